"""What one training step needs in GPU memory, computed from the configs before any weight is loaded: the weights,
their gradients, AdamW's state and the activations of a micro-batch, for full fine-tuning, LoRA and QLoRA, as
train.py holds them. train.py prints it; docs/finetune.md has the table for 7B and 13B.

As train.py trains: frozen weights in the compute dtype, trained ones as fp32 master weights with fp32 gradients and
AdamW's two fp32 moments (16 bytes a trained number), plus, under bf16 autocast, its bf16 copy of each trained weight
(cached for the whole micro-step). FSDP shards weights, gradients and optimizer state over the ranks.

Activations per position and decoder layer are what autograd keeps for backward (`layer_bytes`), counted with
saved-tensor hooks on the CPU at Vicuna-7B's shapes under bf16 autocast (h hidden size, f MLP size, nh heads, r LoRA's
rank; bytes): full fine-tuning 34.125 h + 8 f + 4 nh (fp32 master weights make an fp32 residual stream and fp32 norm
outputs), the LLM frozen 16.125 h + 6 f + 4 nh; LoRA adds the inputs of its A matrices and the outputs of its A's:
without dropout 4 h + 2 f + 14 r, with dropout each of the seven its own dropped copy and mask, 24 h + 4 f + 14 r.
With gradient checkpointing each layer keeps only its input (fp32 in full fine-tuning) and one layer at a time holds
the rest. The logits: 10 bytes per vocabulary entry (bf16, fp32, log-softmax) at every text position, an upper bound,
as only answer positions go through lm_head.
"""

import torch

from lora import add_lora
from model import Llava

GB = 1e9
# bits a quantized weight takes with its share of the constants (quantize.py): int4 a bf16 scale and zero per 128
# weights, int8 a scale per row of thousands; the official --bits 4's NF4 takes 4.127 (Dettmers et al. 2023)
QLORA_BITS = {"int4": 4 + 32 / 128, "int8": 8.0}


def parameter_counts(config, lora_r: int) -> dict:
    """Numbers of parameters by part, counted on a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Llava(config)
        llm = model.language_model
        linear = sum(p.numel() for n, p in llm.layers.named_parameters() if n.endswith("_proj.weight"))
        add_lora(llm, lora_r, 2 * lora_r)
    return dict(llm=sum(p.numel() for n, p in llm.named_parameters() if ".lora_" not in n), llm_linear=linear,
                lora=sum(p.numel() for n, p in llm.named_parameters() if ".lora_" in n),
                tower=sum(p.numel() for p in model.vision_tower.parameters()),
                projector=sum(p.numel() for p in model.multi_modal_projector.parameters()))


def layer_bytes(text, mode: str, lora_r: int = 0, lora_dropout: float = 0.0) -> float:
    """Bytes autograd keeps per position in one decoder layer under bf16 autocast, mode "full" or "lora" (see
    above); text: the LlamaConfig."""
    h, f, nh = text.hidden_size, text.intermediate_size, text.num_attention_heads
    if mode == "full":
        return 34.125 * h + 8 * f + 4 * nh
    return 16.125 * h + 6 * f + 4 * nh + (24 * h + 4 * f if lora_dropout else 4 * h + 2 * f) + 14 * lora_r


def step_memory(config, micro_batch: int, positions: int, lora_r: int = 128, lora_dropout: float = 0.05,
                dtype_bytes: int = 2, gradient_checkpointing: bool = True, shards: int = 1, bits: str = "int4") -> dict:
    """{"full" | "lora" | "qlora": {"weights", "gradients", "optimizer", "activations"}} in bytes, on one GPU, for
    micro-batches of `micro_batch` samples of `positions` LLM positions (image positions included)."""
    n = parameter_counts(config, lora_r)
    h, layers, tokens = config.text.hidden_size, config.text.num_hidden_layers, micro_batch * positions
    text_tokens = micro_batch * max(positions - config.num_image_tokens, 0)
    autocast_copies = 2 if dtype_bytes == 2 and shards == 1 else 0  # bytes a trained number, see the docstring
    lora_layer = layer_bytes(config.text, "lora", lora_r, lora_dropout)
    modes = {  # trained numbers, frozen weight bytes, bytes a position in one layer, the residual stream's bytes
        "full": (n["llm"] + n["projector"], n["tower"] * dtype_bytes, layer_bytes(config.text, "full"),
                 4 if shards == 1 else 2),
        "lora": (n["lora"] + n["projector"], (n["llm"] + n["tower"]) * dtype_bytes, lora_layer, 2),
        "qlora": (n["lora"] + n["projector"], n["llm_linear"] * QLORA_BITS[bits] / 8
                  + (n["llm"] - n["llm_linear"] + n["tower"]) * dtype_bytes, lora_layer, 2)}
    table = {}
    for mode, (trained, frozen, layer, stream) in modes.items():
        layer = layer * dtype_bytes / 2  # counted in bf16
        kept = layers * stream * h + layer if gradient_checkpointing else layers * layer
        table[mode] = dict(weights=(trained * 4 + frozen) / shards, gradients=trained * 4 / shards,
                           optimizer=trained * 8 / shards,
                           activations=tokens * kept + text_tokens * config.text.vocab_size * 10
                           + trained * autocast_copies)
    return table


def memory_table(config, cfg, world: int, dtype_bytes: int) -> str:
    """step_memory of a run as train.py prints it, before loading any weight."""
    shards = world if cfg.fsdp else 1
    r = cfg.lora_r or 128  # the official scripts' rank, where this run trains in full
    bits = cfg.quantize or "int4"  # QLoRA's row: this run's bits, or the official --bits 4's
    table = step_memory(config, cfg.micro_batch, cfg.max_len, r, cfg.lora_dropout, dtype_bytes,
                        cfg.gradient_checkpointing, shards, bits)
    this = ("qlora" if cfg.quantize else "lora" if cfg.lora_r else "full") if cfg.stage == 2 else None  # stage 1:
    # the projector alone, less
    lines = [f"memory a step needs on each GPU, computed (docs/finetune.md), for micro-batches of {cfg.micro_batch} × "
             f"{cfg.max_len} positions (--max-len: the longest)" + (f", FSDP over {shards} ranks" if shards > 1 else "")
             + ", in GB:", f"{'':12}{'weights':>9}{'grads':>8}{'AdamW':>8}{'activ.':>8}{'total':>8}"]
    for mode, row in table.items():
        name = {"full": "full", "lora": f"LoRA r{r}", "qlora": f"QLoRA r{r} {bits}"}[mode]
        lines.append(f"{name:12}" + "".join(f"{row[k] / GB:{w}.1f}" for k, w in
                                            (("weights", 9), ("gradients", 8), ("optimizer", 8), ("activations", 8)))
                     + f"{sum(row.values()) / GB:8.1f}" + ("  <- this run" if mode == this else ""))
    return "\n".join(lines)
