"""train.py end to end on a small toy world: DDP and FSDP equivalence, exact resume after kill -9, frozen parts,
bad samples.

Each run is a real `python train.py` subprocess. OMP_NUM_THREADS=1 keeps CPU arithmetic identical from run to run
(bitwise resume) and stops two DDP ranks from fighting over the cores.
"""

import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clip import CLIPVisionConfig
from data import LazySupervisedDataset, collate
from model import Llava, LlavaConfig
from plumbing.checkpoints import load_clip, load_llama, load_llava
from plumbing.runs import peak_flops
from plumbing.tokenizer import load_tokenizer
from toy import (PLACE, SHAPES, ContrastiveCLIP, contrastive_loss, make_toy_world, swap_positions, swap_shapes,
                 token_wise_similarity)
from plumbing.runs import flops_per_token, llm_positions
from train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE_WORDS = "|".join(SHAPES)
pytestmark = pytest.mark.slow
# train.py refuses FSDP on the CPU below torch 2.9 (its main says why)
needs_cpu_fsdp = pytest.mark.skipif(torch.__version__ < "2.9", reason="FSDP on the CPU (gloo) needs torch >= 2.9")


def env():
    """Read at each run, not at import: conftest hides a GPU from all but the tests that take `device`."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(runs, *args, check=True, background=False):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--runs-dir", str(runs), *map(str, args)]
    if background:
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def torchrun(runs, *args, ranks=2):
    """train.py on `ranks` ranks of one machine (gloo on the CPU, NCCL on GPUs)."""
    with socket.socket() as s:  # a free port: a fixed one may still be held by an earlier run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
           os.path.join(REPO, "train.py"), "--runs-dir", str(runs), *map(str, args)]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small toy world and stage-0 bases made by train.py itself (tiny step counts)."""
    runs = tmp_path_factory.mktemp("runs")
    make_toy_world(runs / "toy" / "world", n_train_images=64, n_stage1=128, n_stage2=96, n_eval_images=8)
    out = train(runs, "--stage", 0, "--lm-steps", 20, "--clip-steps", 4)
    assert "stage 0" in out.stdout + out.stderr
    assert os.path.exists(runs / "toy" / "base" / "llm" / "tokenizer.json")
    return runs


@pytest.fixture(scope="module")
def stage1_model(runs, tmp_path_factory):
    """A one-step stage-1 output: the projector stage 2 starts from."""
    out = tmp_path_factory.mktemp("s1")
    train(runs, "--stage", 1, "--out-dir", out, "--global-batch", 8, "--micro-batch", 8, "--max-steps", 1)
    return out / "model"


def trainable(out_dir, step):
    return load_file(os.path.join(out_dir, f"checkpoint-{step}", "trainable.safetensors"))


def assert_same_log(run_a, run_b, steps):
    """Both runs logged every step with the same loss and pre-clip gradient norm. AdamW hides a wrongly scaled
    gradient in the weights; these two do not."""
    logs = [[json.loads(line) for line in open(run / "log.jsonl")] for run in (run_a, run_b)]
    assert len(logs[0]) == len(logs[1]) == steps
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_stage1_trains_only_the_projector_and_the_loss_falls(runs, tmp_path):
    out = tmp_path / "s1"
    args = ["--stage", 1, "--global-batch", 8, "--micro-batch", 8, "--lr", 3e-3, "--warmup-ratio", 0]
    train(runs, *args, "--out-dir", out, "--epochs", 1)  # 128 samples: 16 steps
    model = load_llava(str(out / "model"))
    base_llm, base_clip = load_llama(str(runs / "toy" / "base" / "llm")), load_clip(str(runs / "toy" / "base" / "clip"))
    for ours, base in ((model.language_model, base_llm), (model.vision_tower, base_clip)):
        for (name, p), (_, q) in zip(ours.state_dict().items(), base.state_dict().items()):
            assert torch.equal(p, q), name  # frozen: bit-identical
    assert set(trainable(out, 16)) == {n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector")}
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * losses[0], losses
    assert open(runs / "LATEST").read().strip() == str(out / "model")
    config = json.load(open(out / "model" / "train_config.json"))
    assert config["template"] == "plain" and config["stage"] == 1
    # LATEST (what chat.py and eval.py use) names finished runs: not a smoke test's, nor a finished run resumed
    smoke = train(runs, *args, "--out-dir", tmp_path / "smoke", "--max-steps", 1)
    assert "LATEST unchanged, as --max-steps stopped the run at step 1 of 48" in smoke.stdout
    assert os.path.exists(tmp_path / "smoke" / "model" / "model.safetensors")
    stamp = os.stat(out / "model" / "model.safetensors").st_mtime_ns
    (runs / "LATEST").write_text("elsewhere\n")
    again = train(runs, *args, "--out-dir", out, "--epochs", 1, "--resume", "true")
    assert "nothing left to train" in again.stdout and open(runs / "LATEST").read() == "elsewhere\n"
    assert os.stat(out / "model" / "model.safetensors").st_mtime_ns == stamp
    (runs / "LATEST").write_text(str(out / "model") + "\n")


def test_logged_tokens_are_the_positions_the_llm_runs(runs, tmp_path):
    """tokens/s and MFU count what the LLM computes: each image's num_image_tokens positions, not its one placeholder
    (in stage 1 an image is most of a sample). One step over all 128 stage-1 samples of the world: the log's tokens
    equal the length of their spliced rows, also when the rows are packed."""
    out = tmp_path / "s1"
    train(runs, "--stage", 1, "--out-dir", out, "--global-batch", 128, "--micro-batch", 32, "--max-steps", 1)
    record, = [json.loads(line) for line in open(out / "log.jsonl")]
    cfg = json.load(open(out / "model" / "train_config.json"))
    model = load_llava(str(out / "model"))
    N = model.config.num_image_tokens
    dataset = LazySupervisedDataset(cfg["data"], cfg["image_folder"], load_tokenizer(cfg["llm"]), cfg["template"],
                                    image_size=model.config.vision.image_size, max_len=cfg["max_len"],
                                    image_aspect_ratio=cfg["image_aspect_ratio"], image_tokens=N)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == 128 and all(len(s["images"]) == 1 for s in samples)
    batch = collate(samples)
    _, _, valid, *_ = model.splice(batch["input_ids"], batch["images"], batch["attention_mask"])
    assert record["tokens"] == int(valid.sum()) == int(batch["attention_mask"].sum()) + 128 * (N - 1)
    assert llm_positions(collate(samples, pack=True, image_tokens=N), N) == record["tokens"]
    # the rest of the record: the step's learning rate (the schedule's first: 0), its rate, nothing skipped
    assert record["step"] == 1 and record["lr"] == 0.0 and record["skipped"] == 0
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["tokens_per_s"] > 0


def test_two_process_ddp_matches_one_process(runs, tmp_path):
    common = ["--stage", 1, "--global-batch", 8, "--max-steps", 3, "--save-every", 100]
    train(runs, *common, "--out-dir", tmp_path / "one", "--micro-batch", 4)  # 1 rank × 2 micro-steps × 4
    out = torchrun(runs, *common, "--out-dir", tmp_path / "two", "--micro-batch", 2)  # 2 ranks × 2 micro-steps × 2
    assert "2 ranks × 2 micro-steps × 2" in out.stdout + out.stderr
    one, two = trainable(tmp_path / "one", 3), trainable(tmp_path / "two", 3)
    assert one.keys() == two.keys()
    for name in one:  # the same up to the order of float additions in the gradient all-reduce
        assert (one[name] - two[name]).abs().max() < 1e-5, name
    assert_same_log(tmp_path / "one", tmp_path / "two", 3)


@needs_cpu_fsdp
def test_two_process_fsdp_matches_one_process_and_resumes(runs, stage1_model, tmp_path):
    """Stage 2 (the LLM trains) sharded over 2 ranks with FSDP2 reaches what one plain process reaches, writes the
    checkpoint layout one process writes (so either engine can resume it), resumes exactly, and saves a model."""
    # lr below the toy's 2e-3: Adam's step lr·g/(|g| + eps) turns float-order noise in a near-zero gradient into a
    # difference of up to ~lr/100 on a few elements (at 2e-3: 1.5e-5 here, 7e-6 for 2-process DDP)
    common = ["--stage", 2, "--projector", stage1_model, "--global-batch", 8, "--max-steps", 4,
              "--save-every", 2, "--lr", 2e-4]
    fsdp = [*common, "--micro-batch", 2, "--fsdp", "true"]  # 2 ranks × 2 micro-steps × 2
    train(runs, *common, "--out-dir", tmp_path / "one", "--micro-batch", 4)  # 1 rank × 2 micro-steps × 4
    out = torchrun(runs, *fsdp, "--out-dir", tmp_path / "fsdp")
    assert "2 ranks × 2 micro-steps × 2" in out.stdout + out.stderr
    one, two = trainable(tmp_path / "one", 4), trainable(tmp_path / "fsdp", 4)
    assert one.keys() == two.keys() and any(k.startswith("language_model.layers.") for k in one)
    for name in one:  # the same up to the order of float additions (2-process DDP differs as much)
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), name
    assert_same_log(tmp_path / "one", tmp_path / "fsdp", 4)
    optimizers = [torch.load(tmp_path / run / "checkpoint-4" / "optimizer.pt") for run in ("one", "fsdp")]
    assert optimizers[0]["param_groups"] == optimizers[1]["param_groups"]  # the same layout, indexed alike
    assert optimizers[0]["state"].keys() == optimizers[1]["state"].keys()
    for index, state in optimizers[0]["state"].items():  # each index holds the same parameter's moments
        for moment in ("exp_avg", "exp_avg_sq"):
            theirs = optimizers[1]["state"][index][moment]
            assert torch.allclose(state[moment], theirs, rtol=1e-3, atol=1e-9), (index, moment)

    model = load_llava(str(tmp_path / "fsdp" / "model"))  # gathered from the shards
    state = model.state_dict()
    for name, tensor in two.items():
        assert torch.equal(state[name], tensor), name
    base_clip = load_clip(str(runs / "toy" / "base" / "clip"))
    for (name, p), q in zip(model.vision_tower.state_dict().items(), base_clip.state_dict().values()):
        assert torch.equal(p, q), name  # frozen

    torchrun(runs, *fsdp, "--out-dir", tmp_path / "resumed", "--max-steps", 2)  # the schedule still counts all steps
    shutil.copytree(tmp_path / "resumed", tmp_path / "resumed_by_one")
    out = torchrun(runs, *fsdp, "--out-dir", tmp_path / "resumed", "--resume", "true")
    assert "checkpoint-2 at step 2" in out.stdout + out.stderr  # resumed, not trained again from the start
    resumed = trainable(tmp_path / "resumed", 4)
    for name in two:
        assert torch.equal(two[name], resumed[name]), name  # bitwise
    # the other engine: one plain process resumes FSDP's checkpoint and ends where the plain run ended
    out = train(runs, *common, "--out-dir", tmp_path / "resumed_by_one", "--micro-batch", 4, "--resume", "true")
    assert "checkpoint-2 at step 2" in out.stdout + out.stderr
    resumed = trainable(tmp_path / "resumed_by_one", 4)
    for name in one:
        assert torch.allclose(one[name], resumed[name], rtol=0, atol=1e-5), name


