"""LoRA (lora.py) and the official LoRA checkpoints: PEFT's arithmetic, the adapter layout merged into its base as
the official loader merges it (checked against transformers with the adapter merged by hand, as PEFT merges it:
W += (alpha / r) · B A; peft is not needed), what a wrong base or adapter says, and the memory estimate's arithmetic.

train.py's LoRA runs (DDP, FSDP, resume, the files a run writes) are in test_train.py."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import tiny_hf
from llama import LlamaConfig, rope_cos_sin
from lora import TARGETS, LoRALinear, add_lora, merge_lora
from model import IMAGE_TOKEN_INDEX, Llava, LlavaConfig
from plumbing.checkpoints import CheckpointError, load_for_inference, load_lora
from plumbing.memory import QLORA_BITS, layer_bytes, parameter_counts, step_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
R, ALPHA = 4, 16.0  # scale 4: a mix-up of alpha / r with alpha or r shows


# -----------------------------------------------------------------------------
# the LoRA linear


def test_lora_linear_starts_as_its_base_and_merges_into_what_it_computes():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, R, ALPHA, dropout=0.5)
    A, B = lora.lora_A.weight, lora.lora_B.weight
    assert A.shape == (R, 16) and B.shape == (12, R) and lora.scaling == ALPHA / R
    # PEFT's init: A kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B zeros: the model as it was
    assert A.abs().max() <= 1 / math.sqrt(16) and A.abs().max() > 0.8 / math.sqrt(16) and not B.any()
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))  # in training mode too, dropout and all
    with torch.no_grad():
        B.normal_()
    seen = {}
    base.register_forward_pre_hook(lambda module, args: seen.update(base=args[0]))
    lora.dropout.register_forward_hook(lambda module, args, out: seen.update(dropped=out))
    out = lora(x)  # training: dropout on the LoRA branch's input only
    assert torch.equal(seen["base"], x) and not torch.equal(seen["dropped"], x)
    torch.testing.assert_close(out, base(x) + seen["dropped"] @ A.T @ B.T * (ALPHA / R))
    lora.eval()
    out = lora(x)
    torch.testing.assert_close(out, base(x) + x @ (B @ A).T * (ALPHA / R))
    merged = lora.merge()
    assert type(merged) is nn.Linear and not merged.weight.requires_grad
    torch.testing.assert_close(merged.weight, base.weight + ALPHA / R * B @ A)
    assert torch.equal(merged.bias, base.bias)
    torch.testing.assert_close(merged(x), out)


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    return Llava(LlavaConfig.from_name("tiny")).eval()


def test_lora_goes_on_the_llms_seven_projections_only():
    """Never on CLIP (whose attention has q_proj, k_proj, v_proj too), the embeddings, lm_head or the projector; only
    A and B train, and the model starts as it was."""
    model = tiny_llava()
    ids, images = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7]]), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(ids, images)
    model.requires_grad_(False)
    add_lora(model.language_model, R, ALPHA)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    layers = model.config.text.num_hidden_layers
    assert wrapped == sorted(f"language_model.layers.{i}.{t}" for i in range(layers) for t in TARGETS)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.lora_{x}.weight" for n in wrapped for x in "AB"}
    with torch.no_grad():
        assert torch.equal(model(ids, images), before)
    merge_lora(model.language_model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_llava().state_dict())  # the plain model's names again


# -----------------------------------------------------------------------------
# the official LoRA checkpoints: a tiny one in their layout, merged as PEFT merges it


def peft_key(layer, target, matrix):
    return f"base_model.model.model.layers.{layer}.{target}.lora_{matrix}.weight"


def write_lora_dir(path, clip_dir=None, fmt="safetensors", seed=1, targets=TARGETS, **config_changes):
    """An adapter directory as liuhaotian/llava-v1.5-7b-lora ships it, for tiny_hf's shapes: random A and B (bf16,
    as the official files), PEFT's adapter_config.json (with keys a newer PEFT adds, which must be ignored),
    non_lora_trainables.bin (the projector) and the LLaVA config.json in the original layout."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    llama = LlamaConfig.from_hf(tiny_hf.LLAMA)
    shapes = {"self_attn.q_proj": (llama.hidden_size, llama.hidden_size),
              "self_attn.k_proj": (llama.hidden_size, llama.num_key_value_heads * llama.head_dim),
              "self_attn.v_proj": (llama.hidden_size, llama.num_key_value_heads * llama.head_dim),
              "self_attn.o_proj": (llama.hidden_size, llama.hidden_size),
              "mlp.gate_proj": (llama.hidden_size, llama.intermediate_size),
              "mlp.up_proj": (llama.hidden_size, llama.intermediate_size),
              "mlp.down_proj": (llama.intermediate_size, llama.hidden_size)}  # (in, out)
    adapter = {}
    for layer in range(llama.num_hidden_layers):
        for target in targets:
            fan_in, fan_out = shapes[target]
            adapter[peft_key(layer, target, "A")] = (torch.randn(R, fan_in, generator=g) * 0.1).bfloat16()
            adapter[peft_key(layer, target, "B")] = (torch.randn(fan_out, R, generator=g) * 0.1).bfloat16()
    if fmt == "safetensors":
        save_file(adapter, str(path / "adapter_model.safetensors"))
    else:
        torch.save(adapter, path / "adapter_model.bin")
    projector = {f"base_model.model.model.mm_projector.{i}.{p}": torch.randn(shape, generator=g).bfloat16() * 0.1
                 for i, shape_in in ((0, 32), (2, 64)) for p, shape in (("weight", (64, shape_in)), ("bias", (64,)))}
    torch.save(projector, path / "non_lora_trainables.bin")
    peft = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "./checkpoints/vicuna-7b-v1-5",
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layers_pattern": None, "layers_to_transform": None, "lora_alpha": ALPHA, "lora_dropout": 0.05,
            "modules_to_save": None, "peft_type": "LORA", "r": R, "rank_pattern": {}, "revision": None,
            "target_modules": [t.split(".")[1] for t in reversed(targets)], "task_type": "CAUSAL_LM",
            "use_dora": False, "use_rslora": False, "loftq_config": {}, "layer_replication": None,
            "megatron_config": None, "a_future_peft_setting": 1, **config_changes}
    (path / "adapter_config.json").write_text(json.dumps(peft))
    config = {**tiny_hf.LLAMA, "architectures": ["LlamaForCausalLM"], "model_type": "llava",
              "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "mm_vision_tower": str(clip_dir or "openai/clip"),
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
              "mm_projector_lr": 2e-5, "use_cache": True}
    (path / "config.json").write_text(json.dumps(config))
    return adapter, projector


