"""The model against transformers (the numerical reference), on tiny random checkpoints in the official layouts."""

import json
import os
from dataclasses import replace
from pathlib import Path

import PIL.Image
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tiny_hf
from clip import CLIPVisionConfig, preprocess_image
from data import collate, tokenize_prompt
from llama import LlamaConfig
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Llava, LlavaConfig
from plumbing.checkpoints import (CheckpointError, load_base, load_clip, load_for_inference, load_llama, load_llava,
                                  save_image_processor, save_llava, save_llava_tokenizer)
from plumbing.tokenizer import load_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory):
    """A tiny LlavaForConditionalGeneration saved by transformers (safetensors)."""
    path = tmp_path_factory.mktemp("llava_hf")
    hf = tiny_hf.hf_llava()
    hf.save_pretrained(path)
    return str(path), hf


def pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, our_ids_rows, images, left_pad=False):
    """transformers' logits for our ids (expanded to its image tokens), padded like ours; returns (logits, mask)."""
    rows = [tiny_hf.expand_image_tokens(r) for r in our_ids_rows]
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if left_pad else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=images, attention_mask=mask)
    return out.logits, mask.bool()


def our_batch(rows):
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    return ids, mask


# -----------------------------------------------------------------------------
# the towers on their own


def test_clip_selected_layer_matches_transformers(tmp_path):
    hf = tiny_hf.hf_clip()
    hf.save_pretrained(tmp_path)
    ours = load_clip(str(tmp_path))
    x = pixels(2)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 0, 1):
            assert (ours(x, select_layer=layer) - ref[layer]).abs().max() < TOL, layer


@pytest.mark.parametrize("fmt", ["safetensors", "sharded_bin"])
def test_llama_logits_match_transformers_with_gqa(tmp_path, fmt):
    hf = tiny_hf.hf_llama()
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # really grouped-query
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        tiny_hf.save_sharded_bin(hf.state_dict(), str(tmp_path), n_shards=3)
    ours = load_llama(str(tmp_path))
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours.lm_head(ours(ours.embed_tokens(ids)))
    assert (got - ref).abs().max() < TOL


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_into_requested_dtype(tmp_path, saved):
    hf = tiny_hf.hf_llama().to(saved)
    hf.save_pretrained(tmp_path)
    ours = load_llama(str(tmp_path), dtype=torch.float32)
    assert ours.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(ours.embed_tokens.weight, hf.model.embed_tokens.weight.float())


# -----------------------------------------------------------------------------
# LLaVA forward


def test_llava_logits_image_in_the_middle(llava_hf_dir):
    path, hf = llava_hf_dir
    ours = load_llava(path)
    ids = [1, 5, 6, 7, IMAGE_TOKEN_INDEX, 8, 9, 10]
    images = pixels(1)
    ref, _ = hf_logits(hf, [ids], images)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), images)
    assert got.shape == ref.shape == (1, len(ids) - 1 + tiny_hf.N_IMAGE_TOKENS, 128)
    assert (got - ref).abs().max() < TOL


def test_llava_logits_two_images(llava_hf_dir):
    path, hf = llava_hf_dir
    ours = load_llava(path)
    ids = [1, IMAGE_TOKEN_INDEX, 5, 6, IMAGE_TOKEN_INDEX, 7, 8]
    images = pixels(2)
    ref, _ = hf_logits(hf, [ids], images)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), images)
        swapped = ours(torch.tensor([ids]), images.flip(0))
    assert (got - ref).abs().max() < TOL
    assert (swapped - ref).abs().max() > 1e-3  # the order of images matters: each goes to its own placeholder