def test_one_rank_under_torchrun_trains_in_bf16_as_one_process_with_ddp_and_fsdp(runs, stage1_model, tmp_path,
                                                                                   device):
    """The GPU recipe's engines in its precision on a one-GPU machine: torchrun starts one NCCL rank (DDP, then FSDP2),
    and it trains stage 2 in bf16 as one plain process does on the GPU, logging MFU and peak memory. The same with
    one gloo rank on the CPU. The 2-rank equivalences are the fp32 gloo tests above; a second NCCL rank would need a
    second GPU."""
    if device == "cpu" and needs_cpu_fsdp.args[0]:  # the mark's own condition and reason, for the CPU run alone
        pytest.skip(needs_cpu_fsdp.kwargs["reason"])
    common = ["--stage", 2, "--projector", stage1_model, "--global-batch", 8, "--micro-batch", 4, "--max-steps", 4,
              "--save-every", 100, "--lr", 2e-4, "--device", device, "--dtype", "bf16"]  # lr: see the FSDP test
    train(runs, *common, "--out-dir", tmp_path / "one")
    for engine, options in (("ddp", []), ("fsdp", ["--fsdp", "true"])):
        out = torchrun(runs, *common, "--out-dir", tmp_path / engine, *options, ranks=1)
        assert "1 rank × 2 micro-steps × 4" in out.stdout + out.stderr
        logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", engine)]
        assert len(logs[0]) == len(logs[1]) == 4
        # bf16 compute: the same up to its rounding (FSDP casts the weights once per step, autocast at each use). On
        # the CPU (2026-12-04) DDP's run was bitwise the plain one, FSDP's losses and grad norms within 0.08 %, and
        # 99.8 % of its weights within the tolerance below
        for plain, launched in zip(*logs):
            assert launched["loss"] == pytest.approx(plain["loss"], rel=1e-2)
            assert launched["grad_norm"] == pytest.approx(plain["grad_norm"], rel=3e-2)
            if device == "cuda":
                assert launched["peak_mem_gb"] > 0
                if peak_flops(torch.cuda.get_device_name()):
                    assert 0 < launched["mfu"] < 1
        one, other = trainable(tmp_path / "one", 4), trainable(tmp_path / engine, 4)
        assert one.keys() == other.keys() and any(k.startswith("language_model.layers.") for k in one)
        # Adam moves a weight by about lr a step whatever its gradient's size, so a near-zero gradient's rounding
        # can move a few weights apart by that much; almost all must stay within a tenth of it
        close = [torch.isclose(one[name], other[name], rtol=0, atol=2e-4 * 4 / 10) for name in one]
        assert sum(c.sum() for c in close) >= 0.99 * sum(c.numel() for c in close), engine
        model = load_llava(str(tmp_path / engine / "model"))
        assert torch.equal(model.state_dict()["multi_modal_projector.linear_1.weight"],
                           other["multi_modal_projector.linear_1.weight"])


def test_packed_or_length_sorted_micro_steps_train_as_one_micro_batch(runs, stage1_model, tmp_path):
    """--pack changes the rows a micro-batch is cut into, and micro-steps of 8 (sorted by length, see
    ModalityLengthGroupedSampler) change how the global batch is split, not the training: the same weights, loss
    and grad norm as one plain micro-batch of 32."""
    common = ["--stage", 2, "--projector", stage1_model, "--global-batch", 32, "--max-steps", 3,
              "--save-every", 100, "--lr", 2e-4]  # lr: see the FSDP test
    train(runs, *common, "--out-dir", tmp_path / "plain", "--micro-batch", 32)
    train(runs, *common, "--out-dir", tmp_path / "packed", "--micro-batch", 32, "--pack", "true")
    out = train(runs, *common, "--out-dir", tmp_path / "micro", "--micro-batch", 8)
    assert "1 rank × 4 micro-steps × 8" in out.stdout + out.stderr
    plain = trainable(tmp_path / "plain", 3)
    assert any(k.startswith("language_model.layers.") for k in plain)
    for run in ("packed", "micro"):
        other = trainable(tmp_path / run, 3)
        assert plain.keys() == other.keys()
        for name in plain:
            assert (plain[name] - other[name]).abs().max() < 1e-5, (run, name)
        assert_same_log(tmp_path / "plain", tmp_path / run, 3)
    assert json.load(open(tmp_path / "packed" / "model" / "train_config.json"))["pack"] is True


