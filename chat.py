"""Chat with a LLaVA-1.5 model about images in the terminal (official llava/serve/cli.py).

    python chat.py photo.jpg                                   # the model train.py wrote last (runs/LATEST)
    python chat.py photo.jpg --model llava-v1.5-7b --vision-tower clip-vit-large-patch14-336  # original layout
    python chat.py photo.jpg --model llava-1.5-7b-hf            # llava-hf layout
    python chat.py photo.jpg --model llava-v1.5-7b-lora --model-base vicuna-7b-v1.5 \\
        --vision-tower clip-vit-large-patch14-336               # an official LoRA, merged into its base
    python chat.py a.png b.png -p "What differs?" -p "Which is darker?" --temperature 0   # scripted
    python chat.py --serve                  # the same chat in a browser, each tab a conversation (plumbing/serve.py)

Interactive: each answer streams as it is generated. Commands: /image PATH [PATH ...] starts a new conversation
about other images (as the official CLI, a conversation is about the images it started with); /reset starts over
with the same images; /quit or Ctrl-D ends (exit 0); Ctrl-C ends at once (exit 130). Scripted (-p, repeatable): one
turn per -p, only the answers on stdout, one after another.

As official, the first turn is "<image>\\n" + question (one per image, in command-line order), an answer enters the
history as its decoded text, and generation stops at EOS. The template is the one the official CLI picks from the
model's name (our models: the one they were trained with; --conv-mode overrides it).

The KV cache lives across turns: each turn renders the whole conversation with the template, but only the tokens
after the longest prefix already in the cache are prefilled, normally the end of the last answer and the new question.
"""

import argparse
import contextlib
import os
import shlex
import sys
from functools import partial

import torch

with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
    import readline  # noqa: F401

import tools
from clip import preprocess_image
from data import CONV_TEMPLATES, render, tokenize_prompt
from model import IMAGE_MARKER, IMAGE_TOKEN_INDEX
from plumbing.checkpoints import CheckpointError, latest_model, load_for_inference
from plumbing.cli import DTYPES, check_quantize, check_sampling, positive_int, resolve_device, resolve_dtype
from plumbing.files import DataError, open_local_image
from plumbing.serve import serve
from quantize import QUANTIZED
from toy import TOY_TOOLS

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")  # train.py writes runs/LATEST
COMMANDS = "commands: /image PATH [PATH ...] (a new conversation about other images), /reset, /quit"

# -----------------------------------------------------------------------------
# the conversation


class ContextFull(Exception):
    def __init__(self, needed: int, limit: int):
        super().__init__(f"context full ({needed} of {limit} positions)")