def test_llava_batch_mixing_text_only_and_images_with_padding(llava_hf_dir):
    path, hf = llava_hf_dir
    ours = load_llava(path)
    rows = [[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15], [1, IMAGE_TOKEN_INDEX, 20, 21,
                                                                               IMAGE_TOKEN_INDEX, 22]]
    images = pixels(3)
    ref, _ = hf_logits(hf, rows, images)
    ids, our_mask = our_batch(rows)
    with torch.no_grad():
        got = ours(ids, images, our_mask)
        valid = ours.splice(ids, images, our_mask)[2]  # (B, L): our padding mask after splicing
    for i, r in enumerate(rows):  # compare the real (unpadded) positions of each row
        n = len(tiny_hf.expand_image_tokens(r))
        assert (got[i, :n] - ref[i, :n]).abs().max() < TOL, i
        assert valid[i, :n].all() and not valid[i, n:].any()


def test_loss_is_mean_cross_entropy_over_supervised_labels(llava_hf_dir):
    path, hf = llava_hf_dir
    ours = load_llava(path)
    rows = [[1, IMAGE_TOKEN_INDEX, 5, 6, 7, 2], [1, 8, 9, 10, 2]]
    labels_rows = [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7, 2], [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 2]]
    ids, mask = our_batch(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, r in enumerate(labels_rows):
        labels[i, :len(r)] = torch.tensor(r)
    images = pixels(1)
    with torch.no_grad():
        loss = ours(ids, images, mask, labels)
        total = ours(ids, images, mask, labels, reduction="sum")
        # by hand: log-softmax of the full logits at each supervised target
        logits = ours(ids, images, mask)
    n_img = tiny_hf.N_IMAGE_TOKENS - 1
    expected = []
    for row, (pos, target) in [(0, (2 + n_img, 6)), (0, (3 + n_img, 7)), (0, (4 + n_img, 2)),
                               (1, (1, 9)), (1, (2, 10)), (1, (3, 2))]:
        expected.append(-torch.log_softmax(logits[row, pos], -1)[target])  # position pos predicts token pos+1
    assert abs(loss.item() - torch.stack(expected).mean().item()) < TOL
    assert abs(total.item() - torch.stack(expected).sum().item()) < TOL
    # transformers agrees (its labels hold IGNORE_INDEX at the image tokens it expands)
    hf_rows = [tiny_hf.expand_image_tokens(r) for r in rows]
    hf_label_rows = [sum(([IGNORE_INDEX] * tiny_hf.N_IMAGE_TOKENS if t == IMAGE_TOKEN_INDEX else [lab]
                          for t, lab in zip(r, lr)), []) for r, lr in zip(rows, labels_rows)]
    L = max(map(len, hf_rows))
    pad = lambda r, v: r + [v] * (L - len(r))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([pad(r, 0) for r in hf_rows]), pixel_values=images,
                 attention_mask=torch.tensor([pad([1] * len(r), 0) for r in hf_rows]),
                 labels=torch.tensor([pad(r, IGNORE_INDEX) for r in hf_label_rows])).loss
    assert abs(loss.item() - ref.item()) < TOL


