"""Speed of our LLaVA-1.5 against transformers' LlavaForConditionalGeneration, same weights, same inputs, one run.

    python bench.py                         # LLaVA-1.5-7B shapes in bf16 on a GPU; the tiny preset on a CPU
    python bench.py --preset tiny --device cpu
    python bench.py --quantize int8 int4    # also our decode with the LLM's linear layers quantized (quantize.py)
    python bench.py --preset llava-v1.5-7b --device cpu --dtype bf16 --load-only --quantize int4   # memory only

Measures, for both sides: time to first token (one image + 48 text tokens = 624 positions at 7B), batch-1 and batch-8
greedy decode tokens/s over --new-tokens, a stage-1 training step (projector trainable, micro-batch 16 × 700
positions) and a stage-2 forward+backward (LLM + projector trainable, micro-batch 8), each with gradient
checkpointing and without, with tokens/s and peak memory (each side's model alone on the GPU while it trains; a setup
that does not fit is reported as out of memory). Prints one JSON object: both sides and ours/theirs ratios (ours alone
where transformers is not installed). Weights are random (nothing is downloaded); greedy tokens are checked to be
equal on both sides, and, with --compile (the default on a GPU), between our eager and compiled decode; where they
part, the step and how near a tie it was are reported (in bf16, correct code parts at near ties: see
first_difference). --compile also compiles our decoder layers for training, as train.py --compile; run once with
--compile false to see what that gives. Each measure prints a progress line to stderr, and --out FILE keeps everything
measured so far in FILE, so that a run cut short still reports (`.ci/gpu` runs it so on a GPU machine).

--quantize adds our batch-1 decode tokens/s and weight memory in float and in each mode, side by side. --load-only
measures nothing but loading: weight memory and the process's peak memory, for one model per process.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import warnings

import torch

from model import IMAGE_TOKEN_INDEX, Llava, LlavaConfig
from plumbing.checkpoints import hf_state_dict, load_weights
from plumbing.cli import DTYPES, check_quantize
from quantize import QUANTIZED


def timed(fn, device, repeats):
    """Median seconds of fn() over repeats runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_tokens_per_s(generate, batch, new_tokens, device, repeats):
    """Greedy decode speed: the tokens after the first over the time after the first. The first token is timed with
    the same cache and compile settings as the whole run, since each setting has its own prefill cost."""
    first = timed(lambda: generate(1), device, repeats)
    total = timed(lambda: generate(new_tokens), device, repeats)
    if total <= first:
        raise ValueError(f"{new_tokens} new tokens took no longer than one: too few to time (--new-tokens)")
    return batch * (new_tokens - 1) / (total - first)


def peak_memory(fn, device):
    """(seconds, peak GiB) of one run of fn after a warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(fn, device, 1)
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def error_text(e: Exception) -> str:
    """A failed measure's line in the results."""
    return "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:200]


def build(preset, device, dtype):
    """Our model with random weights and transformers' copy of exactly the same tensors (None without transformers)."""
    config = LlavaConfig.from_name(preset)
    if preset == "tiny":
        config.image_token_index = config.text.vocab_size - 1  # keep the tiny vocabulary unpadded
    torch.manual_seed(0)
    with torch.device(device):
        ours = Llava(config).to(dtype)
    with torch.no_grad():  # PyTorch's default init leaves RMSNorm at 1 and gives a flat model; shake it a little
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    try:
        import transformers
    except ImportError:
        return ours.eval(), None
    # its deprecation notes and cache hints are about its API, not the measures: keep them out of the progress lines
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    state = hf_state_dict(ours)  # llava-hf file names
    hf_config = transformers.LlavaConfig(**config.to_hf())
    hf_config.text_config.vocab_size = state["language_model.lm_head.weight"].shape[0]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build transformers' model directly in the benchmark dtype
    with torch.device(device):
        theirs = transformers.LlavaForConditionalGeneration(hf_config)
    torch.set_default_dtype(default_dtype)

    def file_name(name):  # transformers 5's in-memory names -> the file names hf_state_dict wrote
        for memory, file in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                             ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                             ("model.vision_tower.", "vision_tower.vision_model."),
                             ("model.multi_modal_projector.", "multi_modal_projector.")):
            if name.startswith(memory):
                return file + name[len(memory):]
        raise KeyError(name)

    theirs.load_state_dict({k: state[file_name(k)] for k in theirs.state_dict()}, strict=True)
    theirs.eval()
    return ours.eval(), theirs


