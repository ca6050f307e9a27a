"""The command lines' plumbing: checks of what a user typed (each a one-line usage error before any work, not a
traceback minutes later), device and dtype names, and the ends of a process (one-line errors, torchrun's exit).
"""

import argparse
import dataclasses
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing.checkpoints import CheckpointError, is_lora_dir, read_config, read_llava_config
from plumbing.files import DataError
from quantize import has_int4_kernel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --dtype names of the scripts
# DTYPES less fp16 for training: its gradients underflow without loss scaling (a GradScaler), which train.py leaves
# out; the official recipe trains in bf16
TRAIN_DTYPES = ("fp32", "bf16")


# -----------------------------------------------------------------------------
# shared by the scripts


def resolve_device(name: str) -> torch.device:
    """"auto" is the GPU if there is one; under torchrun each rank takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device: no CUDA device here")
    return device


def resolve_dtype(name: str, device: torch.device, on_gpu: torch.dtype = torch.float16) -> torch.dtype:
    """"auto" is fp32 on the CPU and on_gpu on a GPU: fp16 for inference, as the official CLI and eval runners load
    the model, bf16 for training, as the official recipe trains."""
    if name == "auto":
        return on_gpu if device.type == "cuda" else torch.float32
    return DTYPES[name]


def check_sampling(temperature: float, top_p: float):
    """Settings that llama.sample would quietly read as something else."""
    if not temperature >= 0:
        raise argparse.ArgumentTypeError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise argparse.ArgumentTypeError(f"--top-p {top_p}: must be above 0 and at most 1 (1: off)")


def check_quantize(mode, device: torch.device):
    """int4 runs on torch's own int4 matmul (quantize.Int4Linear), which not every device has."""
    if mode == "int4" and not has_int4_kernel(device):
        raise argparse.ArgumentTypeError(f"--quantize int4: torch {torch.__version__} has no int4 matmul for {device} "
                                         "(it has one for the CPU and for CUDA GPUs of compute capability 8.0 and up);"
                                         " use --quantize int8")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"need a positive whole number, not {text!r}")
    return int(text)


def parse_bool(text: str) -> bool:
    """true/false (or yes/no, on/off, 1/0); anything else is a usage error, not a silent false."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
             "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


@contextmanager
def one_line_errors(prefix: str = "error: "):
    """A user's mistake (a bad file, a bad checkpoint) ends the process with its message alone, not a traceback.
    One raised in a DataLoader worker arrives wrapped in that worker's traceback, which is cut to its message."""
    try:
        yield
    except (DataError, CheckpointError, FileNotFoundError) as e:
        message = str(e)
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        raise SystemExit(prefix + message) from None


def leave_process_group():
    """Under torchrun, all ranks leave together, then exit without finalizing the interpreter: a rank that exits
    while a gloo worker thread still holds the tensors of its last collective (FSDP's all-gathers) can abort when
    that thread frees them under the finalizing interpreter, and the barrier makes that rare, not impossible (an
    upstream race). Called last, when every file is closed."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -----------------------------------------------------------------------------
# train.py's options


def option(default, help: str):
    """A TrainConfig field and its --help text."""
    return dataclasses.field(default=default, metadata=dict(help=help))


def default_help(f: dataclasses.Field, real: dict, toy: dict, lora: dict) -> str:
    """' (default ...)' for --help: the official stage values and the toy's where they differ from the field's, and
    the official LoRA scripts' where LoRA changes it."""
    def per_stage(defaults):
        values = [defaults[stage].get(f.name, f.default) for stage in (1, 2)]
        return repr(values[0]) if values[0] == values[1] else f"{values[0]!r} in stage 1, {values[1]!r} in stage 2"
    if f.default == "" and not any(f.name in d for d in real.values()):
        return ""  # the help says what empty means
    real_text = per_stage(real)
    toy_text = per_stage({stage: {**real[stage], **toy[stage]} for stage in (1, 2)})
    return (f" (default {real_text}" + (f"; the toy: {toy_text}" if toy_text != real_text else "")
            + (f"; with --lora-r: {lora[f.name]!r})" if f.name in lora else ")"))