def test_packed_rows_give_the_same_loss_and_gradients_as_one_sample_per_row(llava_hf_dir):
    """data.collate's packing (several samples per row, a block-diagonal mask, positions restarting per sample)
    changes how much padding is computed, not what is learned."""
    ours = load_llava(llava_hf_dir[0])
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (n_text, n_images) in enumerate([(30, 1), (6, 0), (9, 2), (4, 1), (12, 0), (5, 1), (3, 0)]):
        ids = torch.randint(3, 120, (n_text,), generator=g)
        ids[0] = 1  # BOS
        ids[1:1 + n_images] = IMAGE_TOKEN_INDEX
        labels = torch.where((torch.arange(n_text) > n_images + 1) & (ids != IMAGE_TOKEN_INDEX), ids, IGNORE_INDEX)
        samples.append(dict(id=str(i), input_ids=ids, labels=labels, images=pixels(n_images, seed=i)))
    N = ours.config.num_image_tokens
    plain, packed = collate(samples), collate(samples, pack=True, image_tokens=N)
    assert plain["segment_ids"] is None and len(plain["input_ids"]) == 7
    # LLM positions 45, 6, 39, 19, 12, 20, 3 packed first-fit, longest first, into rows of 45:
    # [45], [39, 6], [20, 19, 3], [12]
    assert packed["segment_ids"].max(1).values.tolist() == [1, 2, 3, 1]
    assert sorted(packed["ids"]) == sorted(plain["ids"])
    assert packed["attention_mask"].sum() == plain["attention_mask"].sum()  # every token once

    def loss_and_grads(batch):
        ours.zero_grad()
        loss = ours(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"], reduction="sum",
                    segment_ids=batch["segment_ids"])
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}

    (plain_loss, plain_grads), (packed_loss, packed_grads) = loss_and_grads(plain), loss_and_grads(packed)
    assert abs(packed_loss - plain_loss) < TOL * abs(plain_loss)
    assert plain_grads.keys() == packed_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-5), name
    # every packed sample's RoPE positions start again at 0, as in its own row
    _, position_ids, valid, _, segments = ours.splice(packed["input_ids"], packed["images"], packed["attention_mask"],
                                                       segment_ids=packed["segment_ids"])
    row = 2  # three samples and 3 positions of padding
    for k in range(1, int(segments[row].max()) + 1):
        assert position_ids[row][segments[row] == k].tolist() == list(range(int((segments[row] == k).sum())))
    assert not valid[row][segments[row] == 0].any()


def test_placeholder_count_must_match_images(llava_hf_dir):
    ours = load_llava(llava_hf_dir[0])
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        ours(torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 5]]), pixels(1))


# -----------------------------------------------------------------------------
# generation


def test_kv_cached_greedy_equals_recomputing_and_transformers(llava_hf_dir):
    path, hf = llava_hf_dir
    ours = load_llava(path)
    prompts = [[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15, 16, 17], [1, IMAGE_TOKEN_INDEX, 30]]
    images = pixels(2, seed=3)
    steps = []
    generated = ours.generate(prompts, images, max_new_tokens=12, eos_token_id=-1,  # no EOS: all 12 steps
                              on_token=lambda t: steps.append(t.clone()))
    assert all(len(g) == 12 for g in generated)
    assert torch.equal(torch.stack(steps, 1), torch.tensor(generated))  # streamed tokens are the returned ones

    # recompute the whole sequence each step without a cache: same tokens, same logits
    image_of = {0: images[:1], 1: None, 2: images[1:]}
    for i, (prompt, new) in enumerate(zip(prompts, generated)):
        seq = list(prompt)
        for tok in new:
            with torch.no_grad():
                logits = ours(torch.tensor([seq]), image_of[i])[0, -1]
            assert logits.argmax().item() == tok
            seq.append(tok)

    # cached logits equal the full forward's: check the prefill + 3 decode steps of the first prompt
    lm = ours.language_model
    seq = prompts[0] + generated[0][:3]
    with torch.no_grad():
        full = ours(torch.tensor([seq]), images[:1])[0]
        embeds, pos, valid, _, _ = ours.splice(torch.tensor([prompts[0]]), images[:1])
        lm.setup_cache(1, 64)
        from llama import attention_mask
        key_valid = torch.ones(1, 64, dtype=torch.bool)
        L = embeds.shape[1]
        h = lm(embeds, pos, attention_mask(key_valid, torch.arange(L)), torch.arange(L))
        cached = [lm.lm_head(h[0, -1])]
        for k, tok in enumerate(generated[0][:3]):
            ip = torch.tensor([L + k])
            h = lm(lm.embed_tokens(torch.tensor([[tok]])), torch.tensor([[L + k]]), attention_mask(key_valid, ip), ip)
            cached.append(lm.lm_head(h[0, -1]))
        lm.clear_cache()
    assert (torch.stack(cached) - full[L - 1:L + 3]).abs().max() < TOL

    # transformers' generate, left-padded batch, greedy
    rows = [tiny_hf.expand_image_tokens(p) for p in prompts]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ref[:, T:].tolist() == generated


