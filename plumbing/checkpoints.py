"""Reading and writing checkpoint directories: the plumbing behind model.py.

Layouts read: transformers' llava-hf (three generations of key names), the original LLaVA layout (LLM + projector in
one directory, the CLIP tower in its own), plain transformers CLIP and LLaMA directories (stage 1's starting point),
and an official `mm_projector.bin`. Layout written: llava-hf, so transformers loads what we save.

Also the inference entry that chat.py and eval.py share: which model (`latest_model`), in which template
(`choose_template`), loaded with its tokenizer (`load_for_inference`).
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError

from clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionTower
from llama import Llama, LlamaConfig
from lora import TARGETS, add_lora, merge_lora
from model import IMAGE_MARKER, Llava, LlavaConfig
from projector import Projector
from quantize import QUANTIZED, llm_linears, quantized_mode, swap_in
from tokenizers import AddedToken

from plumbing.tokenizer import load_tokenizer
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


def load_weights(module: nn.Module, sources: list, key_map: Callable, dtype, device, ignore=lambda key: False,
                 quantize: Optional[str] = None):
    """Fill every parameter of `module` (built on the meta device) from checkpoint files.

    key_map(our_name) -> (source index, checkpoint key) says where each of our tensors comes from: an explicit map,
    checked both ways. A missing, unexpected or mis-shaped tensor raises an error that names it, so nothing is ever
    left at random init. `assign=True` adopts the loaded tensors instead of copying into preallocated ones. Floating
    tensors take `dtype`; integer ones (a quantized checkpoint's) stay as they are.

    quantize ("int8", "int4"; module a Llava): the LLM's linear layers (quantize.llm_linears) are quantized as each
    weight is read, so that only one of their float weights is in memory at a time.
    """
    quantized = {name + ".weight": QUANTIZED[quantize] for name in llm_linears(module)} if quantize else {}
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
        if name in quantized:  # no reference to the float weight outlives this line
            layer = name.removesuffix("weight")
            state.update({layer + buffer: t for buffer, t in
                          quantized[name].quantize(_read(sources[index], key, dtype, device)).items()})
        else:
            state[name] = _read(sources[index], key, dtype, device)
    unexpected = [k for src, u in zip(sources, used) for k in src.keys() if k not in u and not ignore(k)]
    problems = [(what, items) for what, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong_shape))
                if items]
    if problems:
        raise CheckpointError(", ".join(src.directory for src in sources) + ": " + "; ".join(
            f"{what}: {', '.join(items[:10])}" + (f" ... ({len(items)} in all)" if len(items) > 10 else "")
            for what, items in problems))
    if quantize:
        swap_in(module, quantize)
    module.load_state_dict(state, assign=True)


def _read(source, key, dtype, device) -> torch.Tensor:
    tensor = source.get(key)
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)


def _ignored(key: str) -> bool:
    # RoPE frequencies and CLIP position ids are recomputed, never learned; old checkpoints saved them anyway
    return key.endswith(".inv_freq") or key.endswith("position_ids")


def _first_present(source, candidates):
    return next((c for c in candidates if c in source.keys()), candidates[0])


def _llava_hf_key(source, name):
    """Our name -> the llava-hf checkpoint key. Hub files say `language_model.model.*` and
    `vision_tower.vision_model.*`; transformers >= ~4.52 saves `model.language_model.*` and `lm_head.*`, and
    transformers 5 drops `vision_model.`. Take whichever the file has."""
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
        return 0, f"model.mm_projector.{param}" if projector_type == "linear" else \
            f"model.mm_projector.{2 * (i - 1)}.{param}"
    return 0, rest if rest.startswith("lm_head.") else "model." + rest


def _clip_text_tower(key: str) -> bool:
    # a full CLIPModel checkpoint also holds the text tower and the contrastive heads, which LLaVA never uses
    return key.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale"))


def _target(dtype, device):
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    return dtype, device


def read_llava_config(path: str, vision_tower: Optional[str] = None) -> LlavaConfig:
    """The LlavaConfig of a LLaVA checkpoint directory, read without its weights: llava-hf (transformers) layout, ours
    (the same), or the original LLaVA layout, whose CLIP tower lives in its own directory: `vision_tower`, or else the
    config's `mm_vision_tower`. Raises CheckpointError for what a user can fix."""
    hf = read_config(path)
    if hf.get("model_type", "").startswith("clip"):  # whose config also has text_config and vision_config
        raise CheckpointError(f"{path}: a CLIP model, not a LLaVA one (an original-layout LLaVA takes it as "
                              "--vision-tower)")
    if "text_config" in hf and "vision_config" in hf:  # llava-hf
        if vision_tower:
            raise CheckpointError(f"{path}: holds its own CLIP tower (llava-hf layout); --vision-tower is for the "
                                  "original layout")
        return LlavaConfig.from_hf(hf)
    if "mm_vision_tower" not in hf and "mm_projector_type" not in hf:
        raise CheckpointError(f"{path}: config.json is neither a LLaVA (llava-hf) nor an original LLaVA config; "
                              "for a plain LLaMA/Vicuna and CLIP use load_base()")
    feature = hf.get("mm_vision_select_feature", "patch")
    assert feature in ("patch", "cls_patch"), f"mm_vision_select_feature {feature!r} is not supported"
    return LlavaConfig(vision=CLIPVisionConfig.from_hf(read_config(original_clip_dir(path, hf, vision_tower))),
                       text=LlamaConfig.from_hf(hf), projector_type=hf.get("mm_projector_type", "linear"),
                       vision_feature_layer=hf.get("mm_vision_select_layer", -2),
                       vision_feature_select_strategy="default" if feature == "patch" else "full",
                       image_aspect_ratio=hf.get("image_aspect_ratio", "square"))


def original_clip_dir(path: str, hf: dict, vision_tower: Optional[str]) -> str:
    """The CLIP directory of an original-layout config: --vision-tower, else its mm_vision_tower if that is local."""
    if vision_tower and not os.path.isdir(vision_tower):
        raise CheckpointError(f"--vision-tower {vision_tower}: no such directory")
    clip_dir = vision_tower or hf.get("mm_vision_tower")
    if not clip_dir or not os.path.isdir(clip_dir):
        raise CheckpointError(f"{path}: its CLIP tower {hf.get('mm_vision_tower')!r} is not a local directory; pass "
                              "--vision-tower DIR (a local copy of openai/clip-vit-large-patch14-336)")
    return clip_dir


def load_llava(path: str, vision_tower: Optional[str] = None, dtype=None, device=None,
               quantize: Optional[str] = None) -> Llava:
    """Load a LLaVA checkpoint directory in any of read_llava_config's layouts. quantize ("int8", "int4"): the LLM's
    linear layers are quantized while loading (quantize.py); a checkpoint saved quantized (its config.json says
    "quantize") loads as it was saved."""
    dtype, device = _target(dtype, device)
    config = read_llava_config(path, vision_tower)
    hf = read_config(path)
    saved = hf.get("quantize")
    if saved and quantize not in (None, saved):
        raise CheckpointError(f"{path}: saved in {saved}; load it as it is (without --quantize {quantize}), or "
                              "quantize the float model it was made from")
    with torch.device("meta"):
        model = Llava(config)
    if saved:
        swap_in(model, saved)
    if "text_config" in hf:  # llava-hf
        source = CheckpointFiles(path)
        load_weights(model, [source], lambda name: (0, _llava_hf_key(source, name)), dtype, device, _ignored,
                     None if saved else quantize)
        return model.eval()
    clip_source = CheckpointFiles(original_clip_dir(path, hf, vision_tower))
    load_weights(model, [CheckpointFiles(path), clip_source],
                 lambda name: _original_key(name, config.projector_type, clip_source), dtype, device,
                 lambda key: _ignored(key) or _clip_text_tower(key), None if saved else quantize)
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


def load_llama(directory: str, dtype=None, device=None, quantize: Optional[str] = None) -> Llama:
    """A plain transformers LLaMA / Vicuna directory (`model.*` and `lm_head.weight`), its linear layers quantized as
    they load with `quantize` (QLoRA's frozen base)."""
    dtype, device = _target(dtype, device)
    with torch.device("meta"):
        llm = Llama(LlamaConfig.from_hf(read_config(directory)))
    load_weights(llm, [CheckpointFiles(directory)],
                 lambda name: (0, name if name.startswith("lm_head.") else "model." + name), dtype, device, _ignored,
                 quantize)
    return llm


def load_base(llm: str, vision_tower: str, projector_type: str = "mlp2x_gelu", dtype=None, device=None,
              quantize: Optional[str] = None) -> Llava:
    """Stage 1's starting point: a plain LLaMA/Vicuna, a plain CLIP and a new projector (PyTorch's default Linear
    init, as the official stage 1)."""
    dtype, device = _target(dtype, device)
    language_model, tower = load_llama(llm, dtype, device, quantize), load_clip(vision_tower, dtype, device)
    config = LlavaConfig(vision=tower.config, text=language_model.config, projector_type=projector_type)
    with torch.device("meta"):
        model = Llava(config)
    model.language_model, model.vision_tower = language_model, tower
    model.multi_modal_projector = Projector(projector_type, config.vision.hidden_size,
                                            config.text.hidden_size).to(device=device, dtype=dtype)
    return model


def load_projector(model: Llava, path: str):
    """Stage 2's starting projector: from a stage-1 output directory (ours, llava-hf layout) or an official
    `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`, as the liuhaotian pretrain releases ship it). Also a LoRA
    run's projector, its `non_lora_trainables.bin` (the same keys under PEFT's `base_model.model.`)."""
    source = CheckpointFiles(path)
    projector_type = model.config.projector_type

    def key_map(name):  # ours (llava-hf), mm_projector.bin, or a LoRA run's non_lora_trainables.bin (PEFT's names)
        original = _original_key("multi_modal_projector." + name, projector_type)[1]
        return 0, _first_present(source, [original, PEFT_PREFIX + original,
                                          _llava_hf_key(source, "multi_modal_projector." + name)])

    llava_parts = ("language_model.", "vision_tower.", "model.language_model.", "model.vision_tower.", "lm_head.")
    load_weights(model.multi_modal_projector, [source], key_map, model.multi_modal_projector.linear_1.weight.dtype,
                 model.multi_modal_projector.linear_1.weight.device, lambda key: key.startswith(llava_parts))


# -----------------------------------------------------------------------------
# writing checkpoints: llava-hf layout, so transformers' LlavaForConditionalGeneration loads what we save


def hf_state_dict(model: Llava) -> dict:
    """Our tensors under llava-hf hub names. If the vocabulary has no row for `image_token_index` (an original
    32000-token model), it is padded to a multiple of 64 with the mean embedding, as transformers' converter does
    (convert_llava_weights_to_hf.py; it samples near the mean instead): logits over the original vocabulary are
    unchanged."""
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
            mean = old.float().mean(0, keepdim=True).to(old.dtype)
            renamed[key] = torch.cat([old, mean.expand(new_vocab - vocab, -1)])
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
    """Our LLaVA in the llava-hf layout: transformers' LlavaForConditionalGeneration.from_pretrained loads it, unless
    it is quantized (quantize.py), which config.json then records for load_llava."""
    state = hf_state_dict(model)
    config = model.config.to_hf()
    if mode := quantized_mode(model):
        config["quantize"] = mode
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


def save_llava_tokenizer(llm_dir, directory, image_token_index: int):
    """The LLM's tokenizer files in a llava-hf model directory, with "<image>" added at image_token_index as
    transformers' converter (convert_llava_weights_to_hf.py) adds it: its LlavaProcessor expands that token into the
    image's positions. Our own pipeline never needs it, since it splits prompts at "<image>" before tokenizing."""
    for name in os.listdir(llm_dir):
        if name.startswith(("tokenizer", "special_tokens_map")):
            shutil.copy(os.path.join(llm_dir, name), directory)
    tokenizer = load_tokenizer(llm_dir)
    if tokenizer.token_to_id(IMAGE_MARKER) is None:
        tokenizer.add_special_tokens([AddedToken(IMAGE_MARKER, normalized=False, special=True)])
    if tokenizer.token_to_id(IMAGE_MARKER) != image_token_index:
        raise ValueError(f"{llm_dir}: its tokenizer gives {IMAGE_MARKER} the id {tokenizer.token_to_id(IMAGE_MARKER)}, "
                         f"the model {image_token_index}")
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def save_llama(llm: Llama, directory: str):
    """A plain transformers LLaMA directory (what load_llama and LlamaForCausalLM read)."""
    state = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in llm.state_dict().items()}
    write_checkpoint(state, dict(llm.config.to_hf(), architectures=["LlamaForCausalLM"]), directory)