def test_bf16_mixed_precision_follows_fp32(runs, stage1_model, tmp_path, device):
    """The GPU recipe's precision (`--dtype bf16`, CUDA's default), also run on the CPU: the frozen tower held in
    bf16, the trainable LLM and projector kept as fp32 master weights that fused AdamW updates, the compute under
    bf16 autocast. Its losses track the fp32 run's to within bf16 rounding, and differ from them (autocast is on)."""
    common = ["--stage", 2, "--projector", stage1_model, "--global-batch", 8, "--micro-batch", 4, "--max-steps", 4,
              "--save-every", 100, "--device", device]
    for dtype in ("fp32", "bf16"):
        train(runs, *common, "--out-dir", tmp_path / dtype, "--dtype", dtype)
    logs = [[json.loads(line) for line in open(tmp_path / dtype / "log.jsonl")] for dtype in ("fp32", "bf16")]
    assert len(logs[0]) == len(logs[1]) == 4
    for full, mixed in zip(*logs):
        assert mixed["loss"] == pytest.approx(full["loss"], rel=0.01)
        assert mixed["grad_norm"] == pytest.approx(full["grad_norm"], rel=0.03)
    assert [r["loss"] for r in logs[0]] != [r["loss"] for r in logs[1]]
    masters = trainable(tmp_path / "bf16", 4)
    assert any(k.startswith("language_model.layers.") for k in masters)
    assert {t.dtype for t in masters.values()} == {torch.float32}
    optimizer = torch.load(tmp_path / "bf16" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    # the LLM's and the projector's, each decayed and not (LLaVATrainer.create_optimizer's groups)
    assert [group["fused"] for group in optimizer["param_groups"]] == [True] * 4
    tower = load_file(str(next((tmp_path / "bf16" / "model").glob("*.safetensors"))))
    tower = {k: t for k, t in tower.items() if "vision_tower" in k}
    assert tower and {t.dtype for t in tower.values()} == {torch.bfloat16}
    if device == "cuda":  # peak memory always, MFU on the GPUs whose peak train.py knows
        assert all(r["peak_mem_gb"] > 0 for r in logs[1])
        if peak_flops(torch.cuda.get_device_name()):
            assert all(0 < r["mfu"] < 1 for r in logs[1])


def test_compiled_decoder_layers_train_as_eager_ones(runs, stage1_model, tmp_path):
    """--compile (each LLM layer through torch.compile, inductor's fused kernels) with gradient checkpointing, as on a
    GPU: micro-batches of several lengths (recompiled once, then with a dynamic length) train as the eager run does."""
    common = ["--stage", 2, "--projector", stage1_model, "--global-batch", 8, "--micro-batch", 4, "--max-steps", 3,
              "--save-every", 100, "--lr", 2e-4, "--gradient-checkpointing", "true"]  # lr: see the FSDP test
    for compiled in ("false", "true"):
        out = train(runs, *common, "--out-dir", tmp_path / compiled, "--compile", compiled)
    assert "decoder layers are compiled" in out.stdout + out.stderr
    eager, compiled = trainable(tmp_path / "false", 3), trainable(tmp_path / "true", 3)
    assert eager.keys() == compiled.keys() and any(k.startswith("language_model.layers.") for k in eager)
    for name in eager:  # inductor orders float operations its own way
        assert (eager[name] - compiled[name]).abs().max() < 1e-5, name
    assert_same_log(tmp_path / "false", tmp_path / "true", 3)
    assert json.load(open(tmp_path / "true" / "model" / "train_config.json"))["compile"] is True


def test_resume_after_kill_equals_uninterrupted(runs, tmp_path):
    common = ["--stage", 2, "--projector", "", "--global-batch", 8, "--micro-batch", 4, "--max-steps", 8,
              "--save-every", 2]
    train(runs, *common, "--out-dir", tmp_path / "straight")
    proc = train(runs, *common, "--out-dir", tmp_path / "killed", background=True)
    deadline = time.time() + 120
    while not os.path.isdir(tmp_path / "killed" / "checkpoint-4") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(n for n in os.listdir(tmp_path / "killed") if n.startswith("checkpoint-"))
    assert saved and saved[-1] != "checkpoint-8", saved  # really interrupted mid-run
    out = train(runs, *common, "--out-dir", tmp_path / "killed", "--resume", "true")
    assert f"{saved[-1]} at step {saved[-1].split('-')[1]}" in out.stdout + out.stderr  # not trained again from 0
    straight, resumed = trainable(tmp_path / "straight", 8), trainable(tmp_path / "killed", 8)
    assert straight.keys() == resumed.keys() and any(k.startswith("language_model.") for k in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name  # bitwise
    assert_same_log(tmp_path / "straight", tmp_path / "killed", 8)  # steps logged after checkpoint-4 not twice


def test_a_second_run_into_the_same_out_dir_stops_unless_told(runs, tmp_path):
    """Its checkpoints would mix with the first run's: it stops before any work and says what to do; --overwrite
    starts afresh, --resume true on a finished run says there is nothing left to train."""
    common = ["--stage", 1, "--out-dir", tmp_path / "s1", "--global-batch", 8, "--micro-batch", 8, "--max-steps", 2]
    train(runs, *common)
    first = trainable(tmp_path / "s1", 2)
    out = train(runs, *common, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "checkpoint-2 of an earlier run" in out.stderr and "--resume true" in out.stderr
    assert "--overwrite true" in out.stderr
    assert torch.equal(trainable(tmp_path / "s1", 2)["multi_modal_projector.linear_1.weight"],
                       first["multi_modal_projector.linear_1.weight"])  # untouched
    out = train(runs, *common, "--overwrite", "true", "--lr", 5e-3)
    assert "removing the earlier run's checkpoint-2" in out.stdout + out.stderr
    assert len(open(tmp_path / "s1" / "log.jsonl").readlines()) == 2  # a new log, not appended to
    assert not torch.equal(trainable(tmp_path / "s1", 2)["multi_modal_projector.linear_1.weight"],
                           first["multi_modal_projector.linear_1.weight"])  # trained again, at the new lr
    out = train(runs, *common, "--resume", "true", "--lr", 5e-3)  # the run's own settings (see the next test)
    assert "resumed from" in out.stdout and "nothing left to train" in out.stdout


def test_resume_with_other_settings_stops_and_names_them(runs, tmp_path):
    """--resume continues the checkpoint's run: another learning rate or batch would make it neither run (the official
    Trainer takes them without a word). Another path is only warned about: the same files have many names."""
    common = ["--stage", 1, "--out-dir", tmp_path / "s1", "--micro-batch", 8, "--save-every", 1]
    train(runs, *common, "--global-batch", 8, "--max-steps", 1)
    out = train(runs, *common, "--global-batch", 16, "--lr", 0.05, "--max-steps", 2, "--resume", "true", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --resume: {tmp_path / 's1' / 'checkpoint-1'} is from a run with other settings (--lr 0.002 there, "
        "0.05 now; --global-batch 8 there, 16 now); give its settings, or --overwrite true to start afresh")
    assert len(open(tmp_path / "s1" / "log.jsonl").readlines()) == 1
    data = tmp_path / "same.json"
    shutil.copy(runs / "toy" / "world" / "stage1.json", data)
    out = train(runs, *common, "--global-batch", 8, "--max-steps", 2, "--resume", "true", "--data", data)
    assert f"warning: --data was '{runs / 'toy' / 'world' / 'stage1.json'}' in the run that wrote" in out.stdout
    assert "resumed from" in out.stdout and len(open(tmp_path / "s1" / "log.jsonl").readlines()) == 2


def test_checkpoints_are_found_by_their_step_alone(tmp_path):
    from plumbing.runs import checkpoint_dirs
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-best", ".checkpoint-3.tmp", "checkpoint-4.old"):
        (tmp_path / name).mkdir()
    assert checkpoint_dirs(str(tmp_path)) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-10")]


def test_a_run_that_trains_no_sample_writes_no_model(runs, tmp_path):
    """Every sample cut by --max-len before its answer (or unreadable) used to end in "done", a model and LATEST."""
    latest = (runs / "LATEST").read_text() if (runs / "LATEST").exists() else None
    out = train(runs, "--stage", 1, "--out-dir", tmp_path / "s1", "--global-batch", 8, "--micro-batch", 8,
                "--max-len", 8, "--epochs", 0.2, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no sample was trained in 3 steps (24 skipped)" in out.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "s1" / "model")
    assert ((runs / "LATEST").read_text() if (runs / "LATEST").exists() else None) == latest


def test_a_bad_sample_in_a_loader_worker_and_ctrl_c_each_end_in_one_line(runs, tmp_path):
    """--skip-bad false stops at a bad sample: the worker's wrapped traceback is cut to its message. Ctrl-C says
    how to go on from the newest checkpoint."""
    samples = json.load(open(runs / "toy" / "world" / "stage1.json"))[:16]
    samples[5]["image"] = "no_such_image.png"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(samples))
    out = train(runs, "--stage", 1, "--data", data, "--out-dir", tmp_path / "bad", "--global-batch", 8,
                "--micro-batch", 4, "--num-workers", 2, "--skip-bad", "false", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert re.fullmatch(r"error: sample \S+ \(.*bad.json item 5\): .*no_such_image.png.*",
                        out.stderr.strip().splitlines()[-1])
    run = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--runs-dir", str(runs), "--stage", "1",
                            "--out-dir", str(tmp_path / "s1"), "--global-batch", "8", "--micro-batch", "8",
                            "--save-every", "1", "--epochs", "1000"], env=env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(tmp_path / "s1" / "checkpoint-2") and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert re.search(r"interrupted; the newest checkpoint is .*checkpoint-\d+: the same command with --resume true "
                     r"continues from it", err), err


def test_a_run_into_an_out_dir_that_another_run_trains_into_stops(runs, tmp_path):
    """A second run would remove or mix with the first one's checkpoints and log (--overwrite, --resume): it stops
    and names the first one. A killed run's marker, its process gone, does not stop the next run."""
    out = tmp_path / "s1"
    common = ["--stage", 1, "--out-dir", out, "--global-batch", 8, "--micro-batch", 8, "--save-every", 1000]
    first = train(runs, *common, "--epochs", 1000, background=True)  # 16000 steps: it runs while we look
    deadline = time.time() + 120
    while not os.path.exists(out / "log.jsonl") and time.time() < deadline:
        time.sleep(0.05)
    for extra in ([], ["--overwrite", "true"], ["--resume", "true"]):
        second = train(runs, *common, "--max-steps", 1, *extra, check=False)
        assert second.returncode != 0 and f"another run (pid {first.pid} on " in second.stderr, second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / ".running").read_text().split()[1] == str(first.pid)  # left behind by the kill
    train(runs, *common, "--max-steps", 1, "--overwrite", "true")
    assert not os.path.exists(out / ".running")  # taken over, and removed at the end


def test_bad_sample_is_skipped_counted_and_training_finishes(runs, tmp_path):
    world = runs / "toy" / "world"
    samples = json.load(open(world / "stage1.json"))[:16]
    samples[5]["image"] = "no_such_image.png"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(samples))
    # two loader workers, as the real recipe's default: the count comes back from them (and gc.freeze runs)
    out = train(runs, "--stage", 1, "--data", data, "--out-dir", tmp_path / "bad", "--global-batch", 8,
                "--micro-batch", 4, "--epochs", 1, "--save-every", 100, "--num-workers", 2)
    assert "1 sample skipped" in out.stdout + out.stderr
    assert f"note: no --llm, so the toy's base models (in {runs / 'toy' / 'base'}) train on {data}" in out.stdout
    state = json.load(open(tmp_path / "bad" / "checkpoint-2" / "state.json"))
    assert state["skipped"] == 1 and state["step"] == 2
    log = [json.loads(line) for line in open(tmp_path / "bad" / "log.jsonl")]
    assert log[-1]["skipped"] == 1  # the log counts them too, so far in the run
    assert os.path.exists(tmp_path / "bad" / "model" / "model.safetensors")
    # said up front too: all 16 samples are looked at, the one missing file named
    assert "warning: 1 of 16 image files looked for are not under" in out.stdout + out.stderr
    assert "(by folder: . 1; such as no_such_image.png); their samples will be skipped and counted" in out.stdout


def test_stage2_before_stage1_and_unreadable_data_stop_in_one_line(runs, tmp_path):
    """Stage 2 of the toy without stage 1 stops before stage 0's minutes of work, saying what to run; a data file
    that is not JSON stops with one line that names it, not a traceback."""
    empty = tmp_path / "empty"
    out = train(empty, "--stage", 2, check=False)
    assert out.returncode != 0 and f"run `python train.py --stage 1 --runs-dir {empty}` first" in out.stderr
    assert not os.path.exists(empty / "toy")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1},\n')
    out = train(runs, "--stage", 1, "--data", bad, "--out-dir", tmp_path / "bad", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {bad}: invalid JSON at line 2 column 1: Expecting value"


def test_a_wrong_image_folder_stops_before_training(runs, tmp_path):
    """skip_bad would skip every sample and train on nothing; none of the images found means a wrong folder."""
    (tmp_path / "empty").mkdir()
    out = train(runs, "--stage", 1, "--image-folder", tmp_path / "empty", "--out-dir", tmp_path / "s1", check=False)
    assert out.returncode != 0
    assert f"image files looked for is under {tmp_path / 'empty'}" in out.stderr and "--image-folder right?" in out.stderr
    assert not os.path.exists(tmp_path / "s1" / "log.jsonl")
    # checked before the weights are read (minutes at 7B): a damaged tower is not what stops this run
    damaged = tmp_path / "clip"
    shutil.copytree(runs / "toy" / "base" / "clip", damaged)
    (damaged / "model.safetensors").write_bytes(b"truncated")
    out = train(runs, "--stage", 1, "--llm", runs / "toy" / "base" / "llm", "--vision-tower", damaged, "--data",
                runs / "toy" / "world" / "stage1.json", "--image-folder", tmp_path / "empty", "--global-batch", 8,
                "--micro-batch", 8, "--out-dir", tmp_path / "s1", check=False)
    assert out.returncode != 0 and "--image-folder right?" in out.stderr
    out = train(runs, "--stage", 1, "--image-folder", "", "--out-dir", tmp_path / "s1", check=False)
    assert out.returncode != 0 and "stage1.json names images (train_" in out.stderr
    assert "give --image-folder, where their paths start" in out.stderr


@needs_cpu_fsdp
def test_fsdp_rank_whose_micro_batch_is_all_skipped_keeps_in_step(runs, tmp_path):
    """With one sample per micro-batch, a bad sample empties one rank's micro-batch while the other rank's is not:
    the empty one must still run the forward and backward, whose collectives the other rank waits for."""
    samples = json.load(open(runs / "toy" / "world" / "stage2.json"))[:8]
    next(s for s in samples if "image" in s)["image"] = "no_such_image.png"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(samples))
    out = torchrun(runs, "--stage", 2, "--projector", "", "--data", data, "--group-by-modality", "false",
                   "--out-dir", tmp_path / "bad", "--global-batch", 4, "--micro-batch", 1, "--epochs", 1,
                   "--fsdp", "true")
    assert "2 steps, 1 sample skipped" in out.stdout + out.stderr


def real_recipe_paths(directory, *names):
    """Empty stand-ins for the model directories and data files that train.py checks for before any work."""
    for name in names:
        if name.endswith(".json"):
            (directory / name).write_text("[]")
        else:
            (directory / name).mkdir()
            (directory / name / "config.json").write_text("{}")


def test_real_recipe_defaults_and_overrides(tmp_path, monkeypatch):
    from train import resolve_config
    monkeypatch.chdir(tmp_path)
    real_recipe_paths(tmp_path, "V", "C", "mix.json", "558k.json", "V2", "C2", "P2", "I2", "d2.json")
    cfg = resolve_config(["--stage", "2", "--llm", "V", "--vision-tower", "C", "--data", "mix.json", "--lr", "1e-5"])
    assert (cfg.lr, cfg.global_batch, cfg.micro_batch, cfg.template, cfg.image_aspect_ratio) == \
           (1e-5, 128, 16, "vicuna_v1", "pad")
    assert cfg.group_by_modality and cfg.gradient_checkpointing and cfg.warmup_ratio == 0.03
    assert (cfg.epochs, cfg.max_len, cfg.weight_decay, cfg.grad_clip, cfg.dtype) == (1.0, 2048, 0.0, 1.0, "auto")
    cfg = resolve_config(["--stage", "1", "--llm", "V", "--vision-tower", "C", "--data", "558k.json"])
    assert (cfg.lr, cfg.global_batch, cfg.template, cfg.image_aspect_ratio) == (1e-3, 256, "plain", "square")
    with pytest.raises(SystemExit):
        resolve_config(["--stage", "1", "--llm", "V"])  # the real recipe needs --vision-tower and --data

    # every option given on the command line wins over the stage's and the toy's defaults
    other = dict(stage=2, template="llava_llama_2", image_aspect_ratio="square", projector_type="linear",
                 device="cpu", dtype="bf16", llm="V2", vision_tower="C2", projector="P2", data="d2.json",
                 image_folder="I2", global_batch=60, micro_batch=6, warmup_ratio=0.5,
                 model="", lora_dropout=0.1, quantize="")  # --model, QLoRA: their own tests
    for toy in (True, False):
        argv = ["--stage", "2"] + ([] if toy else ["--llm", "V", "--vision-tower", "C", "--data", "mix.json"])
        defaults = resolve_config(argv)
        given = {}
        for field in dataclasses.fields(defaults):
            value = getattr(defaults, field.name)
            given[field.name] = other.get(field.name, not value if isinstance(value, bool)
                                          else value + 3 if isinstance(value, (int, float)) else value + "_given")
        argv = [arg for name, value in given.items() for arg in ("--" + name.replace("_", "-"), str(value))]
        assert dataclasses.asdict(resolve_config(argv)) == given
    # a true/false option alone means true, as a flag
    cfg = resolve_config(["--stage", "2", "--pack", "--compile", "--resume", "false"])
    assert (cfg.pack, cfg.compile, cfg.resume) == (True, True, False)


@pytest.mark.parametrize("bad", [["--stage", "3"], ["--dtype", "float16"], ["--dtype", "fp16"], ["--device", "gpu"],
                                 ["--image-aspect-ratio", "crop"], ["--projector-type", "mlp"], ["--template", "vicuna"],
                                 ["--resume", "ture"], ["--llm", "nowhere"], ["--data", "nowhere.json"],
                                 ["--global-batch", "10", "--micro-batch", "4"], ["--global-batch", "-8"],
                                 ["--micro-batch", "0"], ["--lr", "-1"], ["--save-every", "0"], ["--epochs", "0"],
                                 ["--warmup-ratio", "2"], ["--max-len", "0"], ["--grad-clip", "0"], ["--data", "."],
                                 ["--quantize", "int8"], ["--quantize", "int3", "--lora-r", "8"]])
def test_bad_option_values_stop_with_a_usage_error(bad, capsys, tmp_path, monkeypatch):
    """A wrong value stops before any work, naming the option and the choices (not a KeyError mid-run); a
    misspelt true/false is not read as false, and a path that does not exist is named before minutes of loading."""
    from train import resolve_config
    monkeypatch.chdir(tmp_path)
    real_recipe_paths(tmp_path, "V", "C", "mix.json")
    with pytest.raises(SystemExit) as stop:
        resolve_config(["--stage", "2", "--llm", "V", "--vision-tower", "C", "--data", "mix.json", *bad])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert bad[0] in error
    if bad == ["--dtype", "fp16"]:  # chat.py and eval.py take it; training would need a GradScaler
        assert "loss scaling" in error


def test_a_tower_without_an_llm_or_a_batch_that_ranks_cannot_split_is_a_usage_error(capsys, tmp_path, monkeypatch):
    """Without --llm, train.py trains the toy: given a real tower, it would quietly train the toy's LM beside it.
    (Other data for the toy is allowed, and said: test_bad_sample_is_skipped_counted_and_training_finishes.) The
    global batch must split into torchrun's ranks × micro-batches, which is known before any loading."""
    from train import resolve_config
    monkeypatch.chdir(tmp_path)
    real_recipe_paths(tmp_path, "V", "C", "mix.json")
    for argv in (["--vision-tower", "C"], ["--vision-tower", "C", "--data", "mix.json"]):
        with pytest.raises(SystemExit) as stop:
            resolve_config(["--stage", "1", *argv])
        assert stop.value.code == 2
        assert "--vision-tower without --llm: the real recipe needs --llm" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as stop:
        resolve_config(["--stage", "1", "--global-batch", "32", "--micro-batch", "8"])
    assert stop.value.code == 2
    assert "--global-batch 32 must split into 3 ranks × micro-batches of 8" in capsys.readouterr().err
    assert resolve_config(["--stage", "1", "--global-batch", "48", "--micro-batch", "8"]).global_batch == 48


def test_projector_given_as_the_stage1_run_or_of_another_type(runs, stage1_model, capsys, tmp_path):
    """--projector takes the stage-1 run's directory for its model/, and an official run's for its mm_projector.bin;
    a checkpoint, or a projector type other than the saved one, is a usage error (not 2 KB of missing tensors)."""
    from train import resolve_config
    stage2 = ["--stage", "2", "--runs-dir", str(runs)]
    assert resolve_config([*stage2, "--projector", str(stage1_model.parent)]).projector == str(stage1_model)
    official = tmp_path / "llava-v1.5-7b-pretrain"
    official.mkdir()
    (official / "mm_projector.bin").write_bytes(b"")
    assert resolve_config([*stage2, "--projector", str(official)]).projector == str(official / "mm_projector.bin")
    for argv, says in ((["--projector", str(stage1_model.parent / "checkpoint-1")], "neither a stage-1 model "
                        "directory (<out-dir>/model, not a checkpoint) nor an official mm_projector.bin"),
                       (["--projector", str(stage1_model), "--projector-type", "linear"],
                        f"--projector-type linear: the projector in {stage1_model} is mlp2x_gelu")):
        with pytest.raises(SystemExit) as stop:
            resolve_config([*stage2, *argv])
        assert stop.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("option, says", [
    (["--learning_rate", "2e-5"], "--learning_rate is the official scripts' option; here: --lr"),
    (["--model_max_length", "2048"], "--model_max_length is the official scripts' option; here: --max-len"),
    (["--global_batch", "8"], "unrecognized argument --global_batch: did you mean --global-batch?"),
    (["--colour", "red"], "unrecognized arguments: --colour red")])
def test_an_official_scripts_option_or_ours_with_underscores_names_its_spelling_here(option, says, capsys):
    """Users port the official scripts' commands: their option names (and ours, underscored) say what to type."""
    from train import resolve_config
    with pytest.raises(SystemExit) as stop:
        resolve_config(["--stage", "2", *option])
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_help_says_what_each_option_does_and_its_stage_defaults(capsys, monkeypatch):
    from train import TrainConfig, resolve_config
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap lines, also at hyphens
    with pytest.raises(SystemExit):
        resolve_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        metavar = "[BOOL]" if f.type is bool else f.type.__name__.upper()  # a true/false option alone means true
        assert f"--{f.name.replace('_', '-')} {metavar} {f.metadata['help']}" in text
    assert ("--lr FLOAT peak learning rate (default 0.001 in stage 1, 2e-05 in stage 2; the toy: 0.002; with "
            "--lora-r: 0.0002)") in text
    assert "--projector-lr FLOAT the projector's peak learning rate (official mm_projector_lr); 0: --lr (default " \
        "0.0; with --lora-r: 2e-05)" in text
    assert "stage 2's defaults are finetune_task.sh's (and _lora.sh's)" in text
    assert "(default 'plain' in stage 1, 'vicuna_v1' in stage 2)" in text


def test_epochs_of_modality_grouped_batches_run_to_the_end(runs, tmp_path):
    """Stage 2 groups image and text-only samples into separate global batches; the sampler's last batch mixes the
    two leftovers and can hold more than one global batch. It must be cut into whole batches, not dropped, or the
    epoch is shorter than the schedule counts and the second epoch runs dry."""
    from data import LazySupervisedDataset, ModalityLengthGroupedSampler
    from plumbing.tokenizer import load_tokenizer
    from train import global_batches, resolve_config
    out = tmp_path / "s2"
    # 93 image and 3 text-only samples: batches of 5 leave 3 + 3 over, more than one batch
    train(runs, "--stage", 2, "--projector", "", "--out-dir", out, "--global-batch", 5, "--micro-batch", 5,
          "--epochs", 2, "--save-every", 1000)
    cfg = resolve_config(["--stage", "2", "--runs-dir", str(runs), "--global-batch", "5", "--micro-batch", "5"])
    assert cfg.group_by_modality
    dataset = LazySupervisedDataset(cfg.data, cfg.image_folder, load_tokenizer(cfg.llm), cfg.template, max_len=512)
    sampled = ModalityLengthGroupedSampler(dataset.modality_lengths, 5, 5).global_batches()
    assert len(sampled[-1]) > 5  # the case that matters: a leftover of more than one batch
    per_epoch = len(global_batches(dataset, cfg, epoch=0))
    assert per_epoch == len(dataset) // 5
    assert len(open(out / "log.jsonl").readlines()) == 2 * per_epoch


def test_ranks_get_micro_batches_of_similar_length_as_the_sampler_deals_them():
    """Each global batch is sorted longest first; train.py must deal it to the ranks as ModalityLengthGroupedSampler
    does (its own iteration, rank by rank), so that the ranks of a micro-step carry similar lengths. Cut into
    contiguous per-rank slices, rank 0 would get the longest samples and every other rank would wait for it."""
    from types import SimpleNamespace
    from data import ModalityLengthGroupedSampler
    from train import global_batches, rank_micro_batches
    lengths = [((i * 37) % 101 + 1) * (1 if i % 3 else -1) for i in range(240)]  # image (+) and text-only (-)
    cfg = SimpleNamespace(group_by_modality=True, global_batch=32, micro_batch=4, seed=0)
    world = 4
    batches = global_batches(SimpleNamespace(modality_lengths=lengths), cfg, epoch=0, world=world)
    for rank in range(world):  # the sampler's own dealing, up to its last batch (the leftover, dealt otherwise)
        sampler = ModalityLengthGroupedSampler(lengths, 32, 4, num_replicas=world, rank=rank, seed=0)
        full = len(sampler.global_batches()) - 1
        dealt = [i for batch in batches[:full] for micro in rank_micro_batches(batch, rank, world, 4) for i in micro]
        assert len(dealt) == full * 8 and dealt == list(sampler)[:len(dealt)]
    for batch in batches[:full]:
        shares = [rank_micro_batches(batch, rank, world, 4) for rank in range(world)]
        assert sorted(i for share in shares for micro in share for i in micro) == sorted(batch)
        for step in zip(*shares):  # one micro-step, a micro-batch per rank: lengths within 25 % of each other
            totals = [sum(abs(lengths[i]) for i in micro) for micro in step]
            assert max(totals) <= 1.25 * min(totals), totals
    assert global_batches(SimpleNamespace(modality_lengths=lengths), cfg, epoch=0, world=1) != batches  # dealt anew
    assert [sorted(b) for b in global_batches(SimpleNamespace(modality_lengths=lengths), cfg, 0, 1)] == \
        [sorted(b) for b in batches]  # ... but the same samples in each global batch


def test_fsdp_on_the_cpu_refuses_a_torch_whose_gloo_averages_wrongly(monkeypatch, tmp_path):
    """On torch 2.7-2.8 FSDP over gloo would train with gradients off by the world size, silently: stop first."""
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.8.0+cpu"))
    with pytest.raises(SystemExit, match=r"--fsdp on the CPU \(gloo\) needs torch >= 2.9; this is torch 2.8.0"):
        train_main(["--stage", "2", "--fsdp", "true", "--device", "cpu", "--runs-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before anything was made


@pytest.mark.parametrize("gpus, local_rank, error", [
    (0, 0, "--device cuda: this machine has no CUDA GPU"),
    (1, 1, r"LOCAL_RANK 1, but this machine has 1 GPU\(s\): torchrun needs one rank per GPU \(--nproc_per_node 1\)")])
def test_a_rank_without_a_gpu_of_its_own_stops_before_any_work(gpus, local_rank, error, monkeypatch, tmp_path):
    """`--device cuda` where torch sees no GPU, and torchrun starting more ranks than the machine has GPUs (two ranks
    on one GPU would ask for cuda:1), stop with a reason before NCCL or CUDA would fail less clearly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for name, value in (("RANK", local_rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", 2)):  # as torchrun sets
        monkeypatch.setenv(name, str(value))
    with pytest.raises(SystemExit, match=error):
        train_main(["--stage", "1", "--device", "cuda", "--runs-dir", str(tmp_path), "--micro-batch", "16"])
    assert not any(tmp_path.iterdir())


def test_learning_rate_schedule_is_hfs_cosine_with_warmup():
    """LLaVA's Trainer steps HF's cosine schedule after each optimizer step, with ceil(ratio x steps) warmup steps:
    get_lr(k) must be the rate of its optimizer step k, the first one at 0."""
    from transformers import get_cosine_schedule_with_warmup
    from train import get_lr
    total, base, ratio = 217, 2e-5, 0.03
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(ratio * total), total)
    for step in range(total):
        assert get_lr(step, total, base, ratio) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=0)
        optimizer.step()
        schedule.step()
    assert get_lr(0, total, base, ratio) == 0 and get_lr(7, total, base, ratio) == base  # 7 = ceil(0.03 x 217)


def test_mfu_peak_follows_the_gpu_model():
    """MFU divides by the GPU's own dense bf16 peak: the PCIe H100 is slower than the SXM one, and a GPU not in the
    table gets no MFU rather than one computed against an H100."""
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12  # the H100's compute, with more and faster memory
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None


def test_flops_per_token_counts_the_llm_products_and_the_trained_weights_not_the_embedding_lookup():
    """2N forward + 2N input gradients through the LLM, + 2N weight gradients for each trained weight (6N when all
    train); the embedding table is a lookup, whether it trains or not."""
    model = Llava(LlavaConfig.from_name("tiny"))
    lm = model.language_model
    products = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)  # stage 1
    assert flops_per_token(model) == 4 * products + 2 * projector
    lm.requires_grad_(True)  # stage 2
    assert flops_per_token(model) == 6 * products + 2 * projector


def test_token_wise_similarity_matches_each_word_to_its_best_patch_and_skips_padding():
    """FILIP's late interaction on hand-made unit vectors. Image 0 shows e0 and e1, image 1 shows e2 and e3; text 0
    says e0 e1, text 1 says e2 and then padding that (if it were read) would match image 1's other patch."""
    e = torch.eye(4)
    patches = torch.stack([e[[0, 1]], e[[2, 3]]])  # (2 images, 2 patches, 4)
    words = torch.stack([e[[0, 1]], e[[2, 3]]])  # (2 texts, 2 tokens, 4); text 1's second token is padding
    mask = torch.tensor([[True, True], [True, False]])
    word_to_patch, patch_to_word = token_wise_similarity(patches, words, mask)
    # every word of text 0 finds itself in image 0, none in image 1; text 1's one real word finds itself in image 1
    assert torch.equal(word_to_patch, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # image 1's patch e3 has no word in text 1 (its padding does not count): half of image 1's patches are named
    assert torch.equal(patch_to_word, torch.tensor([[1.0, 0.0], [0.0, 0.5]]))


def test_stage0_clip_loss_is_clips_plus_filips():
    """ContrastiveCLIP's loss is the sum of CLIP's (class token against each text's last token) and the mean of
    FILIP's two token-wise terms, over the batch's captions and the extra (hard negative) texts."""
    torch.manual_seed(0)
    clip = ContrastiveCLIP(CLIPVisionConfig.from_name("tiny"), vocab_size=50)
    images = torch.randn(3, 3, 32, 32)
    text_ids = torch.randint(1, 50, (5, 6))  # 3 captions, then 2 extra negatives
    text_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 5 + [False], [True] * 6,
                              [True] * 3 + [False] * 3])
    with torch.no_grad():
        loss = clip(images, text_ids, text_mask)
        image_emb = F.normalize(clip.visual_projection(clip.vision.post_layernorm(clip.vision(images, -1))), dim=-1)
        text_emb = F.normalize(clip.text_projection(clip.text(clip.text.embed_tokens(text_ids))), dim=-1)
        last = text_emb[torch.arange(5), torch.tensor([5, 3, 4, 5, 2])]
        words = text_mask.clone()
        words[:, 0] = False
        word_to_patch, patch_to_word = token_wise_similarity(image_emb[:, 1:], text_emb, words)
        scale = clip.logit_scale.exp()
        clips = contrastive_loss(scale * image_emb[:, 0] @ last.T)
        filips = (contrastive_loss(scale * word_to_patch) + contrastive_loss(scale * patch_to_word)) / 2
        assert loss == pytest.approx(float(clips + filips), rel=1e-6) and clips > 0.1 and filips > 0.1
        other_negatives = text_ids.clone()
        other_negatives[3:] = torch.randint(1, 50, (2, 6))
        assert clip(images, other_negatives, text_mask) != loss  # the extra texts take part


def test_stage0_feeds_each_caption_with_its_two_hard_negatives(runs, tmp_path, monkeypatch):
    """A stage-0 CLIP batch holds the captions, then each caption with other shapes, then with its places moved."""
    shutil.copytree(runs / "toy" / "world", tmp_path / "toy" / "world")
    seen = []

    def recording_forward(clip, images, text_ids, text_mask):
        seen.append((len(images), text_ids, text_mask))
        return forward(clip, images, text_ids, text_mask)

    forward = ContrastiveCLIP.forward
    monkeypatch.setattr(ContrastiveCLIP, "forward", recording_forward)
    train_main(["--stage", "0", "--runs-dir", str(tmp_path), "--lm-steps", "1", "--clip-steps", "1"])
    (B, text_ids, text_mask), = seen
    tokenizer = load_tokenizer(tmp_path / "toy" / "world" / "tokenizer.json")
    texts = [tokenizer.decode(ids[mask].tolist()) for ids, mask in zip(text_ids, text_mask)]
    assert B == 32 and len(texts) == 3 * B
    captions = set(s["conversations"][1]["value"] for s in json.load(open(runs / "toy" / "world" / "stage1.json")))
    for caption, other_shapes, moved in zip(texts[:B], texts[B:2 * B], texts[2 * B:]):
        assert caption in captions
        assert other_shapes != caption and re.sub(SHAPE_WORDS, "", other_shapes) == re.sub(SHAPE_WORDS, "", caption)
        assert moved != caption and re.sub(PLACE, "", moved) == re.sub(PLACE, "", caption)
        if len(re.findall(PLACE, caption)) > 1:  # several objects: the same words, in other places
            assert sorted(re.findall(r"\w+", moved)) == sorted(re.findall(r"\w+", caption))


def test_hard_negatives_change_what_a_caption_binds():
    """Stage 0's hard negatives for the CLIP tower: swap_shapes names other shapes; swap_positions keeps the words
    of a caption of several objects but moves every object to another's place, and a lone object elsewhere."""
    rng = random.Random(0)
    caption = "a red circle on the left, a green cross at the bottom and a blue square at the top on a gray background"
    for _ in range(20):
        shapes = swap_shapes(caption, rng)
        named = re.findall("circle|cross|square|triangle", shapes)
        assert len(named) == 3 and all(new != old for new, old in zip(named, ["circle", "cross", "square"]))
        assert re.sub("circle|cross|square|triangle", "", shapes) == re.sub("circle|cross|square", "", caption)
        moved = swap_positions(caption, rng)
        assert sorted(re.findall(r"\w+", moved)) == sorted(re.findall(r"\w+", caption))
        objects = re.findall(r"a (\w+) (\w+) (?:on|at) the (\w+)", moved)
        assert [o[:2] for o in objects] == [("red", "circle"), ("green", "cross"), ("blue", "square")]
        assert all(place != was for (_, _, place), was in zip(objects, ["left", "bottom", "top"]))
        assert moved.endswith(" on a gray background")
    alone = {swap_positions("a red circle on the left on a white background", rng) for _ in range(30)}
    assert alone == {"a red circle on the right on a white background", "a red circle at the top on a white background",
                     "a red circle at the bottom on a white background"}


# -----------------------------------------------------------------------------
# fine-tuning a finished LLaVA on other data, in full or with LoRA (lora.py)


def finetune(runs, model, *args):
    """train.py's task fine-tuning of a finished LLaVA on the toy world's stage-2 data (as a user's own data)."""
    world = runs / "toy" / "world"
    return ["--stage", 2, "--model", model, "--data", world / "stage2.json", "--image-folder", world / "images",
            "--max-len", 512, "--num-workers", 0, "--global-batch", 8, "--save-every", 100, *args]


def lora_names(layers):
    from lora import TARGETS
    return {f"language_model.layers.{i}.{t}.lora_{m}.weight" for i in range(layers) for t in TARGETS for m in "AB"}


def test_task_lora_trains_adapter_and_projector_and_writes_the_merged_model_and_the_official_adapter(
        runs, stage1_model, tmp_path):
    """From a finished LLaVA (a stage-1 output stands in for one): only A, B and the projector train, each at its
    own learning rate; the run writes the model merged (W + (alpha / r) · B A, loadable by transformers) and the
    adapter in the official layout, which merges into its base to the same weights, and chat.py answers alike from
    either. Full task fine-tuning trains the LLM and the projector, the tower frozen."""
    import transformers
    from plumbing.checkpoints import load_for_inference
    from train import get_lr
    out = tmp_path / "task-lora"
    run = train(runs, *finetune(runs, stage1_model, "--micro-batch", 4, "--epochs", 0.25, "--lora-r", 4,
                                "--lora-alpha", 8, "--lr", 1e-2, "--projector-lr", 1e-3), "--out-dir", out)
    assert "memory a step needs on each GPU, computed" in run.stdout
    assert re.search(r"LoRA r4 .*<- this run", run.stdout) and "(merged), its LoRA adapter to" in run.stdout
    base = load_llava(str(stage1_model))
    layers = base.config.text.num_hidden_layers
    saved = trainable(out, 3)
    projector = {n for n in base.state_dict() if n.startswith("multi_modal_projector.")}
    assert set(saved) == lora_names(layers) | projector
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [g["peak_lr"] for g in optimizer["param_groups"]] == [1e-2, 1e-3, 1e-3]  # A and B; the projector's two
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["lr"] for r in log] == [get_lr(step, 3, 1e-2, 0.03) for step in range(3)]

    merged = load_llava(str(out / "model"))
    for name, tensor in base.state_dict().items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in saved:  # W + (alpha / r) · B A
            delta = saved[f"{module}.lora_B.weight"] @ saved[f"{module}.lora_A.weight"] * 8 / 4
            assert torch.allclose(merged.state_dict()[name], tensor + delta, rtol=0, atol=1e-6), name
            assert delta.abs().max() > 1e-3, name  # trained
        elif name in projector:
            assert torch.equal(merged.state_dict()[name], saved[name]), name
        else:  # embeddings, norms, lm_head, the tower: frozen
            assert torch.equal(merged.state_dict()[name], tensor), name
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(out / "model")).eval()
    N, image = merged.config.num_image_tokens, merged.config.image_token_index
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([[1, 5] + [image] * N + [6]]), pixel_values=pixels).logits
        assert (merged(torch.tensor([[1, 5, -200, 6]]), pixels) - expected).abs().max() < 1e-4

    adapter_dir = out / "llava-lora"  # the official layout, PEFT's names
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert adapter.keys() == {"base_model.model.model." + n.removeprefix("language_model.") for n in saved
                              if ".lora_" in n}
    assert all(torch.equal(t, saved["language_model." + k.removeprefix("base_model.model.model.")])
               for k, t in adapter.items())
    assert set(torch.load(adapter_dir / "non_lora_trainables.bin", weights_only=True)) == {
        f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    peft = json.load(open(adapter_dir / "adapter_config.json"))
    assert (peft["peft_type"], peft["r"], peft["lora_alpha"], peft["lora_dropout"], peft["base_model_name_or_path"]) \
        == ("LORA", 4, 8.0, 0.05, str(stage1_model))
    assert sorted(peft["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    assert json.load(open(adapter_dir / "config.json"))["mm_projector_type"] == "mlp2x_gelu"
    again, _, template = load_for_inference(str(adapter_dir), model_base=str(stage1_model))
    assert template == "vicuna_v1"  # the run's, from its train_config.json
    assert all(torch.equal(again.state_dict()[k], v) for k, v in merged.state_dict().items())
    image_file = runs / "toy" / "world" / "images" / "train_00000.png"
    answers = [subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), str(image_file), *model, "-p",
                               "What colour is the circle?", "--temperature", "0", "--max-new-tokens", "6"],
                              env=env(), capture_output=True, text=True)
               for model in (["--model", str(out / "model")],
                             ["--model", str(adapter_dir), "--model-base", str(stage1_model)])]
    assert answers[0].returncode == 0 and answers[0].stdout.strip() and answers[0].stdout == answers[1].stdout

    full = tmp_path / "task"
    train(runs, *finetune(runs, stage1_model, "--micro-batch", 4, "--max-steps", 1), "--out-dir", full)
    saved = trainable(full, 1)
    assert set(saved) == {n for n in base.state_dict() if not n.startswith("vision_tower.")}
    assert not os.path.exists(full / "llava-lora")


