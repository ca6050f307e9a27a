"""LLaVA-1.5: a CLIP vision tower, a projector and a LLaMA decoder, joined by splicing image features into the text.

Reproduces the official `LlavaLlamaForCausalLM` (llava/model/llava_arch.py, `prepare_inputs_labels_for_multimodal`)
and transformers' `LlavaForConditionalGeneration`, which compute the same function (spec §5):

    image (3, 336, 336) --CLIP, layer -2, drop CLS--> (576, 1024) --projector--> (576, C) image "tokens"
    "<s> ... USER: <image>\\nWhat is this? ASSISTANT:" --> text embeddings with the 576 image tokens at <image>

In `input_ids` each image is ONE placeholder id, IMAGE_TOKEN_INDEX, as the official tokenizer_image_token writes it;
the model widens it to the image's 576 positions. Training loss is the mean next-token cross-entropy over labels that
are not IGNORE_INDEX (data.py masks the prompt; image and pad positions are masked here).

The second half of the file reads and writes checkpoints: transformers' llava-hf layout, the original LLaVA layout
(LLM + projector, CLIP from its own directory), and plain HF CLIP / LLaMA directories for starting stage 1.

Shapes: B batch, T tokens before splicing, L positions after, N image tokens per image (576), I images in the batch,
C LLM hidden size, V vocabulary.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionTower
from llama import Llama, LlamaConfig, attention_mask, sample
from projector import Projector

IGNORE_INDEX = -100  # labels at prompt, image and pad positions: no loss there (official llava/constants.py)
IMAGE_TOKEN_INDEX = -200  # one id per image in input_ids; the model splices that image's features there

# -----------------------------------------------------------------------------
# config


@dataclass
class LlavaConfig:
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2  # second-to-last CLIP layer (see clip.py)
    vision_feature_select_strategy: str = "default"  # "default" drops the class token (official "patch"); "full" keeps it
    image_aspect_ratio: str = "pad"  # how images are prepared, see clip.preprocess_image
    # The id transformers' LLaVA writes in its input_ids for image tokens; our input_ids use IMAGE_TOKEN_INDEX, so this
    # only matters for the checkpoints we save. llava-hf puts it at 32000, just past LLaMA's vocabulary.
    image_token_index: int = 32000

    @property
    def num_image_tokens(self) -> int:  # N: LLM positions one image takes
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @classmethod
    def from_name(cls, name: str) -> "LlavaConfig":
        vision, text = LLAVA_PRESETS[name]
        return cls(vision=CLIPVisionConfig.from_name(vision), text=LlamaConfig.from_name(text))

    def to_hf(self) -> dict:
        """transformers' LlavaConfig as a config.json dict (our extra fields ride along; transformers keeps them)."""
        return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
                    vision_config=self.vision.to_hf(), text_config=self.text.to_hf(),
                    image_token_index=self.image_token_index, projector_hidden_act="gelu",
                    vision_feature_layer=self.vision_feature_layer,
                    vision_feature_select_strategy=self.vision_feature_select_strategy,
                    image_seq_length=self.num_image_tokens, multimodal_projector_bias=True,
                    tie_word_embeddings=False, projector_type=self.projector_type,
                    image_aspect_ratio=self.image_aspect_ratio)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlavaConfig":
        return cls(vision=CLIPVisionConfig.from_hf(hf["vision_config"]), text=LlamaConfig.from_hf(hf["text_config"]),
                   projector_type=hf.get("projector_type", "mlp2x_gelu"),  # transformers' LLaVA is always mlp2x_gelu
                   vision_feature_layer=hf.get("vision_feature_layer", -2),
                   vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
                   image_aspect_ratio=hf.get("image_aspect_ratio", "pad"),  # llava-hf weights are v1.5's: "pad"
                   image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)))


LLAVA_PRESETS = {  # name: (CLIP preset, LLaMA preset)
    "llava-v1.5-7b": ("ViT-L/14-336", "vicuna-7b-v1.5"),
    "llava-v1.5-13b": ("ViT-L/14-336", "vicuna-13b-v1.5"),
    "tiny": ("tiny", "tiny"),
}

