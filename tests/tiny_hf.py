"""Tiny random reference models built with transformers (test-only), saved in the official layouts.

Every weight gets random noise on top of transformers' init, so that a norm weight or bias we forgot to apply
(ones / zeros at init) still changes the numbers.
"""

import torch
import transformers

CLIP = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu")
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             rms_norm_eps=1e-5)
IMAGE_TOKEN = 127  # transformers' image token id inside the tiny vocabulary
N_IMAGE_TOKENS = (32 // 8) ** 2  # patches per image: the class token is dropped


def randomize(build, seed=0):
    """build() a transformers model after torch.manual_seed(seed), so that its own init is the same on every run,
    then add seeded noise to every weight."""
    torch.manual_seed(seed)
    model = build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def hf_llama(seed=0, **overrides):
    return randomize(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})), seed)


def hf_clip(seed=0):
    return randomize(lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)), seed)


def hf_llava(seed=0):
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**CLIP).to_dict(),
                                      text_config=transformers.LlamaConfig(**LLAMA).to_dict(),
                                      image_token_index=IMAGE_TOKEN)
    return randomize(lambda: transformers.LlavaForConditionalGeneration(config), seed)


def expand_image_tokens(ids):
    """Our ids (one -200 per image) -> transformers' ids (N image-token ids per image)."""
    out = []
    for t in ids:
        out.extend([IMAGE_TOKEN] * N_IMAGE_TOKENS if t == -200 else [t])
    return out


def save_sharded_bin(state_dict, directory, n_shards=2):
    """Pickled shards + `pytorch_model.bin.index.json`, as 2023-era checkpoints (transformers 5 no longer writes them)."""
    import json
    import os
    keys = sorted(state_dict)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        shard = {k: state_dict[k].clone() for k in keys[i::n_shards]}
        torch.save(shard, os.path.join(directory, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