def test_generation_stops_at_eos_and_samples_reproducibly(llava_hf_dir):
    ours = load_llava(llava_hf_dir[0])
    prompt = [[1, 5, IMAGE_TOKEN_INDEX, 6]]
    greedy = ours.generate(prompt, pixels(1), max_new_tokens=8, eos_token_id=-1)[0]
    stop = greedy[3]  # pretend the 4th greedy token is EOS
    steps = []  # streaming checks for the end after every token
    assert ours.generate(prompt, pixels(1), max_new_tokens=8, eos_token_id=stop, on_token=steps.append)[0] == \
        greedy[:greedy.index(stop)]
    assert len(steps) == greedy.index(stop) + 1  # no step after the EOS
    # a batch goes on until every row has met EOS; each row is cut at its own
    prompts = [[1, 5, IMAGE_TOKEN_INDEX, 6], [1, 9, IMAGE_TOKEN_INDEX, 7, 8]]
    rows = ours.generate(prompts, pixels(2), max_new_tokens=40, eos_token_id=-1)
    early = [t for t in rows[0][:8] if t not in rows[1]]
    assert early, "these prompts give no token that is early in row 0 and absent from row 1: pick others"
    stop = early[0]
    for on_token in (None, []):  # without streaming the end is checked every 16 tokens only
        got = ours.generate(prompts, pixels(2), max_new_tokens=40, eos_token_id=stop,
                            on_token=None if on_token is None else on_token.append)
        assert got == [rows[0][:rows[0].index(stop)], rows[1]]
    a = ours.generate(prompt, pixels(1), 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = ours.generate(prompt, pixels(1), 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    c = ours.generate(prompt, pixels(1), 8, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c


def test_nucleus_sampling_keeps_the_most_likely_token_even_at_top_p_0():
    """As HF (min_tokens_to_keep=1): the nucleus is never empty, which would draw token 0 every time."""
    from llama import sample
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    for top_p in (0.0, 1e-6):
        assert torch.equal(sample(logits, 0.7, top_p), logits.argmax(-1))
    drawn = sample(logits[:1].expand(1000, 10), 1.0, 0.999, generator=torch.Generator().manual_seed(0))
    assert len(drawn.unique()) > 1  # a wide nucleus still samples


def test_a_kept_cache_of_the_same_shape_is_reused_and_its_stale_slots_change_nothing(llava_hf_dir):
    """generate reuses a kept KV cache of the shape it needs (bench.py's compiled runs rely on it: the CUDA graph
    recorded on its buffers replays); what a longer earlier generation left in its slots changes no token."""
    ours = load_llava(llava_hf_dir[0])
    lm = ours.language_model
    short = [[1, 9, IMAGE_TOKEN_INDEX, 3]]
    fresh = ours.generate(short, pixels(1, seed=1), max_new_tokens=6, eos_token_id=-1, cache_size=64)
    assert lm.layers[0].self_attn.kv_cache is None  # not kept by default
    ours.generate([[1, 5, IMAGE_TOKEN_INDEX] + list(range(20, 40))], pixels(1), max_new_tokens=12, eos_token_id=-1,
                  cache_size=64, keep_cache=True)
    kept = [layer.self_attn.kv_cache.k for layer in lm.layers]
    assert (kept[0][0, :, 30:38] != 0).any()  # slots the short prompt's generation never writes
    assert ours.generate(short, pixels(1, seed=1), max_new_tokens=6, eos_token_id=-1, cache_size=64,
                         keep_cache=True) == fresh
    assert all(layer.self_attn.kv_cache.k is k for layer, k in zip(lm.layers, kept))
    ours.generate(short * 2, pixels(2, seed=1), max_new_tokens=6, eos_token_id=-1, cache_size=64, keep_cache=True)
    assert lm.layers[0].self_attn.kv_cache.k.shape[0] == 2  # another shape: a new cache


def test_top_p_keeps_only_the_nucleus():
    from llama import sample
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.7, g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 2 and 3 are cut
    assert sample(logits, 0.0).item() == 0


# -----------------------------------------------------------------------------
# checkpoint layouts


def write_original_layout(tmp_path, hf):
    """The same weights as the llava-hf model, in the original LLaVA layout (names as liuhaotian/llava-v1.5-7b),
    sharded .bin, with the CLIP tower in its own plain-CLIP directory."""
    sd = hf.state_dict()
    clip_dir, llava_dir = tmp_path / "clip", tmp_path / "llava"
    clip_dir.mkdir(), llava_dir.mkdir()
    vision = {k.split("vision_tower.", 1)[1]: v for k, v in sd.items() if "vision_tower." in k}
    vision = {(k if k.startswith("vision_model.") else "vision_model." + k): v.contiguous() for k, v in vision.items()}
    save_file(vision, str(clip_dir / "model.safetensors"))
    with open(clip_dir / "config.json", "w") as f:
        json.dump({"model_type": "clip", "vision_config": tiny_hf.CLIP, "text_config": {}}, f)
    original = {}
    for k, v in sd.items():
        if "language_model" in k and "lm_head" not in k:
            original["model." + k.split("language_model.", 1)[1].removeprefix("model.")] = v
        elif "lm_head" in k:
            original["lm_head.weight"] = v
        elif "multi_modal_projector" in k:
            layer, param = k.split("multi_modal_projector.", 1)[1].split(".")
            original[f"model.mm_projector.{2 * (int(layer[-1]) - 1)}.{param}"] = v
    original["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # 4.31-era checkpoints have these
    tiny_hf.save_sharded_bin(original, str(llava_dir))
    config = {**tiny_hf.LLAMA, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
              "mm_hidden_size": 32, "mm_use_im_start_end": False, "use_mm_proj": True}
    with open(llava_dir / "config.json", "w") as f:
        json.dump(config, f)
    return str(llava_dir), str(clip_dir)


def test_original_layout_gives_the_same_logits(llava_hf_dir, tmp_path):
    path, hf = llava_hf_dir
    llava_dir, clip_dir = write_original_layout(tmp_path, hf)
    with pytest.raises(CheckpointError, match="--vision-tower"):
        load_llava(llava_dir)  # the config names a hub id, which is not a local directory
    original = load_llava(llava_dir, vision_tower=clip_dir)
    assert original.config.image_aspect_ratio == "pad" and original.config.projector_type == "mlp2x_gelu"
    reference = load_llava(path)
    ids, images = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7]]), pixels(1)
    with torch.no_grad():
        assert (original(ids, images) - reference(ids, images)).abs().max() < TOL
    # the tower as transformers 5's CLIPVisionModel.save_pretrained writes it: no `vision_model.` in the names
    bare = tmp_path / "clip_vision_model"
    bare.mkdir()
    tower = load_file(str(Path(clip_dir) / "model.safetensors"))
    save_file({k.removeprefix("vision_model."): v for k, v in tower.items()}, str(bare / "model.safetensors"))
    (bare / "config.json").write_text(json.dumps({**tiny_hf.CLIP, "model_type": "clip_vision_model"}))
    with torch.no_grad():
        assert torch.equal(load_llava(llava_dir, vision_tower=str(bare))(ids, images), original(ids, images))
    # what a user gets wrong is named
    with pytest.raises(CheckpointError, match="--vision-tower .*nowhere: no such directory"):
        load_llava(llava_dir, vision_tower=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="a CLIP model, not a LLaVA one"):
        load_llava(clip_dir)
    with pytest.raises(CheckpointError, match="holds its own CLIP tower .*--vision-tower is for the original layout"):
        load_llava(path, vision_tower=clip_dir)  # not silently ignored
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llava",\n')
    with pytest.raises(CheckpointError, match="bad.config.json: not valid JSON"):
        load_llava(str(tmp_path / "bad"))


def test_stage1_start_from_plain_llama_and_clip(tmp_path):
    hf_llm, hf_vision = tiny_hf.hf_llama(), tiny_hf.hf_clip()
    hf_llm.save_pretrained(tmp_path / "llm")
    hf_vision.save_pretrained(tmp_path / "clip")
    model = load_base(str(tmp_path / "llm"), str(tmp_path / "clip"))
    assert torch.equal(model.language_model.lm_head.weight, hf_llm.lm_head.weight)
    hf_patch = next(v for k, v in hf_vision.state_dict().items() if k.endswith("patch_embedding.weight"))
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight, hf_patch)
    assert model.multi_modal_projector.linear_1.weight.shape == (64, 32)
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]]), pixels(1))).all()