@needs_cpu_fsdp
def test_lora_with_gradient_checkpointing_trains_alike_in_one_process_and_under_ddp_and_fsdp(
        runs, stage1_model, tmp_path):
    """LoRA (no dropout: each engine splits the batch otherwise, and so would draw other masks) trains to the same
    adapter and projector with and without gradient checkpointing (the frozen embeddings give the checkpointed
    layers inputs that need no gradient), in one process, 2 DDP ranks and 2 FSDP ranks; FSDP's gathered model is
    merged and its adapter written as one process writes them."""
    from plumbing.checkpoints import load_for_inference
    common = finetune(runs, stage1_model, "--max-steps", 3, "--lora-r", 4, "--lora-dropout", 0, "--lr", 2e-3,
                      "--projector-lr", 2e-4)
    train(runs, *common, "--micro-batch", 4, "--gradient-checkpointing", "false", "--out-dir", tmp_path / "plain")
    train(runs, *common, "--micro-batch", 4, "--out-dir", tmp_path / "checkpointed")
    torchrun(runs, *common, "--micro-batch", 2, "--out-dir", tmp_path / "ddp")
    torchrun(runs, *common, "--micro-batch", 2, "--fsdp", "true", "--out-dir", tmp_path / "fsdp")
    plain = trainable(tmp_path / "plain", 3)
    assert any(".lora_B." in n for n in plain) and all("lora_" in n or "projector" in n for n in plain)
    for run in ("checkpointed", "ddp", "fsdp"):
        other = trainable(tmp_path / run, 3)
        assert plain.keys() == other.keys()
        for name in plain:  # AdamW divides A's tiny first gradients by their own size: a summation order's last
            # bits show in its first updates (up to 2e-5 here), where a wrong gradient would be off by whole steps
            assert torch.allclose(plain[name], other[name], rtol=0, atol=5e-5), (run, name)
        assert_same_log(tmp_path / "plain", tmp_path / run, 3)
    fsdp = load_llava(str(tmp_path / "fsdp" / "model"))
    from_adapter, _, _ = load_for_inference(str(tmp_path / "fsdp" / "llava-lora"), model_base=str(stage1_model))
    assert all(torch.equal(from_adapter.state_dict()[k], v) for k, v in fsdp.state_dict().items())
    single = load_llava(str(tmp_path / "plain" / "model"))
    assert all(torch.allclose(single.state_dict()[k], v, rtol=0, atol=1e-5) for k, v in fsdp.state_dict().items())


