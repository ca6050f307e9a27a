"""A training run's directory: resumable checkpoints, the one-run-at-a-time marker, the JSONL log and progress bar,
the finished model and runs/LATEST. The plumbing that train.py's loop calls.

    <out_dir>/checkpoint-<step>/   trainable.safetensors, optimizer.pt, rng.pt, state.json (step, skipped, config)
    <out_dir>/log.jsonl            one record per optimizer step
    <out_dir>/model/               the finished model, llava-hf layout (+ its tokenizer, processor, train_config.json)
    <out_dir>/llava-lora/          a LoRA run's adapter in the official layout (the model above has it merged)
    <runs_dir>/LATEST              the newest finished model, which chat.py and eval.py use by default

A checkpoint holds only what trains and is written under a temporary name, then renamed: an interrupted write never
looks like a checkpoint, and a kill -9 resumes bitwise from the newest one.
"""

import dataclasses
import json
import os
import re
import shutil
import socket
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import Llava
from lora import add_lora, merge_lora
from plumbing.checkpoints import (CheckpointError, load_lora, read_config, save_image_processor, save_llava,
                                  save_llava_tokenizer, save_lora_adapter)


def log(rank, *args):
    if rank == 0:
        tqdm.write(" ".join(str(a) for a in args))


def checkpoint_dirs(out_dir: str) -> list:
    """Complete checkpoints, oldest first. A checkpoint is written under a temporary name and renamed when
    complete, so an interrupted write never looks like a checkpoint."""
    if not os.path.isdir(out_dir):
        return []
    steps = sorted(int(m[1]) for m in map(re.compile(r"checkpoint-(\d+)").fullmatch, os.listdir(out_dir)) if m)
    return [os.path.join(out_dir, f"checkpoint-{s}") for s in steps]


def rekey(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state_dict with each parameter's key k replaced by key[k] (its index <-> its name)."""
    return {"state": {key[k]: s for k, s in optimizer_state["state"].items()},
            "param_groups": [dict(g, params=[key[k] for k in g["params"]]) for g in optimizer_state["param_groups"]]}


def optimizer_names(optimizer, trainable: dict) -> list:
    """Parameter names in the optimizer's order: index i of its state_dict() is names[i]."""
    name_of = {p: n for n, p in trainable.items()}
    return [name_of[p] for group in optimizer.param_groups for p in group["params"]]


def full_state(cfg, model, trainable: dict, optimizer):
    """The trainable weights by name and optimizer.state_dict(), as one plain process holds them, so that both engines
    write the same checkpoint and a run can resume under either. Under FSDP every rank must call this: the shards are
    gathered to rank 0 (the others get None) and the optimizer's states, which come keyed by name, re-keyed by index."""
    if not cfg.fsdp:
        return trainable, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    return weights, rekey(by_name, {n: i for i, n in enumerate(optimizer_names(optimizer, trainable))})


def save_checkpoint(cfg, step, model, trainable: dict, optimizer, skipped: int, rank: int):
    """Every rank calls this (FSDP gathers the shards from all of them); rank 0 writes."""
    from safetensors.torch import save_file
    weights, optimizer_state = full_state(cfg, model, trainable, optimizer)
    if rank == 0:
        final = os.path.join(cfg.out_dir, f"checkpoint-{step}")
        tmp = os.path.join(cfg.out_dir, f".tmp-checkpoint-{step}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({n: p.detach().cpu().contiguous() for n, p in weights.items()},
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                    else []}, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "skipped": skipped, "config": dataclasses.asdict(cfg)}, f, indent=2)
        os.replace(tmp, final)
        for old in checkpoint_dirs(cfg.out_dir)[:-1]:  # keep only the newest
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def start_afresh(cfg, rank: int):
    """A run without --resume must not share its out_dir with an earlier run's checkpoints: a later --resume would
    mix the two. Stop with what to do, or with --overwrite remove them."""
    earlier = checkpoint_dirs(cfg.out_dir)
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 removes anything
    if not earlier:
        return
    if not cfg.overwrite:
        raise SystemExit(f"{cfg.out_dir} holds {os.path.basename(earlier[-1])} of an earlier run: --resume true "
                         f"continues it, --overwrite true starts afresh (or choose another --out-dir)")
    if rank == 0:
        log(rank, f"--overwrite: removing the earlier run's {os.path.basename(earlier[-1])} from {cfg.out_dir}")
        for path in earlier:
            shutil.rmtree(path)
    if dist.is_initialized():
        dist.barrier()


