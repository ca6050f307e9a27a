"""Train LLaVA-1.5 in its two stages with a plain PyTorch loop (paper §4; official scripts/v1_5/*.sh, spec §8).

Stage 1, feature alignment: only the projector learns, on image-caption pairs (blip_laion_cc_sbu_558k.json), `plain`
template, lr 1e-3, global batch 256. Stage 2, visual instruction tuning: projector + LLM learn on the 665k mix,
`vicuna_v1` template, lr 2e-5, global batch 128. The CLIP tower stays frozen (and in eval mode) throughout.

With no model arguments it trains the toy world (data.py) on the CPU. The toy's base models are made here too, by a
"stage 0" that runs by itself the first time: a small LLaMA trained on the world's text, and a small CLIP vision tower
trained contrastively against a small text tower, as CLIP was. So stage 1 starts from pretrained towers loaded from
plain HF directories, exactly like the real recipe.

    python train.py --stage 1                      # the toy world: stage 0 if needed, then stage 1
    python train.py --stage 2                      # continues from the toy stage 1
    torchrun --nproc_per_node 8 train.py --stage 1 --llm VICUNA_DIR --vision-tower CLIP_DIR \\
        --data blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images
    torchrun --nproc_per_node 8 train.py --stage 2 --llm VICUNA_DIR --vision-tower CLIP_DIR \\
        --projector runs/stage1/model --data llava_v1_5_mix665k.json --image-folder playground/data

Every stage ends by writing `<out_dir>/model` (llava-hf layout, loadable by transformers, chat.py and eval.py) and
pointing `<runs_dir>/LATEST` at it. Only rank 0 prints and writes. An out_dir that holds an earlier run's
checkpoints takes `--resume true` (continue it) or `--overwrite true` (start afresh).
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from clip import ASPECT_RATIOS, CLIPVisionConfig, CLIPVisionTower, preprocess_image
from data import (BOS_ID, CONV_TEMPLATES, POSITIONS, SHAPES, DataError, LazySupervisedDataset,
                  ModalityLengthGroupedSampler, collate, ensure_toy_world, load_tokenizer, open_image, place_phrase,
                  save_llava_tokenizer)
from llama import Llama, LlamaConfig
from model import (DTYPES, IGNORE_INDEX, CheckpointError, Llava, LlavaConfig, load_base, load_projector, read_config,
                   save_clip, save_image_processor, save_llama, save_llava)
from projector import projector_depth

REPO = os.path.dirname(os.path.abspath(__file__))
# model.DTYPES less fp16: its gradients underflow without loss scaling (a GradScaler), which this loop leaves out; the
# official recipe trains in bf16
TRAIN_DTYPES = ("fp32", "bf16")

# -----------------------------------------------------------------------------
# configuration: dataclass defaults, then the stage's official values, then the toy's, then the command line


def option(default, help: str):
    """A config field and its --help text."""
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclass
class TrainConfig:
    stage: int = option(1, "0: the toy's base models; 1: align the projector; 2: instruction-tune projector + LLM")
    runs_dir: str = option(os.path.join(REPO, "runs"), "where outputs go, and LATEST")
    out_dir: str = option("", "this stage's checkpoints and model (empty: <runs-dir>/stage<N>, or "
                              "<runs-dir>/toy/stage<N>)")
    # models (empty = the toy world's, made by stage 0)
    llm: str = option("", "a plain HF LLaMA / Vicuna directory, also holding the tokenizer (empty: the toy's)")
    vision_tower: str = option("", "a plain HF CLIP directory (empty: the toy's)")
    projector: str = option("", "stage 2: a stage-1 model directory (or its run's, holding model/) or an official "
                                "mm_projector.bin (or its run's directory); its projector type comes with it")
    projector_type: str = option("mlp2x_gelu", "linear or mlpNx_gelu, as the official mm_projector_type")
    # data
    data: str = option("", "LLaVA JSON / JSONL (empty: the toy world's)")
    image_folder: str = option("", "where the data's image paths start")
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
    lm_steps: int = option(250, "stage 0: steps of the toy LM's pretraining on the world's text")
    clip_steps: int = option(2000, "stage 0: steps of the toy CLIP tower's contrastive training")


STAGE_DEFAULTS = {  # scripts/v1_5/pretrain.sh and finetune.sh (8 GPUs × per-device batch)
    1: dict(lr=1e-3, global_batch=256, micro_batch=32, template="plain", image_aspect_ratio="square"),
    2: dict(lr=2e-5, global_batch=128, micro_batch=16, template="vicuna_v1", image_aspect_ratio="pad",
            group_by_modality=True),
}
TOY_DEFAULTS = {  # minutes on a 2-core CPU: tiny models want larger learning rates and batches that fit the world
    1: dict(lr=2e-3, global_batch=32, micro_batch=32, max_len=512, epochs=3.0, num_workers=0,
            gradient_checkpointing=False, save_every=100,
            image_aspect_ratio="pad"),  # the toy's non-square images would lose shapes to a centre crop
    # stage 2: 4 micro-steps of similar lengths (the sampler) pad less than one of 32; that 1.4x pays for the 5.5
    # epochs the toy needs (6 before its question samples grew longer: over 5 minutes; docs/toy_accuracy.md)
    2: dict(lr=2e-3, global_batch=32, micro_batch=8, max_len=512, epochs=5.5, num_workers=0,
            gradient_checkpointing=False, save_every=100),
}


def toy_paths(cfg: TrainConfig) -> dict:
    toy = os.path.join(cfg.runs_dir, "toy")
    return dict(world=os.path.join(toy, "world"), llm=os.path.join(toy, "base", "llm"),
                vision_tower=os.path.join(toy, "base", "clip"), stage1=os.path.join(toy, "stage1", "model"),
                out=os.path.join(toy, f"stage{cfg.stage}"))


def default_help(f: dataclasses.Field) -> str:
    """' (default ...)' for --help: the official stage values and the toy's where they differ from the field's."""
    def per_stage(defaults):
        values = [defaults[stage].get(f.name, f.default) for stage in (1, 2)]
        return repr(values[0]) if values[0] == values[1] else f"{values[0]!r} in stage 1, {values[1]!r} in stage 2"
    if f.default == "" and not any(f.name in d for d in STAGE_DEFAULTS.values()):
        return ""  # the help says what empty means
    real = per_stage(STAGE_DEFAULTS)
    toy = per_stage({stage: {**STAGE_DEFAULTS[stage], **TOY_DEFAULTS[stage]} for stage in (1, 2)})
    return f" (default {real}" + (f"; the toy: {toy})" if toy != real else ")")


def parse_bool(text: str) -> bool:
    """true/false (or yes/no, on/off, 1/0); anything else is a usage error, not a silent false."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
             "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def check_numbers(cfg: TrainConfig, parser):
    """Out-of-range numbers are usage errors here, not a traceback (or a silent no-op) minutes later."""
    ranges = dict(lm_steps=(1, None), clip_steps=(1, None))  # stage 0's; stages 1 and 2 take the rest
    training = cfg.stage in (1, 2)
    if training:
        ranges.update(global_batch=(1, None), micro_batch=(1, None), max_len=(1, None), save_every=(1, None),
                      num_workers=(0, None), max_steps=(0, None), lr=(0, None), weight_decay=(0, None),
                      warmup_ratio=(0, 1))
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if value < low or (high is not None and value > high):
            parser.error(f"--{name.replace('_', '-')} {value}: must be " +
                         (f"between {low} and {high}" if high is not None else f"at least {low}"))
    if not training:
        return
    for name in ("epochs", "grad_clip"):
        if not getattr(cfg, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be above 0")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's ranks; train() relies on this check
    if cfg.global_batch % (world * cfg.micro_batch):
        parser.error(f"--global-batch {cfg.global_batch} must split into {world} rank{'s' * (world > 1)} × "
                     f"micro-batches of {cfg.micro_batch} (--micro-batch)")


# the official scripts' options (llava/train/train.py's dataclasses, HF TrainingArguments) and what stands for each here
OFFICIAL_OPTIONS = dict(model_name_or_path="--llm", pretrain_mm_mlp_adapter="--projector",
                        mm_projector_type="--projector-type", data_path="--data", version="--template",
                        output_dir="--out-dir", learning_rate="--lr", num_train_epochs="--epochs",
                        model_max_length="--max-len", per_device_train_batch_size="--micro-batch",
                        gradient_accumulation_steps="--global-batch (accumulation follows from it)",
                        group_by_modality_length="--group-by-modality", dataloader_num_workers="--num-workers",
                        max_grad_norm="--grad-clip", save_steps="--save-every", bf16="--dtype bf16",
                        tune_mm_mlp_adapter="--stage 1")


def unknown_option_hint(unknown: list) -> str:
    """The usage error for options argparse does not know: an official script's name, or ours with underscores."""
    name = next((arg[2:].split("=")[0] for arg in unknown if arg.startswith("--")), "")
    ours = {f.name for f in dataclasses.fields(TrainConfig)}
    if name.replace("-", "_") in ours:
        return f"unrecognized argument --{name}: did you mean --{name.replace('_', '-')}?"
    if name in OFFICIAL_OPTIONS:
        return f"--{name} is the official scripts' option; here: {OFFICIAL_OPTIONS[name]}"
    return f"unrecognized arguments: {' '.join(unknown)}"


def stage1_projector(path: str, parser) -> str:
    """What --projector names: a stage-1 model directory or an official mm_projector.bin; given the stage-1 run's
    directory (ours, or the official one holding mm_projector.bin), what it holds."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        inside = [p for p in (os.path.join(path, "model"), os.path.join(path, "mm_projector.bin")) if os.path.exists(p)]
        if not inside:
            parser.error(f"--projector {path}: neither a stage-1 model directory (<out-dir>/model, not a checkpoint) "
                         "nor an official mm_projector.bin")
        return inside[0]
    return path


def resolve_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--stage {0,1,2}] [--OPTION VALUE ...] (--help lists them all)")
    for f in dataclasses.fields(TrainConfig):
        flag = dict(type=parse_bool, nargs="?", const=True) if f.type is bool else dict(type=f.type)  # --x: true
        parser.add_argument("--" + f.name.replace("_", "-"), **flag, default=None, metavar=f.type.__name__.upper(),
                            help=f.metadata["help"] + default_help(f))
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_option_hint(unknown))
    given = {k: v for k, v in vars(known).items() if v is not None}
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in ("stage", "runs_dir")})
    if cfg.stage not in (0, 1, 2):
        parser.error(f"--stage {cfg.stage}: choose 0 (the toy's base models), 1 or 2")
    toy = not given.get("llm")
    if toy and given.get("vision_tower"):  # the toy LLM with a real tower: surely a forgotten --llm
        parser.error("--vision-tower without --llm: the real recipe needs --llm, --vision-tower and --data (with "
                     "none of them, train.py trains the toy world)")
    values = dict(STAGE_DEFAULTS.get(cfg.stage, {}))
    if toy:
        values.update(TOY_DEFAULTS.get(cfg.stage, {}))
        paths = toy_paths(cfg)
        values.update(llm=paths["llm"], vision_tower=paths["vision_tower"], out_dir=paths["out"],
                      data=os.path.join(paths["world"], f"stage{max(cfg.stage, 1)}.json"),
                      image_folder=os.path.join(paths["world"], "images"))
        if cfg.stage == 2:
            values["projector"] = paths["stage1"]
    else:
        values["out_dir"] = os.path.join(cfg.runs_dir, f"stage{cfg.stage}")
    values.update(given)
    cfg = TrainConfig(**{**dataclasses.asdict(cfg), **values})
    if cfg.stage in (1, 2):
        missing = [name for name in ("llm", "vision_tower", "data") if not getattr(cfg, name)]
        if missing:
            parser.error("the real recipe needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        for name in ("llm", "vision_tower", "projector", "data", "image_folder"):
            if given.get(name) and not os.path.exists(given[name]):  # before minutes of loading, not after
                parser.error(f"--{name.replace('_', '-')} {given[name]}: no such file or directory")
        if os.path.isdir(cfg.data):
            parser.error(f"--data {cfg.data}: a directory; give the LLaVA JSON or JSONL file")
        if cfg.projector and os.path.exists(cfg.projector):
            cfg.projector = stage1_projector(cfg.projector, parser)
            saved_type = read_config(cfg.projector).get("projector_type") if os.path.isdir(cfg.projector) else None
            if saved_type and given.get("projector_type", saved_type) != saved_type:
                parser.error(f"--projector-type {cfg.projector_type}: the projector in {cfg.projector} is {saved_type}")
            cfg.projector_type = saved_type or cfg.projector_type
        if cfg.template not in CONV_TEMPLATES:
            parser.error(f"--template {cfg.template!r}: choose from {', '.join(CONV_TEMPLATES)}")
        if cfg.image_aspect_ratio not in ASPECT_RATIOS:
            parser.error(f"--image-aspect-ratio {cfg.image_aspect_ratio!r}: choose from {', '.join(ASPECT_RATIOS)}")
        try:
            projector_depth(cfg.projector_type)
        except ValueError as e:
            parser.error(f"--projector-type: {e}")
    check_numbers(cfg, parser)
    if cfg.dtype not in ("auto", *TRAIN_DTYPES):
        why = " (fp16 training needs loss scaling, which this loop leaves out)" if cfg.dtype == "fp16" else ""
        parser.error(f"--dtype {cfg.dtype!r}: choose from auto, {', '.join(TRAIN_DTYPES)}{why}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device {cfg.device!r}: choose from auto, cpu, cuda (torchrun gives each rank its GPU)")
    return cfg


# -----------------------------------------------------------------------------
# distributed setup and small helpers


def setup_distributed(cfg: TrainConfig):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if "RANK" in os.environ else 0
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA GPU that torch can use")
    if cuda and local_rank >= torch.cuda.device_count():  # before NCCL, which would fail less clearly
        raise SystemExit(f"LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"torchrun needs one rank per GPU (--nproc_per_node {torch.cuda.device_count()})")
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
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


def get_lr(step: int, total: int, base: float, warmup_ratio: float) -> float:
    """The learning rate of optimizer step `step` (from 0): linear warmup over warmup_ratio of the steps, then cosine
    decay to 0, as HF's get_cosine_schedule_with_warmup gives it to LLaVA's Trainer (whose first step runs at 0)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: TrainConfig):
    """AdamW with the HF defaults LLaVA used; no weight decay on biases and norm weights (LLaVATrainer). Fused: one
    kernel updates every parameter instead of a dozen small ops per parameter tensor; the CPU has it too, so the
    tests run the optimizer the GPU runs."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def log(rank, *args):
    if rank == 0:
        tqdm.write(" ".join(str(a) for a in args))


# -----------------------------------------------------------------------------
# stage 0: the toy world's base models (a stand-in for downloading Vicuna and CLIP)


class ContrastiveCLIP(torch.nn.Module):
    """CLIP's training setup (Radford et al. 2021, Fig. 3): image and text towers, projections into a shared space,
    symmetric cross-entropy over the batch's image-text similarity matrix. The text tower is a small causal
    transformer read out at its last token, like CLIP's (here our Llama class). A second, token-wise similarity
    (FILIP, Yao et al. 2021) trains the patch tokens too; see `token_wise_similarity`."""

    def __init__(self, vision: CLIPVisionConfig, vocab_size: int):
        super().__init__()
        self.vision = CLIPVisionTower(vision)
        self.text = Llama(LlamaConfig(vocab_size=vocab_size, hidden_size=vision.hidden_size,
                                      intermediate_size=2 * vision.hidden_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
        self.visual_projection = torch.nn.Linear(vision.hidden_size, vision.projection_dim, bias=False)
        self.text_projection = torch.nn.Linear(vision.hidden_size, vision.projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, images, text_ids, text_mask):
        """images (B, 3, H, W); text_ids, text_mask (B + N, T): row i < B is image i's caption, rows after B are
        extra negatives (hard ones) that only the image-to-text direction sees."""
        image_tokens = self.vision.post_layernorm(self.vision(images, select_layer=-1))  # (B, 1 + P, C)
        image_emb = F.normalize(self.visual_projection(image_tokens), dim=-1)  # (B, 1 + P, D)
        text_emb = F.normalize(self.text_projection(self.text(self.text.embed_tokens(text_ids))), dim=-1)  # (B+N, T, D)
        last = text_emb[torch.arange(len(text_ids)), text_mask.sum(1) - 1]  # (B + N, D) at each text's last token
        words = text_mask.clone()
        words[:, 0] = False  # BOS is no word
        word_to_patch, patch_to_word = token_wise_similarity(image_emb[:, 1:], text_emb, words)
        scale = self.logit_scale.exp().clamp(max=100)
        return (contrastive_loss(scale * image_emb[:, 0] @ last.T)  # CLIP's: class token against last text token
                + (contrastive_loss(scale * word_to_patch) + contrastive_loss(scale * patch_to_word)) / 2)


def token_wise_similarity(patches, words, word_mask):
    """FILIP's late interaction (Yao et al. 2021, eq. 4-5) between B images and B + N texts: each word is matched to
    its most similar patch and the scores averaged over the text's words, and each patch to its most similar word,
    averaged over the image's patches. patches (B, P, D) and words (B + N, T, D) unit vectors; word_mask (B + N, T)
    is False at padding. Returns (word_to_patch, patch_to_word), each (B, B + N).

    Why the toy needs it: with the class token's similarity alone, the patches may stay a private code that only the
    class token reads (shape came out of the toy's patches non-linearly, and the LLM learned it slowly). LLaVA's LLM
    reads the patches, so this term makes each patch say what it shows in the words of the captions."""
    sim = torch.einsum("ipd,jtd->ijpt", patches, words)  # (B, B + N, P, T)
    word_to_patch = (sim.amax(2) * word_mask).sum(-1) / word_mask.sum(-1)
    patch_to_word = sim.masked_fill(~word_mask[None, :, None, :], -1.0).amax(3).mean(-1)  # cosines are >= -1
    return word_to_patch, patch_to_word


def contrastive_loss(logits):
    """CLIP's symmetric cross-entropy on a (B, B + N) similarity matrix: each image picks its own text among all,
    and each of the first B texts picks its image (extra texts, hard negatives, have no image of their own)."""
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :len(logits)].T, targets)) / 2


def swap_shapes(caption: str, rng: random.Random) -> str:
    """The caption with every shape word replaced by another shape: a hard negative (as NegCLIP, Yuksekgonul et al.
    2023). In a batch of random scenes, colours and positions alone tell the captions apart; without these negatives
    the tower never needs to see shapes, and the LLM cannot learn what it is not shown."""
    return re.sub("|".join(SHAPES), lambda m: rng.choice([s for s in SHAPES if s != m.group()]), caption)


PLACE = f"(?:on|at) the ({'|'.join(POSITIONS)})"  # data.place_phrase's words


def swap_positions(caption: str, rng: random.Random) -> str:
    """The caption with the objects' places permuted among them (a lone object moved elsewhere): a hard negative
    with the same words as the caption, which only a tower that binds each object to its place tells apart."""
    places = re.findall(PLACE, caption)
    if len(places) > 1:
        shift = rng.randrange(1, len(places))  # a cyclic shift moves every object
        moved = places[shift:] + places[:shift]
    else:
        moved = [rng.choice([p for p in POSITIONS if p not in places])]
    phrases = iter(place_phrase(p) for p in moved)
    return re.sub(PLACE, lambda m: next(phrases), caption)


def run_stage0(cfg: TrainConfig, rank: int):
    """Train and save the toy's base LLaMA and CLIP tower in plain HF layouts (what stage 1 loads)."""
    paths = toy_paths(cfg)
    if rank != 0:  # small enough for one process; the others wait at the barrier in main()
        return
    ensure_toy_world(paths["world"])
    tokenizer = load_tokenizer(paths["world"])
    torch.manual_seed(cfg.seed)
    log(rank, f"stage 0: making the toy world's base models in {os.path.dirname(paths['llm'])} "
              f"(a small LLaMA on the world's text, a small CLIP tower trained contrastively)")

    # the LM: next-token prediction on the world's captions and conversations, packed into blocks (nanoGPT style)
    texts = []
    for name in ("stage1.json", "stage2.json"):
        with open(os.path.join(paths["world"], name)) as f:
            for sample in json.load(f):
                texts.append(" ".join(turn["value"].replace("<image>", "").strip() for turn in sample["conversations"]))
    ids = [t for enc in tokenizer.encode_batch(texts) for t in enc.ids + [tokenizer.token_to_id("</s>")]]
    block = 128
    data = torch.tensor(ids[:len(ids) // block * block]).view(-1, block)
    llm = Llama(dataclasses.replace(LlamaConfig.from_name("toy"), vocab_size=tokenizer.get_vocab_size()))
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    for step in tqdm(range(cfg.lm_steps), desc="stage 0 LM", disable=rank != 0):
        batch = data[torch.randint(len(data), (32,), generator=generator)]
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg.lm_steps, 3e-3, 0.05)
        logits = llm.lm_head(llm(llm.embed_tokens(batch[:, :-1])))
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    log(rank, f"stage 0 LM: final loss {loss.item():.3f}")
    save_llama(llm, paths["llm"])
    for name in os.listdir(paths["world"]):  # the tokenizer travels with the LLM, as in a Vicuna directory
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(paths["world"], name), paths["llm"])

    # the vision tower: contrastive image-caption training on stage 1's pairs, all images preprocessed once
    vision = CLIPVisionConfig.from_name("toy")
    with open(os.path.join(paths["world"], "stage1.json")) as f:
        pairs = [(s["image"], s["conversations"][1]["value"]) for s in json.load(f)]
    images = torch.stack([preprocess_image(open_image(os.path.join(paths["world"], "images", name)), vision.image_size)
                          for name, _ in pairs])  # (N, 3, H, W)
    clip = ContrastiveCLIP(vision, tokenizer.get_vocab_size())
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.1)
    batch_size, rng = 32, random.Random(cfg.seed)
    step, bar = 0, tqdm(total=cfg.clip_steps, desc="stage 0 CLIP", disable=rank != 0)
    while step < cfg.clip_steps:
        order = torch.randperm(len(pairs), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size].tolist()
            captions = [pairs[i][1] for i in index]
            texts = [[BOS_ID] + tokenizer.encode(c, add_special_tokens=False).ids
                     for c in captions + [swap_shapes(c, rng) for c in captions]
                     + [swap_positions(c, rng) for c in captions]]
            text_ids = torch.zeros(len(texts), max(map(len, texts)), dtype=torch.long)  # right-padded
            text_mask = torch.zeros_like(text_ids, dtype=torch.bool)
            for i, ids in enumerate(texts):
                text_ids[i, :len(ids)], text_mask[i, :len(ids)] = torch.tensor(ids), True
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, cfg.clip_steps, 1e-3, 0.05)
            loss = clip(images[index], text_ids, text_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # drawn once, by update
            bar.update()
            if step == cfg.clip_steps:
                break
    bar.close()
    log(rank, f"stage 0 CLIP: final contrastive loss {loss.item():.3f} (chance: {math.log(batch_size):.2f} for "
              f"texts, {math.log(2 * batch_size):.2f} for images)")
    save_clip(clip.vision, paths["vision_tower"])


# -----------------------------------------------------------------------------
# stages 1 and 2


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
                  "global_batch", "epochs", "warmup_ratio", "weight_decay", "grad_clip", "seed")