def save_clip(tower: CLIPVisionTower, directory: str):
    """A plain transformers CLIP vision directory (what load_clip and CLIPVisionModel read)."""
    state = {"vision_model." + k: v for k, v in tower.state_dict().items()}
    write_checkpoint(state, dict(tower.config.to_hf(), architectures=["CLIPVisionModel"]), directory)



# -----------------------------------------------------------------------------
# LoRA adapters in the official layout: PEFT's files, as llava/train/train.py writes them at the end of a LoRA run
# and llava/model/builder.py merges them into their base

PEFT_PREFIX = "base_model.model."  # PEFT wraps LlavaLlamaForCausalLM as PeftModel.base_model.model
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT >= 0.7 writes the first, 0.6 the second
# PEFT's name of an A or B matrix, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
ADAPTER_KEY = re.compile(re.escape(PEFT_PREFIX) + r"model\.layers\.\d+\.(" + "|".join(map(re.escape, TARGETS))
                         + r")\.lora_[AB]\.weight")
MERGE_INSTEAD = ("merge it with the official scripts/merge_lora_weights.py and pass the merged model as --model "
                 "alone")


def is_lora_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _is_llava(hf: dict) -> bool:  # llava-hf or the original layout, against a plain LLaMA / Vicuna
    return ("text_config" in hf and "vision_config" in hf) or "mm_vision_tower" in hf or "mm_projector_type" in hf