def merged_by_hand(reference, adapter, projector, targets=TARGETS):
    """transformers' LLaVA with the adapter merged as PEFT merges it (W += (alpha / r) · B A) and the projector of
    non_lora_trainables.bin, as the official builder loads them."""
    lm = reference.model.language_model
    with torch.no_grad():
        for layer in range(len(lm.layers)):
            for target in targets:
                block, name = target.split(".")
                linear = getattr(getattr(lm.layers[layer], block), name)
                A, B = adapter[peft_key(layer, target, "A")].float(), adapter[peft_key(layer, target, "B")].float()
                linear.weight += ALPHA / R * B @ A
        for i, ours in ((0, "linear_1"), (2, "linear_2")):
            for p in ("weight", "bias"):
                getattr(reference.model.multi_modal_projector, ours).get_parameter(p).copy_(
                    projector[f"base_model.model.model.mm_projector.{i}.{p}"].float())
    return reference


def logits_close(ours, reference):
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6, 7, 9]
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([tiny_hf.expand_image_tokens(ids)]), pixel_values=images).logits
        got = ours(torch.tensor([ids]), images)
    assert (got - expected).abs().max() < 1e-4
    return got


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A Vicuna (plain LLaMA) and a CLIP directory, and a finished LLaVA in the llava-hf layout, each with the
    tokenizer chat.py and eval.py read (the real LLaMA-2 one)."""
    root = tmp_path_factory.mktemp("bases")
    vicuna, clip, llava = tiny_hf.hf_llama(seed=2), tiny_hf.hf_clip(seed=3), tiny_hf.hf_llava(seed=4)
    vicuna.save_pretrained(root / "vicuna")
    clip.save_pretrained(root / "clip")
    llava.save_pretrained(root / "llava")
    for name in ("vicuna", "llava"):
        for file in os.listdir(os.path.join(FIXTURES, "llama2-tokenizer")):
            shutil.copy(os.path.join(FIXTURES, "llama2-tokenizer", file), root / name)
    return root, vicuna, clip, llava


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_official_lora_merges_into_its_vicuna_as_peft_merges_it(bases, fmt, tmp_path):
    """finetune_lora.sh's adapters (and the zoo's llava-v1.5-7b-lora): the Vicuna's LLM, the LoRA config's CLIP tower
    (its mm_vision_tower) and projector, A and B merged; PEFT 0.6's adapter_model.bin or later ones' safetensors."""
    root, vicuna, clip, _ = bases
    adapter, projector = write_lora_dir(tmp_path / "llava-v1.5-7b-lora", root / "clip", fmt)
    ours = load_lora(str(tmp_path / "llava-v1.5-7b-lora"), str(root / "vicuna"))
    reference = tiny_hf.hf_llava()
    reference.model.language_model.load_state_dict(vicuna.model.state_dict())
    reference.lm_head.load_state_dict(vicuna.lm_head.state_dict())
    reference.model.vision_tower.load_state_dict(clip.state_dict())
    logits_close(ours, merged_by_hand(reference, adapter, projector))
    assert ours.config.image_aspect_ratio == "pad" and ours.config.vision_feature_layer == -2
    # through the inference entry chat.py and eval.py use: the base's tokenizer, the template from the name
    model, tokenizer, template = load_for_inference(str(tmp_path / "llava-v1.5-7b-lora"), dtype=torch.float32,
                                                    model_base=str(root / "vicuna"))
    assert template == "llava_v1" and tokenizer.get_vocab_size() == 32000
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours.state_dict().values()))


def test_task_lora_merges_into_the_finished_llava_it_was_trained_from(bases, tmp_path):
    """finetune_task_lora.sh's adapters: the finished LLaVA's LLM and CLIP tower, the run's projector, A and B
    merged. An adapter on some of the projections (PEFT's target_modules) merges those alone."""
    root, _, _, llava = bases
    adapter, projector = write_lora_dir(tmp_path / "task-lora", targets=TARGETS[:4])
    ours = load_lora(str(tmp_path / "task-lora"), str(root / "llava"))
    logits_close(ours, merged_by_hand(tiny_hf.hf_llava(seed=4), adapter, projector, TARGETS[:4]))


def run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


def test_a_lora_without_its_base_or_with_the_wrong_one_says_what_to_pass(bases, tmp_path):
    """One line each, from chat.py and eval.py too: a LoRA directory without --model-base (naming the base its
    adapter_config.json names), a base that does not fit the adapter, --model-base with a whole model, a base that is
    itself a LoRA, an adapter for modules we do not have, settings that are not plain LoRA."""
    root = bases[0]
    lora = tmp_path / "llava-lora"
    write_lora_dir(lora, root / "clip")
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    error = run("chat.py", image, "--model", lora, "-p", "hi")
    assert f"{lora}: a LoRA adapter, not a whole model; pass the model it was trained from as --model-base" in error
    assert "its adapter_config.json names ./checkpoints/vicuna-7b-v1-5" in error
    wide = tmp_path / "vicuna-13b"  # another size: the adapter's A matrices take 64 inputs, its q_proj 96
    tiny_hf.hf_llama(hidden_size=96, num_attention_heads=4).save_pretrained(wide)
    shutil.copytree(os.path.join(FIXTURES, "llama2-tokenizer"), wide, dirs_exist_ok=True)
    error = run("eval.py", "generate", "--model", lora, "--model-base", wide, "--question-file",
                write_question(tmp_path), "--answers-file", tmp_path / "answers.jsonl", "--image-folder", tmp_path)
    assert f"--model-base {wide} does not fit the adapter in {lora}" in error
    assert "pass the model it was trained from (its adapter_config.json names ./checkpoints/vicuna-7b-v1-5)" in error
    assert not os.path.exists(tmp_path / "answers.jsonl")
    with pytest.raises(CheckpointError, match=f"--model-base {root / 'vicuna'} goes with a LoRA directory, and "
                                              f"{root / 'llava'} has no adapter_config.json"):
        load_for_inference(str(root / "llava"), model_base=str(root / "vicuna"))
    with pytest.raises(CheckpointError, match=f"--model-base {lora}: a LoRA adapter itself"):
        load_for_inference(str(lora), model_base=str(lora))
    for changes, says in (
            (dict(target_modules=["q_proj", "lm_head", "embed_tokens"]),
             r"an adapter for modules this LLaVA does not have \(lm_head, embed_tokens\); ours takes LoRA on the "
             r"LLM's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: merge it with the official "
             r"scripts/merge_lora_weights.py and pass the merged model as --model alone"),
            (dict(use_dora=True, rank_pattern={"q_proj": 8}), r"use_dora True, rank_pattern \{'q_proj': 8\} is not "
                                                               r"plain LoRA, which is all we merge")):
        other = tmp_path / f"other{len(changes)}"
        write_lora_dir(other, root / "clip", **changes)
        with pytest.raises(CheckpointError, match=says):
            load_for_inference(str(other), model_base=str(root / "vicuna"))
    stray = tmp_path / "stray"  # a tensor of a module we do not have, though the config does not name it
    write_lora_dir(stray, root / "clip")
    save_file({**load_file(str(stray / "adapter_model.safetensors")),
               "base_model.model.lm_head.lora_A.weight": torch.zeros(R, 64)}, str(stray / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensors of modules this LLaVA does not have "
                                              r"\(base_model.model.lm_head.lora_A.weight\)"):
        load_for_inference(str(stray), model_base=str(root / "vicuna"))


def write_question(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question_id": 0, "image": "image.png", "text": "What is this?"}) + "\n")
    return path


# -----------------------------------------------------------------------------
# the memory a step needs


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_memory_estimate_is_what_a_tiny_step_holds(mode):
    """The weights, gradients and AdamW state step_memory computes are what a step of a tiny model holds, built as
    train.py builds it (frozen parts in bf16, trained ones in fp32); QLoRA's weights are its linear layers at
    QLORA_BITS and the rest as LoRA's."""
    config = LlavaConfig.from_name("tiny")
    model = Llava(config)
    model.requires_grad_(False).to(torch.bfloat16)
    if mode == "lora":
        add_lora(model.language_model, R, ALPHA)
    else:
        model.language_model.float().requires_grad_(True)
    model.multi_modal_projector.float().requires_grad_(True)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6]]), torch.randn(1, 3, 32, 32),
              labels=torch.tensor([[-100, -100, 5, 6]])).backward()
    optimizer.step()
    expected = step_memory(config, 1, 64, R, 0.0, dtype_bytes=2)[mode]
    assert expected["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert expected["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trained)
    assert expected["optimizer"] == sum(s.numel() * s.element_size() for state in optimizer.state.values()
                                        for name, s in state.items() if name != "step")
    counts = parameter_counts(config, R)
    lm = model.language_model
    assert counts["llm_linear"] == sum(p.numel() for n, p in lm.named_parameters()
                                       if n.endswith(("_proj.weight", "_proj.base_layer.weight")))
    if mode == "lora":
        qlora = step_memory(config, 1, 64, R, 0.0, dtype_bytes=2)["qlora"]
        assert qlora["weights"] == pytest.approx(expected["weights"] - counts["llm_linear"] * (2 - QLORA_BITS["int4"] / 8))
        assert qlora["optimizer"] == expected["optimizer"]


