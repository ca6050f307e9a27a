"""quantize.py: the int8 and int4 layers against the error bounds their arithmetic predicts, torch's int4 matmul
against the dequantized weights, a tiny LLaVA's greedy answers quantized, quantizing while loading one weight at a
time, the saved quantized checkpoint, and --quantize in chat.py, eval.py and bench.py."""

import json
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import chat
import eval
import quantize
import tiny_hf
from clip import CLIPVisionConfig
from llama import LlamaConfig
from model import IMAGE_TOKEN_INDEX, Llava, LlavaConfig
from plumbing import checkpoints
from plumbing.checkpoints import CheckpointError, load_llava, save_llava
from plumbing.files import open_image
from plumbing.tokenizer import load_tokenizer
from quantize import Int4Linear, Int8Linear, unpack_int4
from toy import make_toy_world

REPO = Path(__file__).parent.parent


def layer_of(cls, w):
    """A quantized layer holding w, quantized."""
    layer = cls(w.shape[1], w.shape[0])
    layer.load_state_dict(cls.quantize(w), assign=True)
    return layer


def dequantized(layer) -> torch.Tensor:
    """The (N, K) weights a quantized layer's buffers stand for, in fp32 (before its first forward)."""
    if isinstance(layer, Int8Linear):
        return layer.weight.float() * layer.scales.float()[:, None]
    s, z = (t.float().t().repeat_interleave(layer.group_size, dim=1) for t in layer.scales_and_zeros.unbind(-1))
    return (unpack_int4(layer.weight).float() - 8) * s + z


# -----------------------------------------------------------------------------
# the layers


