"""LoRA, low-rank adaptation (Hu et al. 2021), as PEFT computes it for the official LLaVA-1.5 LoRA recipes
(scripts/v1_5/finetune_lora.sh, finetune_task_lora.sh; peft tuners/lora/layer.py).

A frozen weight W (out, in) learns only a low-rank change: y = W x + (alpha / r) · B A dropout(x), with A (r, in) and
B (out, r). A starts as nn.Linear's default (kaiming-uniform), B as zeros, so training starts from the model itself.
At r 128 that is 320M trained numbers for Vicuna-7B's 6.7B. Once trained, W + (alpha / r) · B A is one plain matrix
again (`merge`): inference costs what the model always cost.

It goes on the LLM's seven projections in every decoder layer (official find_all_linear_names), never on CLIP, the
embeddings or lm_head; the projector trains beside it in full.
"""

import math

import torch
import torch.nn as nn

# official find_all_linear_names: every nn.Linear of the LLM but lm_head, i.e. these, in each LlamaDecoderLayer
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


class LoRALinear(nn.Module):
    """A frozen module computing y = base_layer(x) (an nn.Linear, or a quantized one: QLoRA), plus a trained low-rank
    change. lora_A and lora_B are nn.Linear, as in PEFT, so their weights are (r, in) and (out, r)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.scaling = alpha / r
        # on the LoRA branch only: the frozen path sees x as it is
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in)), PEFT's
        nn.init.zeros_(self.lora_B.weight)  # B A = 0: the first step starts from the model as it was

    def forward(self, x):  # (B, T, in) -> (B, T, out)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The plain linear computing what this one computes without dropout: W + (alpha / r) · B A (PEFT's
        merge_and_unload), summed in fp32 and rounded once to W's dtype. (A QLoRA adapter merges into the float
        weights its quantized base was made from, as the official loader does: plumbing/checkpoints.py load_lora.)"""
        W = self.base_layer.weight
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                           device=W.device, dtype=W.dtype)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling  # (out, in)
        merged.weight.copy_(W.float() + delta)
        if self.base_layer.bias is not None:
            merged.bias.copy_(self.base_layer.bias)
        return merged.requires_grad_(False)


def add_lora(llm: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=TARGETS):
    """Wrap `targets` of every decoder layer of a Llama in a LoRALinear (the frozen weight stays where it was, as
    base_layer). Only the new A and B require gradients."""
    for layer in llm.layers:
        for target in targets:
            parent, name = target.split(".")
            block = getattr(layer, parent)
            setattr(block, name, LoRALinear(getattr(block, name), r, alpha, dropout))


def merge_lora(llm: nn.Module):
    """Replace every LoRALinear of the LLM by its merged plain linear: the model a LoRA run hands to inference."""
    for layer in llm.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, module in list(block.named_children()):
                if isinstance(module, LoRALinear):
                    setattr(block, name, module.merge())