def read_adapter_config(lora_dir: str) -> dict:
    """The settings of a PEFT adapter_config.json that LoRA's arithmetic needs: r, lora_alpha and the targets (as
    lora.TARGETS names them). Keys we do not know (newer PEFT adds some) are ignored; a setting that would change the
    arithmetic, which we do not reproduce, is refused."""
    path = os.path.join(lora_dir, "adapter_config.json")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    unsupported = [f"{key} {config[key]!r}" for key, plain in (("peft_type", "LORA"), ("fan_in_fan_out", False),
                                                                ("bias", "none"), ("use_dora", False),
                                                                ("use_rslora", False))
                   if config.get(key, plain) not in (plain, None)]
    unsupported += [f"{key} {config[key]!r}" for key in ("rank_pattern", "alpha_pattern", "layers_to_transform",
                                                          "modules_to_save") if config.get(key)]
    if unsupported:
        raise CheckpointError(f"{path}: {', '.join(unsupported)} is not plain LoRA, which is all we merge; "
                              + MERGE_INSTEAD)
    ours = {target.split(".")[1]: target for target in TARGETS}
    named = config.get("target_modules") or []
    named = [named] if isinstance(named, str) else named
    foreign = [name for name in named if name.split(".")[-1] not in ours]
    if foreign or not named:
        raise CheckpointError(f"{path}: an adapter for modules this LLaVA does not have ({', '.join(foreign)}); "
                              f"ours takes LoRA on the LLM's {', '.join(ours)}: " + MERGE_INSTEAD)
    return dict(r=config["r"], alpha=config["lora_alpha"], base=config.get("base_model_name_or_path"),
                targets=[ours[name] for name in ours if name in {n.split(".")[-1] for n in named}])