# -----------------------------------------------------------------------------
# the model


class Llava(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = Projector(config.projector_type, config.vision.hidden_size,
                                               config.text.hidden_size)
        self.language_model = Llama(config.text)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(I, 3, H, W) pixels -> (I, N, C) image tokens in the LLM's embedding space."""
        features = self.vision_tower(images, self.config.vision_feature_layer)  # (I, 1 + patches, C_vision)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # the patch tokens only
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def splice(self, input_ids, images=None, attention_mask=None, labels=None, left_pad=False, segment_ids=None):
        """Replace each IMAGE_TOKEN_INDEX by its image's N tokens, without a Python loop over samples or tokens.

        input_ids (B, T) with one placeholder per image; images (I, 3, H, W) in the order the placeholders appear
        (row by row); attention_mask (B, T), False at padding. Returns embeds (B, L, C), position_ids (B, L),
        valid (B, L) False at padding, labels (B, L) or None, and segment_ids (B, L) or None. Rows are padded on the
        right (training) or, with left_pad, on the left, so that every row's last real token sits at position L-1
        (generation). segment_ids (B, T), for rows that pack several samples (data.collate): 1, 2, ... numbers the
        samples of a row, 0 is padding; each sample's positions then start again at 0.
        """
        B, T = input_ids.shape
        is_image = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        n_images = int(is_image.sum())
        if n_images != (0 if images is None else len(images)):
            raise ValueError(f"input_ids hold {n_images} image placeholders but {0 if images is None else len(images)}"
                             " images were given")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        N = self.config.num_image_tokens
        width = 1 + is_image.long() * (N - 1)  # positions each input token occupies after splicing
        start = width.cumsum(1) - width  # (B, T) where each token (or each image's first token) lands
        row_len = width.sum(1)  # (B,)
        L = int(row_len.max())
        if left_pad:
            start = start + (L - row_len)[:, None]  # right-align every row
        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        is_text = ~is_image

        text_embeds = self.language_model.embed_tokens(input_ids[is_text])  # (T_text, C)
        embeds = text_embeds.new_zeros(B, L, text_embeds.shape[-1])
        embeds[rows[is_text], start[is_text]] = text_embeds
        valid = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        valid[rows[is_text], start[is_text]] = attention_mask[is_text].bool()
        if n_images:
            image_embeds = self.encode_images(images).to(embeds.dtype)  # (I, N, C)
            image_pos = start[is_image][:, None] + torch.arange(N, device=input_ids.device)  # (I, N)
            image_rows = rows[is_image][:, None].expand(-1, N)
            embeds[image_rows, image_pos] = image_embeds
            valid[image_rows, image_pos] = attention_mask[is_image].bool()[:, None]
        position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)  # counts real tokens only, so left padding works
        if labels is not None:
            spliced = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            spliced[rows[is_text], start[is_text]] = labels[is_text]  # image positions keep IGNORE_INDEX
            labels = spliced
        if segment_ids is not None:  # an image's N positions belong to the sample of its placeholder
            segments = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
            segments.scatter_(1, start, segment_ids)
            segments = segments.cummax(1).values * valid  # fills each image's span, then zeroes the padding
            first = torch.arange(L, device=input_ids.device).expand(B, L) * (segments != segments.roll(1, 1))
            position_ids = torch.arange(L, device=input_ids.device) - first.cummax(1).values  # (B, L) from each start
            segment_ids = segments
        return embeds, position_ids, valid, labels, segment_ids

    def forward(self, input_ids, images=None, attention_mask=None, labels=None, reduction="mean", segment_ids=None):
        """Logits (B, L, V) without labels; with labels, the next-token cross-entropy over supervised positions
        ("mean", or "sum" so that a training step can average over all the tokens of a global batch). segment_ids
        (B, T): rows that pack several samples (see splice); each sample then attends only to itself."""
        embeds, position_ids, valid, labels, segments = self.splice(input_ids, images, attention_mask, labels,
                                                                    segment_ids=segment_ids)
        mask = None  # right padding sits after every real token, so the causal mask alone already hides it
        if segments is not None:  # block-diagonal causal: (B, 1, L, L), the same attention as unpacked rows
            L = segments.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
            mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
        hidden = self.language_model(embeds, position_ids, mask)  # (B, L, C)
        if labels is None:
            return self.language_model.lm_head(hidden).float()
        targets = labels[:, 1:]  # position t predicts token t+1
        supervised = targets != IGNORE_INDEX
        # only supervised positions go through lm_head: saves the (B, L, V) logits tensor, the largest in training
        logits = self.language_model.lm_head(hidden[:, :-1][supervised]).float()  # (n_supervised, V)
        return F.cross_entropy(logits, targets[supervised], reduction=reduction)

    @torch.inference_mode()
    def generate(self, prompts: list, images: Optional[torch.Tensor] = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                 on_token: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 cache_start: int = 0, cache_size: Optional[int] = None, keep_cache: bool = False,
                 compile: bool = False) -> list:
        """Continue each prompt (a list of ids with IMAGE_TOKEN_INDEX placeholders); returns the new ids per prompt,
        without the EOS. Prompts are left-padded; the prefill runs once, then one token per step from the KV cache.

        on_token(tokens (B,)) is called with each step's tokens (finished rows repeat the pad id) for streaming.
        cache_start > 0 continues a single sequence whose first `cache_start` positions are already in the cache
        (a chat's earlier turns); cache_size sets the cache's length when a new one is made; keep_cache keeps it
        allocated afterwards, for such a continuation or for the next call to reuse (see Llama.setup_cache).
        compile runs the decode step through torch.compile (CUDA graphs on a GPU; see Llama.decode_step); the first
        call pays for the compilation.
        """
        lm = self.language_model
        eos = lm.config.eos_token_id if eos_token_id is None else eos_token_id
        device = lm.embed_tokens.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, T), lm.config.pad_token_id, dtype=torch.long)
        pad_mask = torch.zeros(B, T, dtype=torch.bool)
        for i, p in enumerate(prompts):
            input_ids[i, T - len(p):] = torch.tensor(p)
            pad_mask[i, T - len(p):] = True
        embeds, position_ids, valid, *_ = self.splice(input_ids.to(device), images, pad_mask.to(device), left_pad=True)
        L = embeds.shape[1]
        if cache_start == 0:
            lm.setup_cache(B, cache_size or L + max_new_tokens)
        else:
            assert B == 1 and lm.layers[0].self_attn.kv_cache is not None, "continuing needs one sequence and a cache"
            position_ids = position_ids + cache_start
        S = lm.layers[0].self_attn.kv_cache.k.shape[2]
        if cache_start + L + max_new_tokens - 1 > S:
            raise ValueError(f"the KV cache holds {S} positions; this needs {cache_start + L + max_new_tokens - 1}")
        key_valid = torch.ones(B, S, dtype=torch.bool, device=device)
        key_valid[:, cache_start:cache_start + L] = valid

        # prefill: the whole prompt in one forward; only the last position's logits are needed
        input_pos = torch.arange(cache_start, cache_start + L, device=device)
        hidden = lm(embeds, position_ids, attention_mask(key_valid, input_pos), input_pos)
        logits = lm.lm_head(hidden[:, -1])  # (B, V)
        next_position = position_ids[:, -1:] + 1  # (B, 1)
        input_pos = input_pos[-1:]  # the last slot written
        decode_step = lm.decode_step
        if compile:
            decode_step = torch.compile(lm.decode_step, mode="reduce-overhead" if device.type == "cuda" else None,
                                        fullgraph=True)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)  # (B,)
            token = token.masked_fill(finished, lm.config.pad_token_id)
            new_tokens.append(token)
            if on_token is not None:
                on_token(token)
            finished |= token == eos
            # reading `finished` waits for the GPU: when nobody streams, look only every 16 tokens
            if step == max_new_tokens - 1 or ((on_token is not None or step % 16 == 15) and bool(finished.all())):
                break
            # decode: one new token per sequence at the next cache slot; all tensors stay on the device
            input_pos = input_pos + 1
            logits = decode_step(token, next_position, input_pos, key_valid)
            next_position = next_position + 1
        if not keep_cache:
            lm.clear_cache()
        out = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
        return [row[:row.index(eos)] if eos in row else row for row in out]