def test_int8_errs_at_most_half_a_step_per_weight_and_per_output():
    """|w - q·s| ≤ s/2 per weight (s = max|w| / 127 of its row, also with the scale stored in bf16), hence
    |y_n - ŷ_n| ≤ (s_n / 2)·Σ_k |x_k| per output, for torch's int8 matmul as for the formula."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    w[3, 7] = 8.0  # an outlier sets its row's step
    w[5] = 0  # a zero row: scale 0, codes 0
    for dtype in (torch.float32, torch.bfloat16):
        buffers = Int8Linear.quantize(w.to(dtype))
        q, s = buffers["weight"], buffers["scales"].float()
        assert q.dtype == torch.int8 and buffers["scales"].dtype == dtype and q.abs().max() == 127
        error = (w.to(dtype).float() - q.float() * s[:, None]).abs()
        assert (error <= s[:, None] / 2 + 1e-7).all()
        assert (q[5] == 0).all() and s[5] == 0
    layer = layer_of(Int8Linear, w)
    x = torch.randn(5, 3, 96)
    y, reference = layer(x), F.linear(x, w)  # (5, 3, 48)
    bound = x.abs().sum(-1, keepdim=True) * layer.scales / 2
    assert ((y - reference).abs() <= bound + 1e-5).all()
    assert (y - reference).abs().max() > 0.01 * bound.max()  # a real error, within the bound
    torch.testing.assert_close(y, F.linear(x, dequantized(layer)), rtol=1e-5, atol=1e-5)  # torch's int8 matmul


@pytest.mark.parametrize("N, K, G", [(32, 256, 128), (16, 352, 32), (64, 64, 64)])  # 352: the toy's MLP width
def test_int4_errs_at_most_half_a_step_per_weight_and_per_output(N, K, G):
    """|w - ŵ| ≤ s/2 per weight with ŵ = (q - 8)·s + z, s = (max - min) / 15 of its group of G columns, also for a
    group far from zero (the zero point), hence |y_n - ŷ_n| ≤ Σ_k |x_k|·s/2 (s of k's group) per output; torch's
    int4 matmul, in the kernel's own layout, gives x·ŵᵀ."""
    torch.manual_seed(0)
    w = torch.randn(N, K)
    w[0, :G] += 5  # a group not centred on 0
    layer = layer_of(Int4Linear, w)
    assert layer.group_size == G and layer.scales_and_zeros.shape == (K // G, N, 2)
    assert layer.weight.shape == (N, K // 2) and layer.weight.dtype == torch.uint8  # two weights per byte
    q = unpack_int4(layer.weight)
    assert q.min() == 0 and q.max() == 15
    s = layer.scales_and_zeros[..., 0].t().repeat_interleave(G, dim=1)  # (N, K): each weight's group's
    weights = dequantized(layer)
    assert ((w - weights).abs() <= s / 2 + 1e-6).all()
    x = torch.randn(4, 3, K)
    y = layer(x)
    assert layer.packed  # the first forward put the weight into the kernel's layout
    torch.testing.assert_close(y, F.linear(x, weights), rtol=1e-5, atol=1e-5)
    bound = torch.einsum("btk,nk->btn", x.abs(), s / 2)
    assert ((y - F.linear(x, w)).abs() <= bound + 1e-5).all()
    assert (y - F.linear(x, w)).abs().max() > 0.01 * bound.max()


def test_quantized_layers_on_the_device_compute_the_weights_they_hold(device):
    """Each layer gives x·ŵᵀ for the weights ŵ its buffers stand for, in fp32 and in bf16 (the CPU kernels' fast
    dtype). Run again on CUDA where there is a GPU, in bf16: int8 as a cast and a matmul, int4 through tinygemm's
    tensor-core kernel and its layout."""
    torch.manual_seed(0)
    for dtype in (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16):
        w, x = torch.randn(64, 256, dtype=dtype), torch.randn(3, 5, 256, dtype=dtype)
        for cls in (Int8Linear, Int4Linear):
            layer = layer_of(cls, w).to(device)
            reference = F.linear(x.float(), dequantized(layer).cpu())
            y = layer(x.to(device))
            assert y.dtype == dtype and y.shape == (3, 5, 64)
            tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(y.float().cpu(), reference, rtol=0, atol=tolerance * reference.abs().max())


def test_int4_bytes_hold_two_codes_each_high_half_first():
    w = torch.cat([torch.arange(16.), torch.arange(15., -1, -1)]).repeat(4)[None].repeat(16, 1) * 0.1  # (16, 128)
    buffers = Int4Linear.quantize(w)  # each group spans 0 .. 1.5: step 0.1, codes = w / 0.1
    assert buffers["weight"][0, :3].tolist() == [0x01, 0x23, 0x45]
    assert buffers["weight"][0, 8:10].tolist() == [0xFE, 0xDC]
    torch.testing.assert_close(buffers["scales_and_zeros"][0, 0], torch.tensor([0.1, 0.8]))  # z: the value of code 8


def test_int4_kernel_is_there_for_the_cpu_and_cuda_from_compute_capability_8(monkeypatch):
    assert quantize.has_int4_kernel(torch.device("cpu")) and not quantize.has_int4_kernel(torch.device("meta"))
    for capability, has in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert quantize.has_int4_kernel(torch.device("cuda")) is has


# -----------------------------------------------------------------------------
# a tiny LLaVA, quantized while loading


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """transformers' tiny random LLaVA (tests/tiny_hf.py) in the llava-hf layout, and 20 prompts with an image each."""
    path = tmp_path_factory.mktemp("tiny") / "llava"
    tiny_hf.hf_llava(seed=0).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(20):
        text = torch.randint(3, tiny_hf.IMAGE_TOKEN, (12,), generator=g).tolist()
        prompts.append([1] + text[:6] + [IMAGE_TOKEN_INDEX] + text[6:])
    return str(path), prompts, torch.randn(20, 3, 32, 32, generator=g)


def test_only_the_llms_linear_layers_are_quantized(tiny):
    path, _, _ = tiny
    for mode, cls in quantize.QUANTIZED.items():
        model = load_llava(path, quantize=mode)
        layer = model.language_model.layers[1]
        assert all(type(m) is cls for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                            layer.mlp.down_proj))
        assert sum(type(m) is cls for m in model.modules()) == 7 * len(model.language_model.layers)
        kept = [model.language_model.lm_head, model.multi_modal_projector.linear_1,
                model.vision_tower.encoder.layers[0].mlp.fc1]
        assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in kept)


def test_tiny_llava_greedy_answers_quantized_agree_with_float(tiny):
    """int8: the whole greedy answer (8 tokens) is the float model's on most prompts, and the next-token logits err
    by about 2 % (relative RMS). int4 errs by about 20 % (a step is (max - min) / 15 of a 64-column group, about 16
    times int8's), enough to part at this random model's near ties (the median top-2 margin is 0.27 standard deviations of
    the logits): its first token is the float model's on more than half of the prompts, and among its top 3 on most.
    docs/quantize.md has the counts."""
    path, prompts, images = tiny
    float_model = load_llava(path)
    reference = float_model.generate(prompts, images, max_new_tokens=8, eos_token_id=-1)
    with torch.no_grad():
        float_logits = float_model(torch.tensor(prompts), images)[:, -1]  # (20, V)
    for mode, whole, first, top3, error in (("int8", 15, 18, 19, 0.03), ("int4", 0, 10, 15, 0.4)):
        model = load_llava(path, quantize=mode)
        answers = model.generate(prompts, images, max_new_tokens=8, eos_token_id=-1)
        with torch.no_grad():
            logits = model(torch.tensor(prompts), images)[:, -1]
        counts = dict(whole=sum(a == b for a, b in zip(answers, reference)),
                      first=sum(a[0] == b[0] for a, b in zip(answers, reference)),
                      top3=sum(a[0] in row for a, row in zip(answers, float_logits.topk(3).indices.tolist())))
        centred = float_logits - float_logits.mean(-1, keepdim=True)
        relative = (logits - float_logits).norm(dim=-1) / centred.norm(dim=-1)  # (20,)
        print(f"{mode}: of 20 prompts, {counts['whole']} whole answers equal to float, {counts['first']} first tokens, "
              f"{counts['top3']} first tokens among float's top 3; logits' relative error at most {relative.max():.3f}")
        assert counts["whole"] >= whole and counts["first"] >= first and counts["top3"] >= top3
        assert 0 < relative.max() <= error


def test_loading_quantizes_each_weight_as_it_is_read_and_keeps_none(tiny, monkeypatch):
    """Peak memory near the quantized size: when a tensor is read, no float weight of an LLM linear layer read
    before it is still alive."""
    path, _, _ = tiny
    real_get, read, alive_at_reads = checkpoints.CheckpointFiles.get, [], []

    def get(self, key):
        alive_at_reads.append(sum(ref() is not None for ref in read))
        tensor = real_get(self, key)
        if key.endswith("proj.weight") and ".layers." in key and "vision" not in key:
            read.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(checkpoints.CheckpointFiles, "get", get)
    load_llava(path, quantize="int4")
    assert len(read) == 14 and max(alive_at_reads) == 0


# -----------------------------------------------------------------------------
# a quantized checkpoint


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_checkpoint_loads_without_the_float_weights_with_the_same_logits(tiny, tmp_path, mode):
    path, prompts, images = tiny
    out = tmp_path / "quantized"
    quantize.main(["--model", path, "--quantize", mode, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["quantize"] == mode and config["torch_dtype"] == "float32"  # the checkpoint's own dtype
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        key = "language_model.model.layers.0.mlp.down_proj.weight"
        assert f.get_tensor(key).dtype == {"int8": torch.int8, "int4": torch.uint8}[mode]
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.float32
    assert (out / "model.safetensors").stat().st_size < 0.7 * (Path(path) / "model.safetensors").stat().st_size
    ids = torch.tensor(prompts[:4])
    with torch.no_grad():
        assert torch.equal(load_llava(str(out))(ids, images[:4]), load_llava(path, quantize=mode)(ids, images[:4]))
        assert torch.equal(load_llava(str(out), quantize=mode)(ids, images[:4]), load_llava(str(out))(ids, images[:4]))
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(CheckpointError, match=f"saved in {mode}; load it as it is"):
        load_llava(str(out), quantize=other)


def test_an_int4_model_that_has_run_is_not_saved(tiny, tmp_path):
    """Its weights are in the kernel's layout then, which on the CPU depends on the instruction set."""
    path, prompts, images = tiny
    model = load_llava(path, quantize="int4")
    save_llava(model, str(tmp_path / "before"))  # before it runs: the plain layout
    model.generate(prompts[:1], images[:1], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="saved before it runs"):
        save_llava(model, str(tmp_path / "after"))
    assert not (tmp_path / "after").exists()


# -----------------------------------------------------------------------------
# the command lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/ as train.py leaves it (a small toy world, a tiny random model with the toy's tokenizer, LATEST)."""
    root = tmp_path_factory.mktemp("runs")
    world = make_toy_world(root / "toy" / "world", n_train_images=6, n_stage1=4, n_stage2=6, n_eval_images=4)
    tokenizer = load_tokenizer(world["tokenizer"])
    torch.manual_seed(0)
    model = Llava(LlavaConfig(vision=CLIPVisionConfig.from_name("tiny"),
                              text=replace(LlamaConfig.from_name("tiny"), vocab_size=tokenizer.get_vocab_size()),
                              image_token_index=tokenizer.token_to_id("<image>")))
    with torch.no_grad():  # larger than the default init: answers that depend on question and image
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model_dir = root / "toy" / "stage2" / "model"
    save_llava(model, str(model_dir))
    (model_dir / "tokenizer.json").write_bytes(Path(world["tokenizer"]).read_bytes())
    (model_dir / "train_config.json").write_text(json.dumps({"template": "vicuna_v1"}))
    (root / "LATEST").write_text(str(model_dir))
    return dict(root=root, world=world, model_dir=model_dir, tokenizer=tokenizer,
                image=str(world["images"] / "eval_00000.png"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_chat_answers_quantized_as_loaded_and_as_saved(runs, tmp_path, capsys, mode):
    """chat.py --quantize answers as a ChatSession on the model load_llava quantizes, and a checkpoint that
    quantize.py wrote (its tokenizer and template copied along) answers the same without --quantize."""
    session = chat.ChatSession(load_llava(str(runs["model_dir"]), quantize=mode), runs["tokenizer"], "vicuna_v1",
                               [open_image(runs["image"])], max_new_tokens=6, temperature=0.0)
    expected = session.ask("What colour is the circle?")
    saved = tmp_path / f"model-{mode}"
    quantize.main(["--model", str(runs["model_dir"]), "--quantize", mode, "--out", str(saved)])
    assert {"tokenizer.json", "train_config.json"} <= {p.name for p in saved.iterdir()}
    capsys.readouterr()
    for model, option in ((runs["model_dir"], ["--quantize", mode]), (saved, [])):
        assert chat.main([runs["image"], "--model", str(model), "-p", "What colour is the circle?", "--temperature",
                          "0", "--max-new-tokens", "6", *option]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_eval_answers_quantized_toy_questions_and_benchmark_files(runs, tmp_path, capsys):
    """`python eval.py --quantize int4` (the toy evaluation, answers in their own file) and `eval.py generate
    --quantize int8`."""
    eval.main(["--runs-dir", str(runs["root"]), "--quantize", "int4", "--max-new-tokens", "3"])
    answers_file = runs["model_dir"].parent / "toy_eval_answers_int4.jsonl"
    assert f"answers in {answers_file}" in capsys.readouterr().out
    questions = [json.loads(line) for line in Path(runs["world"]["eval"]).read_text().splitlines()]
    assert len(answers_file.read_text().splitlines()) == len(questions) == 12
    question_file, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions[:3]))
    eval.main(["generate", "--question-file", str(question_file), "--image-folder", str(runs["world"]["images"]),
               "--answers-file", str(answers), "--model", str(runs["model_dir"]), "--quantize", "int8",
               "--max-new-tokens", "3"])
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == \
        [q["question_id"] for q in questions[:3]]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_decode_step_quantized_gives_the_eager_answers(runs, mode):
    """chat.py --compile: torch.compile traces torch's int8 and int4 matmuls (inductor's code on the CPU)."""
    model = load_llava(str(runs["model_dir"]), quantize=mode)
    answers = []
    for compile in (False, True):
        session = chat.ChatSession(model, runs["tokenizer"], "vicuna_v1", [open_image(runs["image"])],
                                   max_new_tokens=6, temperature=0.0, compile=compile)
        answers.append([session.ask("What colour is the circle?"), session.ask("And the square?")])
    assert answers[0] == answers[1] and all(answers[0])


def test_unknown_quantize_value_or_int4_without_a_kernel_is_a_one_line_usage_error(runs, capsys):
    """argparse's own line for an unknown mode names the known ones; int4 on a device without torch's int4 matmul
    (here "meta") says to use int8. In chat.py, eval.py (both commands), bench.py and quantize.py."""
    no_kernel = (f"--quantize int4: torch {torch.__version__} has no int4 matmul for meta (it has one for the CPU and "
                 "for CUDA GPUs of compute capability 8.0 and up); use --quantize int8")
    unknown = "argument --quantize: invalid choice: 'int3' (choose from 'int8', 'int4')"
    generate = ["generate", "--question-file", "q.jsonl", "--answers-file", "a.jsonl"]
    for run, argv in ((chat.parse_args, [runs["image"]]), (eval.main, []), (eval.main, generate)):
        for option, says in ((["--quantize", "int3"], unknown),
                             (["--quantize", "int4", "--device", "meta"], no_kernel)):
            with pytest.raises(SystemExit) as stop:
                run(argv + option)
            assert stop.value.code == 2
            assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + says)
    for script, option, says in (("bench.py", ["--device", "meta", "--quantize", "int4"], no_kernel),
                                  ("bench.py", ["--quantize", "int3"], unknown),
                                  ("quantize.py", ["--model", "m", "--out", "o", "--quantize", "int3"], unknown)):
        result = subprocess.run([sys.executable, script, *option], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and result.stderr.splitlines()[-1] == f"{script}: error: {says}"


def test_a_checkpoint_saved_in_one_mode_asked_for_the_other_is_one_line(runs, tmp_path):
    result = subprocess.run([sys.executable, "quantize.py", "--model", str(runs["model_dir"]), "--quantize", "int8",
                             "--out", str(tmp_path / "int8")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "chat.py", runs["image"], "--model", str(tmp_path / "int8"), "-p", "Hi",
                             "--quantize", "int4"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "saved in int8; load it as it is (without --quantize int4)" in result.stderr


def test_bench_reports_float_int8_and_int4_side_by_side_and_the_memory_of_loading():
    def bench(*args):
        result = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--device", "cpu", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    # 24 new tokens: enough that decoding them takes measurably longer than one, even on a busy machine
    quantized = bench("--quantize", "int8", "int4", "--skip-training", "--batch", "1", "--new-tokens", "24",
                      "--compile", "false", "--repeats", "1")["quantized"]
    assert list(quantized) == ["float", "int8", "int4"]
    assert quantized["float"]["weight_gb"] > quantized["int8"]["weight_gb"] > quantized["int4"]["weight_gb"]
    assert all(m["decode_b1_tok_s"] > 0 and 0 <= m["greedy_steps_equal_to_float"] <= 24 for m in quantized.values())
    assert quantized["float"]["greedy_steps_equal_to_float"] == 24
    loaded = bench("--load-only", "--quantize", "int4")
    assert loaded["quantize"] == "int4" and loaded["weight_gb"] == quantized["int4"]["weight_gb"]
    assert loaded["peak_rss_gb"] >= loaded["peak_rss_before_loading_gb"] > 0
