"""LLaVA-1.5: a CLIP vision tower, a projector and a LLaMA decoder, joined by splicing image features into the text.

Reproduces the official `LlavaLlamaForCausalLM` (llava/model/llava_arch.py, `prepare_inputs_labels_for_multimodal`)
and transformers' `LlavaForConditionalGeneration` (models/llava/modeling_llava.py), which compute the same function:

    image (3, 336, 336) --CLIP, layer -2, drop CLS--> (576, 1024) --projector--> (576, C) image "tokens"
    "<s> ... USER: <image>\\nWhat is this? ASSISTANT:" --> text embeddings with the 576 image tokens at <image>

In `input_ids` each image is ONE placeholder id, IMAGE_TOKEN_INDEX, as the official tokenizer_image_token writes it;
the model widens it to the image's 576 positions. Training loss is the mean next-token cross-entropy over labels that
are not IGNORE_INDEX (data.py masks the prompt; image and pad positions are masked here).

Reading and writing checkpoint directories (llava-hf, the original layout, plain CLIP and LLaMA) is plumbing, in
plumbing/checkpoints.py.

Shapes: B batch, T tokens before splicing, L positions after, N image tokens per image (576), I images in the batch,
C LLM hidden size, V vocabulary.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIPVisionConfig, CLIPVisionTower
from llama import Llama, LlamaConfig, attention_mask, sample
from projector import Projector

IGNORE_INDEX = -100  # labels at prompt, image and pad positions: no loss there (official llava/constants.py)
IMAGE_TOKEN_INDEX = -200  # one id per image in input_ids; the model splices that image's features there
IMAGE_MARKER = "<image>"  # where an image goes in the text (official DEFAULT_IMAGE_TOKEN), before tokenization

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

        on_token(tokens (B,)) is called with each step's tokens (finished rows repeat the pad id) for streaming; it
        may return a (B,) bool tensor of rows to end at this token.
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
                stop = on_token(token)
                if stop is not None:  # the caller ends these rows (a stop string it reads in the text)
                    finished |= stop
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