def test_save_then_transformers_load_gives_the_same_logits(llava_hf_dir, tmp_path):
    ours = load_llava(llava_hf_dir[0])
    save_llava(ours, str(tmp_path), max_shard_bytes=200_000)  # force shards + index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6, 7]
    images = pixels(1)
    ref, _ = hf_logits(hf, [ids], images)
    with torch.no_grad():
        assert (ours(torch.tensor([ids]), images) - ref).abs().max() < TOL
    assert (load_llava(str(tmp_path)).language_model.lm_head.weight == ours.language_model.lm_head.weight).all()


def test_save_pads_a_vocabulary_without_image_token(llava_hf_dir, tmp_path):
    ours = load_llava(llava_hf_dir[0])
    ours.config.image_token_index = 128  # an original-layout model: no row for transformers' image token
    save_llava(ours, str(tmp_path))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert hf.config.text_config.vocab_size == 192  # 129 rounded up to a multiple of 64
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6]
    rows = [[128] * tiny_hf.N_IMAGE_TOKENS if t == IMAGE_TOKEN_INDEX else [t] for t in ids]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([sum(rows, [])]), pixel_values=pixels(1)).logits[..., :128]
        assert (ours(torch.tensor([ids]), pixels(1)) - ref).abs().max() < TOL