def load_lora(lora_dir: str, base_dir: str, vision_tower: Optional[str] = None, dtype=None, device=None) -> Llava:
    """A LoRA directory in the official layout merged into its base, as the LoRA branch of llava/model/builder.py
    does: the base's LLM (a Vicuna for finetune_lora.sh's adapters, with the LLaVA config and CLIP tower that the LoRA
    directory's config.json names; or the finished LLaVA that finetune_task_lora.sh trained from, whose tower is
    kept), the projector from non_lora_trainables.bin, then W += (alpha / r) · B A in every adapted projection (PEFT's
    merge_and_unload; summed in fp32 here, where the official loader sums in fp16)."""
    settings = read_adapter_config(lora_dir)
    dtype, device = _target(dtype, device)
    if _is_llava(read_config(base_dir)):
        model = load_llava(base_dir, vision_tower, dtype, device)
    else:
        config = read_llava_config(lora_dir, vision_tower)
        model = load_base(base_dir, original_clip_dir(lora_dir, read_config(lora_dir), vision_tower),
                          config.projector_type, dtype, device)
        model.config = dataclasses.replace(config, vision=model.config.vision, text=model.config.text)
    load_adapter(model.language_model, lora_dir, base_dir, settings)
    load_projector(model, os.path.join(lora_dir, "non_lora_trainables.bin"))
    return model.eval()