# -----------------------------------------------------------------------------
# reading checkpoint directories


class CheckpointError(Exception):
    pass


class CheckpointFiles:
    """The tensors of a transformers-style directory: `model.safetensors`, `pytorch_model.bin`, or shards of either
    listed in a `*.index.json`. Safetensors are preferred; `.bin` pickles are only read with weights_only=True.
    Tensors are read one at a time (memory-mapped), so loading never holds two copies of a 7B model."""

    def __init__(self, path: str):
        """A checkpoint directory, or one file of it (e.g. an official `mm_projector.bin`)."""
        if os.path.isfile(path):
            path, only = os.path.split(path)
        else:
            only = None
        self.directory = directory = path
        names = [only] if only else (os.listdir(directory) if os.path.isdir(directory) else [])
        for kind in ("safetensors", "bin"):
            base = "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
            if only and only.endswith("." + kind):
                base = only
            if base + ".index.json" in names:
                with open(os.path.join(directory, base + ".index.json")) as f:
                    self.file_of = dict(json.load(f)["weight_map"])
                break
            if base in names:
                self.file_of = None  # filled below, from the single file's own keys
                self.files = [base]
                break
        else:
            raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found")
        self.kind = kind
        self._open = {}
        if self.file_of is None:
            self.file_of = {k: self.files[0] for k in self._handle(self.files[0]).keys()}

    def _handle(self, filename):
        if filename not in self._open:
            path = os.path.join(self.directory, filename)
            try:
                if self.kind == "safetensors":
                    from safetensors import safe_open
                    self._open[filename] = safe_open(path, framework="pt")
                else:
                    self._open[filename] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # a truncated or corrupt file: say which one
                raise CheckpointError(f"{path}: cannot read ({e})") from e
        return self._open[filename]

    def keys(self):
        return self.file_of.keys()

    def shape(self, key):
        handle = self._handle(self.file_of[key])
        return tuple(handle.get_slice(key).get_shape() if self.kind == "safetensors" else handle[key].shape)

    def get(self, key) -> torch.Tensor:
        handle = self._handle(self.file_of[key])
        return handle.get_tensor(key) if self.kind == "safetensors" else handle[key]


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json (expected a model directory in the official layout)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_weights(module: nn.Module, sources: list, key_map: Callable, dtype, device, ignore=lambda key: False):
    """Fill every parameter of `module` (built on the meta device) from checkpoint files.

    key_map(our_name) -> (source index, checkpoint key) says where each of our tensors comes from: an explicit map,
    checked both ways. A missing, unexpected or mis-shaped tensor raises an error that names it, so nothing is ever
    left at random init. `assign=True` adopts the loaded tensors instead of copying into preallocated ones.
    """
    state, missing, wrong_shape, used = {}, [], [], [set() for _ in sources]
    for name, ours in module.state_dict(keep_vars=True).items():
        index, key = key_map(name)
        if key not in sources[index].keys():
            missing.append(f"{key} (for {name})")
            continue
        used[index].add(key)
        if sources[index].shape(key) != tuple(ours.shape):
            wrong_shape.append(f"{key}: checkpoint {list(sources[index].shape(key))}, model {list(ours.shape)}")
            continue
        state[name] = sources[index].get(key).to(device=device, dtype=dtype)
    unexpected = [k for src, u in zip(sources, used) for k in src.keys() if k not in u and not ignore(k)]
    problems = [(what, items) for what, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong_shape))
                if items]
    if problems:
        raise CheckpointError(", ".join(src.directory for src in sources) + ": " + "; ".join(
            f"{what}: {', '.join(items[:10])}" + (f" ... ({len(items)} in all)" if len(items) > 10 else "")
            for what, items in problems))
    module.load_state_dict(state, assign=True)