PATHS_ON_RESUME = ("llm", "vision_tower", "projector", "data", "image_folder")  # only warned about


def check_same_run(cfg: TrainConfig, path: str, rank: int):
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


def build_model(cfg: TrainConfig, device, dtype):
    """Bases + projector, with only this stage's parts trainable. Frozen parts are kept in the compute dtype;
    trainable parts in fp32 (autocast computes in bf16, AdamW updates fp32 master weights)."""
    model = load_base(cfg.llm, cfg.vision_tower, cfg.projector_type, dtype=dtype, device=device)
    if cfg.projector:
        load_projector(model, cfg.projector)
    model.requires_grad_(False)
    trainable = [model.multi_modal_projector] + ([model.language_model] if cfg.stage == 2 else [])
    for part in trainable:
        part.float().requires_grad_(True)
    model.multi_modal_projector.float()  # fresh or loaded, the projector is trained in fp32 (stage 2 too)
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


def gather_model(model):
    """A plain copy of an FSDP-sharded model on rank 0 (None elsewhere), for save_llava. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Llava(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def check_images(dataset, cfg: TrainConfig, rank: int):
    """Stop before training if none of the image files looked for exists (a wrong --image-folder: every image sample
    would be skipped), and say which subfolders lack some, whose samples --skip-bad will skip (the official code
    stops at the first missing image instead)."""
    checked, missing = dataset.missing_images()
    if checked and len(missing) == checked:
        raise SystemExit(f"none of the {checked} image files looked for is under {cfg.image_folder} (such as "
                         f"{missing[0]}): is --image-folder right?" if cfg.image_folder else
                         f"{cfg.data} names images ({missing[0]}, ...): give --image-folder, where their paths start")
    if missing:
        folders = Counter(Path(f).parts[0] if len(Path(f).parts) > 1 else "." for f in missing)
        log(rank, f"warning: {len(missing)} of {checked} image files looked for are not under {cfg.image_folder} "
                  f"(by folder: {', '.join(f'{name} {n}' for name, n in folders.most_common())}; such as "
                  f"{missing[0]}); " + ("their samples will be skipped and counted" if cfg.skip_bad else
                                       "training stops at the first (--skip-bad false)"))


def llm_positions(batch: dict, image_tokens: int) -> int:
    """The positions the LLM runs for one collated micro-batch: its real tokens, each image placeholder spliced into
    image_tokens positions (Llava.splice). tokens/s and MFU count these, as bench.py and issue 7's figures do; the
    text alone would leave out most of the work (a stage-1 sample is 576 image positions and a caption of ~30)."""
    n_images = 0 if batch["images"] is None else len(batch["images"])
    return int(batch["attention_mask"].sum()) + n_images * (image_tokens - 1)


def flops_per_token(model) -> float:
    """Training FLOPs per LLM position: 2N forward through the LLM, 2N backward for activation gradients, 2N more
    for weight gradients where weights train (Kaplan et al.'s 6N, minus frozen weights). N leaves out the embedding
    table, a lookup. An estimate: lm_head counts at every position (it runs only where labels are: 2 % too much in
    stage 1 at 7B), and the CLIP tower, the projector and attention's score products are left out (~6 % at 7B)."""
    n_llm = sum(p.numel() for n, p in model.language_model.named_parameters() if not n.startswith("embed_tokens"))
    n_trainable = sum(p.numel() for n, p in model.named_parameters()
                      if p.requires_grad and not n.startswith("language_model.embed_tokens"))
    return 4 * n_llm + 2 * n_trainable


# dense bf16 peak FLOP/s of one GPU (NVIDIA datasheets), for MFU; the first name contained in the device's name wins
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """None for a GPU not listed: no MFU is logged rather than a wrong one."""
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)