def test_train_py_prints_the_memory_of_each_way_and_marks_its_own():
    """Stage 2 marks full fine-tuning or LoRA (at the run's rank; the official 128 where LoRA is off); stage 1,
    which trains the projector alone, none. FSDP divides what it shards."""
    from types import SimpleNamespace
    from plumbing.memory import memory_table
    config = LlavaConfig.from_name("llava-v1.5-7b")
    cfg = dict(stage=2, micro_batch=16, max_len=2048, lora_r=0, lora_dropout=0.05, gradient_checkpointing=True,
               fsdp=False, quantize="")
    rows = {line.split()[0] + line.split()[1]: line for line in memory_table(
        config, SimpleNamespace(**cfg), 1, 2).splitlines()[2:]}
    assert rows["full27.6"].endswith("<- this run") and rows["LoRAr128"].split()[-1] == "45.4"
    lora = memory_table(config, SimpleNamespace(**{**cfg, "lora_r": 64}), 1, 2)
    assert re.search(r"\nLoRA r64 .*<- this run\n", lora) and "QLoRA r64" in lora
    qlora = memory_table(config, SimpleNamespace(**{**cfg, "lora_r": 64, "quantize": "int8"}), 1, 2)
    assert re.search(r"\nQLoRA r64 int8 .*<- this run", qlora) and "<- this run" not in qlora.split("QLoRA")[0]
    assert "<- this run" not in memory_table(config, SimpleNamespace(**{**cfg, "stage": 1}), 1, 2)
    sharded = memory_table(config, SimpleNamespace(**{**cfg, "fsdp": True}), 8, 2)
    assert "FSDP over 8 ranks" in sharded and re.search(r"\nfull +3\.5 +3\.4 +6\.8 ", sharded)


