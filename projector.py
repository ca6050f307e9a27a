"""The vision-language connector: maps CLIP patch features into the LLM's embedding space.

LLaVA (v1) used one linear layer; LLaVA-1.5 (paper §3.1) switched to a two-layer MLP with GELU, `mlp2x_gelu`, which
improved every benchmark. Official `build_vision_projector` (llava/model/multimodal_projector/builder.py) builds
`mlp{N}x_gelu` as Linear(vision, llm) followed by N-1 × [GELU, Linear(llm, llm)].

Layers are named `linear_1 ... linear_N` as in transformers' LlavaMultiModalProjector; the original checkpoints call
them `mm_projector.0, .2, .4 ...` (the GELUs take the odd indices of an nn.Sequential). model.py maps the two.
"""

import re

import torch.nn as nn
import torch.nn.functional as F


def projector_depth(projector_type: str) -> int:
    """"linear" -> 1, "mlp2x_gelu" -> 2, ..."""
    if projector_type == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not match:
        raise ValueError(f"unknown projector type {projector_type!r} (expected 'linear' or 'mlpNx_gelu')")
    return int(match.group(1))


class Projector(nn.Module):
    def __init__(self, projector_type: str, vision_dim: int, llm_dim: int):
        super().__init__()
        depth = projector_depth(projector_type)
        for i in range(1, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(vision_dim if i == 1 else llm_dim, llm_dim))
        self.depth = depth

    def forward(self, x):  # (B, N, vision_dim) -> (B, N, llm_dim)
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(F.gelu(x))  # exact erf GELU, as nn.GELU() in the official code
        return x
