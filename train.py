"""Train LLaVA-1.5 in its two stages with a plain PyTorch loop (paper §4; official scripts/v1_5/pretrain.sh and
finetune.sh, llava/train/train.py).

Stage 1, feature alignment: only the projector learns, on image-caption pairs (blip_laion_cc_sbu_558k.json), `plain`
template, lr 1e-3, global batch 256. Stage 2, visual instruction tuning: projector + LLM learn on the 665k mix,
`vicuna_v1` template, lr 2e-5, global batch 128. The CLIP tower stays frozen (and in eval mode) throughout.

One optimizer step, `train_step`, is the heart of it: the loss is the mean over every supervised token of the global
batch (all ranks, all micro-steps), and gradients cross between ranks once per step, on the last micro-step.

Stage 2 can also start from a finished LLaVA, to fine-tune it on your own data (`--model`, finetune_task.sh), and
can train LoRA (lora.py) in place of the whole LLM (`--lora-r 128`, finetune_lora.sh and finetune_task_lora.sh).
Without model arguments it trains the toy world (toy.py) on the CPU, from the shipped base models (toy_base/).

    python train.py --stage 1                      # the toy world, from toy_base/ (--stage 0 makes new bases)
    python train.py --stage 2                      # continues from the toy stage 1
    torchrun --nproc_per_node 8 train.py --stage 1 --llm VICUNA_DIR --vision-tower CLIP_DIR \\
        --data blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images
    torchrun --nproc_per_node 8 train.py --stage 2 --llm VICUNA_DIR --vision-tower CLIP_DIR \\
        --projector runs/stage1/model --data llava_v1_5_mix665k.json --image-folder playground/data
    python train.py --stage 2 --model llava-1.5-7b-hf --data my.json --image-folder my_images --lora-r 128

Every stage ends by writing `<out_dir>/model` (llava-hf layout: transformers, chat.py and eval.py load it) and pointing
`<runs_dir>/LATEST` at it; an out_dir holding an earlier run's checkpoints takes `--resume true` or `--overwrite true`.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from clip import ASPECT_RATIOS, CLIPVisionConfig
from data import CONV_TEMPLATES, LazySupervisedDataset, ModalityLengthGroupedSampler, collate
from llama import LlamaConfig
from model import IGNORE_INDEX, LlavaConfig
from lora import add_lora
from plumbing.checkpoints import load_base, load_llava, load_projector, read_config, read_llava_config
from plumbing.cli import (DTYPES, TRAIN_DTYPES, check_gpus, check_images, check_launch, check_train_config,
                          default_help, leave_process_group, one_line_errors, option, parse_bool, unknown_option_hint)
from plumbing.files import DataError
from plumbing.memory import memory_table
from plumbing.runs import (RunLog, check_same_run, checkpoint_dirs, claim_out_dir, gather_model, load_checkpoint, log,
                           publish, save_checkpoint, start_afresh)
from plumbing.tokenizer import load_tokenizer
from projector import projector_depth
from toy import TOY_DEFAULTS, prepare_toy, toy_paths

REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# configuration: dataclass defaults, then the stage's official values, then the toy's, then the command line


@dataclass
class TrainConfig:
    stage: int = option(1, "0: the toy's base models; 1: align the projector; 2: instruction-tune projector + LLM")
    runs_dir: str = option(os.path.join(REPO, "runs"), "where outputs go, and LATEST")
    out_dir: str = option("", "this stage's checkpoints and model (empty: <runs-dir>/stage<N>, or "
                              "<runs-dir>/toy/stage<N>)")
    # models (empty = the toy world's, made by stage 0)
    llm: str = option("", "a plain HF LLaMA / Vicuna directory, also holding the tokenizer (empty: the toy's)")
    model: str = option("", "stage 2 from a finished LLaVA (ours, llava-hf, original layout with --vision-tower), not "
                            "--llm and --projector: stage 2's defaults are finetune_task.sh's (and _lora.sh's)")
    vision_tower: str = option("", "a plain HF CLIP directory (empty: the toy's)")
    projector: str = option("", "stage 2: a stage-1 model directory (or its run's, holding model/) or an official "
                                "mm_projector.bin (or its run's directory); its projector type comes with it")
    projector_type: str = option("mlp2x_gelu", "linear or mlpNx_gelu, as the official mm_projector_type")
    # data
    data: str = option("", "LLaVA JSON / JSONL, or several: a.json,b.json (empty: the toy world's)")
    image_folder: str = option("", "where the data's image paths start; several: d1,d2 (the first holding an image)")
    template: str = option("", "conversation template: " + ", ".join(CONV_TEMPLATES))
    image_aspect_ratio: str = option("", "pad: to a square of CLIP's mean colour first; square: resize and centre-crop")
    max_len: int = option(2048, "tokens per sample, image tokens included; longer ones are cut")
    group_by_modality: bool = option(False, "image and text-only samples in separate batches, as the "
                                            "official group_by_modality_length")
    pack: bool = option(False, "several samples per micro-batch row, each attending only to itself: less "
                               "compute spent on padding")
    skip_bad: bool = option(True, "skip (and count) unreadable samples instead of stopping")
    num_workers: int = option(2, "data loader processes per rank")
    # optimization
    lr: float = option(0.0, "peak learning rate")
    global_batch: int = option(0, "samples per optimizer step, over all ranks and micro-steps")
    micro_batch: int = option(0, "samples per forward on one rank")
    epochs: float = option(1.0, "passes over the data; fractions allowed")
    warmup_ratio: float = option(0.03, "linear warmup over this share of the steps, then cosine decay to 0")
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and norms)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this")
    seed: int = option(42, "seeds the data order and the initial weights")
    gradient_checkpointing: bool = option(True, "recompute the LLM's activations in backward: less memory")
    fsdp: bool = option(False, "shard the LLM with FSDP: stage 2 of a 7B model does not fit one GPU with DDP")
    compile: bool = option(False, "compile each LLM decoder layer (torch.compile): fewer, fused kernels; the first "
                                  "steps pay for compiling")
    # LoRA (lora.py): the LLM frozen, low-rank changes of its seven projections trained beside the projector
    lora_r: int = option(0, "LoRA's rank (the official LoRA scripts: 128); 0: the LLM trains in full")
    lora_alpha: float = option(256.0, "LoRA's change is scaled by alpha / r")
    lora_dropout: float = option(0.05, "dropout on the input of LoRA's branch")
    projector_lr: float = option(0.0, "the projector's peak learning rate (official mm_projector_lr); 0: --lr")
    quantize: str = option("", "with LoRA: the frozen LLM's projections in int8 or int4 (QLoRA, official --bits)")
    # runtime
    device: str = option("auto", "auto: cuda if available, else cpu; cpu; cuda")
    dtype: str = option("auto", "auto: bf16 on cuda, fp32 on cpu; " + "; ".join(TRAIN_DTYPES))
    save_every: int = option(1000, "optimizer steps between resumable checkpoints")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    overwrite: bool = option(False, "start afresh in an out_dir that holds an earlier run's checkpoints, "
                                    "removing them")
    max_steps: int = option(0, "stop after this many optimizer steps (smoke tests: LATEST stays as it is); 0: the "
                               "full schedule")
    # stage 0 (toy only)
    lm_steps: int = option(600, "stage 0: steps of the toy LM's pretraining on the world's text")
    clip_steps: int = option(2000, "stage 0: steps of the toy CLIP tower's contrastive training")


STAGE_DEFAULTS = {  # scripts/v1_5/pretrain.sh and finetune.sh (8 GPUs × per-device batch)
    1: dict(lr=1e-3, global_batch=256, micro_batch=32, template="plain", image_aspect_ratio="square"),
    2: dict(lr=2e-5, global_batch=128, micro_batch=16, template="vicuna_v1", image_aspect_ratio="pad",
            group_by_modality=True),
}
LORA_DEFAULTS = dict(lr=2e-4, projector_lr=2e-5)  # scripts/v1_5/finetune_lora.sh and finetune_task_lora.sh


def resolve_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--stage {0,1,2}] [--OPTION VALUE ...] (--help lists them all)")
    fields = dataclasses.fields(TrainConfig)
    for f in fields:
        flag = dict(type=parse_bool, nargs="?", const=True) if f.type is bool else dict(type=f.type)  # --x: true
        parser.add_argument("--" + f.name.replace("_", "-"), **flag, default=None, metavar=f.type.__name__.upper(),
                            help=f.metadata["help"] + default_help(f, STAGE_DEFAULTS, TOY_DEFAULTS, LORA_DEFAULTS))
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_option_hint(unknown, {f.name for f in fields}))
    given = {k: v for k, v in vars(known).items() if v is not None}
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in ("stage", "runs_dir")})
    if cfg.stage not in (0, 1, 2):
        parser.error(f"--stage {cfg.stage}: choose 0 (the toy's base models), 1 or 2")
    toy = not given.get("llm") and not given.get("model")
    if toy and given.get("vision_tower"):  # the toy LLM with a real tower: surely a forgotten --llm
        parser.error("--vision-tower without --llm: the real recipe needs --llm, --vision-tower and --data (with "
                     "none of them, train.py trains the toy world)")
    values = dict(STAGE_DEFAULTS.get(cfg.stage, {}))
    if toy:
        paths = toy_paths(cfg.runs_dir, cfg.stage)
        values.update(TOY_DEFAULTS.get(cfg.stage, {}), llm=paths["llm"], vision_tower=paths["vision_tower"],
                      out_dir=paths["out"], data=os.path.join(paths["world"], f"stage{max(cfg.stage, 1)}.json"),
                      image_folder=os.path.join(paths["world"], "images"))
        if cfg.stage == 2:
            values["projector"] = paths["stage1"]
    else:
        values["out_dir"] = os.path.join(cfg.runs_dir, "task" if given.get("model") else f"stage{cfg.stage}")
    if given.get("lora_r"):
        values.update(LORA_DEFAULTS, out_dir=values["out_dir"] + "-lora")
    cfg = TrainConfig(**{**dataclasses.asdict(cfg), **values, **given})
    check_train_config(cfg, given, parser, CONV_TEMPLATES, ASPECT_RATIOS, projector_depth)
    return cfg


# -----------------------------------------------------------------------------
# processes, the model and the optimizer


def setup_distributed(cfg: TrainConfig):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if "RANK" in os.environ else 0
    check_gpus(cuda, local_rank)
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # official --tf32 True
    dtype = (torch.bfloat16 if cuda else torch.float32) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    return rank, world, device, dtype


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def build_model(cfg: TrainConfig, device, dtype):
    """Bases + projector, or a finished LLaVA (--model), with only this run's parts trainable: the projector, and in
    stage 2 the LLM or, with LoRA, low-rank changes of its projections. Frozen parts are kept in the compute dtype;
    trainable parts in fp32 (autocast computes in bf16, AdamW updates fp32 master weights)."""
    quantize = cfg.quantize or None  # QLoRA: the frozen projections quantized as they load (quantize.py)
    model = (load_llava(cfg.model, cfg.vision_tower or None, dtype, device, quantize) if cfg.model else
             load_base(cfg.llm, cfg.vision_tower, cfg.projector_type, dtype, device, quantize))
    if cfg.projector:
        load_projector(model, cfg.projector)
    model.requires_grad_(False)
    if cfg.lora_r:  # new fp32 A and B beside each frozen (or quantized) projection, trainable
        add_lora(model.language_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    elif cfg.stage == 2:
        model.language_model.float().requires_grad_(True)
    model.multi_modal_projector.float().requires_grad_(True)
    model.language_model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        model.language_model.compile_layers()  # fused kernels, fewer saved activations (see there)
    return model


def shard(model, world: int, device, dtype):
    """FSDP2: every parameter becomes a DTensor holding 1/world of it. Each decoder layer is its own unit, all-gathered
    just before it runs and freed after; the root unit holds the rest (embeddings, lm_head, projector, the frozen
    tower). Within a unit only the trainable parameters must share a dtype, so the bf16 tower can sit beside them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    # compute in the run's dtype (as autocast would), reduce gradients in fp32; a no-op in fp32 on the CPU
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def make_optimizer(trainable: dict, cfg: TrainConfig):
    """AdamW with the HF defaults LLaVA used, in LLaVATrainer.create_optimizer's groups: no weight decay on biases and
    norm weights, the projector at its own peak lr. Fused: one kernel updates every parameter instead of a dozen small
    ops per parameter tensor; the CPU has it too, so the tests run the optimizer the GPU runs."""
    groups = []
    for projector, peak in ((False, cfg.lr), (True, cfg.projector_lr or cfg.lr)):
        params = [p for n, p in trainable.items() if n.startswith("multi_modal_projector.") == projector]
        groups += [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay, peak_lr=peak),
                   dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, peak_lr=peak)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def get_lr(step: int, total: int, base: float, warmup_ratio: float) -> float:
    """The learning rate of optimizer step `step` (from 0): linear warmup over warmup_ratio of the steps, then cosine
    decay to 0, as HF's get_cosine_schedule_with_warmup gives it to LLaVA's Trainer (whose first step runs at 0)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# batches and the training step


def global_batches(dataset, cfg: TrainConfig, epoch: int, world: int = 1) -> list:
    """The epoch's sample order cut into global batches (the last incomplete one is dropped). The samples of a global
    batch do not depend on the world size, only how rank_micro_batches deals them."""
    if cfg.group_by_modality:  # single-modality global batches, dealt into micro-batches of similar length
        batches = ModalityLengthGroupedSampler(dataset.modality_lengths, batch_size=cfg.global_batch,
                                               micro_batch=cfg.micro_batch, num_replicas=world, seed=cfg.seed,
                                               epoch=epoch).global_batches()
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batches = [order[i:i + cfg.global_batch] for i in range(0, len(order), cfg.global_batch)]
    # full global batches only: the sampler's last, mixed batch can hold more or fewer than one
    return [batch[i:i + cfg.global_batch] for batch in batches
            for i in range(0, len(batch) - cfg.global_batch + 1, cfg.global_batch)]


def rank_micro_batches(batch: list, rank: int, world: int, micro_batch: int) -> list:
    """This rank's micro-batches of a global batch, as ModalityLengthGroupedSampler lays it out: micro-step m of rank
    r is slice m * world + r, so the ranks of a micro-step get samples of similar total length and none waits long
    for another at the gradient all-reduce."""
    return [batch[start:start + micro_batch] for start in range(rank * micro_batch, len(batch), world * micro_batch)]


SKIPPED_BATCH = dict(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.zeros(1, 1, dtype=torch.bool),
                     labels=torch.full((1, 1), IGNORE_INDEX), images=None, segment_ids=None)


def train_step(model, ddp_model, batches: list, optimizer, params: list, cfg: TrainConfig, world: int, device,
               autocast) -> tuple:
    """One optimizer step on this rank's micro-batches of one global batch. Returns (the global batch's summed loss,
    its number of supervised tokens, the gradient norm before clipping)."""
    # average over every supervised token of the global batch, not a mean of per-micro-batch means
    n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    n_global = all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64, device=device)).item()
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        if not b["ids"]:  # every sample was skipped: one padding token without labels runs the same forward, and so
            b = SKIPPED_BATCH  # the same collectives, as the other ranks' micro-batches, with a zero loss
        # gradients cross between ranks only on the last micro-step: DDP's no_sync, and FSDP's equivalent, which
        # keeps unsharded gradients until then
        if cfg.fsdp:
            model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or world == 1 or cfg.fsdp else ddp_model.no_sync()
        with sync, autocast:
            images = b["images"].to(device, non_blocking=True) if b["images"] is not None else None
            segment_ids = b["segment_ids"].to(device) if b["segment_ids"] is not None else None
            loss = ddp_model(b["input_ids"].to(device), images, b["attention_mask"].to(device), b["labels"].to(device),
                             reduction="sum", segment_ids=segment_ids)
            if images is None:  # text-only batch: touch the unused projector so DDP's sync sees it
                loss = loss + 0.0 * sum(p.sum() for p in model.multi_modal_projector.parameters())
            # DDP and FSDP average gradients over ranks; × world turns that into the global batch's sum
            (loss * world / max(n_global, 1.0)).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm of sharded gradients, reduced over the ranks
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(loss_sum.to(torch.float64)), n_global, grad_norm


# -----------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, rank: int, world: int, device, dtype):
    earlier = checkpoint_dirs(cfg.out_dir) if cfg.resume else []
    resume_from = earlier[-1] if earlier else None  # the newest checkpoint
    if resume_from:
        check_same_run(cfg, resume_from, rank)
    tokenizer = load_tokenizer(cfg.model or cfg.llm)
    # the data is checked before the weights' minutes of loading: the configs say how an image becomes positions
    config = read_llava_config(cfg.model, cfg.vision_tower or None) if cfg.model else LlavaConfig(
        vision=CLIPVisionConfig.from_hf(read_config(cfg.vision_tower)), text=LlamaConfig.from_hf(read_config(cfg.llm)))
    dataset = LazySupervisedDataset(cfg.data, cfg.image_folder, tokenizer, cfg.template,
                                    image_size=config.vision.image_size, image_aspect_ratio=cfg.image_aspect_ratio,
                                    max_len=cfg.max_len, image_tokens=config.num_image_tokens, skip_bad=cfg.skip_bad)
    check_images(dataset, cfg, partial(log, rank))
    if cfg.num_workers:
        # the DataLoader's forked workers share the parent's records until something writes to their pages; the cycle
        # collector writes to every object it scans, so each worker would soon hold a private copy of them all.
        # Frozen objects are never scanned.
        gc.freeze()
    accum = cfg.global_batch // (world * cfg.micro_batch)  # a whole number: resolve_config checked it
    steps_per_epoch = len(global_batches(dataset, cfg, epoch=0, world=world))  # the same for every epoch
    total_steps = int(cfg.epochs * steps_per_epoch)
    if total_steps == 0:
        raise SystemExit(f"{cfg.data}: {len(dataset)} samples make no full global batch of {cfg.global_batch} "
                         "(--global-batch)")

    log(rank, memory_table(config, cfg, world, torch.finfo(dtype).bits // 8))
    model = build_model(cfg, device, dtype)
    if cfg.compile:
        log(rank, "the LLM's decoder layers are compiled (torch.compile): the first steps are slow while it compiles")
    # transformers' LLaVA needs a vocabulary id for its image tokens: the toy tokenizer has "<image>"; LLaMA's has
    # none, so the saved model gets one past the vocabulary (padded there, as llava-hf's 32000)
    model.config.image_token_index = tokenizer.token_to_id("<image>") or model.config.text.vocab_size
    model.config.image_aspect_ratio = cfg.image_aspect_ratio  # saved with the model: inference prepares images alike
    if cfg.fsdp:
        shard(model, world, device, dtype)  # before the optimizer: sharding replaces every parameter
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(trainable, cfg)
    start_step, skipped = load_checkpoint(resume_from, model, trainable, optimizer, cfg.fsdp) if resume_from else (0, 0)
    model.train()
    model.vision_tower.eval()  # frozen: CLIP's statistics stay as pretrained
    ddp_model = model  # FSDP's hooks are on the sharded model itself
    if world > 1 and not cfg.fsdp:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                              else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    log(rank, f"stage {cfg.stage}: {len(dataset)} samples, {total_steps} steps of {cfg.global_batch} ({world} "
              f"rank{'s' * (world > 1)} × {accum} micro-step{'s' * (accum > 1)} × {cfg.micro_batch}), trainable "
              f"{sum(p.numel() for p in trainable.values()) / 1e6:.2f}M of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
              + (f"; resumed from {resume_from} at step {start_step}" if resume_from else ""))

    os.makedirs(cfg.out_dir, exist_ok=True)
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    run_log = RunLog(cfg, model, rank, world, device, start_step, end_step)
    collate_fn = partial(collate, pad_id=tokenizer.token_to_id("<unk>"), pack=cfg.pack,
                         image_tokens=model.config.num_image_tokens)
    step, trained_tokens = start_step, 0
    try:  # the bar is closed before an error's message is printed, which it would otherwise be drawn over
        while step < end_step:
            epoch, offset = divmod(step, steps_per_epoch)
            # this rank's micro-batches for the rest of the epoch: its share of each global batch
            micro_batches = [micro_batch for batch in global_batches(dataset, cfg, epoch, world)[offset:]
                             for micro_batch in rank_micro_batches(batch, rank, world, cfg.micro_batch)]
            loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=micro_batches, collate_fn=collate_fn,
                                                      num_workers=cfg.num_workers,
                                                      pin_memory=device.type == "cuda"))
            for _ in range(offset, steps_per_epoch):
                if step == end_step:
                    break
                t0 = time.time()
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(step, total_steps, group["peak_lr"], cfg.warmup_ratio)
                torch.manual_seed(cfg.seed + step * world + rank)  # LoRA's dropout: a resumed step draws alike
                batches = [next(loader) for _ in range(accum)]
                skipped += sum(b["n_skipped"] for b in batches)
                loss_sum, n_tokens, grad_norm = train_step(model, ddp_model, batches, optimizer,
                                                           list(trainable.values()), cfg, world, device, autocast)
                step += 1
                trained_tokens += n_tokens
                run_log.step(step, loss_sum.item() / max(n_tokens, 1.0), optimizer.param_groups[0]["lr"],
                             grad_norm.item(), batches, t0, skipped)
                if step % cfg.save_every == 0 and step < end_step:
                    save_checkpoint(cfg, step, model, trainable, optimizer, skipped, rank)
    finally:
        run_log.close()
    skipped = int(all_reduce_sum(torch.tensor([skipped], device=device)).item())
    if step > start_step and trained_tokens == 0:  # not a model to hand to chat.py and eval.py
        raise DataError(f"{cfg.data}: no sample was trained in {step - start_step} steps ({skipped} skipped): each "
                        "was unreadable (named above), had no answer to learn, or lost its answers to --max-len "
                        f"{cfg.max_len}; no model written")
    if step > start_step:  # a finished run resumed has its last checkpoint already
        save_checkpoint(cfg, step, model, trainable, optimizer, skipped, rank)
    publish(cfg, gather_model(model, cfg) if cfg.fsdp else model, step, start_step, total_steps, skipped, rank)
    return model


def main(argv=None):
    cfg = resolve_config(argv)
    rank, world, device, dtype = setup_distributed(cfg)
    paths = toy_paths(cfg.runs_dir, cfg.stage)
    toy = cfg.llm == paths["llm"]
    check_launch(cfg, device, toy, paths, partial(log, rank))
    marker = claim_out_dir(cfg, rank) if cfg.stage in (1, 2) else None
    try:
        with one_line_errors():
            if cfg.stage in (1, 2) and not cfg.resume:
                start_afresh(cfg, rank)
            torch.manual_seed(cfg.seed)
            if toy or cfg.stage == 0:
                if rank == 0:  # small enough for one process; the others wait
                    prepare_toy(paths, cfg.stage, cfg.seed, cfg.lm_steps, cfg.clip_steps, get_lr)
                if dist.is_initialized():
                    dist.barrier()
            if cfg.stage in (1, 2):
                log(rank, "config: " + json.dumps(dataclasses.asdict(cfg)))
                train(cfg, rank, world, device, dtype)
    except KeyboardInterrupt:
        if rank == 0:
            last = checkpoint_dirs(cfg.out_dir) if cfg.stage in (1, 2) else []
            print(f"\ninterrupted; {'the newest checkpoint is ' + last[-1] if last else 'no checkpoint yet'}: the "
                  "same command with --resume true continues from it", file=sys.stderr)
        sys.exit(130)
    finally:
        if marker:  # a killed run cannot remove it, but its process is gone: the next run takes over
            os.remove(marker)
    leave_process_group()


if __name__ == "__main__":
    main()