def load_adapter(llm: Llama, lora_dir: str, base_dir: str, settings: dict):
    """Put the adapter's A and B on the LLM's projections and merge them. An adapter that does not fit (another model
    size, or tensors of modules we do not have) is refused with what to pass instead."""
    name = next((n for n in ADAPTER_FILES if os.path.isfile(os.path.join(lora_dir, n))), None)
    if name is None:
        raise CheckpointError(f"{lora_dir}: no {' or '.join(ADAPTER_FILES)} beside its adapter_config.json")
    source = CheckpointFiles(os.path.join(lora_dir, name))
    add_lora(llm, settings["r"], settings["alpha"], targets=settings["targets"])
    ours = {PEFT_PREFIX + "model." + n: p for n, p in llm.named_parameters() if ".lora_" in n}
    foreign = [k for k in source.keys() if k not in ours and not ADAPTER_KEY.fullmatch(k)]
    if foreign:
        raise CheckpointError(f"{source.directory}/{name}: tensors of modules this LLaVA does not have ({foreign[0]}"
                              + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "") + "): " + MERGE_INSTEAD)
    extra = [k for k in source.keys() if k not in ours]  # of layers the base does not have
    misfit = [f"{extra[0]}: the base has {len(llm.layers)} decoder layers"] if extra else []
    misfit += [f"no {k}" for k in ours if k not in source.keys()]
    misfit += [f"{k}: adapter {list(source.shape(k))}, base {list(p.shape)}" for k, p in ours.items()
               if k in source.keys() and source.shape(k) != tuple(p.shape)]
    if misfit:
        trained_from = f" (its adapter_config.json names {settings['base']})" if settings["base"] else ""
        raise CheckpointError(f"--model-base {base_dir} does not fit the adapter in {lora_dir} ({misfit[0]}): pass "
                              f"the model it was trained from{trained_from}")
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(source.get(key))
    merge_lora(llm)