def prompts(config, batch, n_text, seed):
    """`batch` prompts of BOS + n_text-1 text tokens with one image in the middle; ours and transformers' ids."""
    g = torch.Generator().manual_seed(seed)
    ours, theirs = [], []
    for _ in range(batch):
        text = torch.randint(3, min(config.text.vocab_size, 32000) - 1, (n_text - 1,), generator=g).tolist()
        ids = [1] + text[:n_text // 2] + [IMAGE_TOKEN_INDEX] + text[n_text // 2:]
        ours.append(ids)
        theirs.append(sum(([config.image_token_index] * config.num_image_tokens if t == IMAGE_TOKEN_INDEX else [t]
                           for t in ids), []))
    return ours, torch.tensor(theirs)


def first_difference(ours, ids, images, reference, other):
    """Where greedy tokens `other` first part from our eager `reference` (the earliest step over the rows), and how
    close a call that step was: the best logit's margin over the runner-up there, teacher-forced on `reference`, in
    standard deviations of that step's logits. None where the tokens are equal.

    In bf16 every kernel rounds its own way, so two correct implementations keep the same greedy tokens only until
    the first near tie; an error parts them at a clear choice (docs/bench.md has what such margins look like)."""
    parted = [(next((k for k, (a, b) in enumerate(zip(r, o)) if a != b), None), i)
              for i, (r, o) in enumerate(zip(reference, other))]
    parted = [(k, i) for k, i in parted if k is not None]
    if not parted:
        return None
    step, row = min(parted)
    sequence = torch.tensor([ids[row] + reference[row]], device=images.device)
    with torch.inference_mode():  # position t's logits choose token t + 1
        logits = ours(sequence, images[row:row + 1])[0, step - len(reference[row]) - 1]  # (V,)
    best, runner_up = logits.topk(2).values
    return {"step": step, "margin": round(float((best - runner_up) / logits.std()), 4)}


def bench_inference(ours, theirs, args, device, dtype, batch, results, save):
    """Time to first token (at batch 1) and greedy decode tokens/s of both sides at one batch size."""
    config = ours.config
    S = config.vision.image_size
    ids, hf_ids = prompts(config, batch, args.prompt_tokens, seed=batch)
    images = torch.randn(batch, 3, S, S, device=device, dtype=dtype)
    hf_ids, mask = hf_ids.to(device), torch.ones_like(hf_ids, device=device)

    def ours_run(n, compile=False):  # compiled runs keep the KV cache: the next replays the CUDA graph on it
        return ours.generate(ids, images, max_new_tokens=n, eos_token_id=-1, compile=compile, keep_cache=compile)

    def theirs_run(n, cache=None):
        with torch.no_grad():
            return theirs.generate(input_ids=hf_ids, attention_mask=mask, pixel_values=images, max_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation=cache)

    def compare(equal, parted, tokens):  # greedy tokens equal to our eager ones, or where and how they part
        results["ours"][f"{equal}_b{batch}"] = tokens == eager
        if tokens != eager:
            results["ours"][f"{parted}_b{batch}"] = first_difference(ours, ids, images, eager, tokens)

    n, compile = args.new_tokens, args.compile
    eager = ours_run(n)
    if compile:  # the compiled decode step must give the eager path's greedy tokens
        try:
            compare("compiled_equal_to_eager", "compiled_first_difference", ours_run(n, compile=True))
        except Exception as e:  # reported, and the eager decode is timed instead, on a fresh cache
            results["ours"][f"compiled_b{batch}_error"] = error_text(e)
            ours.language_model.clear_cache()
            compile = False
    if batch == 1:
        results["ours"]["ttft_ms"] = 1e3 * timed(lambda: ours_run(1), device, args.repeats)
    results["ours"][f"decode_b{batch}_tok_s"] = decode_tokens_per_s(lambda k: ours_run(k, compile), batch, n, device,
                                                                    args.repeats)
    ours.language_model.clear_cache()
    save(f"ours, batch {batch}")
    if theirs is None:
        return
    compare("greedy_equal_to_transformers", "transformers_first_difference", theirs_run(n)[:, -n:].tolist())
    if batch == 1:
        results["transformers"]["ttft_ms"] = 1e3 * timed(lambda: theirs_run(1), device, args.repeats)
    for name, cache in (("dynamic", None), ("static", "static")):
        try:
            results["transformers"][f"decode_b{batch}_{name}_tok_s"] = decode_tokens_per_s(
                lambda k: theirs_run(k, cache), batch, n, device, args.repeats)
        except Exception as e:  # report, not crash: one side's failure is a result too
            results["transformers"][f"decode_b{batch}_{name}_error"] = error_text(e)
        save(f"transformers, batch {batch}, {name} cache")


def bench_training(ours, theirs, args, device, dtype, results, save):
    """Stage 1 (projector trains, full optimizer step) and stage 2 (LLM + projector, forward + backward)."""
    config = ours.config
    S = config.vision.image_size
    inputs = {}  # stage -> one micro-batch, the same samples for both sides
    for stage, batch in ((1, args.stage1_batch), (2, args.stage2_batch)):
        n_text = args.train_positions - config.num_image_tokens + 1
        ids, hf_ids = prompts(config, batch, n_text, seed=10 + stage)
        ids = torch.tensor(ids, device=device)
        hf_ids = hf_ids.to(device)
        labels, hf_labels = ids.clone(), hf_ids.clone()
        labels[ids == IMAGE_TOKEN_INDEX] = -100
        hf_labels[hf_ids == config.image_token_index] = -100
        images = torch.randn(batch, 3, S, S, device=device, dtype=dtype)
        inputs[stage] = (batch, ids, labels, hf_ids, hf_labels, images)
    for side, model, other in (("ours", ours, theirs), ("transformers", theirs, ours)):
        if model is None:
            continue
        if other is not None:  # the other side's weights wait in host memory, so the peak is this side's alone
            other.to("cpu")
        if side == "ours" and args.compile:  # as train.py --compile
            model.language_model.compile_layers()
        for stage, (batch, ids, labels, hf_ids, hf_labels, images) in inputs.items():
            model.requires_grad_(False)
            if side == "ours":
                projector, llm = model.multi_modal_projector, [model.language_model]  # lm_head is inside
            else:  # transformers 5 keeps lm_head beside its LlamaModel
                projector, llm = model.model.multi_modal_projector, [model.model.language_model, model.lm_head]
            trainable = [p for part in [projector, *(llm if stage == 2 else [])] for p in part.parameters()]
            for p in trainable:
                p.requires_grad_(True)
            results[side][f"stage{stage}_trainable_params"] = sum(p.numel() for p in trainable)
            model.train()
            optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-5, fused=True)

            def step():
                if side == "ours":
                    loss = model(ids, images, labels=labels)
                else:
                    loss = model(input_ids=hf_ids, pixel_values=images, labels=hf_labels).loss
                loss.backward()
                if stage == 1:
                    optimizer.step()
                for p in trainable:
                    p.grad = None

            # with gradient checkpointing, as the official recipe (--gradient_checkpointing True in both stages);
            # then without, which saves the forward's recomputation where memory allows it
            for checkpointing, suffix in ((True, ""), (False, "_no_ckpt")):
                if side == "ours":
                    model.language_model.gradient_checkpointing = checkpointing
                elif checkpointing:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_disable()
                try:
                    seconds, peak = peak_memory(step, device)
                    results[side][f"stage{stage}{suffix}_tok_s"] = batch * args.train_positions / seconds
                    results[side][f"stage{stage}{suffix}_peak_gb"] = peak
                except Exception as e:  # a result too: this setup does not fit the GPU, or failed to compile
                    results[side][f"stage{stage}{suffix}_error"] = error_text(e)
                    for p in trainable:  # a backward cut short may have left some
                        p.grad = None
                save(f"{side}, stage {stage}, checkpointing {'on' if checkpointing else 'off'}")
            model.requires_grad_(False)
            model.eval()
        if side == "ours" and args.compile:  # eager layers again for the decode measured next
            for layer in model.language_model.layers:
                layer._compiled_call_impl = None  # what nn.Module.compile set
        if other is not None:
            other.to(device)