def test_7b_preset_has_transformers_parameter_count():
    config = LlavaConfig.from_name("llava-v1.5-7b")
    with torch.device("meta"):
        ours = Llava(config)
        hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**config.to_hf()))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(hf)
    assert 7.0e9 < count(ours) < 7.1e9  # 6.74B LLaMA + 0.30B CLIP + 0.02B projector


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing tensors: language_model.model.norm.weight"),
    ("extra", "unexpected tensors: language_model.model.extra.weight"),
    ("shape", r"wrong shapes: multi_modal_projector.linear_2.bias: checkpoint \[7\], model \[64\]"),
])
def test_damaged_checkpoint_names_the_tensor(llava_hf_dir, tmp_path, damage, message):
    from safetensors.torch import load_file
    src = llava_hf_dir[0]
    sd = load_file(os.path.join(src, "model.safetensors"))
    norm_key = next(k for k in sd if k.endswith("model.norm.weight"))
    if damage == "missing":
        del sd[norm_key]
    elif damage == "extra":
        sd["language_model.model.extra.weight"] = torch.zeros(3)
    else:
        sd[next(k for k in sd if k.endswith("linear_2.bias"))] = torch.zeros(7)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    if damage == "missing" and not norm_key.startswith("language_model.model."):
        message = message.replace("language_model.model.norm", norm_key.removesuffix(".weight").replace(".", r"\."))
    with pytest.raises(CheckpointError, match=message):
        load_llava(str(tmp_path))


