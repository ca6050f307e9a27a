"""bench.py on the tiny preset, as a user runs it: one JSON object, both sides, equal greedy tokens. The decode step
is compiled as on a GPU (torch.compile, fullgraph; on the CPU, code from inductor instead of CUDA graphs), so that
the compiled path is proved to give the eager path's tokens. Run again on CUDA, in bf16, where there is a GPU."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
    out = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--batch", "2", "--train-positions", "40",
                          "--stage1-batch", "2", "--stage2-batch", "2", "--repeats", "3", *map(str, args)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def assert_same_greedy_tokens(ours, exactly):
    """Equal to our eager decode's, or (where bf16 rounds each side its own way) until a near tie at most: see
    bench.first_difference."""
    for batch in (1, 2):
        for equal, parted in (("greedy_equal_to_transformers", "transformers_first_difference"),
                              ("compiled_equal_to_eager", "compiled_first_difference")):
            assert ours[f"{equal}_b{batch}"] or (not exactly and ours[f"{parted}_b{batch}"]["margin"] < 0.1), ours


def test_bench_runs_tiny_and_matches_transformers(device, tmp_path):
    out = run_bench("--device", device, "--new-tokens", 16, "--compile", "true", "--out", tmp_path / "bench.json")
    result = json.loads(out.stdout)
    assert json.loads((tmp_path / "bench.json").read_text()) == result  # --out's last rewrite is the whole result
    assert "bench.py: transformers, stage 2, checkpointing off measured" in out.stderr  # progress, measure by measure
    assert result["preset"] == "tiny"
    if device == "cpu":
        assert result["device"] == "cpu" and result["dtype"] == "float32"
    else:  # bf16, and the compiled decode step replayed as CUDA graphs
        assert result["dtype"] == "bfloat16"
        for side in (result["ours"], result["transformers"]):
            for stage in (1, 2):  # recomputing the forward in backward holds fewer activations
                assert 0 < side[f"stage{stage}_peak_gb"] < side[f"stage{stage}_no_ckpt_peak_gb"]
    assert result["compiled"] is True
    ours, theirs = result["ours"], result["transformers"]
    # same weights, same prompts: the same greedy tokens as transformers' generate, compiled or not
    assert_same_greedy_tokens(ours, exactly=device == "cpu")  # fp32 on the CPU, bf16 on CUDA
    for side in (ours, theirs):
        for key in ("ttft_ms", "stage1_tok_s", "stage2_tok_s", "stage1_no_ckpt_tok_s", "stage2_no_ckpt_tok_s"):
            assert math.isfinite(side[key]) and side[key] > 0, key
    assert math.isfinite(ours["decode_b1_tok_s"]) and math.isfinite(theirs["decode_b1_dynamic_tok_s"])
    for stage in (1, 2):  # both sides train the same weights: the projector, then also the LLM with its lm_head
        assert ours[f"stage{stage}_trainable_params"] == theirs[f"stage{stage}_trainable_params"] > 0
    assert ours["stage2_trainable_params"] > ours["stage1_trainable_params"]
    assert set(result["ratios"]) == {"ttft (theirs/ours, >1 = faster)", "decode_b1 (ours/theirs best)",
                                     "decode_b2 (ours/theirs best)", "stage1 tok/s (ours/theirs)",
                                     "stage2 tok/s (ours/theirs)", "stage1 tok/s without checkpointing (ours/theirs)",
                                     "stage2 tok/s without checkpointing (ours/theirs)",
                                     "stage1 tok/s (ours without checkpointing/theirs with)",
                                     "stage2 tok/s (ours without checkpointing/theirs with)"}
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())


def test_bench_in_bf16_on_the_cpu():
    """The GPU's dtype where CI can run it: both models built in bf16, greedy tokens compared as on a GPU."""
    result = json.loads(run_bench("--device", "cpu", "--dtype", "bf16", "--new-tokens", 16, "--compile", "true",
                                  "--skip-training").stdout)
    assert result["dtype"] == "bfloat16" and set(result) >= {"ours", "transformers", "ratios"}
    assert_same_greedy_tokens(result["ours"], exactly=False)
    assert result["ours"]["decode_b1_tok_s"] > 0 and result["transformers"]["decode_b2_static_tok_s"] > 0


def test_a_training_setup_that_runs_out_of_memory_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    """Without checkpointing, 7B training may not fit the GPU: that setup is reported, not a crash, and its ratios
    are null while the others are still measured."""
    import torch

    import bench
    calls = []

    def out_of_memory_without_checkpointing(fn, device):
        calls.append(fn)
        if len(calls) % 2 == 0:  # each stage runs with checkpointing, then without
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1.0, None

    monkeypatch.setattr(bench, "peak_memory", out_of_memory_without_checkpointing)
    # decode speed is not what this test is about, and 4 tokens timed once are too few to time on a busy machine
    monkeypatch.setattr(bench, "decode_tokens_per_s", lambda *args: 1.0)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--preset", "tiny", "--new-tokens", "4",
                                      "--batch", "2", "--train-positions", "40", "--repeats", "1", "--compile", "false"])
    bench.main()
    result = json.loads(capsys.readouterr().out)
    assert len(calls) == 8  # 2 sides × 2 stages × with and without checkpointing
    for side in (result["ours"], result["transformers"]):
        for stage in (1, 2):
            assert side[f"stage{stage}_no_ckpt_error"] == "out of memory"
            assert f"stage{stage}_no_ckpt_tok_s" not in side and side[f"stage{stage}_tok_s"] > 0
    ratios = result["ratios"]
    assert ratios["stage1 tok/s (ours without checkpointing/theirs with)"] is None
    assert ratios["stage1 tok/s without checkpointing (ours/theirs)"] is None
    assert ratios["stage2 tok/s (ours/theirs)"] == 1.0  # both sides took the same (faked) time