def _ignored(key: str) -> bool:
    # RoPE frequencies and CLIP position ids are recomputed, never learned; old checkpoints saved them anyway
    return key.endswith(".inv_freq") or key.endswith("position_ids")


def _first_present(source, candidates):
    return next((c for c in candidates if c in source.keys()), candidates[0])


def _llava_hf_key(source, name):
    """Our name -> the llava-hf checkpoint key. Hub files say `language_model.model.*` and
    `vision_tower.vision_model.*`; transformers >= ~4.52 saves `model.language_model.*` and `lm_head.*`, and
    transformers 5 drops `vision_model.` (spec §7, addendum). Take whichever the file has."""
    if name.startswith("language_model.lm_head."):
        rest = name[len("language_model."):]
        return _first_present(source, ["language_model." + rest, rest])
    group, rest = name.split(".", 1)
    candidates = {
        "language_model": ["language_model.model." + rest, "model.language_model." + rest],
        "vision_tower": ["vision_tower.vision_model." + rest, "vision_tower." + rest,
                         "model.vision_tower.vision_model." + rest, "model.vision_tower." + rest],
        "multi_modal_projector": ["multi_modal_projector." + rest, "model.multi_modal_projector." + rest],
    }[group]
    return _first_present(source, candidates)


def _original_key(name, projector_type, clip_source=None):
    """Our name -> (0 = the LLaVA directory, 1 = the CLIP directory), key in the original LLaVA layout."""
    group, rest = name.split(".", 1)
    if group == "vision_tower":  # plain HF CLIP: openai's files say `vision_model.*`; transformers 5 saves without it
        return 1, _first_present(clip_source, ["vision_model." + rest, rest])
    if group == "multi_modal_projector":  # linear_i is entry 2(i-1) of the official nn.Sequential (GELUs between)
        layer, param = rest.split(".")
        i = int(layer.split("_")[1])
        return 0, f"model.mm_projector.{param}" if projector_type == "linear" else f"model.mm_projector.{2 * (i - 1)}.{param}"
    return 0, rest if rest.startswith("lm_head.") else "model." + rest