# the official scripts' options (llava/train/train.py's dataclasses, HF TrainingArguments) and what stands for each here
OFFICIAL_OPTIONS = dict(model_name_or_path="--llm", pretrain_mm_mlp_adapter="--projector",
                        mm_projector_type="--projector-type", data_path="--data", version="--template",
                        output_dir="--out-dir", learning_rate="--lr", num_train_epochs="--epochs",
                        model_max_length="--max-len", per_device_train_batch_size="--micro-batch",
                        gradient_accumulation_steps="--global-batch (accumulation follows from it)",
                        group_by_modality_length="--group-by-modality", dataloader_num_workers="--num-workers",
                        max_grad_norm="--grad-clip", save_steps="--save-every", bf16="--dtype bf16",
                        tune_mm_mlp_adapter="--stage 1")


def unknown_option_hint(unknown: list, ours: set) -> str:
    """The usage error for options argparse does not know: an official script's name, or ours with underscores."""
    name = next((arg[2:].split("=")[0] for arg in unknown if arg.startswith("--")), "")
    if name.replace("-", "_") in ours:
        return f"unrecognized argument --{name}: did you mean --{name.replace('_', '-')}?"
    if name in OFFICIAL_OPTIONS:
        return f"--{name} is the official scripts' option; here: {OFFICIAL_OPTIONS[name]}"
    return f"unrecognized arguments: {' '.join(unknown)}"