# -----------------------------------------------------------------------------
# quantized: the LLM's linear layers in int8 or int4 (quantize.py)


class Tensors:
    """A checkpoint's stand-in for load_weights: tensors under our own names, each made when it is read (taken from a
    model in memory, or drawn at random, so that random 7B weights never exist whole, as a checkpoint's never do
    while load_llava reads it)."""
    directory = "bench.py's weights"

    def __init__(self, shapes: dict, get):
        self.shapes, self.get = shapes, get

    def keys(self):
        return self.shapes.keys()

    def shape(self, key):
        return self.shapes[key]


def load(config, source, quantize, dtype, device):
    """Our model filled by load_weights as load_llava fills it, quantizing each weight as it is read."""
    with torch.device("meta"):
        model = Llava(config)
    load_weights(model, [source], lambda name: (0, name), dtype, device, quantize=quantize)
    return model.eval()


def weight_gb(model) -> float:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())) / 2**30


def bench_quantized(ours, args, device, dtype, results, save):
    """Weight memory and batch-1 greedy decode tokens/s of our model as it is and in each --quantize mode (the same
    weights, quantized as load_llava quantizes a checkpoint), and for how many steps each one's greedy tokens are
    the float model's (random weights have near ties, where a quantized model may part early)."""
    config, state = ours.config, ours.state_dict()
    source = Tensors({name: tuple(t.shape) for name, t in state.items()}, state.__getitem__)
    ids, _ = prompts(config, 1, args.prompt_tokens, seed=1)
    images = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, device=device, dtype=dtype)
    results["quantized"], reference = {}, None
    for mode in ["float", *args.quantize]:
        model = ours if mode == "float" else load(config, source, mode, dtype, device)
        measured = results["quantized"][mode] = {"weight_gb": weight_gb(model)}

        def run(n):  # compiled runs keep the KV cache, as in bench_inference
            return model.generate(ids, images, max_new_tokens=n, eos_token_id=-1, compile=args.compile,
                                  keep_cache=args.compile)

        tokens = run(args.new_tokens)[0]
        reference = reference or tokens
        measured["greedy_steps_equal_to_float"] = next(
            (step for step, (a, b) in enumerate(zip(reference, tokens)) if a != b), len(tokens))
        measured["decode_b1_tok_s"] = decode_tokens_per_s(run, 1, args.new_tokens, device, args.repeats)
        model.language_model.clear_cache()
        save(f"{mode} decode")