def train(cfg: TrainConfig, rank: int, world: int, device, dtype):
    earlier = checkpoint_dirs(cfg.out_dir) if cfg.resume else []
    resume_from = earlier[-1] if earlier else None  # the newest checkpoint
    if resume_from:
        check_same_run(cfg, resume_from, rank)
    tokenizer = load_tokenizer(cfg.llm)
    # the data is checked before the weights' minutes of loading: the configs say how an image becomes positions
    config = LlavaConfig(vision=CLIPVisionConfig.from_hf(read_config(cfg.vision_tower)),
                         text=LlamaConfig.from_hf(read_config(cfg.llm)))
    accum = cfg.global_batch // (world * cfg.micro_batch)  # a whole number: resolve_config checked it
    dataset = LazySupervisedDataset(cfg.data, cfg.image_folder, tokenizer, cfg.template,
                                    image_size=config.vision.image_size, image_aspect_ratio=cfg.image_aspect_ratio,
                                    max_len=cfg.max_len, image_tokens=config.num_image_tokens, skip_bad=cfg.skip_bad)
    check_images(dataset, cfg, rank)
    if cfg.num_workers:
        # the DataLoader's forked workers share the parent's records until something writes to their pages; the cycle
        # collector writes to every object it scans, so each worker would soon hold a private copy of them all. Frozen
        # objects are never scanned (665k synthetic records: 0.7 GB private per new worker, 0.1 GB frozen)
        gc.freeze()
    steps_per_epoch = len(global_batches(dataset, cfg, epoch=0, world=world))  # the same for every epoch
    total_steps = int(cfg.epochs * steps_per_epoch)
    if total_steps == 0:
        raise SystemExit(f"{cfg.data}: {len(dataset)} samples make no full global batch of {cfg.global_batch} "
                         "(--global-batch)")

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
    optimizer = make_optimizer(list(trainable.values()), cfg)
    start_step, skipped = 0, 0
    if resume_from:
        start_step, skipped = load_checkpoint(resume_from, model, trainable, optimizer, cfg.fsdp)
        log(rank, f"resumed from {resume_from} at step {start_step}")
    model.train()
    model.vision_tower.eval()  # frozen: CLIP's statistics stay as pretrained
    if world > 1 and not cfg.fsdp:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                              else None)
    else:
        ddp_model = model  # FSDP's hooks are on the sharded model itself
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    log(rank, f"stage {cfg.stage}: {len(dataset)} samples, {total_steps} steps of {cfg.global_batch} ({world} "
              f"rank{'s' * (world > 1)} × {accum} micro-step{'s' * (accum > 1)} × {cfg.micro_batch}), trainable "
              f"{sum(p.numel() for p in trainable.values()) / 1e6:.2f}M of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_file = open_log(os.path.join(cfg.out_dir, "log.jsonl"), start_step) if rank == 0 else None
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    bar = tqdm(total=end_step, initial=start_step, desc=f"stage {cfg.stage}", disable=rank != 0)
    step, flops_token, trained_tokens = start_step, flops_per_token(model), 0
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    try:  # the bar is closed before an error's message is printed, which it would otherwise be drawn over
        while step < end_step:
            epoch, offset = divmod(step, steps_per_epoch)
            # this rank's micro-batches for the rest of the epoch: its share of each global batch
            micro_batches = [micro_batch for batch in global_batches(dataset, cfg, epoch, world)[offset:]
                             for micro_batch in rank_micro_batches(batch, rank, world, cfg.micro_batch)]
            loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=micro_batches,
                                                      collate_fn=partial(collate, pad_id=tokenizer.token_to_id("<unk>"),
                                                                         pack=cfg.pack,
                                                                         image_tokens=model.config.num_image_tokens),
                                                      num_workers=cfg.num_workers, pin_memory=device.type == "cuda"))
            for _ in range(offset, steps_per_epoch):
                if step >= end_step:
                    break
                t0 = time.time()
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(step, total_steps, cfg.lr, cfg.warmup_ratio)
                batches = [next(loader) for _ in range(accum)]
                # average over every supervised token of the global batch, not a mean of per-micro-batch means
                n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
                stats = all_reduce_sum(torch.tensor([n_local, 0.0, 0.0, 0.0], dtype=torch.float64, device=device))
                trained_tokens += stats[0].item()
                n_global = max(stats[0].item(), 1.0)
                loss_sum = torch.zeros((), device=device)
                for i, b in enumerate(batches):
                    skipped += b["n_skipped"]
                    last = i == accum - 1
                    # gradients are reduced across ranks only on the last micro-step: DDP's no_sync, and FSDP's
                    # equivalent, which keeps unsharded gradients until then
                    if cfg.fsdp:
                        model.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext() if last or world == 1 or cfg.fsdp else ddp_model.no_sync()
                    if len(b["ids"]) == 0:  # every sample was skipped: one padding token without labels gives a zero
                        # loss through the same forward, and so the same collectives, as the other ranks' micro-batches
                        b = dict(b, input_ids=torch.zeros(1, 1, dtype=torch.long),
                                 attention_mask=torch.zeros(1, 1, dtype=torch.bool),
                                 labels=torch.full((1, 1), IGNORE_INDEX), images=None, segment_ids=None)
                    with sync, autocast:
                        images = b["images"].to(device, non_blocking=True) if b["images"] is not None else None
                        segment_ids = b["segment_ids"].to(device) if b["segment_ids"] is not None else None
                        loss = ddp_model(b["input_ids"].to(device), images, b["attention_mask"].to(device),
                                         b["labels"].to(device), reduction="sum", segment_ids=segment_ids)
                        if images is None:  # text-only batch: touch the unused projector so DDP's sync sees it
                            loss = loss + 0.0 * sum(p.sum() for p in model.multi_modal_projector.parameters())
                        # DDP and FSDP average gradients over ranks; × world turns that into the global batch's sum
                        (loss * world / n_global).backward()
                    loss_sum += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.grad_clip)
                if isinstance(grad_norm, DTensor):  # FSDP: the norm of sharded gradients, reduced over the ranks
                    grad_norm = grad_norm.full_tensor()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                stats[1], stats[2] = loss_sum, sum(llm_positions(b, model.config.num_image_tokens) for b in batches)
                stats = all_reduce_sum(stats)
                if device.type == "cuda":  # kernels run asynchronously: wait for this step's backward and AdamW step,
                    torch.cuda.synchronize(device)  # which no host read has waited for yet, or dt would leave them out
                dt = time.time() - t0
                record = dict(step=step, loss=stats[1].item() / n_global, lr=optimizer.param_groups[0]["lr"],
                              grad_norm=grad_norm.item(), tokens=int(stats[2].item()),
                              tokens_per_s=stats[2].item() / dt, skipped=skipped)
                postfix = dict(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                               tok_s=f"{record['tokens_per_s']:.0f}")
                if device.type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    postfix["mem"] = f"{record['peak_mem_gb']:.1f}GB"
                if peak:
                    record["mfu"] = flops_token * stats[2].item() / dt / (world * peak)
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                if rank == 0:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    bar.set_postfix(postfix, refresh=False)  # drawn once, by update
                    bar.update()
                if step % cfg.save_every == 0 and step < end_step:
                    save_checkpoint(cfg, step, model, trainable, optimizer, skipped, rank)
    finally:
        bar.close()
    if log_file:
        log_file.close()
    skipped = int(all_reduce_sum(torch.tensor([skipped], device=device)).item())
    if step > start_step and trained_tokens == 0:  # not a model to hand to chat.py and eval.py
        raise DataError(f"{cfg.data}: no sample was trained in {step - start_step} steps ({skipped} skipped): each "
                        "was unreadable (named above), had no answer to learn, or lost its answers to --max-len "
                        f"{cfg.max_len}; no model written")
    if step > start_step:  # a finished run resumed has its last checkpoint already
        save_checkpoint(cfg, step, model, trainable, optimizer, skipped, rank)
    plain = gather_model(model) if cfg.fsdp else model
    final, latest = os.path.join(cfg.out_dir, "model"), os.path.join(cfg.runs_dir, "LATEST")
    if rank == 0 and step == start_step and os.path.exists(os.path.join(final, "config.json")):
        log(rank, f"stage {cfg.stage}: nothing left to train in {cfg.out_dir} (step {step} of {total_steps}); its "
                  f"model is {final}, {latest} unchanged")
    elif rank == 0:
        save_llava(plain, final)
        save_image_processor(plain.config, final)  # with the tokenizer: what transformers' AutoProcessor reads
        save_llava_tokenizer(cfg.llm, final, plain.config.image_token_index)
        with open(os.path.join(final, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        # a run that --max-steps cut short is a smoke test, not the model chat.py and eval.py should pick up
        if step == total_steps:
            point_latest(cfg.runs_dir, final)
            where = f"chat.py and eval.py now use it ({latest})"
        else:
            where = f"{latest} unchanged, as --max-steps stopped the run at step {step} of {total_steps}"
        log(rank, f"stage {cfg.stage} done: {step} steps, {skipped} sample{'s' * (skipped != 1)} skipped; model "
                  f"saved to {final}; {where}")
    return model


def point_latest(runs_dir: str, model_dir: str):
    """`<runs_dir>/LATEST` names the newest finished model; chat.py and eval.py use it by default."""
    os.makedirs(runs_dir, exist_ok=True)
    tmp = os.path.join(runs_dir, ".LATEST.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.abspath(model_dir) + "\n")
    os.replace(tmp, os.path.join(runs_dir, "LATEST"))


def main(argv=None):
    cfg = resolve_config(argv)
    rank, world, device, dtype = setup_distributed(cfg)
    if cfg.fsdp and device.type == "cpu" and torch.__version__ < "2.9":
        # FSDP2 over gloo: torch 2.6 has no CPU streams for it, 2.7-2.8 average gradients wrongly (pytorch#162338)
        raise SystemExit(f"--fsdp on the CPU (gloo) needs torch >= 2.9; this is torch {torch.__version__}")
    if cfg.fsdp and not dist.is_initialized():  # before anything is loaded or trained
        raise SystemExit("--fsdp shards over the ranks of a torchrun launch")
    paths = toy_paths(cfg)
    toy = cfg.llm == paths["llm"]
    if cfg.stage == 2 and toy and cfg.projector and not os.path.isdir(cfg.projector):
        runs_dir = "" if cfg.runs_dir == TrainConfig.runs_dir else f" --runs-dir {cfg.runs_dir}"
        raise SystemExit(f"stage 2 starts from stage 1's projector; run `python train.py --stage 1{runs_dir}` first "
                         f"(no {cfg.projector})")
    if toy and cfg.stage in (1, 2) and cfg.data != os.path.join(paths["world"], f"stage{cfg.stage}.json"):
        log(rank, f"note: no --llm, so the toy's base models (in {os.path.dirname(cfg.llm)}) train on {cfg.data}, "
                  "with the toy's settings; the real recipe needs --llm and --vision-tower")
    marker = claim_out_dir(cfg, rank) if cfg.stage in (1, 2) else None
    try:
        if cfg.stage in (1, 2) and not cfg.resume:
            start_afresh(cfg, rank)
        torch.manual_seed(cfg.seed)
        if cfg.stage == 0 or (toy and not os.path.exists(os.path.join(cfg.vision_tower, "config.json"))):
            run_stage0(cfg, rank)
            if dist.is_initialized():
                dist.barrier()
        if cfg.stage in (1, 2):
            log(rank, "config: " + json.dumps(dataclasses.asdict(cfg)))
            train(cfg, rank, world, device, dtype)
    except (DataError, CheckpointError, FileNotFoundError) as e:  # their messages name the file and the fix
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker, which wraps it in that traceback
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        raise SystemExit(f"error: {message}") from None
    except KeyboardInterrupt:
        if rank == 0:
            last = checkpoint_dirs(cfg.out_dir) if cfg.stage in (1, 2) else []
            print(f"\ninterrupted; {'the newest checkpoint is ' + last[-1] if last else 'no checkpoint yet'}: the "
                  "same command with --resume true continues from it", file=sys.stderr)
        sys.exit(130)
    finally:
        if marker:  # a killed run cannot remove it, but its process is gone: the next run takes over
            os.remove(marker)
    if dist.is_initialized():
        # all ranks leave together: a rank that exits while a gloo worker thread still holds the tensors of its last
        # collective (FSDP's all-gathers) aborts when that thread frees them under the finalizing interpreter
        dist.barrier()
        dist.destroy_process_group()
        # the barrier makes that rare, not impossible (an upstream race): leave without finalizing the interpreter,
        # now that every file is closed and the output is flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