def check_numbers(cfg, parser):
    """Out-of-range numbers are usage errors here, not a traceback (or a silent no-op) minutes later."""
    ranges = dict(lm_steps=(1, None), clip_steps=(1, None))  # stage 0's; stages 1 and 2 take the rest
    training = cfg.stage in (1, 2)
    if training:
        ranges.update(global_batch=(1, None), micro_batch=(1, None), max_len=(1, None), save_every=(1, None),
                      num_workers=(0, None), max_steps=(0, None), lr=(0, None), weight_decay=(0, None),
                      warmup_ratio=(0, 1), lora_r=(0, None), lora_dropout=(0, 1), projector_lr=(0, None))
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if value < low or (high is not None and value > high):
            parser.error(f"--{name.replace('_', '-')} {value}: must be " +
                         (f"between {low} and {high}" if high is not None else f"at least {low}"))
    if not training:
        return
    for name in ("epochs", "grad_clip", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be above 0")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's ranks; train() relies on this check
    if cfg.global_batch % (world * cfg.micro_batch):
        parser.error(f"--global-batch {cfg.global_batch} must split into {world} rank{'s' * (world > 1)} × "
                     f"micro-batches of {cfg.micro_batch} (--micro-batch)")


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


def check_train_config(cfg, given: dict, parser, templates, aspect_ratios, projector_depth):
    """The checks of train.py's resolved config that need no loading: each a usage error naming its option. Sets
    cfg.projector to what --projector names, and cfg.projector_type to the type saved with it."""
    if cfg.stage in (1, 2):
        needed = ("data",) if cfg.model else ("llm", "vision_tower", "data")  # --model: a whole LLaVA
        missing = [name for name in needed if not getattr(cfg, name)]
        if missing:
            parser.error("the real recipe needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        for name in ("model", "llm", "vision_tower", "projector", "data", "image_folder"):
            # before minutes of loading, not after; --data and --image-folder may list several, comma-separated
            for path in given.get(name, "").split(",") if name in ("data", "image_folder") else [given.get(name)]:
                if path and not os.path.exists(path):
                    parser.error(f"--{name.replace('_', '-')} {path}: no such file or directory")
        if cfg.model or cfg.lora_r or cfg.quantize:
            check_finetuning(cfg, given, parser)
        for path in cfg.data.split(","):
            if os.path.isdir(path):
                parser.error(f"--data {path}: a directory; give the LLaVA JSON or JSONL file")
        if cfg.projector and os.path.exists(cfg.projector):
            cfg.projector = stage1_projector(cfg.projector, parser)
            saved_type = read_config(cfg.projector).get("projector_type") if os.path.isdir(cfg.projector) else None
            if saved_type and given.get("projector_type", saved_type) != saved_type:
                parser.error(f"--projector-type {cfg.projector_type}: the projector in {cfg.projector} is {saved_type}")
            cfg.projector_type = saved_type or cfg.projector_type
        if cfg.template not in templates:
            parser.error(f"--template {cfg.template!r}: choose from {', '.join(templates)}")
        if cfg.image_aspect_ratio not in aspect_ratios:
            parser.error(f"--image-aspect-ratio {cfg.image_aspect_ratio!r}: choose from {', '.join(aspect_ratios)}")
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


def check_finetuning(cfg, given: dict, parser):
    """--model (task fine-tuning from a finished LLaVA) and --lora-r. Sets cfg.projector_type to the model's."""
    if cfg.lora_r and cfg.stage != 2:
        parser.error(f"--lora-r {cfg.lora_r}: LoRA changes the LLM, which trains in stage 2 (--stage 2)")
    if cfg.quantize and (not cfg.lora_r or cfg.quantize not in ("int8", "int4") or cfg.fsdp):
        parser.error(f"--quantize {cfg.quantize}: int8 or int4, for the frozen LLM under LoRA (--lora-r N), in one "
                     "process per GPU without --fsdp (QLoRA)")
    if not cfg.model:
        return
    if cfg.stage != 2 or given.get("llm") or given.get("projector"):
        parser.error(f"--model {cfg.model}: a finished LLaVA to fine-tune is where --stage 2 starts, in place of "
                     "--llm and --projector")
    if is_lora_dir(cfg.model):
        parser.error(f"--model {cfg.model}: a LoRA adapter; fine-tune its merged model (a LoRA run of train.py "
                     "writes it as <out-dir>/model)")
    try:
        cfg.projector_type = read_llava_config(cfg.model, cfg.vision_tower or None).projector_type
    except CheckpointError as e:
        parser.error(f"--model: {e}")


def check_gpus(cuda: bool, local_rank: int):
    """Before NCCL, which would fail less clearly."""
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA GPU that torch can use")
    if cuda and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"torchrun needs one rank per GPU (--nproc_per_node {torch.cuda.device_count()})")


def check_launch(cfg, device, toy: bool, toy_paths: dict, log):
    """What is known wrong once the processes are up, before any loading."""
    if cfg.fsdp and device.type == "cpu" and torch.__version__ < "2.9":
        # FSDP2 over gloo: torch 2.6 has no CPU streams for it, 2.7-2.8 average gradients wrongly (pytorch#162338)
        raise SystemExit(f"--fsdp on the CPU (gloo) needs torch >= 2.9; this is torch {torch.__version__}")
    if cfg.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp shards over the ranks of a torchrun launch")
    if cfg.stage == 2 and toy and cfg.projector and not os.path.isdir(cfg.projector):  # before stage 0's minutes
        runs_dir = "" if cfg.runs_dir == type(cfg).runs_dir else f" --runs-dir {cfg.runs_dir}"
        raise SystemExit(f"stage 2 starts from stage 1's projector; run `python train.py --stage 1{runs_dir}` first "
                         f"(no {cfg.projector})")
    if toy and cfg.stage in (1, 2) and cfg.data != os.path.join(toy_paths["world"], f"stage{cfg.stage}.json"):
        log(f"note: no --llm, so the toy's base models (in {os.path.dirname(cfg.llm)}) train on {cfg.data}, with the "
            "toy's settings; the real recipe needs --llm and --vision-tower")


def check_images(dataset, cfg, log):
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
        log(f"warning: {len(missing)} of {checked} image files looked for are not under {cfg.image_folder} "
            f"(by folder: {', '.join(f'{name} {n}' for name, n in folders.most_common())}; such as "
            f"{missing[0]}); " + ("their samples will be skipped and counted" if cfg.skip_bad else
                                 "training stops at the first (--skip-bad false)"))