class ChatSession:
    """One conversation about some images, with the model's KV cache kept between turns."""

    def __init__(self, model, tokenizer, template: str, images: list, max_new_tokens=512, temperature=0.2,
                 top_p=1.0, seed=None, compile=False):
        self.model, self.tokenizer, self.conv = model, tokenizer, CONV_TEMPLATES[template]
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.compile = compile  # the decode step through torch.compile (see Llava.generate)
        self.device = model.language_model.embed_tokens.weight.device
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.cache = None  # this conversation's KV cache, one per layer, made by its first answer
        self.reset(images)

    def reset(self, images=None):
        """Start a new conversation, about new PIL images if given."""
        if images is not None:
            config, size = self.model.config, self.model.config.vision.image_size
            self.images = images  # PIL, for the tools
            pixels = [preprocess_image(image, size, config.image_aspect_ratio) for image in images]
            pixels = torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)  # (I, 3, S, S)
            self.pixels = pixels.to(self.device)
        self.messages = []  # [(0 user | 1 assistant, text)]
        self.cached_ids = []  # the ids whose keys and values are in the KV cache, in order
        self.cut_short = False  # whether the last answer ran into the end of the context

    def positions(self, ids: list) -> int:
        """LLM positions of ids: each image placeholder stands for num_image_tokens positions."""
        return len(ids) + (self.model.config.num_image_tokens - 1) * ids.count(IMAGE_TOKEN_INDEX)

    def ask(self, question: str, stream=None, should_stop=None) -> str:
        """Answer the next question; stream(text) gets each new piece as it is generated; should_stop() ends it."""
        question = question.replace(IMAGE_MARKER, "").strip()  # images come only from files, one marker each
        if not self.messages:
            question = (IMAGE_MARKER + "\n") * len(self.pixels) + question
        messages = self.messages + [(0, question), (1, None)]
        ids = tokenize_prompt(self.tokenizer, render(self.conv, messages))
        needed, limit = self.positions(ids), self.model.config.text.max_position_embeddings
        if needed >= limit:
            raise ContextFull(needed, limit)

        # reuse the longest cached prefix; at least the last token is prefilled, for the logits of the first answer
        # token. Text after an answer may tokenize differently than it was generated, hence a prefix, not a count.
        reuse = 0
        while reuse < min(len(ids) - 1, len(self.cached_ids)) and ids[reuse] == self.cached_ids[reuse]:
            reuse += 1
        sampled, shown = [], ""
        stop = self.conv.sep if self.conv.style == "single" else None  # llava_v0 ends an answer with "###", not EOS

        def on_token(token):  # token (1,)
            nonlocal shown
            sampled.append(int(token[0]))
            if stream is None and stop is None and should_stop is None:
                return
            text = self.tokenizer.decode(sampled)  # the whole answer so far: "▁" and byte pieces decode right
            if (stop is not None and stop in text) or (should_stop is not None and should_stop()):
                return torch.ones(1, dtype=torch.bool, device=token.device)
            if stream is not None and not text.endswith("\ufffd"):  # not while a UTF-8 character is incomplete
                stream(text[len(shown):])
                shown = text

        # its own cache, made once, as long as the context (2 GiB for a 7B model in fp16): --serve keeps several
        layers = self.model.language_model.layers
        for layer, cache in zip(layers, self.cache or [None] * len(layers)):
            layer.self_attn.kv_cache = cache
        self.cached_ids = self.cached_ids[:reuse]  # all that stays valid should generation fail midway
        self.model.generate([ids[reuse:]], self.pixels[ids[:reuse].count(IMAGE_TOKEN_INDEX):],
                            max_new_tokens=min(self.max_new_tokens, limit - needed), temperature=self.temperature,
                            top_p=self.top_p, eos_token_id=self.model.config.text.eos_token_id, on_token=on_token,
                            generator=self.generator, cache_start=self.positions(ids[:reuse]), cache_size=limit,
                            keep_cache=True, compile=self.compile)
        self.cache = [layer.self_attn.kv_cache for layer in layers]
        # the last sampled token (EOS, or the last of max_new_tokens) is never fed back, so it is not in the cache
        self.cached_ids = ids + sampled[:-1]
        # stopped by the context's end, not by EOS or --max-new-tokens: the CLI says so
        self.cut_short = (len(sampled) == limit - needed < self.max_new_tokens
                          and sampled[-1] != self.model.config.text.eos_token_id)
        answer = self.tokenizer.decode(sampled).split(stop)[0] if stop else self.tokenizer.decode(sampled)
        if stream is not None and answer != shown:
            stream(answer[len(shown):])
        answer = answer.strip().replace(IMAGE_MARKER, "")
        self.messages = messages[:-1] + [(1, answer)]
        return answer


# -----------------------------------------------------------------------------
# the command line


def ask_with_tools(session: ChatSession, question: str, use_tools, show_thoughts=False) -> str:
    """LLaVA-Plus's final value (use_tools: tools.answer); stderr: the steps (show_thoughts), problems, boxes saved."""
    image = session.images[0] if session.images else None
    steps = use_tools(session.ask, image, question)
    for step in steps:
        if show_thoughts:
            print(tools.show(step), file=sys.stderr)
        if step.problem:
            print(f"chat.py: {step.problem}", file=sys.stderr)
        if step.result and step.result.get("boxes") and image is not None:
            path = tools.save_boxes(image, step.result, os.path.join(RUNS, "chat"))
            print(f"chat.py: {step.tool}'s boxes drawn on the image: {path}", file=sys.stderr)
    return steps[-1].value