def test_a_run_cut_short_keeps_what_it_measured_in_its_out_file(monkeypatch, tmp_path):
    """A GPU lease's time limit may stop bench.py mid-run: --out holds every measure taken before, with its ratios."""
    import bench
    measure = bench.bench_inference

    def killed_at_the_second_batch_size(*args):
        if args[5] != 1:  # the batch size: training was measured in between
            raise SystemExit("killed")
        measure(*args)

    monkeypatch.setattr(bench, "bench_inference", killed_at_the_second_batch_size)
    # 4 tokens timed once are too few to time on a busy machine: what is kept, not the speed, is what this test is about
    monkeypatch.setattr(bench, "decode_tokens_per_s", lambda *args: 1.0)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--preset", "tiny", "--new-tokens", "4",
                                      "--batch", "2", "--repeats", "1", "--compile", "false",
                                      "--out", str(tmp_path / "bench.json")])
    with pytest.raises(SystemExit):
        bench.main()
    result = json.loads((tmp_path / "bench.json").read_text())
    for side in (result["ours"], result["transformers"]):
        assert side["ttft_ms"] > 0 and side["stage2_no_ckpt_tok_s"] > 0
        assert not any(key.startswith("decode_b2") for key in side)
    assert result["ours"]["decode_b1_tok_s"] > 0 and result["transformers"]["decode_b1_static_tok_s"] > 0
    assert result["ratios"]["decode_b1 (ours/theirs best)"] > 0 and result["ratios"]["stage1 tok/s (ours/theirs)"] > 0
    assert result["ratios"]["decode_b2 (ours/theirs best)"] is None  # not measured
    assert not (tmp_path / "bench.json.tmp").exists()


def test_a_compile_that_fails_is_reported_and_the_eager_path_is_timed(monkeypatch, capsys):
    """torch.compile fails when first called, as inductor or a CUDA graph may on a new machine: the decode is timed
    eagerly with the error beside it, the training setups of compiled layers report it, and the run goes on."""
    import torch

    import bench

    def compile_that_fails(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("inductor failed")
        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    # 4 tokens timed once are too few to time on a busy machine, and the eager path is timed all the same
    monkeypatch.setattr(bench, "decode_tokens_per_s", lambda *args: 1.0)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--preset", "tiny", "--new-tokens", "4",
                                      "--batch", "2", "--train-positions", "40", "--repeats", "1", "--compile", "true"])
    bench.main()
    result = json.loads(capsys.readouterr().out)
    ours = result["ours"]
    for batch in (1, 2):
        assert ours[f"compiled_b{batch}_error"] == "RuntimeError: inductor failed"
        assert ours[f"decode_b{batch}_tok_s"] > 0 and ours[f"greedy_equal_to_transformers_b{batch}"] is True
    for stage in (1, 2):  # our compiled layers fail; transformers' eager ones still train
        assert ours[f"stage{stage}_error"] == "RuntimeError: inductor failed"
        assert result["transformers"][f"stage{stage}_tok_s"] > 0
        assert result["ratios"][f"stage{stage} tok/s (ours/theirs)"] is None


def test_first_difference_finds_the_earliest_parting_and_its_margin():
    """The step where two greedy runs part, and the margin of our choice there, from one teacher-forced forward."""
    import torch

    import bench
    ours, _ = bench.build("tiny", torch.device("cpu"), torch.float32)
    ids, _ = bench.prompts(ours.config, 2, 12, seed=0)
    images = torch.randn(2, 3, 32, 32)
    eager = ours.generate(ids, images, max_new_tokens=8, eos_token_id=-1)
    assert bench.first_difference(ours, ids, images, eager, [row[:] for row in eager]) is None
    other = [row[:] for row in eager]
    other[0][5] += 1
    other[1][3] += 1  # the earlier parting, in the second row
    found = bench.first_difference(ours, ids, images, eager, other)
    assert found["step"] == 3
    with torch.inference_mode():
        logits = ours(torch.tensor([ids[1] + eager[1]]), images[1:])[0]  # (L, V)
    at_step = logits[-8 - 1 + 3]
    assert int(at_step.argmax()) == eager[1][3]  # teacher-forced, fp32: the position that chose that token
    best, runner_up = at_step.topk(2).values
    assert found["margin"] == pytest.approx(float((best - runner_up) / at_step.std()), abs=1e-4) and found["margin"] > 0


def test_decode_speed_counts_only_the_tokens_after_the_first_with_the_same_settings(monkeypatch):
    """A decode's tokens/s leaves out its own first token: transformers' static cache prefills at another cost than
    its dynamic one (slower in some versions, faster in others), so subtracting another setting's first-token time
    gave wrong rates, negative with transformers 5.17 on the CPU."""
    import torch

    import bench
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def generate_with(prefill_s, per_token_s):
        def generate(new_tokens):  # the first token comes with the prefill
            clock[0] += prefill_s + per_token_s * (new_tokens - 1)
        return generate

    cpu = torch.device("cpu")
    for prefill_s in (0.5, 0.001):
        assert bench.decode_tokens_per_s(generate_with(prefill_s, 0.01), 8, 33, cpu, 3) == pytest.approx(800)
    with pytest.raises(ValueError, match="too few to time"):
        bench.decode_tokens_per_s(generate_with(0.5, 0.0), 1, 4, cpu, 3)
