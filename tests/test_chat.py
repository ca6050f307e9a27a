"""chat.py on tiny checkpoints made here: driven as a user drives it (a subprocess), and its ChatSession in-process
where the test must see inside (which positions each turn prefills).

The tiny models are random, but only whole-word tokens ("▁red", "▁circle") and EOS can win the greedy argmax: the
lm_head rows of every other token are zero, so their logits (0) lose to the best word's. The answers then read as
words and tokenize back to the ids that were generated, so a test can say exactly what a turn has to prefill.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers

import chat
import tiny_hf
from clip import CLIPVisionConfig, preprocess_image
from data import CONV_TEMPLATES, render, tokenize_prompt
from llama import LlamaConfig
from model import IMAGE_TOKEN_INDEX, Llava, LlavaConfig
from plumbing.checkpoints import choose_template, load_llava, save_llava
from plumbing.files import open_image
from plumbing.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q1, Q2 = "What colour is the circle?", "And the background?"
MAX_NEW = 8


def only_words_win(lm_head_weight, tokenizer):
    keep = torch.zeros(len(lm_head_weight), dtype=torch.bool)
    keep[[i for piece, i in tokenizer.get_vocab().items() if piece[0] == "▁" and piece[1:].isalpha()]] = True
    keep[2] = True  # EOS
    with torch.no_grad():
        lm_head_weight[~keep] = 0


@pytest.fixture(scope="module")
def tokenizer(toy_world):
    return load_tokenizer(toy_world["root"])


@pytest.fixture(scope="module")
def images(toy_world):
    return [str(toy_world["images"] / f"train_0000{i}.png") for i in range(2)]


@pytest.fixture(scope="module")
def ours(toy_world, tokenizer, images, tmp_path_factory):
    """A tiny random checkpoint of ours (llava-hf layout + tokenizer + train_config.json of a stage-2 run), and the
    model as chat.py loads it. The first seed whose model tells the tests' images and turns apart is taken (a
    random model often says the same thing whatever it is shown, and the tests could not see a mix-up)."""
    text = dataclasses.replace(LlamaConfig.from_name("tiny"), vocab_size=tokenizer.get_vocab_size())
    for seed in range(200):
        torch.manual_seed(seed)
        model = Llava(LlavaConfig(vision=CLIPVisionConfig.from_name("tiny"), text=text,
                                  image_token_index=tokenizer.token_to_id("<image>")))
        only_words_win(model.language_model.lm_head.weight, tokenizer)
        answers = {(tuple(ims), tuple(qs)): reference_answers(model, tokenizer, ims, qs)
                   for ims, qs in ((images[:1], [Q1, Q2]), (images, [Q1, Q2]), (images[::-1], [Q1]),
                                   (images[1:], [Q1]))}
        first_answers = [a[0] for a in answers.values()]
        if (all(x for a in answers.values() for x in a) and all(len(set(a)) == len(a) for a in answers.values())
                and len(set(first_answers)) == len(first_answers)):
            break
    else:
        raise AssertionError("no seed in 200 gives a model whose answers differ")
    path = tmp_path_factory.mktemp("ours") / "model"
    save_llava(model, path)
    shutil.copy(toy_world["tokenizer"], path)
    (path / "train_config.json").write_text(json.dumps({"stage": 2, "template": "vicuna_v1"}))
    return str(path), load_llava(str(path))


def pixels(model, paths):
    config = model.config
    return torch.stack([preprocess_image(open_image(p), config.vision.image_size, config.image_aspect_ratio)
                        for p in paths]).to(model.language_model.embed_tokens.weight.device)


def reference_answers(model, tokenizer, image_paths, questions, template="vicuna_v1"):
    """Greedy answers, each generated from scratch (no cache kept) over the whole conversation so far."""
    messages, answers = [], []
    for question in questions:
        messages.append((0, "<image>\n" * len(image_paths) + question if not messages else question))
        ids = tokenize_prompt(tokenizer, render(CONV_TEMPLATES[template], messages + [(1, None)]))
        new = model.generate([ids], pixels(model, image_paths), MAX_NEW, temperature=0.0)[0]
        answers.append(tokenizer.decode(new).strip())
        messages.append((1, answers[-1]))
    return answers


def start_chat(*args, script=os.path.join(REPO, "chat.py")):
    """chat.py in a subprocess. Start several before waiting on any: each spends seconds importing torch."""
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))  # for a chat.py copied elsewhere


def finish(process, stdin=""):
    stdout, stderr = process.communicate(stdin, timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_chat(*args, stdin="", script=os.path.join(REPO, "chat.py")):
    return finish(start_chat(*args, script=script), stdin)


def assert_one_line_error(result, *names):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(str(name) in result.stderr for name in names), result.stderr
    assert result.stdout == ""


LONG_QUESTION = "Is there a red circle or a blue square? " * 40  # more than the tiny model's 256 positions

# -----------------------------------------------------------------------------
# scripted (-p)


def test_scripted_answers_equal_from_scratch_generation(ours, tokenizer, images):
    path, model = ours
    answers = reference_answers(model, tokenizer, images, [Q1, Q2])
    result = run_chat(*images, "--model", path, "-p", Q1, "-p", Q2, "--temperature", 0, "--max-new-tokens", MAX_NEW)
    assert result.returncode == 0, result.stderr
    assert result.stdout == answers[0] + "\n" + answers[1] + "\n"  # only the answers
    # the images must go in in command-line order, which the check above sees: swapped, the answer changes
    assert reference_answers(model, tokenizer, images[::-1], [Q1])[0] != answers[0]


def test_compiled_decode_step_gives_the_same_answers(ours, tokenizer, images, monkeypatch):
    """--compile: the decode step through torch.compile (inductor's code on the CPU, CUDA graphs on a GPU), also
    across a second turn that continues the kept cache."""
    path, model = ours
    answers = reference_answers(model, tokenizer, images, [Q1, Q2])
    result = run_chat(*images, "--model", path, "-p", Q1, "-p", Q2, "--temperature", 0, "--max-new-tokens", MAX_NEW,
                      "--compile")
    assert result.returncode == 0, result.stderr
    assert result.stdout == answers[0] + "\n" + answers[1] + "\n"
    compiled = []  # in-process, to see that the decode step really went through torch.compile
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real_compile(fn, **kw))
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(i) for i in images], MAX_NEW,
                               temperature=0.0, compile=True)
    assert [session.ask(Q1), session.ask(Q2)] == answers and len(compiled) == 2


def test_bf16_answers_equal_from_scratch_bf16_generation(ours, tokenizer, images, device):
    """`--dtype bf16` (a GPU's training dtype), also run on the CPU: the weights and the KV cache kept across turns
    are bf16, and the answers are the ones a bf16 model gives recomputing each turn from scratch."""
    path, _ = ours
    model = load_llava(path, dtype=torch.bfloat16, device=device)
    answers = reference_answers(model, tokenizer, images, [Q1, Q2])
    result = run_chat(*images, "--model", path, "-p", Q1, "-p", Q2, "--temperature", 0, "--max-new-tokens", MAX_NEW,
                      "--dtype", "bf16", "--device", device)
    assert result.returncode == 0, result.stderr
    assert result.stdout == answers[0] + "\n" + answers[1] + "\n"
    assert chat.parse_args([*images, "--dtype", "bf16", "--device", device]).dtype == torch.bfloat16


def test_default_dtype_is_the_official_clis(images, monkeypatch):
    """fp16 on a GPU, as llava/serve/cli.py loads the model (and as eval.py answers); fp32 on the CPU."""
    assert chat.parse_args([*images, "--device", "cpu"]).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, as far as parse_args can tell
    assert chat.parse_args([*images, "--device", "cuda"]).dtype == torch.float16


def test_second_turn_prefills_only_the_new_tokens(ours, tokenizer, images, monkeypatch):
    _, model = ours
    lm = model.language_model
    forwards = []  # (first cache slot written, positions) of every LLM forward

    def counting_forward(embeds, position_ids=None, mask=None, input_pos=None):
        forwards.append((int(input_pos[0]), embeds.shape[1]))
        return type(lm).forward(lm, embeds, position_ids, mask, input_pos)

    monkeypatch.setattr(lm, "forward", counting_forward)
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[0])], MAX_NEW, temperature=0.0)
    answer1 = session.ask(Q1)
    turn1, forwards[:] = list(forwards), []
    answer2 = session.ask(Q2)
    (start, prefill), decode = forwards[0], forwards[1:]

    conv = CONV_TEMPLATES["vicuna_v1"]
    prompt1 = tokenize_prompt(tokenizer, render(conv, [(0, "<image>\n" + Q1), (1, None)]))
    n_image = model.config.num_image_tokens
    assert turn1[0] == (0, len(prompt1) - 1 + n_image)  # turn 1: the whole prompt, image widened
    assert all(n == 1 for _, n in turn1[1:] + decode)  # then one token per step
    # turn 2 continues at the slot after the last one turn 1 wrote ...
    assert start == turn1[-1][0] + 1
    # ... with "</s>USER: Q2 ASSISTANT:" and at most the answer's last token (generation never feeds that one back)
    new_text = len(tokenize_prompt(tokenizer, "</s>USER: " + Q2 + " ASSISTANT:")) - 1  # without BOS
    assert prefill in (new_text, new_text + 1)
    full2 = tokenize_prompt(tokenizer, render(conv, [(0, "<image>\n" + Q1), (1, answer1), (0, Q2), (1, None)]))
    assert start + prefill == len(full2) - 1 + n_image
    assert [answer1, answer2] == reference_answers(model, tokenizer, images[:1], [Q1, Q2])


def test_answers_stream_piece_by_piece_as_they_are_generated(ours, tokenizer, images, monkeypatch):
    """stream(piece) gets the answer while it is generated, each piece once: together they are the answer."""
    _, model = ours
    pieces, steps = [], []  # steps: how many pieces had arrived at each decode step
    decode_step = model.language_model.decode_step
    monkeypatch.setattr(model.language_model, "decode_step", lambda *a: steps.append(len(pieces)) or decode_step(*a))
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[0])], MAX_NEW, temperature=0.0)
    answer = session.ask(Q1, stream=pieces.append)
    assert answer == reference_answers(model, tokenizer, images[:1], [Q1])[0]
    assert "".join(pieces).strip() == answer and len(pieces) > 1
    assert steps[0] == 1 and steps == sorted(steps) and len(set(steps)) > 1  # they came out step by step


def test_sampling_is_reproducible_with_a_seed(ours, tokenizer, images):
    _, model = ours

    def sampled(seed):
        session = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[0])], MAX_NEW, temperature=1.0,
                                   seed=seed)
        return [session.ask(Q1), session.ask(Q2)]

    assert sampled(0) == sampled(0) != sampled(1)


def test_an_answer_that_runs_into_the_end_of_the_context_is_flagged(ours, tokenizer, images, monkeypatch):
    """The answer gets what is left of the context; stopping there (not at EOS or --max-new-tokens) is said."""
    _, model = ours
    monkeypatch.setattr(model.config.text, "eos_token_id", -1)  # no EOS: the answers run as long as allowed
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[0])], 40, temperature=0.0)
    limit = model.config.text.max_position_embeddings
    question = Q1
    while True:  # a question that leaves the answer fewer than 40 positions
        ids = tokenize_prompt(tokenizer, render(CONV_TEMPLATES["vicuna_v1"], [(0, "<image>\n" + question), (1, None)]))
        if limit - session.positions(ids) < 40:
            break
        question = "red " + question
    left = limit - session.positions(ids)
    session.ask(question)
    assert session.cached_ids[:len(ids)] == ids  # the prompt as computed here
    assert session.cut_short and len(session.cached_ids) - len(ids) + 1 == left  # + the last token, never fed back
    session.reset()
    session.ask(Q1)  # 40 tokens, as --max-new-tokens says: not cut short
    assert not session.cut_short


# -----------------------------------------------------------------------------
# interactive


def test_interactive_chat_with_commands(ours, tokenizer, images, tmp_path):
    path, model = ours
    a1, a2 = reference_answers(model, tokenizer, images[:1], [Q1, Q2])
    [b1] = reference_answers(model, tokenizer, images[1:], [Q1])
    gone = tmp_path / "gone.png"
    stdin = "\n".join([Q1, LONG_QUESTION, Q2, f"/image {images[1]}", Q1, f"/image {gone}", "/reset", Q1, "/quit",
                       "never asked"]) + "\n"
    result = run_chat(images[0], "--model", path, "--temperature", 0, "--max-new-tokens", MAX_NEW, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # a question that does not fit is refused and leaves the conversation as it was; /image starts a new
    # conversation about the new image; a failed /image changes nothing; /reset starts over
    assert re.findall(r"ASSISTANT: (.*)", result.stdout) == [a1, a2, b1, b1]
    assert re.search(r"^USER: context full \(\d+ of 256 positions\): /reset to start over$", result.stdout, re.M)
    assert "(new conversation about 1 image(s))" in result.stdout
    assert f"{gone}: image file not found" in result.stdout
    assert "(new conversation)" in result.stdout


def test_end_of_input_and_ctrl_c_end_quietly(ours, tokenizer, images):
    path, model = ours
    until_eof = start_chat(images[0], "--model", path, "--temperature", 0, "--max-new-tokens", MAX_NEW)
    interrupted = start_chat(images[0], "--model", path)
    for line in interrupted.stderr:  # wait until the chat is ready for input
        if line.startswith("commands:"):
            break
    interrupted.send_signal(signal.SIGINT)
    interrupted = finish(interrupted)
    assert interrupted.returncode == 130  # the shell's status for Ctrl-C
    assert "Traceback" not in interrupted.stderr

    until_eof = finish(until_eof, Q1 + "\n")  # then the end of input, as Ctrl-D
    assert until_eof.returncode == 0, until_eof.stderr
    assert "Traceback" not in until_eof.stderr
    assert re.findall(r"ASSISTANT: (.*)", until_eof.stdout) == reference_answers(model, tokenizer, images[:1], [Q1])


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2


def test_bad_input_is_one_line_and_exit_code_2(ours, images, tmp_path):
    path, _ = ours
    missing, text = tmp_path / "missing.jpg", tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    nowhere, no_config, damaged = tmp_path / "nowhere", tmp_path / "no_config", tmp_path / "damaged"
    no_config.mkdir()
    shutil.copytree(path, damaged)
    (damaged / "model.safetensors").write_bytes(b"truncated")
    config_only = tmp_path / "config_only"  # the tokenizer is looked for before the weights' minutes of loading
    config_only.mkdir()
    shutil.copy(os.path.join(path, "config.json"), config_only)
    runs = {  # all at once; what each must say
        (missing, "not found"): start_chat(images[0], missing, "--model", path, "-p", Q1),
        (text, "cannot read the image"): start_chat(text, "--model", path, "-p", Q1),
        ("https://example.com/cat.jpg", "a URL; chat.py reads image files (download it first)"):
            start_chat("https://example.com/cat.jpg", "--model", path, "-p", Q1),
        (nowhere, "no such model directory"): start_chat(images[0], "--model", nowhere, "-p", Q1),
        (no_config, "no config.json"): start_chat(images[0], "--model", no_config, "-p", Q1),
        (damaged, damaged): start_chat(images[0], "--model", damaged, "-p", Q1),
        (config_only, "no tokenizer.json or tokenizer.model"): start_chat(images[0], "--model", config_only, "-p", Q1),
        ("context full (", " of 256 positions)"): start_chat(images[0], "--model", path, "-p", LONG_QUESTION),
    }
    for names, process in runs.items():
        assert_one_line_error(finish(process), *names)


@pytest.mark.parametrize("option, says", [(["--top-p", "0"], "--top-p 0.0: must be above 0 and at most 1"),
                                          (["--top-p", "1.5"], "--top-p 1.5: must be above 0 and at most 1"),
                                          (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
                                          (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                                          (["--compile", "true"], "'true' is not an image: --compile takes no value")])
def test_out_of_range_settings_and_a_value_for_compile_are_usage_errors(option, says, capsys):
    """Not read as something else: a negative temperature would be greedy, top-p 0 would keep no token, and a value
    for --compile would be an image."""
    from chat import parse_args
    with pytest.raises(SystemExit) as stop:
        parse_args([*option, "photo.jpg"])
    assert stop.value.code == 2
    assert says in capsys.readouterr().err


def test_default_model_is_the_latest_trained_one(ours, tokenizer, images, tmp_path):
    path, model = ours
    for folder in ("untrained", "trained"):  # copies of chat.py, each with its own runs/
        (tmp_path / folder).mkdir()
        shutil.copy(os.path.join(REPO, "chat.py"), tmp_path / folder)
    (tmp_path / "trained" / "runs").mkdir()
    (tmp_path / "trained" / "runs" / "LATEST").write_text(path + "\n")  # as train.py writes it
    untrained = start_chat(images[0], "-p", Q1, script=tmp_path / "untrained" / "chat.py")
    trained = start_chat(images[0], "-p", Q1, "--temperature", 0, "--max-new-tokens", MAX_NEW, "--conv-mode",
                         "llava_v1", script=tmp_path / "trained" / "chat.py")

    assert_one_line_error(finish(untrained), "train one with `python train.py --stage 1`")
    trained = finish(trained)
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout == reference_answers(model, tokenizer, images[:1], [Q1], "llava_v1")[0] + "\n"
    assert "automatic template is vicuna_v1; using llava_v1" in trained.stderr  # an override is pointed out


# -----------------------------------------------------------------------------
# templates and transformers


def test_template_follows_the_model(tmp_path):
    snapshot = "snapshots/4481d270cc22fd5c4d1bb5df129622006ccd9234"  # a Hugging Face cache's layout
    for name, files, template in [("ours1", {"train_config.json": {"template": "plain"}}, "vicuna_v1"),  # stage 1
                                  ("ours2", {"train_config.json": {"template": "vicuna_v1"}}, "vicuna_v1"),
                                  ("llava-v1.5-7b", {}, "llava_v1"),  # official CLI: "v1" in the name
                                  ("llava-1.5-7b-hf", {}, "llava_v1"),  # llava-hf's name for it
                                  ("llava-v1.6-mistral-7b", {}, "mistral_instruct"),
                                  (f"models--liuhaotian--llava-v1.5-7b/{snapshot}", {}, "llava_v1"),
                                  (f"models--llava-hf--llava-1.5-7b-hf/{snapshot}", {}, "llava_v1"),
                                  ("models/original", {"config.json": {"mm_projector_type": "mlp2x_gelu"}}, "llava_v1"),
                                  ("models/hf", {"config.json": {"model_type": "llava", "text_config": {}}},
                                   "llava_v1"),
                                  # LLaVA-Plus's release: original layout, linear projector, served in llava_v0
                                  ("llava_plus_v0_7b", {"config.json": {"model_type": "llava",
                                                                        "mm_vision_tower": "openai/clip"}}, "llava_v0"),
                                  ("models/lightning", {"config.json": {"mm_projector_type": "linear"}}, "llava_v0")]:
        (tmp_path / name).mkdir(parents=True)
        for file, content in files.items():
            (tmp_path / name / file).write_text(json.dumps(content))
        assert choose_template(str(tmp_path / name)) == template, name


def test_same_answer_as_transformers_on_a_llava_hf_checkpoint(toy_world, tokenizer, images, tmp_path):
    text = dict(tiny_hf.LLAMA, vocab_size=tokenizer.get_vocab_size())
    image_token = tokenizer.token_to_id("<image>")
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**tiny_hf.CLIP).to_dict(),
                                      text_config=transformers.LlamaConfig(**text).to_dict(),
                                      image_token_index=image_token)
    hf = tiny_hf.randomize(lambda: transformers.LlavaForConditionalGeneration(config), seed=2)
    only_words_win(hf.lm_head.weight, tokenizer)
    path = tmp_path / "llava-1.5-tiny-hf"  # a llava-hf name: the llava_v1 template
    hf.save_pretrained(path)
    shutil.copy(toy_world["tokenizer"], path)

    ids = tokenize_prompt(tokenizer, render(CONV_TEMPLATES["llava_v1"], [(0, "<image>\n" + Q1), (1, None)]))
    expanded = [t for i in ids for t in ([image_token] * tiny_hf.N_IMAGE_TOKENS if i == IMAGE_TOKEN_INDEX else [i])]
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded), dtype=int),
                          pixel_values=preprocess_image(open_image(images[0]), 32, "pad")[None],
                          max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = out[0, len(expanded):].tolist()
    answer = tokenizer.decode(new[:new.index(2)] if 2 in new else new).strip()
    assert answer

    result = run_chat(images[0], "--model", path, "-p", Q1, "--temperature", 0, "--max-new-tokens", MAX_NEW)
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer + "\n"