def save_lora_adapter(model: Llava, directory: str, base: str, vision_tower: Optional[str], settings: dict):
    """A LoRA run's adapter in the official layout, as llava/train/train.py writes it: adapter_model.safetensors (the
    A and B matrices under PEFT's names), adapter_config.json, non_lora_trainables.bin (the projector) and config.json
    (the LLaVA config in the original layout). settings: r, lora_alpha, lora_dropout of the run. Tensors are written
    in the frozen LLM's dtype, as the official run writes bf16."""
    os.makedirs(directory, exist_ok=True)
    from safetensors.torch import save_file
    dtype = model.language_model.embed_tokens.weight.dtype
    adapter = {PEFT_PREFIX + "model." + n: p.detach().to(dtype).cpu().contiguous()
               for n, p in model.language_model.state_dict().items() if ".lora_" in n}
    save_file(adapter, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    projector = {PEFT_PREFIX + _original_key("multi_modal_projector." + n, model.config.projector_type)[1]:
                 p.detach().to(dtype).cpu() for n, p in model.multi_modal_projector.state_dict().items()}
    torch.save(projector, os.path.join(directory, "non_lora_trainables.bin"))
    peft = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, **settings,
                target_modules=[t.split(".")[1] for t in TARGETS], bias="none", fan_in_fan_out=False,
                inference_mode=True, init_lora_weights=True, modules_to_save=None, layers_to_transform=None,
                layers_pattern=None, rank_pattern={}, alpha_pattern={}, revision=None)
    config = model.config
    original = dict(config.text.to_hf(), architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                    mm_hidden_size=config.vision.hidden_size, mm_projector_type=config.projector_type,
                    mm_vision_select_layer=config.vision_feature_layer,
                    mm_vision_select_feature="patch" if config.vision_feature_select_strategy == "default"
                    else "cls_patch", image_aspect_ratio=config.image_aspect_ratio, mm_use_im_start_end=False,
                    mm_use_im_patch_token=False, use_mm_proj=True, mm_patch_merge_type="flat",
                    torch_dtype=str(dtype).removeprefix("torch."))
    if vision_tower:  # the CLIP a Vicuna base is paired with (a local directory, or a hub id); a LLaVA brings its own
        original["mm_vision_tower"] = os.path.abspath(vision_tower) if os.path.isdir(vision_tower) else vision_tower
    for filename, content in (("adapter_config.json", peft), ("config.json", original)):
        with open(os.path.join(directory, filename), "w") as f:
            json.dump(content, f, indent=2)


# -----------------------------------------------------------------------------
# the inference entry of chat.py and eval.py: which model, in which template, loaded with its tokenizer


def latest_model(runs_dir: str) -> str:
    """The model directory named by <runs_dir>/LATEST, which train.py writes at the end of every finished stage."""
    latest = os.path.join(runs_dir, "LATEST")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"no trained model: {latest} does not exist; train one with `python train.py --stage "
                                "1` (then `python train.py --stage 2`), or pass --model DIR")
    with open(latest) as f:
        return f.read().strip()


def conv_mode_for(model_name: str) -> str:
    """The template the official CLI picks from a model's name or path (llava/serve/cli.py), e.g.
    "liuhaotian/llava-v1.5-7b" -> "llava_v1". Note the v1.5 eval scripts pass "vicuna_v1" instead."""
    parts = model_name.strip("/").split("/")
    # official get_model_name_from_path: ".../llava-x/checkpoint-500" is named "llava-x_checkpoint-500"
    name = "_".join(parts[-2:]) if parts[-1].startswith("checkpoint-") else parts[-1]
    for key, mode in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                      ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if key in name.lower():
            return mode
    return "llava_v0"