def test_lora_resume_after_kill_equals_uninterrupted(runs, stage1_model, tmp_path):
    """As full fine-tuning's: bitwise, also with LoRA's dropout on (its masks are a function of the step)."""
    common = finetune(runs, stage1_model, "--micro-batch", 4, "--max-steps", 8, "--save-every", 2, "--lora-r", 4)
    train(runs, *common, "--out-dir", tmp_path / "straight")
    proc = train(runs, *common, "--out-dir", tmp_path / "killed", background=True)
    deadline = time.time() + 120
    while not os.path.isdir(tmp_path / "killed" / "checkpoint-4") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(n for n in os.listdir(tmp_path / "killed") if n.startswith("checkpoint-"))
    assert saved and saved[-1] != "checkpoint-8", saved
    out = train(runs, *common, "--out-dir", tmp_path / "killed", "--resume", "true")
    assert f"{saved[-1]} at step {saved[-1].split('-')[1]}" in out.stdout + out.stderr
    straight, resumed = trainable(tmp_path / "straight", 8), trainable(tmp_path / "killed", 8)
    assert straight.keys() == resumed.keys() and any(".lora_A." in k for k in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name  # bitwise
    assert_same_log(tmp_path / "straight", tmp_path / "killed", 8)
    assert json.load(open(tmp_path / "killed" / "model" / "train_config.json"))["lora_dropout"] == 0.05


def test_task_fine_tuning_and_lora_take_the_official_scripts_settings(tmp_path, monkeypatch, capsys):
    """--model: finetune_task.sh's settings (stage 2's); with --lora-r, finetune_task_lora.sh's (lr 2e-4, projector
    2e-5, alpha 256, dropout 0.05), as from a Vicuna finetune_lora.sh's; what does not go together is a usage error."""
    from train import resolve_config
    monkeypatch.chdir(tmp_path)
    real_recipe_paths(tmp_path, "V", "C", "P", "mix.json", "my.json", "adapter")
    (tmp_path / "M").mkdir()
    (tmp_path / "M" / "config.json").write_text(json.dumps(LlavaConfig.from_name("tiny").to_hf()))
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    task = ["--stage", "2", "--model", "M", "--data", "my.json"]
    cfg = resolve_config(task)
    assert (cfg.lr, cfg.global_batch, cfg.micro_batch, cfg.template, cfg.image_aspect_ratio, cfg.epochs) == \
        (2e-5, 128, 16, "vicuna_v1", "pad", 1.0)
    assert cfg.group_by_modality and cfg.gradient_checkpointing and cfg.lora_r == 0 and cfg.projector_lr == 0
    assert cfg.out_dir.endswith(os.path.join("runs", "task")) and cfg.llm == "" and cfg.projector == ""
    cfg = resolve_config([*task, "--lora-r", "128"])
    assert (cfg.lr, cfg.projector_lr, cfg.lora_alpha, cfg.lora_dropout, cfg.global_batch) == (2e-4, 2e-5, 256, 0.05, 128)
    assert cfg.out_dir.endswith(os.path.join("runs", "task-lora"))
    cfg = resolve_config(["--stage", "2", "--llm", "V", "--vision-tower", "C", "--projector", "P", "--data", "mix.json",
                          "--lora-r", "128", "--lr", "1e-4"])
    assert (cfg.lr, cfg.projector_lr) == (1e-4, 2e-5) and cfg.out_dir.endswith(os.path.join("runs", "stage2-lora"))
    for argv, says in (
            (["--stage", "1", "--model", "M", "--data", "my.json"], "--model M: a finished LLaVA to fine-tune is "
                                                                    "where --stage 2 starts, in place of --llm"),
            ([*task, "--llm", "V"], "in place of --llm and --projector"),
            ([*task, "--projector", "P"], "in place of --llm and --projector"),
            (["--stage", "1", "--llm", "V", "--vision-tower", "C", "--data", "mix.json", "--lora-r", "8"],
             "--lora-r 8: LoRA changes the LLM, which trains in stage 2"),
            (["--stage", "2", "--model", "adapter", "--data", "my.json"], "--model adapter: a LoRA adapter; fine-tune "
                                                                          "its merged model"),
            (["--stage", "2", "--model", "V", "--data", "my.json"], "--model: V: config.json is neither a LLaVA"),
            (["--stage", "2", "--model", "nowhere", "--data", "my.json"], "--model nowhere: no such file"),
            ([*task, "--lora-r", "8", "--lora-alpha", "0"], "--lora-alpha 0.0: must be above 0"),
            ([*task, "--lora-r", "8", "--lora-dropout", "2"], "--lora-dropout 2.0: must be between 0 and 1"),
            ([*task, "--lora-r", "-1"], "--lora-r -1: must be at least 0")):
        with pytest.raises(SystemExit) as stop:
            resolve_config(argv)
        assert stop.value.code == 2 and says in capsys.readouterr().err, argv


def test_the_readmes_worked_example_runs_on_a_tiny_toy(runs, stage1_model, tmp_path):
    """README, "Fine-tune on your own data": make_toy_task's files, eval.py on its held-out questions before and
    after a task LoRA run (a table with its two categories), the same scores from the adapter merged into its base."""
    from toy import make_toy_task
    task = make_toy_task(tmp_path / "task", n_train=16, n_eval_scenes=4, n_world_images=64)
    mine = tmp_path / "runs"  # the default --out-dir under it: task-lora
    train(mine, "--stage", 2, "--model", stage1_model, "--data", task["train"], "--image-folder", task["images"],
          "--lora-r", 4, "--lora-alpha", 8, "--lr", 2e-3, "--projector-lr", 2e-4, "--global-batch", 8,
          "--micro-batch", 8, "--epochs", 1, "--num-workers", 0, "--gradient-checkpointing", "false")
    assert open(mine / "LATEST").read().strip() == str(mine / "task-lora" / "model")
    tables = []
    for model in (["--model", stage1_model], ["--model", mine / "task-lora" / "model"],
                  ["--model", mine / "task-lora" / "llava-lora", "--model-base", stage1_model]):
        out = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *map(str, model), "--toy-questions",
                              str(task["eval"])], env=env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        table = out.stdout[out.stdout.index("category"):]
        assert "object at a place" in table and "empty place" in table and re.search(r"overall +\d+ +16 ", table)
        tables.append(table)
    assert tables[1] == tables[2]  # the merged model and the adapter on its base answer alike
    assert os.path.exists(mine / "task-lora" / "toy_eval_answers_task.jsonl")


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_qlora_trains_lora_over_a_quantized_base_and_merges_into_its_float_weights(runs, stage1_model, tmp_path, bits):
    """QLoRA (--quantize with --lora-r, the official --bits path): the frozen projections are int8 or int4 as they
    load, LoRA's A and B (fp32, computed under autocast in the run's dtype) and the projector train over them, the
    gradients passing through the quantized layers; the adapter merges into the float weights the base was made from,
    as the official loader merges QLoRA adapters."""
    from plumbing.checkpoints import load_lora
    from quantize import QUANTIZED
    from train import build_model, resolve_config
    out = tmp_path / bits
    args = finetune(runs, stage1_model, "--micro-batch", 4, "--epochs", 0.25, "--lora-r", 4, "--lora-alpha", 8,
                    "--lr", 1e-2, "--projector-lr", 1e-3, "--quantize", bits)
    run = train(runs, *args, "--out-dir", out)
    assert re.search(rf"QLoRA r4 {bits} .*<- this run", run.stdout), run.stdout
    cfg = resolve_config(["--runs-dir", str(runs), *map(str, args)])
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    base_layers = [m.base_layer for m in model.language_model.modules() if hasattr(m, "lora_A")]
    assert base_layers and all(type(layer) is QUANTIZED[bits] for layer in base_layers)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"language_model",
                                                                                           "multi_modal_projector"}
    assert all(".lora_" in n for n, p in model.language_model.named_parameters() if p.requires_grad)
    saved = trainable(out, 3)
    first = base_layers[0]  # layer 0's q_proj: its A learned, so gradients crossed the quantized layers above it
    assert saved["language_model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 1e-4
    merged = load_llava(str(out / "model"))
    again = load_lora(str(out / "llava-lora"), str(stage1_model))  # into the float base, as the official loader
    assert all(torch.equal(again.state_dict()[k], v) for k, v in merged.state_dict().items())
    float_q = load_llava(str(stage1_model)).language_model.layers[0].self_attn.q_proj.weight
    delta = (saved["language_model.layers.0.self_attn.q_proj.lora_B.weight"]
             @ saved["language_model.layers.0.self_attn.q_proj.lora_A.weight"]) * 8 / 4
    assert torch.allclose(merged.language_model.layers[0].self_attn.q_proj.weight, float_q + delta, atol=1e-6)
    assert not torch.equal(first.dequantize(torch.float32), float_q)  # the base it trained over was quantized


def test_toy_base_models_are_the_runs_own_else_the_shipped_ones_made_for_its_world(runs, tmp_path, monkeypatch):
    """Stage 0 writes the run directory's base models, never the shipped copy; later stages take the run
    directory's where stage 0 made them, else the shipped ones, which must have been made from the world's text."""
    import toy
    shipped = tmp_path / "toy_base"
    shutil.copytree(runs / "toy" / "base", shipped)
    monkeypatch.setattr(toy, "SHIPPED", shipped)
    fresh = tmp_path / "fresh"
    assert toy.toy_paths(str(fresh), 1)["llm"] == str(shipped / "llm")
    assert toy.toy_paths(str(fresh), 0)["llm"] == str(fresh / "toy" / "base" / "llm")  # stage 0: never the shipped
    assert toy.toy_paths(str(runs), 2)["vision_tower"] == str(runs / "toy" / "base" / "clip")
    # a world whose text the shipped tokenizer was not made from
    paths = toy.toy_paths(str(fresh), 1)
    make_toy_world(fresh / "toy" / "world", n_train_images=8, n_stage1=8, n_stage2=8, n_eval_images=2, seed=5,
                   vocab_size=400)
    with pytest.raises(SystemExit, match=r"other text than the base models in .*toy_base were made for: run "
                                         r"`python train.py --stage 0`"):
        toy.prepare_toy(paths, 1, 42, 1, 1, lambda *a: 0.0)
    shutil.copy(shipped / "llm" / "tokenizer.json", fresh / "toy" / "world" / "tokenizer.json")
    toy.prepare_toy(paths, 1, 42, 1, 1, lambda *a: 0.0)  # the same tokenizer: nothing to do, nothing trained
    assert not (fresh / "toy" / "base").exists()
