"""bench.py on the tiny preset, as a user runs it: one JSON object, both sides, equal greedy tokens. The decode step
is compiled as on a GPU (torch.compile, fullgraph; on the CPU, code from inductor instead of CUDA graphs), so that
the compiled path is proved to give the eager path's tokens. Run again on CUDA, in bf16, where there is a GPU."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_tiny_and_matches_transformers(device):
    out = subprocess.run([sys.executable, "bench.py", "--device", device, "--preset", "tiny", "--new-tokens", "8",
                          "--batch", "2", "--train-positions", "40", "--stage1-batch", "2", "--stage2-batch", "2",
                          "--repeats", "1", "--compile", "true"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["preset"] == "tiny"
    if device == "cpu":
        assert result["device"] == "cpu" and result["dtype"] == "float32"
    else:  # bf16, and the compiled decode step replayed as CUDA graphs
        assert result["dtype"] == "bfloat16"
        for side in (result["ours"], result["transformers"]):
            assert side["stage1_peak_gb"] > 0 and side["stage2_peak_gb"] > 0
    assert result["compiled"] is True
    ours, theirs = result["ours"], result["transformers"]
    for batch in (1, 2):  # same weights, same prompts: the same greedy tokens as transformers' generate
        assert ours[f"greedy_equal_to_transformers_b{batch}"] is True
        assert ours[f"compiled_equal_to_eager_b{batch}"] is True
    for side in (ours, theirs):
        for key in ("ttft_ms", "stage1_tok_s", "stage2_tok_s"):
            assert math.isfinite(side[key]) and side[key] > 0, key
    assert math.isfinite(ours["decode_b1_tok_s"]) and math.isfinite(theirs["decode_b1_dynamic_tok_s"])
    assert set(result["ratios"]) == {"ttft (theirs/ours, >1 = faster)", "decode_b1 (ours/theirs best)",
                                     "decode_b2 (ours/theirs best)", "stage1 tok/s (ours/theirs)",
                                     "stage2 tok/s (ours/theirs)"}