def choose_template(model_dir: str, runner: str = "cli") -> str:
    """The template a model is prompted in when --conv-mode does not say, as the official runner does:
    runner "cli" (chat.py, llava/serve/cli.py) picks it from the model's name, "eval" (eval.py: every v1.5 eval
    script passes --conv-mode vicuna_v1) takes vicuna_v1. Our own models were trained in a template that
    train_config.json records, and keep it, except that chat gives a stage-1 model (trained in `plain`: image, then
    caption, no question) vicuna_v1, the chat format of its Vicuna and of stage 2, where eval asks it in `plain`."""
    train_config = os.path.join(model_dir, "train_config.json")
    if os.path.isfile(train_config):
        with open(train_config) as f:
            template = json.load(f).get("template") or "vicuna_v1"
        return "vicuna_v1" if template == "plain" and runner == "cli" else template
    if runner == "eval":
        return "vicuna_v1"
    path = os.path.abspath(model_dir)
    if os.path.basename(os.path.dirname(path)) == "snapshots":  # a Hugging Face cache: models--ORG--NAME/snapshots/HASH
        path = os.path.basename(os.path.dirname(os.path.dirname(path))).split("--")[-1]
    # official rule on the name; llava-hf spells v1.5 "llava-1.5-7b-hf", where the rule looks for "v1"
    template = conv_mode_for(os.path.basename(path).lower().replace("llava-1.5", "llava-v1.5"))
    if template == "llava_v0" and os.path.isfile(os.path.join(model_dir, "config.json")):
        config = read_config(model_dir)
        # LLaVA-1.5's two-layer MLP projector (v0, v1 and LLaVA-Plus have a linear one; every llava-hf LLaVA has the
        # MLP, and a text_config)
        if config.get("mm_projector_type") == "mlp2x_gelu" or "text_config" in config:
            return "llava_v1"
    return template


def load_for_inference(model_dir: str, vision_tower=None, dtype=None, device=None, runner: str = "cli",
                       quantize: Optional[str] = None, model_base: Optional[str] = None):
    """(model, tokenizer, template) of a model directory in any layout, quantized as load_llava's `quantize` says, or
    of a LoRA directory in the official layout merged into model_base (whose tokenizer it takes, as the official
    loader). What is quick to find missing (a config, a tokenizer, the base a LoRA needs) is looked for first, before
    the weights' minutes."""
    for option, path in (("--model", model_dir), ("--model-base", model_base)):
        if path is not None and not os.path.isdir(path):
            raise CheckpointError(f"{option} {path}: no such model directory")
    try:
        lora = is_lora_dir(model_dir)
        if lora and not model_base:
            named = read_adapter_config(model_dir)["base"]
            raise CheckpointError(f"{model_dir}: a LoRA adapter, not a whole model; pass the model it was trained from "
                                  "as --model-base (the Vicuna for the official LoRA models and finetune_lora.sh, "
                                  "the finished LLaVA for finetune_task_lora.sh" + (f"; its adapter_config.json "
                                                                                   f"names {named}" if named else "")
                                  + ")")
        if model_base and not lora:
            raise CheckpointError(f"--model-base {model_base} goes with a LoRA directory, and {model_dir} has no "
                                  "adapter_config.json: a whole model loads with --model alone")
        if model_base and is_lora_dir(model_base):
            raise CheckpointError(f"--model-base {model_base}: a LoRA adapter itself; pass the model it was trained "
                                  "from")
        read_config(model_dir)
        tokenizer = load_tokenizer(model_base or model_dir)
        model = (load_lora(model_dir, model_base, vision_tower, dtype, device) if lora
                 else load_llava(model_dir, vision_tower, dtype, device, quantize))
        return model, tokenizer, choose_template(model_dir, runner)
    except (CheckpointError, OSError, ValueError, KeyError, AssertionError, SafetensorError) as e:
        # damaged files and JSON, a missing tokenizer, a config the loaders do not support (they assert it)
        message = str(e) or type(e).__name__
        raise CheckpointError(message if model_dir in message or "--model" in message else f"{model_dir}: {message}") \
            from None