def _clip_text_tower(key: str) -> bool:
    # a full CLIPModel checkpoint also holds the text tower and the contrastive heads, which LLaVA never uses
    return key.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale"))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --dtype names of the scripts


def _target(dtype, device):
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    return dtype, device


def load_llava(path: str, vision_tower: Optional[str] = None, dtype=None, device=None) -> Llava:
    """Load a LLaVA checkpoint directory: llava-hf (transformers) layout, ours (the same), or the original LLaVA
    layout, whose CLIP tower lives in its own directory: `vision_tower`, or else the config's `mm_vision_tower`."""
    dtype, device = _target(dtype, device)
    hf = read_config(path)
    if hf.get("model_type", "").startswith("clip"):  # whose config also has text_config and vision_config
        raise CheckpointError(f"{path}: a CLIP model, not a LLaVA one (an original-layout LLaVA takes it as "
                              "--vision-tower)")
    if "text_config" in hf and "vision_config" in hf:  # llava-hf
        if vision_tower:
            raise CheckpointError(f"{path}: holds its own CLIP tower (llava-hf layout); --vision-tower is for the "
                                  "original layout")
        config = LlavaConfig.from_hf(hf)
        with torch.device("meta"):
            model = Llava(config)
        source = CheckpointFiles(path)
        load_weights(model, [source], lambda name: (0, _llava_hf_key(source, name)), dtype, device, _ignored)
        return model.eval()
    if "mm_vision_tower" not in hf and "mm_projector_type" not in hf:
        raise CheckpointError(f"{path}: config.json is neither a LLaVA (llava-hf) nor an original LLaVA config; "
                              "for a plain LLaMA/Vicuna and CLIP use load_base()")
    if vision_tower and not os.path.isdir(vision_tower):
        raise CheckpointError(f"--vision-tower {vision_tower}: no such directory")
    clip_dir = vision_tower or hf.get("mm_vision_tower")
    if not clip_dir or not os.path.isdir(clip_dir):
        raise CheckpointError(f"{path}: its CLIP tower {hf.get('mm_vision_tower')!r} is not a local directory; pass "
                              "--vision-tower DIR (a local copy of openai/clip-vit-large-patch14-336)")
    feature = hf.get("mm_vision_select_feature", "patch")
    assert feature in ("patch", "cls_patch"), f"mm_vision_select_feature {feature!r} is not supported"
    config = LlavaConfig(vision=CLIPVisionConfig.from_hf(read_config(clip_dir)), text=LlamaConfig.from_hf(hf),
                         projector_type=hf.get("mm_projector_type", "linear"),
                         vision_feature_layer=hf.get("mm_vision_select_layer", -2),
                         vision_feature_select_strategy="default" if feature == "patch" else "full",
                         image_aspect_ratio=hf.get("image_aspect_ratio", "square"))
    with torch.device("meta"):
        model = Llava(config)
    clip_source = CheckpointFiles(clip_dir)
    load_weights(model, [CheckpointFiles(path), clip_source],
                 lambda name: _original_key(name, config.projector_type, clip_source), dtype, device,
                 lambda key: _ignored(key) or _clip_text_tower(key))
    return model.eval()


