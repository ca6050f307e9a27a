"""CLIP ViT vision tower and image preprocessing, as LLaVA-1.5 uses them.

Reproduces the vision half of OpenAI CLIP (Radford et al. 2021) in the layout of transformers' `CLIPVisionModel`
(so official checkpoints load with no renaming), and LLaVA-1.5's `process_images` (llava/mm_utils.py) on top of
`CLIPImageProcessor`. LLaVA never uses CLIP's pooled output: it takes the *patch tokens of the second-to-last layer*
(`mm_vision_select_layer = -2`), because the last layer is trained to feed the contrastive pooled embedding and is
less general (LLaVA paper §4.1; llava/model/multimodal_encoder/clip_encoder.py).

Shapes: B images, C = hidden size (1024 for ViT-L), P = patches per side (336 / 14 = 24), N = P*P + 1 positions
(577: the class token, then the patches in row-major order).
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# config


@dataclass
class CLIPVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by LLaVA; kept so a saved config round-trips to transformers

    def __post_init__(self):
        assert self.image_size % self.patch_size == 0, "the image must tile into whole patches"
        assert self.hidden_size % self.num_attention_heads == 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str) -> "CLIPVisionConfig":
        return cls(**CLIP_PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict) -> "CLIPVisionConfig":
        """From a transformers config.json dict: a CLIPVisionConfig, or a full CLIPConfig (whose vision part we take)."""
        hf = hf.get("vision_config", hf)
        return cls(**{k: hf[k] for k in asdict(cls()) if k in hf})

    def to_hf(self) -> dict:
        return dict(asdict(self), model_type="clip_vision_model", hidden_act="quick_gelu", num_channels=3)


CLIP_PRESETS = {
    "ViT-L/14-336": dict(),  # openai/clip-vit-large-patch14-336, the LLaVA-1.5 tower
    # the toy world's tower, trained by stage 0: 4 × 4 patches of 16 px, so an object (20-27 px) spans about 2 × 2
    # patches and each patch shows a telling part of its outline; 16 image tokens keep the LLM's sequences short
    "toy": dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, projection_dim=64),
    "tiny": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=2, projection_dim=32),  # for tests
}

# -----------------------------------------------------------------------------
# image preprocessing: LLaVA-1.5 `process_images` = optional pad to square, then CLIPImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the statistics CLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB, as the official `.convert('RGB')` does (alpha is dropped, not composited: that is
    what the released model saw). 16/32-bit grayscale is first scaled to 8 bits; Pillow would clip it at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((pixels * 255.0 / max(pixels.max(), 1.0)).round().astype(np.uint8))
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple) -> Image.Image:
    """Centre the image on a square canvas of side max(w, h) (official `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, background)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


ASPECT_RATIOS = ("pad", "square")  # official image_aspect_ratio values that LLaVA-1.5 uses


def preprocess_image(image: Image.Image, image_size: int = 336, aspect_ratio: str = "pad") -> torch.Tensor:
    """PIL image -> normalized (3, image_size, image_size) float32 tensor, exactly as LLaVA-1.5 prepares it.

    aspect_ratio "pad" (v1.5 fine-tuning and inference): pad to a square with the mean colour (122, 116, 104), so
    the whole image is seen; "square" (stage-1 pretraining, where pretrain.sh leaves the default): resize the shortest
    side and centre-crop, which cuts off the ends of long images.
    """
    assert aspect_ratio in ASPECT_RATIOS, f"unknown image_aspect_ratio {aspect_ratio!r}"
    image = to_rgb(image)
    if aspect_ratio == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in CLIP_MEAN))
    # shortest side -> image_size with Pillow's antialiased bicubic; torch's bicubic gives different pixels
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(image_size * long / short)
    image = image.resize((image_size, new_long) if w < h else (new_long, image_size), Image.BICUBIC)
    w, h = image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)  # (H, W, 3) in [0, 1]
    pixels = (pixels - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (3, H, W)

# -----------------------------------------------------------------------------
# the vision transformer (module names follow transformers' CLIPVisionModel, so checkpoints load without renaming)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention: every patch sees every other patch, no mask."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        B, N, C = x.shape
        # (B, N, C) -> (B, nh, N, hs)
        q, k, v = (proj(x).view(B, N, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hs), as CLIP
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu: the sigmoid approximation OpenAI trained with


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(C) * C**-0.5)
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, C)  # learned, one per position

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, P, P)
        patches = patches.flatten(2).transpose(1, 2)  # (B, P*P, C), row-major like the reference
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, N, C)


class CLIPVisionTower(nn.Module):
    """The CLIP image encoder. `forward` returns the hidden states after `select_layer`, indexed as transformers'
    `hidden_states` tuple: 0 = the embeddings after `pre_layrnorm`, k = the output of block k, -1 = the last block.

    LLaVA asks for -2, so the last block and `post_layernorm` never run; they are still built so that every official
    checkpoint loads strictly and our saved checkpoints stay complete for transformers users.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the official spelling
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> (B, N, C) hidden states of `select_layer` (class token first)."""
        n_blocks = select_layer % (self.config.num_hidden_layers + 1)  # -2 -> 23 of 24 blocks
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:n_blocks]:
            x = layer(x)
        return x