def test_saved_plain_towers_load_in_transformers(tmp_path):
    from clip import CLIPVisionConfig, CLIPVisionTower
    from llama import Llama, LlamaConfig
    from plumbing.checkpoints import save_clip, save_llama
    torch.manual_seed(0)
    llm, tower = Llama(LlamaConfig.from_name("tiny")), CLIPVisionTower(CLIPVisionConfig.from_name("tiny"))
    save_llama(llm, str(tmp_path / "llm"))
    save_clip(tower, str(tmp_path / "clip"))
    hf_llm = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "llm")).eval()
    hf_clip = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "clip")).eval()
    ids, x = torch.randint(0, 128, (1, 9)), pixels(1)
    with torch.no_grad():
        assert (llm.lm_head(llm(llm.embed_tokens(ids))) - hf_llm(input_ids=ids).logits).abs().max() < TOL
        assert (tower(x, -2) - hf_clip(pixel_values=x, output_hidden_states=True).hidden_states[-2]).abs().max() < TOL
    assert torch.equal(load_llama(str(tmp_path / "llm")).norm.weight, llm.norm.weight)


def test_stage2_projector_from_a_stage1_dir_or_an_official_mm_projector_bin(llava_hf_dir, tmp_path):
    trained = load_llava(llava_hf_dir[0])
    hf_llm, hf_vision = tiny_hf.hf_llama(), tiny_hf.hf_clip()
    hf_llm.save_pretrained(tmp_path / "llm")
    hf_vision.save_pretrained(tmp_path / "clip")
    expected = trained.multi_modal_projector.state_dict()
    # ours: a whole stage-1 output directory
    model = load_base(str(tmp_path / "llm"), str(tmp_path / "clip"))
    from plumbing.checkpoints import load_projector
    load_projector(model, llava_hf_dir[0])
    assert all(torch.equal(model.multi_modal_projector.state_dict()[k], v) for k, v in expected.items())
    # official: mm_projector.bin with `model.mm_projector.{0,2}.*`
    official = {f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.')[1]}": v
                for k, v in expected.items()}
    torch.save(official, tmp_path / "mm_projector.bin")
    model = load_base(str(tmp_path / "llm"), str(tmp_path / "clip"))
    load_projector(model, str(tmp_path / "mm_projector.bin"))
    assert all(torch.equal(model.multi_modal_projector.state_dict()[k], v) for k, v in expected.items())
    torch.save({**official, "model.mm_projector.4.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match="unexpected tensors: model.mm_projector.4.weight"):
        load_projector(model, str(tmp_path / "bad.bin"))


def test_corrupt_weights_file_names_it(llava_hf_dir, tmp_path):
    import shutil
    shutil.copy(os.path.join(llava_hf_dir[0], "config.json"), tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_llava(str(tmp_path))


@pytest.mark.parametrize("aspect_ratio", ["pad", "square"])
def test_saved_model_runs_under_transformers_autoprocessor_as_ours(aspect_ratio, tmp_path):
    """What train.py writes beside the weights (the LLM's tokenizer with "<image>" added at the model's image id,
    preprocessor and processor configs) lets a transformers user prompt it with AutoProcessor, as llava-hf's models:
    the same pixels as our preprocessing, the same greedy tokens."""
    tokenizer_dir = os.path.join(os.path.dirname(__file__), "fixtures", "llama2-tokenizer")
    config = LlavaConfig(vision=CLIPVisionConfig.from_name("tiny"),
                         text=replace(LlamaConfig.from_name("tiny"), vocab_size=32000), image_token_index=32000,
                         image_aspect_ratio=aspect_ratio)
    torch.manual_seed(0)
    ours = Llava(config).eval()
    with torch.no_grad():  # larger than the default init, so that the greedy tokens depend on the image
        for p in ours.parameters():
            p.normal_(0, 0.3)
    save_llava(ours, str(tmp_path))
    save_image_processor(ours.config, str(tmp_path))
    save_llava_tokenizer(tokenizer_dir, str(tmp_path), ours.config.image_token_index)
    saved = load_tokenizer(tmp_path)
    assert saved.token_to_id("<image>") == 32000
    prompt = "USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And <image>? ASSISTANT:"
    assert tokenize_prompt(saved, prompt) == tokenize_prompt(load_tokenizer(tokenizer_dir), prompt)  # ours unchanged

    image = PIL.Image.fromarray(torch.randint(0, 256, (30, 50, 3), generator=torch.Generator().manual_seed(1))
                            .numpy().astype("uint8"))  # not square: pad and crop differ
    processor = transformers.AutoProcessor.from_pretrained(str(tmp_path))
    inputs = processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    mine = preprocess_image(image, 32, aspect_ratio)[None]
    assert (inputs["pixel_values"] - mine).abs().max() < 1e-5
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = theirs[0, inputs["input_ids"].shape[1]:]
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(32000)  # the processor expanded "<image>" into the image's positions; ours takes one marker
    assert ids[first:first + tiny_hf.N_IMAGE_TOKENS] == [32000] * tiny_hf.N_IMAGE_TOKENS
    ours_ids = ids[:first] + [IMAGE_TOKEN_INDEX] + ids[first + tiny_hf.N_IMAGE_TOKENS:]
    assert ours.generate([ours_ids], mine, max_new_tokens=8, eos_token_id=-1)[0] == theirs.tolist()


def test_llava_plus_release_layout_loads_and_matches_transformers(tmp_path):
    """LLaVA-Plus's released checkpoint (llava_plus_v0_7b) in miniature: the original layout, a linear projector its
    config does not name, a vocabulary of 32001 with "[PAD]" in added_tokens.json beside tokenizer.model, no aspect
    ratio (so resize and centre-crop). Its CLIP tower and LLaMA are compared with transformers' own, the projector
    applied by hand (transformers' LLaVA has no linear projector)."""
    llm = tiny_hf.hf_llama(seed=4, vocab_size=32001)
    clip = tiny_hf.hf_clip(seed=5)
    projector = torch.nn.Linear(tiny_hf.CLIP["hidden_size"], tiny_hf.LLAMA["hidden_size"])
    llava_dir, clip_dir = tmp_path / "llava_plus_v0_7b", tmp_path / "clip-vit-large-patch14"
    clip.save_pretrained(clip_dir)
    llava_dir.mkdir()
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    state.update({"model.mm_projector.weight": projector.weight.detach(), "model.mm_projector.bias": projector.bias.detach()})
    tiny_hf.save_sharded_bin(state, str(llava_dir))
    config = {**tiny_hf.LLAMA, "vocab_size": 32001, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_vision_select_layer": -2, "mm_hidden_size": 32,
              "mm_use_im_start_end": False, "use_mm_proj": True}
    (llava_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "special_tokens_map.json", "tokenizer_config.json"):
        (llava_dir / name).write_bytes((Path(__file__).parent / "fixtures" / "llama2-tokenizer" / name).read_bytes())
    (llava_dir / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}))

    model, tokenizer, template = load_for_inference(str(llava_dir), vision_tower=str(clip_dir))
    assert template == "llava_v0" and tokenizer.token_to_id("[PAD]") == 32000 and tokenizer.get_vocab_size() == 32001
    assert (model.config.projector_type, model.config.image_aspect_ratio) == ("linear", "square")
    ids, images = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 32000]]), pixels(1)
    with torch.no_grad():
        features = clip(images, output_hidden_states=True).hidden_states[-2][:, 1:]  # layer -2, patches
        embeds = llm.model.embed_tokens(torch.tensor([[1, 5]]))
        spliced = torch.cat([embeds, projector(features), llm.model.embed_tokens(torch.tensor([[6, 32000]]))], 1)
        theirs = llm(inputs_embeds=spliced).logits
        assert (model(ids, images) - theirs).abs().max() < TOL