def load_clip(directory: str, dtype=None, device=None) -> CLIPVisionTower:
    """A plain transformers CLIP directory (CLIPModel or CLIPVisionModel; the text tower is skipped)."""
    dtype, device = _target(dtype, device)
    with torch.device("meta"):
        tower = CLIPVisionTower(CLIPVisionConfig.from_hf(read_config(directory)))
    source = CheckpointFiles(directory)  # openai's files say `vision_model.*`; transformers 5 saves without it
    load_weights(tower, [source], lambda name: (0, _first_present(source, ["vision_model." + name, name])), dtype,
                 device, lambda key: _ignored(key) or _clip_text_tower(key))
    return tower


def load_llama(directory: str, dtype=None, device=None) -> Llama:
    """A plain transformers LLaMA / Vicuna directory (`model.*` and `lm_head.weight`)."""
    dtype, device = _target(dtype, device)
    with torch.device("meta"):
        llm = Llama(LlamaConfig.from_hf(read_config(directory)))
    load_weights(llm, [CheckpointFiles(directory)],
                 lambda name: (0, name if name.startswith("lm_head.") else "model." + name), dtype, device, _ignored)
    return llm


def load_base(llm: str, vision_tower: str, projector_type: str = "mlp2x_gelu", dtype=None, device=None) -> Llava:
    """Stage 1's starting point: a plain LLaMA/Vicuna, a plain CLIP and a new projector (PyTorch's default Linear
    init, as the official stage 1)."""
    dtype, device = _target(dtype, device)
    language_model, tower = load_llama(llm, dtype, device), load_clip(vision_tower, dtype, device)
    config = LlavaConfig(vision=tower.config, text=language_model.config, projector_type=projector_type)
    with torch.device("meta"):
        model = Llava(config)
    model.language_model, model.vision_tower = language_model, tower
    model.multi_modal_projector = Projector(projector_type, config.vision.hidden_size,
                                            config.text.hidden_size).to(device=device, dtype=dtype)
    return model