def interactive(session: ChatSession, with_tools=None):
    """Read questions and commands until /quit or the end of input; stream each answer (with tools: the final one)."""
    print(COMMANDS, file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:  # Ctrl-D
            print()
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            print("(new conversation)")
            continue
        if command == "/image":
            try:
                images = [open_local_image(path) for path in shlex.split(rest)]  # quotes allow spaces in paths
            except (DataError, ValueError) as e:  # ValueError: unbalanced quotes
                print(e)
                continue
            if images:
                session.reset(images)
            print(f"(new conversation about {len(images)} image(s))" if images else "usage: /image PATH [PATH ...]")
            continue
        if command.startswith("/"):
            print(f"unknown command {command}; {COMMANDS}")
            continue
        labelled = False

        def stream(piece):  # the label goes out with the first token, so that "context full" stands alone
            nonlocal labelled
            print(piece if labelled else "ASSISTANT: " + piece, end="", flush=True)
            labelled = True

        try:
            if with_tools is None:
                session.ask(line, stream)
                print()
            else:  # the first answer is the model's plan, not for the user: no streaming
                print("ASSISTANT: " + with_tools(session, line))
            if session.cut_short:
                print(f"(cut short: the context's {session.model.config.text.max_position_embeddings} positions are "
                      "full; /reset to start over)")
        except ContextFull as e:
            print(f"{e}: /reset to start over")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image file(s), in the order the first turn shows them")
    p.add_argument("--model", metavar="DIR", help="ours, llava-hf or original LLaVA layout (default: runs/LATEST's)")
    p.add_argument("--vision-tower", metavar="DIR", help="CLIP for an original-layout model (default: its config's)")
    p.add_argument("--model-base", metavar="DIR", help="what a LoRA --model was trained from, merged into it")
    p.add_argument("-p", "--prompt", action="append", metavar="QUESTION", help="print only its answer; repeatable")
    p.add_argument("--conv-mode", choices=sorted(CONV_TEMPLATES), help="template (default: see above)")
    p.add_argument("--temperature", type=float, default=0.2, metavar="T", help="0 = greedy (default 0.2, as official)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="per answer (default 512)")
    p.add_argument("--seed", type=int, metavar="N", help="makes sampling reproducible")
    p.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile; a GPU: CUDA graphs)")
    p.add_argument("--tools", action="store_true", help="LLaVA-Plus: the model may call the toy's detect and measure")
    p.add_argument("--tool-server", metavar="URL", help="LLaVA-Plus: the controller of the official tool workers")
    p.add_argument("--show-thoughts", action="store_true", help="with tools: show thoughts, actions and tool results")
    p.add_argument("--max-tool-rounds", type=int, default=1, metavar="N", help="with tools: per question (default 1)")
    p.add_argument("--serve", action="store_true", help="serve the chat page instead (no IMAGE: the page uploads)")
    p.add_argument("--host", default="127.0.0.1", help="with --serve (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="with --serve (default 8000; 0: any free one)")
    p.add_argument("--max-conversations", type=positive_int, default=4, metavar="N", help="with --serve (default 4)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: fp16 on cuda, fp32 on cpu")
    p.add_argument("--quantize", choices=QUANTIZED, help="the LLM's linear layers, as they load (quantize.py)")
    args = p.parse_args(argv)
    flag_values = [image for image in args.images if image.lower() in ("true", "false") and not os.path.exists(image)]
    if flag_values:  # train.py and bench.py take `--compile true`; here a value would be read as an image
        p.error(f"{flag_values[0]!r} is not an image: --compile takes no value here (give it alone)")
    if args.serve == bool(args.images) or (args.serve and args.prompt):  # the page uploads images and asks
        p.error("--serve takes no IMAGE nor -p" if args.serve else "give the IMAGE file(s) (or --serve: the chat page)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    try:
        check_sampling(args.temperature, args.top_p)
        args.device = resolve_device(args.device)
        check_quantize(args.quantize, args.device)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.dtype = resolve_dtype(args.dtype, args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        images = [open_local_image(path) for path in args.images]  # before the model, which may take minutes
        model_dir = args.model or latest_model(RUNS)
        model, tokenizer, template = load_for_inference(model_dir, args.vision_tower, args.dtype, args.device,
                                                        quantize=args.quantize, model_base=args.model_base)
    except (DataError, CheckpointError, FileNotFoundError) as e:  # each names the image or model at fault
        print(f"chat.py: {e}", file=sys.stderr)
        return 2
    if args.conv_mode and args.conv_mode != template:  # as official: say so
        print(f"chat.py: the automatic template is {template}; using {args.conv_mode} (--conv-mode)", file=sys.stderr)
    template = args.conv_mode or template
    about = (f"{model_dir} ({template} template, {args.device}, {str(args.dtype).removeprefix('torch.')})"
             + ("; --compile: the first answer waits for the compiler" if args.compile else ""))
    new_session = partial(ChatSession, model, tokenizer, template, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, compile=args.compile)
    use_tools = (args.tools or args.tool_server) and partial(  # LLaVA-Plus's loop, with its skills
        tools.answer, skills=TOY_TOOLS if args.tools else {}, max_rounds=args.max_tool_rounds,
        server=args.tool_server and tools.ToolServer(args.tool_server))
    if args.serve:
        return serve(new_session, use_tools, args.host, args.port, args.max_conversations, about)
    session = new_session(images)
    with_tools = use_tools and partial(ask_with_tools, use_tools=use_tools, show_thoughts=args.show_thoughts)
    if not args.prompt:
        print(about, file=sys.stderr)
        interactive(session, with_tools)
        return 0
    for question in args.prompt:
        try:
            print(session.ask(question) if with_tools is None else with_tools(session, question), flush=True)
            if session.cut_short:
                print(f"chat.py: that answer was cut short at the end of the context "
                      f"({model.config.text.max_position_embeddings} positions)", file=sys.stderr)
        except ContextFull as e:
            print(f"chat.py: {e}; ask less or use fewer images", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: end quietly, with the shell's usual status for it
        print(file=sys.stderr)
        sys.exit(130)