def claim_out_dir(cfg, rank: int) -> str | None:
    """One run at a time in an out_dir: a second one would remove, or mix with, the first one's checkpoints and log.
    A marker file names the running process; one whose process is gone (a killed run) is taken over. Rank 0 holds it
    and main removes it when the run ends. Returns its path on rank 0."""
    if rank != 0:
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    marker, host = os.path.join(cfg.out_dir, ".running"), socket.gethostname()
    try:
        with open(marker) as f:
            other_host, other_pid = f.read().split()
    except (FileNotFoundError, ValueError):
        other_host = None
    if other_host is not None and (other_host != host or process_exists(int(other_pid))):
        raise SystemExit(f"{cfg.out_dir}: another run (pid {other_pid} on {other_host}) is training into it; wait for "
                         f"it to end or choose another --out-dir (if that run is gone, remove {marker})")
    with open(marker, "w") as f:
        f.write(f"{host} {os.getpid()}\n")
    return marker


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is another user's
        pass
    return True


def open_log(path: str, start_step: int):
    """The run's JSONL log: a fresh run starts it anew; a resumed one keeps the steps up to its checkpoint (an
    interrupted run may have logged a few more, which are trained again)."""
    kept = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except ValueError:  # a line cut short by the kill
                    pass
    log_file = open(path, "w")
    log_file.writelines(kept)
    return log_file


# what decides the data order and the arithmetic: a resumed run that changed one would be neither run
SAME_ON_RESUME = ("stage", "projector_type", "template", "image_aspect_ratio", "max_len", "group_by_modality", "lr",
                  "global_batch", "epochs", "warmup_ratio", "weight_decay", "grad_clip", "seed", "lora_r", "lora_alpha",
                  "lora_dropout", "projector_lr")
PATHS_ON_RESUME = ("model", "llm", "vision_tower", "projector", "data", "image_folder")  # only warned about


def check_same_run(cfg, path: str, rank: int):
    """Before any loading: --resume continues the checkpoint's run, so its settings must be this run's. Paths are
    only warned about, since the same files can be named from another working directory."""
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)["config"]
    changed = [f"--{name.replace('_', '-')} {saved[name]!r} there, {getattr(cfg, name)!r} now"
               for name in SAME_ON_RESUME if name in saved and saved[name] != getattr(cfg, name)]
    if changed:
        raise CheckpointError(f"--resume: {path} is from a run with other settings ({'; '.join(changed)}); give its "
                              "settings, or --overwrite true to start afresh")
    for name in PATHS_ON_RESUME:
        if saved.get(name) != getattr(cfg, name):
            log(rank, f"warning: --{name.replace('_', '-')} was {saved.get(name)!r} in the run that wrote {path}, "
                      f"now {getattr(cfg, name)!r}")


def load_checkpoint(path, model, trainable: dict, optimizer, fsdp: bool):
    from safetensors.torch import load_file
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    if weights.keys() != trainable.keys():
        raise CheckpointError(f"{path} holds different trainable tensors than this run trains (another stage?)")
    # to the CPU first: saved from rank 0's GPU, it would otherwise land on cuda:0 on every rank (load_state_dict and
    # set_optimizer_state_dict move it to each parameter's device)
    optimizer_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    if fsdp:  # every rank reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: frozen weights are not here
        set_model_state_dict(model, weights, options=options)
        by_name = rekey(optimizer_state, dict(enumerate(optimizer_names(optimizer, trainable))))
        set_optimizer_state_dict(model, optimizer, by_name, options=options)
    else:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(weights[name])
        optimizer.load_state_dict(optimizer_state)
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    return state["step"], state["skipped"]