def load_projector(model: Llava, path: str):
    """Stage 2's starting projector: from a stage-1 output directory (ours, llava-hf layout) or an official
    `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`, as the liuhaotian pretrain releases ship it)."""
    source = CheckpointFiles(path)
    projector_type = model.config.projector_type

    def key_map(name):
        ours = _llava_hf_key(source, "multi_modal_projector." + name)
        return 0, ours if ours in source.keys() else _original_key("multi_modal_projector." + name, projector_type)[1]

    llava_parts = ("language_model.", "vision_tower.", "model.language_model.", "model.vision_tower.", "lm_head.")
    load_weights(model.multi_modal_projector, [source], key_map, model.multi_modal_projector.linear_1.weight.dtype,
                 model.multi_modal_projector.linear_1.weight.device, lambda key: key.startswith(llava_parts))


# -----------------------------------------------------------------------------
# writing checkpoints: llava-hf layout, so transformers' LlavaForConditionalGeneration loads what we save


def hf_state_dict(model: Llava) -> dict:
    """Our tensors under llava-hf hub names. If the vocabulary has no row for `image_token_index` (an original
    32000-token model), it is padded to a multiple of 64 with the mean embedding, as transformers' converter does
    (spec §7; it samples near the mean instead): logits over the original vocabulary are unchanged."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        group, rest = name.split(".", 1)
        if group == "language_model":
            name = "language_model." + rest if rest.startswith("lm_head.") else "language_model.model." + rest
        elif group == "vision_tower":
            name = "vision_tower.vision_model." + rest
        renamed[name] = tensor
    vocab = model.config.text.vocab_size
    if model.config.image_token_index >= vocab:
        new_vocab = -(-(model.config.image_token_index + 1) // 64) * 64
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            old = renamed[key]
            renamed[key] = torch.cat([old, old.float().mean(0, keepdim=True).to(old.dtype).expand(new_vocab - vocab, -1)])
    return renamed


def write_checkpoint(state: dict, config: dict, directory: str, max_shard_bytes: int = 5 * 2**30):
    """config.json + safetensors, sharded with a `model.safetensors.index.json` above max_shard_bytes."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = dict(config, torch_dtype=str(next(iter(state.values())).dtype).removeprefix("torch."))
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
            weight_map.update({k: filename for k in shard})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                       "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def save_llava(model: Llava, directory: str, max_shard_bytes: int = 5 * 2**30):
    """Our LLaVA in the llava-hf layout: transformers' LlavaForConditionalGeneration.from_pretrained loads it."""
    state = hf_state_dict(model)
    config = model.config.to_hf()
    config["text_config"]["vocab_size"] = state["language_model.lm_head.weight"].shape[0]
    write_checkpoint(state, config, directory, max_shard_bytes)


def save_image_processor(config: LlavaConfig, directory: str):
    """preprocessor_config.json and processor_config.json, as llava-hf ships them, so that transformers'
    AutoProcessor prepares images and prompts for this model as we do: LlavaImageProcessor's do_pad is our "pad"
    (a square of CLIP's mean colour first), without it a resize and centre crop ("square")."""
    size = config.vision.image_size
    image = dict(image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor",
                 do_pad=config.image_aspect_ratio == "pad", do_resize=True, size={"shortest_edge": size},
                 resample=3, do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                 do_convert_rgb=True)
    processor = dict(processor_class="LlavaProcessor", image_token="<image>", patch_size=config.vision.patch_size,
                     num_additional_image_tokens=1,  # the class token, which "default" then drops
                     vision_feature_select_strategy=config.vision_feature_select_strategy)
    for name, content in (("preprocessor_config.json", image), ("processor_config.json", processor)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)


def save_llama(llm: Llama, directory: str):
    """A plain transformers LLaMA directory (what load_llama and LlamaForCausalLM read)."""
    state = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in llm.state_dict().items()}
    write_checkpoint(state, dict(llm.config.to_hf(), architectures=["LlamaForCausalLM"]), directory)


def save_clip(tower: CLIPVisionTower, directory: str):
    """A plain transformers CLIP vision directory (what load_clip and CLIPVisionModel read)."""
    state = {"vision_model." + k: v for k, v in tower.state_dict().items()}
    write_checkpoint(state, dict(tower.config.to_hf(), architectures=["CLIPVisionModel"]), directory)