def load_only(args, device, dtype) -> dict:
    """The memory it takes to load our model (--preset) from a checkpoint, quantized as --quantize says, measured
    without one: its tensors are drawn at random as load_weights reads them, one at a time. Then an 8-token prompt
    is answered, which puts int4 weights into the kernel's layout. What 7B needs, measurable on a CPU."""
    config = LlavaConfig.from_name(args.preset)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Llava(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    # in fp16, as llava-v1.5-7b's files hold them
    source = Tensors(shapes, lambda name: torch.randn(shapes[name], generator=generator, dtype=torch.float16) * 0.02)
    import resource  # Unix only, as this measure
    # the most memory the process has held (kilobytes on Linux, bytes on macOS)
    peak_rss_gb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                                 else 1024) / 2**30
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "quantize": args.quantize[0] if args.quantize else None,
              "peak_rss_before_loading_gb": peak_rss_gb()}
    started = time.time()
    model = load(config, source, result["quantize"], dtype, device)
    result.update(load_s=time.time() - started, weight_gb=weight_gb(model), peak_rss_loading_gb=peak_rss_gb())
    model.generate([list(range(1, 9))], max_new_tokens=2)
    result["peak_rss_gb"] = peak_rss_gb()
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def with_ratios(results, args):
    """The results and the ours/theirs ratios; a ratio is None where a side has no figure (it ran out of memory,
    failed, or was not measured yet)."""
    if "transformers" not in results:
        return results
    o, t = results["ours"], results["transformers"]
    ratio = lambda a, b: a / b if a and b else None
    best = lambda b: max((v for k, v in t.items() if k.startswith(f"decode_b{b}_") and k.endswith("tok_s")), default=None)
    ratios = {"ttft (theirs/ours, >1 = faster)": ratio(t.get("ttft_ms"), o.get("ttft_ms"))}
    for batch in sorted({1, args.batch}):
        ratios[f"decode_b{batch} (ours/theirs best)"] = ratio(o.get(f"decode_b{batch}_tok_s"), best(batch))
    if not args.skip_training:
        for stage in (1, 2):
            ratios[f"stage{stage} tok/s (ours/theirs)"] = ratio(o.get(f"stage{stage}_tok_s"), t.get(f"stage{stage}_tok_s"))
            ratios[f"stage{stage} tok/s without checkpointing (ours/theirs)"] = \
                ratio(o.get(f"stage{stage}_no_ckpt_tok_s"), t.get(f"stage{stage}_no_ckpt_tok_s"))
            # what training can reach: checkpointing only where it pays, at no more peak memory than theirs with it
            ratios[f"stage{stage} tok/s (ours without checkpointing/theirs with)"] = \
                ratio(o.get(f"stage{stage}_no_ckpt_tok_s"), t.get(f"stage{stage}_tok_s"))
    return dict(results, ratios=ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="llava-v1.5-7b (default on a GPU) or tiny (default on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="text tokens around the image")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (32 on a CPU)")
    parser.add_argument("--batch", type=int, default=8, help="the second decode batch size")
    parser.add_argument("--train-positions", type=int, default=None, help="default 700 (128 on a CPU)")
    parser.add_argument("--stage1-batch", type=int, default=None, help="default 16 (4 on a CPU)")
    parser.add_argument("--stage2-batch", type=int, default=None, help="default 8 (4 on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measure, after a warm-up "
                        "(the median is reported; default 3)")
    parser.add_argument("--compile", nargs="?", const="true", choices=("true", "false"), default=None,
                        help="compile our decode step, and our decoder layers in training (default: on a GPU)")
    parser.add_argument("--skip-training", action="store_true", help="measure only generation")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON object here, rewritten after each measure "
                        "with everything measured so far (progress goes to stderr)")
    parser.add_argument("--quantize", nargs="+", default=[], choices=QUANTIZED, metavar="MODE",
                        help="int8 and/or int4: also measure our batch-1 decode and weight memory with the LLM's "
                             "linear layers quantized (quantize.py), beside the float model's")
    parser.add_argument("--load-only", action="store_true",
                        help="only load our model, quantized with --quantize (one mode), from random weights drawn "
                             "one tensor at a time, answer 8 tokens, and report weight memory and the process's peak "
                             "memory: what --preset llava-v1.5-7b needs, also on a CPU (--dtype bf16: a GPU's sizes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        for mode in args.quantize:
            check_quantize(mode, device)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.load_only and len(args.quantize) > 1:
        parser.error("--load-only measures one model per process: give one --quantize mode (or none, for float)")
    cuda = device.type == "cuda"
    args.preset = args.preset or ("llava-v1.5-7b" if cuda else "tiny")
    args.compile = cuda if args.compile is None else args.compile == "true"
    for name, gpu, cpu in (("new_tokens", 256, 32), ("train_positions", 700, 128), ("stage1_batch", 16, 4),
                           ("stage2_batch", 8, 4)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    dtype = (torch.bfloat16 if cuda else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]
    if args.load_only:
        print(json.dumps(load_only(args, device, dtype), indent=2))
        return
    started = time.time()
    ours, theirs = build(args.preset, device, dtype)
    print(f"bench.py: {args.preset} built, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
               "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
               "compiled": args.compile, "ours": {}}
    if theirs is not None:
        import transformers
        results.update(transformers_version=transformers.__version__, transformers={})

    def save(measured):
        """After each measure: a progress line, and with --out the results so far in that file, so that a run cut
        short (by a time limit, say) keeps what it measured."""
        print(f"bench.py: {measured} measured ({time.time() - started:.0f} s since the start)", file=sys.stderr,
              flush=True)
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump(with_ratios(results, args), f, indent=2)
            os.replace(args.out + ".tmp", args.out)

    # the headline measures first (batch-1 decode, time to first token, training), then the batch-8 decode: a run
    # cut short by its time limit loses the least (each new batch size compiles both sides' decode again)
    bench_inference(ours, theirs, args, device, dtype, 1, results, save)
    if args.quantize:
        bench_quantized(ours, args, device, dtype, results, save)
    if not args.skip_training:
        bench_training(ours, theirs, args, device, dtype, results, save)
    if args.batch != 1:
        bench_inference(ours, theirs, args, device, dtype, args.batch, results, save)
    print(json.dumps(with_ratios(results, args), indent=2))


if __name__ == "__main__":
    main()