def gather_model(model, cfg):
    """A plain copy of an FSDP-sharded model on rank 0 (None elsewhere), for publish. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Llava(model.config)
        if cfg.lora_r:
            add_lora(plain.language_model, cfg.lora_r, cfg.lora_alpha)
    plain.load_state_dict(state, assign=True)
    return plain


# dense bf16 peak FLOP/s of one GPU (NVIDIA datasheets), for MFU; the first name contained in the device's name wins
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """None for a GPU not listed: no MFU is logged rather than a wrong one."""
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)


def point_latest(runs_dir: str, model_dir: str):
    """`<runs_dir>/LATEST` names the newest finished model; chat.py and eval.py use it by default."""
    os.makedirs(runs_dir, exist_ok=True)
    tmp = os.path.join(runs_dir, ".LATEST.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.abspath(model_dir) + "\n")
    os.replace(tmp, os.path.join(runs_dir, "LATEST"))



def llm_positions(batch: dict, image_tokens: int) -> int:
    """The positions the LLM runs for one collated micro-batch: its real tokens, each image placeholder spliced into
    image_tokens positions (Llava.splice). tokens/s and MFU count these, as bench.py does; the text alone would leave
    out most of the work (a stage-1 sample is 576 image positions and a caption of ~30)."""
    n_images = 0 if batch["images"] is None else len(batch["images"])
    return int(batch["attention_mask"].sum()) + n_images * (image_tokens - 1)


def flops_per_token(model) -> float:
    """Training FLOPs per LLM position: 2N forward through the LLM, 2N backward for activation gradients, 2N more
    for weight gradients where weights train (Kaplan et al.'s 6N, minus frozen weights). N leaves out the embedding
    table, a lookup. An estimate: lm_head counts at every position (it runs only where labels are), and the CLIP
    tower, the projector and attention's score products are left out."""
    n_llm = sum(p.numel() for n, p in model.language_model.named_parameters() if not n.startswith("embed_tokens"))
    n_trainable = sum(p.numel() for n, p in model.named_parameters()
                      if p.requires_grad and not n.startswith("language_model.embed_tokens"))
    return 4 * n_llm + 2 * n_trainable


class RunLog:
    """The progress bar and <out_dir>/log.jsonl (rank 0): loss, lr, grad norm, tokens and tokens/s (LLM positions),
    skipped samples; on a GPU peak memory and MFU (model FLOPs utilization: the arithmetic the model needs, over the
    GPUs' dense bf16 peak)."""

    def __init__(self, cfg, model, rank, world, device, start_step, end_step):
        self.rank, self.world, self.device = rank, world, device
        self.flops_per_token, self.image_tokens = flops_per_token(model), model.config.num_image_tokens
        self.file = open_log(os.path.join(cfg.out_dir, "log.jsonl"), start_step) if rank == 0 else None
        self.bar = tqdm(total=end_step, initial=start_step, desc=f"stage {cfg.stage}", disable=rank != 0)
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def step(self, step, loss, lr, grad_norm, batches, start_time, skipped):
        """One optimizer step's record; every rank calls it (the positions are summed over the ranks)."""
        tokens = torch.tensor(sum(llm_positions(b, self.image_tokens) for b in batches), dtype=torch.float64,
                              device=self.device)
        if dist.is_initialized():
            dist.all_reduce(tokens)
        tokens = tokens.item()
        if self.device.type == "cuda":  # kernels run asynchronously: wait for this step's backward and AdamW step,
            torch.cuda.synchronize(self.device)  # which no host read has waited for yet, or the time leaves them out
        seconds = time.time() - start_time
        record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=int(tokens),
                      tokens_per_s=tokens / seconds, skipped=skipped)
        postfix = dict(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            postfix["mem"] = f"{record['peak_mem_gb']:.1f}GB"
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens / seconds / (self.world * self.peak)
            postfix["mfu"] = f"{record['mfu']:.1%}"
        if self.rank == 0:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.bar.set_postfix(postfix, refresh=False)  # drawn once, by update
            self.bar.update()

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def publish(cfg, model, step: int, start_step: int, total_steps: int, skipped: int, rank: int):
    """The end of a run, on rank 0: <out_dir>/model in the llava-hf layout, with what transformers' AutoProcessor
    reads (the tokenizer with <image>, the image processor) and the run's config, and LATEST pointed at it, unless
    --max-steps cut the run short (a smoke test) or a finished run was resumed with nothing left to train. A LoRA run
    also writes its adapter in the official layout, <out_dir>/llava-lora (the official loader wants "llava" and "lora"
    in the name), and merges it into the model it saves."""
    final, latest = os.path.join(cfg.out_dir, "model"), os.path.join(cfg.runs_dir, "LATEST")
    if rank != 0:
        return
    if step == start_step and os.path.exists(os.path.join(final, "config.json")):
        log(rank, f"stage {cfg.stage}: nothing left to train in {cfg.out_dir} (step {step} of {total_steps}); its "
                  f"model is {final}, {latest} unchanged")
        return
    written = [final]
    if cfg.lora_r:
        written.append(os.path.join(cfg.out_dir, "llava-lora"))
        tower = cfg.vision_tower or (read_config(cfg.model).get("mm_vision_tower") if cfg.model else None)
        save_lora_adapter(model, written[1], cfg.model or cfg.llm, tower, dict(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout))
        if cfg.quantize:  # QLoRA: the adapter merges into the float weights the quantized base was made from
            config = model.config
            model = load_lora(written[1], cfg.model or cfg.llm, cfg.vision_tower or None,
                              model.language_model.embed_tokens.weight.dtype, "cpu")  # the frozen weights' dtype
            model.config = config
        else:
            merge_lora(model.language_model)
    save_llava(model, final)
    save_image_processor(model.config, final)
    save_llava_tokenizer(cfg.model or cfg.llm, final, model.config.image_token_index)
    for directory in written:  # the template chat.py and eval.py prompt in, among others
        with open(os.path.join(directory, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    if step == total_steps:
        point_latest(cfg.runs_dir, final)
        where = f"chat.py and eval.py now use it ({latest})"
    else:
        where = f"{latest} unchanged, as --max-steps stopped the run at step {step} of {total_steps}"
    log(rank, f"stage {cfg.stage} done: {step} steps, {skipped} sample{'s' * (skipped != 1)} skipped; model saved to "
              f"{final}" + (f" (merged), its LoRA adapter to {written[1]}" if cfg.lora_r else "") + f"; {where}")