@pytest.mark.parametrize("mode, dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.05)])
def test_activation_bytes_per_position_are_what_autograd_keeps(mode, dropout):
    """layer_bytes against saved-tensor hooks on one decoder layer of the toy's shape (its attention as Vicuna's,
    without grouped queries) under bf16 autocast, held as train.py holds it: the bytes per position, from two lengths
    (what does not grow with the length, the weights, drops out)."""
    from llama import LlamaDecoderLayer
    text = LlamaConfig.from_name("toy")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(text)
    if mode == "full":
        layer.float()
    else:
        layer.to(torch.bfloat16).requires_grad_(False)
        holder = nn.Module()
        holder.layers = [layer]
        add_lora(holder, 8, 16, dropout)

    def kept(T):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(1, T, text.hidden_size, dtype=torch.float32 if mode == "full" else torch.bfloat16,
                        requires_grad=True)
        cos, sin = rope_cos_sin(torch.arange(T)[None], text.head_dim, text.rope_theta, torch.bfloat16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, cos, sin, None, None)
        return sum(storages.values())

    per_position = (kept(96) - kept(32)) / 64
    assert per_position == pytest.approx(layer_bytes(text, mode, 8, dropout), rel=0.05)


# -----------------------------------------------------------------------------
# the worked example: a question type the toy was never taught (README, "Fine-tune on your own data")


def test_toy_task_asks_what_is_at_each_place_and_its_answers_are_what_the_images_show(tmp_path):
    """make_toy_task's files in the official formats: every training image asked about its four places (and once
    about what the toy knows), the held-out questions' answers the colour drawn at the place (or its background), no
    scene one of the world's held-out ones."""
    from data import SHORT_ANSWER, preprocess
    from plumbing.tokenizer import load_tokenizer
    from toy import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, TASK_CATEGORIES, make_toy_task, make_toy_world
    world = make_toy_world(tmp_path / "world", n_train_images=20, n_stage1=20, n_stage2=40, n_eval_images=5)
    task = make_toy_task(tmp_path / "task", n_train=30, n_eval_scenes=10, n_world_images=20)
    tokenizer = load_tokenizer(world["tokenizer"])
    samples = json.loads(task["train"].read_text())
    assert len(samples) == 30
    for sample in samples:
        questions = [turn["value"].replace("<image>", "").strip() for turn in sample["conversations"][::2]]
        assert len(questions) == 5 and all(q.endswith(SHORT_ANSWER) for q in questions)
        places = sorted(q.split("the ")[1].split("?")[0] for q in questions if q.startswith("What is "))
        assert places == sorted(POSITIONS)  # each place once; the fifth question is one the toy was taught
        preprocess(sample["conversations"], tokenizer, "vicuna_v1", True)  # what training reads, answers and all
        assert all(turn["actions"] == [] and turn["thoughts"] for turn in sample["conversations"][1::2])
        assert (task["images"] / sample["image"]).is_file()
    questions = [json.loads(line) for line in task["eval"].read_text().splitlines()]
    assert len(questions) == 40 and {q["category"] for q in questions} == set(TASK_CATEGORIES)
    for q in questions:
        image = Image.open(task["images"] / q["image"]).convert("RGB")
        fx, fy = POSITIONS[q["text"].split("the ")[1].split("?")[0]]
        centre = image.getpixel((int(fx * image.width), int(fy * image.height)))
        if q["answer"] == "no object":
            assert centre in BACKGROUNDS.values() and q["category"] == "empty place"
        else:
            colour, shape = q["answer"].split()
            assert centre == COLOURS[colour] and shape in SHAPES and q["category"] == "object at a place"
    held_out = {p.read_bytes() for p in world["images"].glob("eval_*.png")}
    assert not held_out & {p.read_bytes() for p in task["images"].iterdir()}
