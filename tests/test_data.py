"""data.py against the official LLaVA outputs (golden files from llava-torch 1.2.2.post1), the spec's template strings,
and the guarantees we add: no silent mis-masking, images never cut, bad samples named, single-modality batches."""

import ast
import hashlib
import io
import json
import random
import re
import shutil
import struct
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data import (CONV_TEMPLATES, SHORT_ANSWER, LazySupervisedDataset, ModalityLengthGroupedSampler, collate,
                  preprocess, render, to_messages, tokenize_prompt, truncate)
from model import IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN_INDEX
from plumbing.checkpoints import conv_mode_for
from plumbing.files import DataError, open_image
from plumbing.tokenizer import EOS_ID, load_tokenizer
from toy import (DESCRIBE, EVAL_CATEGORIES, POSITIONS, SHIPPED, described_objects, ensure_toy_world, find_shapes,
                 lm_texts, make_toy_eval, make_toy_world)

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "golden_preprocess.json").read_text())
GOLDEN_TOKENIZER = json.loads((FIXTURES / "golden_tokenizer.json").read_text())["rows"]

# -----------------------------------------------------------------------------
# templates: the spec's exact strings (spec §1)

SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions.")
SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
SYSTEM_LLAVA_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                        "that the user provides, and assist the user with a variety of tasks using natural language.")
SYSTEM_MPT = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
              "helpful and honest answers.")
TWO_ROUNDS = [(0, "<image>\nQ1"), (1, "A1"), (0, "Q2"), (1, None)]
RENDERED = {
    "vicuna_v1": f"{SYSTEM_USER} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "v1": f"{SYSTEM_USER} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "llava_v1": f"{SYSTEM_HUMAN} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "llava_llama_2": f"[INST] <<SYS>>\n{SYSTEM_LLAVA_LLAMA_2}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]",
    "mistral_instruct": "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
                     "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
    "mpt": f"{SYSTEM_MPT}<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
           "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
    "llava_v0": f"{SYSTEM_HUMAN}###Human: <image>\nQ1###Assistant: A1###Human: Q2###Assistant:",
    "plain": "<image>\nQ1\nA1\nQ2\n",
}


@pytest.mark.parametrize("template", sorted(RENDERED))
def test_render_matches_the_spec(template):
    assert render(CONV_TEMPLATES[template], TWO_ROUNDS) == RENDERED[template]


def test_render_roles_by_name_and_order():
    conv = CONV_TEMPLATES["vicuna_v1"]
    by_name = [("human", "<image>\nQ1"), ("gpt", "A1"), ("USER", "Q2"), ("ASSISTANT", None)]
    assert render(conv, by_name) == RENDERED["vicuna_v1"]
    assert render(conv, [(0, "<image>\nHi"), (1, None)]) == f"{SYSTEM_USER} USER: <image>\nHi ASSISTANT:"
    with pytest.raises(ValueError, match="alternate"):
        render(conv, [(1, "A1"), (0, "Q")])


def test_golden_inference_prompts(llama_tokenizer):
    for case in GOLDEN["inference_prompts"]:
        assert tokenize_prompt(llama_tokenizer, case["prompt"]) == case["tokenizer_image_token_ids_fast_tokenizer_json"]
    # the first one is exactly what an inference caller renders: llava_v1 with "<image>\n" + question
    first = GOLDEN["inference_prompts"][0]
    assert first["conv_mode"] == "llava_v1"
    assert render(CONV_TEMPLATES["llava_v1"], [(0, "<image>\nWhat is shown in this image?"), (1, None)]) == first["prompt"]


@pytest.mark.parametrize("name, mode", [
    ("liuhaotian/llava-v1.5-7b", "llava_v1"), ("llava-v1.5-13b", "llava_v1"), ("llava-v1.6-vicuna-7b", "llava_v1"),
    ("liuhaotian/llava-v1.6-34b", "chatml_direct"), ("llava-v1.6-mistral-7b", "mistral_instruct"),
    ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"), ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
    ("/ckpt/llava-v1.5-7b-lora/checkpoint-500/", "llava_v1"), ("runs/toy", "llava_v0")])
def test_conv_mode_for(name, mode):
    assert conv_mode_for(name) == mode


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_json_matches_golden(llama_tokenizer):
    for row in GOLDEN_TOKENIZER:
        assert llama_tokenizer.encode(row["text"]).ids == row["ids"], row["text"]


def test_tokenizer_from_sentencepiece_model(tmp_path, llama_tokenizer):
    shutil.copy(FIXTURES / "llama2-tokenizer" / "tokenizer.model", tmp_path)  # no tokenizer.json next to it
    from_model = load_tokenizer(tmp_path)
    assert from_model.get_vocab() == llama_tokenizer.get_vocab()
    for row in GOLDEN_TOKENIZER:
        assert from_model.encode(row["text"]).ids == row["ids"], row["text"]
    for text in [" " * n + "x" + " " * m for n in range(20) for m in range(8)]:  # runs of spaces: merge-order ties
        assert from_model.encode(text).ids == llama_tokenizer.encode(text).ids
    assert from_model.decode(from_model.encode("Hello, 世界 🙂").ids) == "Hello, 世界 🙂"


def test_a_tokenizer_json_saved_without_legacy_behaviour_reads_as_llava_was_trained(tmp_path, llama_tokenizer):
    """transformers' legacy=False saves LLaMA's tokenizer.json with a Metaspace pre-tokenizer that puts "▁" only at
    the start of the text, so text after "</s>" loses it: "</s>USER" becomes "USER", not LLaVA-1.5's "▁US ER"
    (spec §2). Loaded here, such a file tokenizes and decodes as the legacy one."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    saved = Tokenizer.from_file(str(FIXTURES / "llama2-tokenizer" / "tokenizer.json"))
    saved.normalizer = None
    saved.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    saved.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    saved.save(str(tmp_path / "tokenizer.json"))
    second_turn = render(CONV_TEMPLATES["vicuna_v1"], [(0, "<image>\nWhat is it?"), (1, "A  cat."), (0, "And?")])
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(second_turn).ids != \
        llama_tokenizer.encode(second_turn).ids  # the case: the file as saved reads it otherwise
    loaded = load_tokenizer(tmp_path)
    for text in [second_turn, "  two  spaces", " Hello, 世界 🙂", "a</s>b c", *(row["text"] for row in GOLDEN_TOKENIZER)]:
        assert loaded.encode(text).ids == llama_tokenizer.encode(text).ids, text
        assert loaded.decode(loaded.encode(text).ids) == llama_tokenizer.decode(llama_tokenizer.encode(text).ids)


def test_load_tokenizer_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_tokenize_prompt_images_and_chunks(llama_tokenizer):
    assert tokenize_prompt(llama_tokenizer, "<image>") == [1, IMAGE_TOKEN_INDEX]
    assert tokenize_prompt(llama_tokenizer, "\n") == [1, 29871, 13]  # spec §2
    assert tokenize_prompt(llama_tokenizer, "USER: ") == [1, 3148, 1001, 29901, 29871]
    # every chunk gets its own dummy-prefix "▁" (29871 before "\n"), one <s> in front, one id per image
    ids = tokenize_prompt(llama_tokenizer, "<image>\n<image>\nHi")
    assert ids == [1, IMAGE_TOKEN_INDEX, 29871, 13, IMAGE_TOKEN_INDEX, 29871, 13, 18567]


# -----------------------------------------------------------------------------
# tokenization and label masking


@pytest.mark.parametrize("case", GOLDEN["samples"], ids=lambda c: c["id"])
def test_golden_v1(case, llama_tokenizer):
    want = case["v1_fast_tokenizer_json"]
    messages = to_messages(case["conversations"], case["has_image"])
    assert render(CONV_TEMPLATES["vicuna_v1"], messages) == want["prompt"]
    input_ids, labels = preprocess(case["conversations"], llama_tokenizer, "vicuna_v1", case["has_image"])
    assert input_ids == want["input_ids"] == case["input_ids_fast_tokenizer_json"]
    assert labels == want["labels"]


@pytest.mark.parametrize("case", GOLDEN["plain_samples"], ids=lambda c: c["id"])
def test_golden_plain(case, llama_tokenizer):
    input_ids, labels = preprocess(case["conversations"], llama_tokenizer, "plain", has_image=True)
    assert input_ids == case["plain"]["input_ids"] == case["input_ids_fast_tokenizer_json"]
    assert labels == case["plain"]["labels"]


def official_masking(tokenizer, prompt: str, sep: str, sep2: str) -> list[int]:
    """The masking loop of the official preprocess_v1 / preprocess_llama_2 (legacy tokenizer), transcribed."""
    input_ids = tokenize_prompt(tokenizer, prompt)
    target, cur_len = list(input_ids), 1
    target[0] = IGNORE_INDEX
    for rou in prompt.split(sep2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenize_prompt(tokenizer, rou))
        instruction_len = len(tokenize_prompt(tokenizer, parts[0])) - 2
        for k in range(cur_len, min(cur_len + instruction_len, len(target))):
            target[k] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == len(input_ids), "the official code would print a tokenization mismatch here"
    return target


@pytest.mark.parametrize("template, sep", [("vicuna_v1", " ASSISTANT: "), ("llava_v1", " ASSISTANT: "),
                                           ("llava_llama_2", "[/INST] "), ("mistral_instruct", "[/INST] ")])
def test_masking_equals_the_official_loop(template, sep, llama_tokenizer):
    for case in GOLDEN["samples"]:
        messages = to_messages(case["conversations"], case["has_image"])
        prompt = render(CONV_TEMPLATES[template], messages)
        input_ids, labels = preprocess(case["conversations"], llama_tokenizer, template, case["has_image"])
        assert input_ids == tokenize_prompt(llama_tokenizer, prompt)
        assert labels == official_masking(llama_tokenizer, prompt, sep, "</s>"), case["id"]


@pytest.mark.parametrize("template, supervised", [
    ("vicuna_v1", "A1</s> A2</s>"), ("llava_v1", "A1</s> A2</s>"), ("llava_llama_2", "A1 </s> A2 </s>"),
    ("mistral_instruct", "A1 </s> A2 </s>"), ("chatml_direct", "A1<|im_end|>A2<|im_end|>")])
def test_supervised_text_per_template(template, supervised, toy_world):
    """Each answer and the separator that ends it are supervised, nothing else: decoded, that is `supervised`."""
    tokenizer = load_tokenizer(toy_world["tokenizer"])
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # as in the tokenizers chatml models ship with
    conversation = [dict(zip(("from", "value"), turn)) for turn in
                    [("human", "Q1\n<image>"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]]
    input_ids, labels = preprocess(conversation, tokenizer, template, has_image=True)
    assert input_ids.count(IMAGE_TOKEN_INDEX) == 1 and len(labels) == len(input_ids)
    kept = [label for label in labels if label != IGNORE_INDEX]
    assert all(label == token for label, token in zip(labels, input_ids) if label != IGNORE_INDEX)
    assert tokenizer.decode(kept, skip_special_tokens=False) == supervised


def test_straddling_token_is_an_error_not_a_silent_mask(llama_tokenizer):
    # LLaMA's vocabulary merges "><" across "<|im_end|><|im_start|>", so chatml answers have no exact boundary;
    # the official preprocess_mpt would find a mismatch and silently zero the whole sample
    conversation = [dict(zip(("from", "value"), turn)) for turn in
                    [("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]]
    with pytest.raises(DataError, match="straddles"):
        preprocess(conversation, llama_tokenizer, "chatml_direct", has_image=False)


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2"])
def test_answers_cut_at_character_offsets_equal_retokenized_prefixes(template, toy_world, llama_tokenizer):
    """preprocess tokenizes a conversation once and finds each answer by character offsets; tokenizing the prompt up
    to each answer's start and end again (what the official code does) must give the same cuts, for both the toy's
    tokenizer and LLaMA's, on multi-turn conversations with and without images."""
    conv = CONV_TEMPLATES[template]
    samples = json.loads(Path(toy_world["stage2"]).read_text())
    for tokenizer in (load_tokenizer(toy_world["tokenizer"]), llama_tokenizer):
        for sample in samples:
            messages = to_messages(sample["conversations"], "image" in sample)
            input_ids, labels = preprocess(sample["conversations"], tokenizer, template, "image" in sample)
            want = [IGNORE_INDEX] * len(input_ids)
            for i in range(1, len(messages), 2):
                before = tokenize_prompt(tokenizer, render(conv, messages[:i] + [(1, None)]))  # up to "ASSISTANT:"
                through = tokenize_prompt(tokenizer, render(conv, messages[:i + 1]))  # ... up to " answer</s>"
                assert input_ids[:len(through)] == through and through[:len(before)] == before
                want[len(before):len(through)] = through[len(before):]
            assert labels == want, sample["id"]


def test_to_messages_official_edits():
    turns = [dict(zip(("from", "value"), turn)) for turn in
             [("gpt", "hello"), ("human", "What is it?\n<image>"), ("gpt", "A cat."),
              ("human", "Compare <image> and <image>."), ("gpt", "Same.")]]
    assert to_messages(turns, has_image=3) == [  # leading gpt turn dropped; a lone marker moves to the front
        (0, "<image>\nWhat is it?"), (1, "A cat."), (0, "Compare <image> and <image>."), (1, "Same.")]
    assert to_messages(turns[1:3], has_image=False) == [(0, "What is it?\n<image>"), (1, "A cat.")]
    # one image: official preprocess_multimodal takes every marker out of a turn and puts one in front
    assert to_messages(turns[3:], has_image=True) == [(0, "<image>\nCompare  and ."), (1, "Same.")]


def test_official_preprocessing_of_odd_samples(llama_tokenizer):
    """What official preprocess does with samples the LLaVA data can hold: "<image>" in a text-only sample is text;
    an image sample without a marker trains as text (the image is encoded, then left out); "</s>" or " ASSISTANT: "
    in a message throws the official round count off, which masks the whole sample ("tokenization mismatch")."""
    ids, labels = preprocess(turns("What does <image> mean in HTML?", "A tag."), llama_tokenizer, "vicuna_v1", False)
    plain_text = llama_tokenizer.encode(render(CONV_TEMPLATES["vicuna_v1"], [(0, "What does <image> mean in HTML?"),
                                                                            (1, "A tag.")])).ids
    assert IMAGE_TOKEN_INDEX not in ids and ids == plain_text
    assert sum(label != IGNORE_INDEX for label in labels) > 0
    for message in ("It is </s> in the vocabulary.", "Write ASSISTANT: like this."):
        with pytest.raises(DataError, match="the official preprocessing cuts rounds there"):
            preprocess(turns("What is the end token?", message), llama_tokenizer, "vicuna_v1", False)


def test_empty_turns_as_official(llama_tokenizer):
    """Official get_prompt renders an empty message as its role alone. An empty answer before the last merges its
    round into the next, and the official loop still trains that round's answer; an empty question or an empty
    last answer throws the round count off (the whole sample masked), so we skip the sample."""
    system = CONV_TEMPLATES["vicuna_v1"].system
    official_prompt = system + " USER: Q1 ASSISTANT:USER: Q2 ASSISTANT: A2</s>"  # written out by hand
    ids, labels = preprocess(turns("Q1", "", "Q2", "A2"), llama_tokenizer, "vicuna_v1", False)
    assert ids == tokenize_prompt(llama_tokenizer, official_prompt)
    assert labels == official_masking(llama_tokenizer, official_prompt, " ASSISTANT: ", "</s>")
    assert llama_tokenizer.decode([x for x in labels if x != IGNORE_INDEX], skip_special_tokens=False) == "A2</s>"
    for conversation, message in [(turns("Q1", "A1", "", "A2"), "turn 2: empty question"),
                                  (turns("Q1", "A1", "Q2", ""), "turn 3: empty answer")]:
        with pytest.raises(AssertionError, match="mismatch"):  # the official loop would mask all of it
            messages = [(i % 2, turn["value"]) for i, turn in enumerate(conversation)]
            official_masking(llama_tokenizer, render(CONV_TEMPLATES["vicuna_v1"], messages), " ASSISTANT: ", "</s>")
        with pytest.raises(DataError, match=message):
            preprocess(conversation, llama_tokenizer, "vicuna_v1", False)


# -----------------------------------------------------------------------------
# truncation


def test_truncate_counts_images_and_never_cuts_one():
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8]
    labels = [IGNORE_INDEX] * 4 + [7, 8]
    assert truncate(ids, labels, max_len=9, image_tokens=4) == (ids, labels)  # 1 + 1 + 4 + 3 = 9 positions
    assert truncate(ids, labels, max_len=8, image_tokens=4) == (ids[:5], labels[:5])
    assert truncate(ids, labels, max_len=6, image_tokens=4) is None  # only the prompt would be left
    assert truncate(ids, labels, max_len=5, image_tokens=4) is None  # the image does not fit: it goes, and all after
    assert truncate(ids[:2] + ids[3:], labels[:2] + labels[3:], max_len=5, image_tokens=4) == (ids[:2] + ids[3:],
                                                                                              labels[:2] + labels[3:])


def test_dataset_truncation_drops_whole_images(tmp_path, toy_world):
    tokenizer = load_tokenizer(toy_world["tokenizer"])
    sample = dict(id="two", image=["train_00000.png", "train_00001.png"], conversations=[
        dict(zip(("from", "value"), turn)) for turn in
        [("human", "<image>\nWhat colour is it?"), ("gpt", "red"), ("human", "And this one?\n<image>"), ("gpt", "blue")]])
    path = tmp_path / "two.json"
    path.write_text(json.dumps([sample]))

    def load(max_len):
        return LazySupervisedDataset(path, toy_world["images"], tokenizer, "vicuna_v1", image_size=32,
                                     max_len=max_len, image_tokens=16)[0]

    full = load(2048)
    assert full["images"].shape == (2, 3, 32, 32)
    second = [k for k, t in enumerate(full["input_ids"].tolist()) if t == IMAGE_TOKEN_INDEX][1]
    cut = load(second - 1 + 16 + 15)  # room for the text and image before the second image, not for all of it
    assert cut["images"].shape == (1, 3, 32, 32)
    assert cut["input_ids"].tolist() == full["input_ids"][:second].tolist()
    assert tokenizer.decode([t for t in cut["labels"].tolist() if t != IGNORE_INDEX]) == "red"
    assert load(20) is None  # the first answer comes after the first image: nothing left to learn


# -----------------------------------------------------------------------------
# round trip: toy world -> dataset -> DataLoader


def check_batch(batch, records, tokenizer, image_size):
    B, T = batch["input_ids"].shape
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool and batch["labels"].shape == (B, T)
    n_images = int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum())
    if n_images:
        assert batch["images"].shape == (n_images, 3, image_size, image_size)
        assert batch["images"].dtype == torch.float32 and batch["images"].abs().max() < 3  # CLIP-normalized
    else:
        assert batch["images"] is None
    assert (batch["labels"][~batch["attention_mask"]] == IGNORE_INDEX).all()
    assert (batch["input_ids"][~batch["attention_mask"]] == 0).all()
    assert (batch["labels"][batch["input_ids"] == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
    supervised = batch["labels"] != IGNORE_INDEX
    assert (batch["labels"][supervised] == batch["input_ids"][supervised]).all()
    for row, sample_id in enumerate(batch["ids"]):
        record = records[sample_id]
        answers = [text for _, text in to_messages(record["conversations"], "image" in record)[1::2]]
        ids = batch["labels"][row][supervised[row]].tolist()
        assert ids and ids[-1] == EOS_ID
        assert tokenizer.decode(ids) == " ".join(answers)  # every answer, and its </s>
    return n_images


def test_round_trip_stage2(toy_world):
    tokenizer = load_tokenizer(toy_world["tokenizer"])
    dataset = LazySupervisedDataset(toy_world["stage2"], toy_world["images"], tokenizer, "vicuna_v1", image_size=32,
                                    image_tokens=16)
    records = {r["id"]: r for r in json.loads(toy_world["stage2"].read_text())}
    sampler = ModalityLengthGroupedSampler(dataset.modality_lengths, batch_size=8, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=collate)
    seen, images, modalities = [], 0, []
    for batch in loader:
        images += check_batch(batch, records, tokenizer, 32)
        assert batch["n_skipped"] == 0
        seen += batch["ids"]
        modalities.append({"image" in records[i] for i in batch["ids"]})
    assert sorted(seen) == sorted(records)
    n_single = (len(dataset) - len(sampler.global_batches()[-1])) // 8  # the batches before the mixed leftover
    assert n_single > 5 and all(len(m) == 1 for m in modalities[:n_single])
    assert images == sum(len(r["image"]) if isinstance(r.get("image"), list) else "image" in r
                         for r in records.values())
    assert any(isinstance(r.get("image"), list) for r in records.values())  # two-image samples were in there
    assert any("image" not in r for r in records.values())  # and text-only ones


def test_round_trip_stage1_plain(toy_world):
    tokenizer = load_tokenizer(toy_world["tokenizer"])
    dataset = LazySupervisedDataset(toy_world["stage1"], toy_world["images"], tokenizer, "plain", image_size=48,
                                    image_aspect_ratio="square")
    records = json.loads(toy_world["stage1"].read_text())
    batch = collate([dataset[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 48, 48)
    for row, record in enumerate(records[:4]):
        ids = batch["input_ids"][row][batch["attention_mask"][row]].tolist()
        assert ids[:2] == [1, IMAGE_TOKEN_INDEX]  # the instruction is dropped (official preprocess_plain)
        supervised = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
        assert supervised == ids[2:]
        assert tokenizer.decode(supervised) == record["conversations"][1]["value"] + "\n"


def test_toy_tokenizer_has_llamas_structure(toy_world):
    toy = json.loads(toy_world["tokenizer"].read_text())
    llama = json.loads((FIXTURES / "llama2-tokenizer" / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert toy[key] == llama[key], key
    assert toy["added_tokens"][:3] == llama["added_tokens"]
    for key in ("type", "unk_token", "fuse_unk", "byte_fallback"):
        assert toy["model"][key] == llama["model"][key]
    assert list(toy["model"]["vocab"].items())[:259] == list(llama["model"]["vocab"].items())[:259]  # specials, bytes
    image = toy["added_tokens"][-1]
    assert image["content"] == IMAGE_MARKER and image["special"]
    assert image["id"] == len(toy["model"]["vocab"]) == load_tokenizer(toy_world["tokenizer"]).get_vocab_size() - 1
    assert 300 <= image["id"] <= 1000


def test_default_toy_world(tmp_path, capsys):
    """ensure_toy_world: generated once, atomically, with defaults that pass through the whole data path."""
    paths = ensure_toy_world(tmp_path / "toy_world")
    assert "generating the toy world" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["toy_world"]  # the temporary folder was renamed into place
    stamp = paths["stage2"].stat().st_mtime_ns
    assert ensure_toy_world(tmp_path / "toy_world") == paths and capsys.readouterr().out == ""
    assert paths["stage2"].stat().st_mtime_ns == stamp

    tokenizer = load_tokenizer(paths["tokenizer"])
    # the shipped base models (toy_base/, which stage 1 starts from) were made for this very world's text
    assert tokenizer.get_vocab() == load_tokenizer(SHIPPED / "llm").get_vocab()
    # and stage 0's LM reads the conversations as stage 2 writes them: the format's fixed tokens, the tools' outputs
    texts = lm_texts(paths)
    assert len(texts) == 12000 and not any(IMAGE_MARKER in text for text in texts)
    assert sum('"thoughts🤔" No tool needed.\n"actions🚀" []\n"value👉"' in text for text in texts[4000:]) > 6000
    assert sum("detect model outputs: {'boxes'" in text for text in texts[4000:]) > 1000
    stage1, stage2 = json.loads(paths["stage1"].read_text()), json.loads(paths["stage2"].read_text())
    assert len(stage1) == 4000 and len(stage2) == 8000
    for record in stage1:
        preprocess(record["conversations"], tokenizer, "plain", True)
    lengths = []
    for record in stage2:
        input_ids, labels = preprocess(record["conversations"], tokenizer, "vicuna_v1", "image" in record)
        lengths.append(len(input_ids))
    assert max(lengths) < 300  # short sequences (+ 16 image tokens): the toy trains fast
    assert {len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in stage2} == {0, 1, 2}
    assert sum(SHORT_ANSWER in r["conversations"][0]["value"] for r in stage2) > 500
    # captions name the objects in random order, not by place, which would give places away by rank
    places = [re.findall("the (left|right|top|bottom)", r["conversations"][1]["value"]) for r in stage1]
    by_place = [p == sorted(p, key=list(POSITIONS).index) for p in places if len(p) > 1]
    assert 0.25 < sum(by_place) / len(by_place) < 0.4  # by chance: 1/2 of 2-object scenes, 1/6 of 3-object ones
    # question samples draw a scene in proportion to its objects (1/6 have one object; 1/3 if drawn evenly), and
    # ask count, the whole image's question, and size half as often as each look-up (about 0.5 times as often as
    # position, once a scene's repeats are dropped)
    objects_in = {r["image"]: len(p) for r, p in zip(stage1, places)}
    tool_use = [r for r in stage2 if r["conversations"][1]["actions"]]
    described = [r for r in stage2 if r["conversations"][0]["value"].replace("<image>", "").strip() in DESCRIBE]
    assert 0.21 < len(tool_use) / len(stage2) < 0.27 and 0.10 < len(described) / len(stage2) < 0.14
    assert {r["conversations"][1]["actions"][0]["API_name"] for r in tool_use} == {"detect", "measure"}
    assert all(turn["actions"] == [] and turn["thoughts"] for r in stage2 if r not in tool_use
               for turn in r["conversations"][1::2])  # LLaVA-Plus's conversion of plain answers
    for r in described[:100]:  # every phrasing: detect with no caption, then the whole description, in its order
        assert r in tool_use and r["conversations"][1]["actions"][0]["API_params"] == {"caption": ""}
        shown = [(s["colour"], s["shape"]) for s in find_shapes(Image.open(paths["images"] / r["image"]))]
        text = r["conversations"][3]["value"]
        named = [(colour, shape) for _, colour, shape, _ in described_objects(text)]
        assert sorted(named) == sorted(shown) and text.count(" is on the ") + text.count(" is at the ") == len(shown)
        result = r["conversations"][2]["value"].split(": ", 1)[1].split("\n")[0]  # the tool turn's dict
        listed = [p.split() for p in ast.literal_eval(result)["phrases"]]
        assert [list(pair) for pair in re.findall(r"A \w+ (\w+) (\w+) is", text)][:len(listed)] == listed
    qa = [r for r in stage2 if isinstance(r.get("image"), str) and r not in tool_use]
    assert 0.12 < sum(objects_in[r["image"]] == 1 for r in qa) / len(qa) < 0.22
    asked = [t["value"] for r in qa for t in r["conversations"][::2]]
    where = sum("Where is" in q for q in asked)
    assert 0.4 < sum("How many" in q for q in asked) / where < 0.65  # count: the whole image's, half as often
    assert 0.4 < sum("large or small?" in q for q in asked) / where < 0.65  # size too

    questions = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert len(questions) == 300 and len({q["question_id"] for q in questions}) == 300
    answers = {"colour": {"red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray"},
               "shape": {"circle", "square", "triangle", "cross"}, "count": {"1", "2", "3"},
               "position": {"left", "right", "top", "bottom"}, "yes_no": {"yes", "no"}}
    for q in questions:
        if q["category"] == "grounding":  # a box, normalized, inside the image
            assert q["text"].startswith("Give the bounding box of the ") and 0 <= q["answer"][0] < q["answer"][2] <= 1
        elif q["category"] == "describe":  # a description naming each of the scene's objects once
            assert q["text"] in DESCRIBE and len(described_objects(q["answer"])) == q["objects"]
        else:
            assert q["answer"] in answers[q["category"]] and q["text"].endswith(SHORT_ANSWER)
        assert (paths["images"] / q["image"]).exists()
        assert q["objects"] in (1, 2, 3) and (q["category"] != "count" or q["answer"] == str(q["objects"]))
    assert {q["objects"] for q in questions} == {1, 2, 3}
    sizes_by_image = defaultdict(set)  # one scene per image, so one size per image
    for q in questions:
        sizes_by_image[q["image"]].add(q["objects"])
    assert len(sizes_by_image) == 100 and all(len(sizes) == 1 for sizes in sizes_by_image.values())
    assert {q["category"] for q in questions} == set(answers) | {"grounding", "describe"} == set(EVAL_CATEGORIES)
    assert abs(sum(q["answer"] == "yes" for q in questions) - sum(q["answer"] == "no" for q in questions)) < 20
    trained_on = {f for r in stage1 + stage2 for f in ([r["image"]] if isinstance(r.get("image"), str)
                                                       else r.get("image", []))}
    assert trained_on.isdisjoint(q["image"] for q in questions)
    sizes = {Image.open(paths["images"] / f).size for f in sorted(trained_on)[:200]}
    assert (64, 64) in sizes and len(sizes) > 1  # some non-square images


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_world_is_deterministic(tmp_path):
    sizes = dict(n_train_images=20, n_stage1=20, n_stage2=40, n_eval_images=5)
    a = tree_hashes(make_toy_world(tmp_path / "a", seed=0, **sizes)["root"])
    b = tree_hashes(make_toy_world(tmp_path / "b", seed=0, **sizes)["root"])
    c = tree_hashes(make_toy_world(tmp_path / "c", seed=1, **sizes)["root"])
    assert a == b and len(a) == 20 + 5 + 5
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in ("stage1.json", "stage2.json", "eval.jsonl", "images/train_00000.png"))


def test_toy_eval_set_draws_unseen_scenes_beyond_the_worlds_own(tmp_path):
    """make_toy_eval: more held-out scenes for the same world, the first of them the world's eval scenes, none a
    training scene; questions as the world's own; the same arguments give the same bytes."""
    sizes = dict(n_train_images=20, n_stage1=20, n_stage2=40, n_eval_images=5)
    world = make_toy_world(tmp_path / "world", seed=3, **sizes)
    extra = make_toy_eval(tmp_path / "extra", 40, seed=3, n_train_images=20)
    again = make_toy_eval(tmp_path / "again", 40, seed=3, n_train_images=20)
    assert tree_hashes(extra["root"]) == tree_hashes(again["root"])
    images = sorted(p.name for p in extra["images"].iterdir())
    assert images == [f"eval_{i:05d}.png" for i in range(40)]
    for i in range(5):
        name = f"eval_{i:05d}.png"
        assert (extra["images"] / name).read_bytes() == (world["images"] / name).read_bytes()
    training = {p.read_bytes() for p in world["images"].glob("train_*.png")}
    assert not training & {(extra["images"] / name).read_bytes() for name in images}
    questions = [json.loads(line) for line in extra["eval"].read_text().splitlines()]
    assert [q["question_id"] for q in questions] == list(range(120))
    assert [q["image"] for q in questions] == [name for name in images for _ in range(3)]
    own = [json.loads(line) for line in world["eval"].read_text().splitlines()]
    assert {tuple(q) for q in questions} == {tuple(q) for q in own}  # the same fields
    assert [q["category"] for q in questions[:15]] == [q["category"] for q in own]
    assert {q["category"] for q in questions} == set(EVAL_CATEGORIES)
    for q in questions:
        assert q["objects"] in (1, 2, 3) and (q["text"].endswith(SHORT_ANSWER) or q["category"] in ("grounding",
                                                                                                      "describe"))


# -----------------------------------------------------------------------------
# bad input


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the CRC fixed, so it parses)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def turns(*values):
    return [dict(zip(("from", "value"), turn)) for turn in zip(["human", "gpt"] * len(values), values)]


BAD = {  # id -> (sample, what the error must say)
    "missing": (dict(image="nope.png", conversations=turns("<image>\nQ?", "red")), "nope.png: image file not found"),
    "corrupt": (dict(image="corrupt.png", conversations=turns("<image>\nQ?", "red")), "corrupt.png: cannot read"),
    "bomb": (dict(image="bomb.png", conversations=turns("<image>\nQ?", "red")), "bomb.png: decompression bomb"),
    "order": (dict(conversations=turns("Q?", "red")[:1] * 2), "must alternate"),
    "two_images": (dict(image="ok.png", conversations=turns("<image>\nQ?", "red", "<image>\nAnd?", "blue")),
                   "2 <image> markers for 1"),
    "marker_in_answer": (dict(image="ok.png", conversations=turns("<image>\nQ?", "<image> red")), "in an answer"),
    "end_in_answer": (dict(conversations=turns("Q?", "red</s> and blue")), "'</s>' in a message"),
    "empty": (dict(image="ok.png", conversations=turns("<image>\nQ?", "  ")), "empty answer"),
    "roles": (dict(conversations=[{"from": "user", "value": "Q?"}, {"from": "assistant", "value": "red"}]),
              'turns come "from" human or gpt, as in LLaVA\'s data, not assistant, user'),
}


def test_an_image_sample_without_a_marker_trains_as_text(tmp_path, toy_world):
    """As official: its image is encoded and then left out (image_features[0:0]), so the sample is text alone."""
    shutil.copy(toy_world["images"] / "train_00000.png", tmp_path / "ok.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([dict(id="no_marker", image="ok.png", conversations=turns("What is it?", "red"))]))
    sample = LazySupervisedDataset(path, tmp_path, load_tokenizer(toy_world["tokenizer"]), "vicuna_v1",
                                   image_size=32)[0]
    assert IMAGE_TOKEN_INDEX not in sample["input_ids"].tolist() and sample["images"].shape == (0, 3, 32, 32)
    assert (sample["labels"] != IGNORE_INDEX).any()


@pytest.fixture
def bad_jsonl(tmp_path, toy_world):
    """A JSONL file of good samples, each bad case, and a line of invalid JSON; and its image folder."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(toy_world["images"] / "train_00000.png", images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (images / "bomb.png").write_bytes(bomb_png(50_000, 50_000))
    good = [dict(id=f"good{i}", image="ok.png", conversations=turns("<image>\nWhat is it?", f"thing {i}"))
            for i in range(5)] + [dict(id="good_text", conversations=turns("Hi?", "hello"))]
    lines = [json.dumps(s) for s in good[:3]] + [json.dumps(dict(id=k, **s)) for k, (s, _) in BAD.items()]
    lines += ["{'id': 'broken', oops", ""] + [json.dumps(s) for s in good[3:]]  # an invalid line, then a blank one
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, images, [s["id"] for s in good]


def test_each_bad_sample_names_its_id_and_line(bad_jsonl, toy_world):
    path, images, _ = bad_jsonl
    dataset = LazySupervisedDataset(path, images, load_tokenizer(toy_world["tokenizer"]), "vicuna_v1", image_size=32)
    assert len(dataset) == 3 + len(BAD) + 1 + 3
    for index, (sample_id, (_, message)) in enumerate(BAD.items(), start=3):
        with pytest.raises(DataError) as error:
            dataset[index]
        assert f"sample {sample_id} ({path}:{index + 1})" in str(error.value)
        assert message in str(error.value)
    with pytest.raises(DataError, match=rf"bad.jsonl:{3 + len(BAD) + 1}\): invalid JSON"):
        dataset[3 + len(BAD)]
    assert dataset[3 + len(BAD) + 1]["id"] == "good3"  # the blank line is not a sample


def test_skip_bad_counts_across_workers(bad_jsonl, toy_world, capfd):
    path, images, good_ids = bad_jsonl
    dataset = LazySupervisedDataset(path, images, load_tokenizer(toy_world["tokenizer"]), "vicuna_v1", image_size=32,
                                    skip_bad=True)
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert sum(b["n_skipped"] for b in batches) == len(BAD) + 1
    assert [i for b in batches for i in b["ids"]] == good_ids  # nothing else lost, order kept
    assert all(b["input_ids"].shape[0] == len(b["ids"]) for b in batches)
    assert capfd.readouterr().err.count("skipping sample") == len(BAD) + 1


def test_invalid_json_file_names_the_line(tmp_path, llama_tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b", oops}\n]')
    with pytest.raises(DataError, match=r"data.json: invalid JSON at line 3 column"):
        LazySupervisedDataset(path, tmp_path, llama_tokenizer, "vicuna_v1")
    path.write_text('{"id": "a", "conversations": []}\n{"id": "b", "conversations": []}\n')  # JSONL named .json
    with pytest.raises(DataError, match=r"line 2 column 1: Extra data \(one sample per line is JSONL: name the file "
                                        r"\.jsonl\)"):
        LazySupervisedDataset(path, tmp_path, llama_tokenizer, "vicuna_v1")


def test_open_image_limits(tmp_path, toy_world):
    image = open_image(toy_world["images"] / "train_00000.png")
    assert image.size in {(64, 64), (64, 48), (48, 64)} and image.mode == "RGB"
    with pytest.raises(DataError, match="over the limit of 1000 pixels"):  # our cap, checked before decoding
        open_image(toy_world["images"] / "train_00000.png", max_pixels=1000)
    (tmp_path / "warn.png").write_bytes(bomb_png(10_000, 10_000))  # Pillow warns here; we raise
    with pytest.raises(DataError, match="decompression bomb"):
        open_image(tmp_path / "warn.png", max_pixels=10**9)
    (tmp_path / "cut.png").write_bytes((toy_world["images"] / "train_00000.png").read_bytes()[:-40])  # truncated
    with pytest.raises(DataError, match="cut.png: cannot read"):
        open_image(tmp_path / "cut.png")


# -----------------------------------------------------------------------------
# sampler


def random_lengths(n, image_share, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 300) * (1 if rng.random() < image_share else -1) for _ in range(n)]


def is_image(lengths, indices):
    return {lengths[i] > 0 for i in indices}


def test_sampler_batches_hold_one_modality():
    lengths = random_lengths(203, 0.7)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=8, micro_batch=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and len(sampler) == 203  # each index once per epoch
    batches = sampler.global_batches()
    assert all(len(batch) == 8 for batch in batches[:-1]) and len(batches[-1]) < 16
    assert all(len(is_image(lengths, batch)) == 1 for batch in batches[:-1])
    assert len(is_image(lengths, batches[-1])) == 2  # the documented exception: the merged leftovers, last
    n_full = 8 * (len(batches) - 1)
    assert order[:n_full] == [i for batch in batches[:-1] for i in batch]
    for batch in batches[:-1]:  # one rank, 2 micro-steps: the longest 4 samples first, then the shortest 4
        assert [abs(lengths[i]) for i in batch] == sorted((abs(lengths[i]) for i in batch), reverse=True)
    # 2 ranks × 2 micro-steps: the 4 longest first, dealt to the ranks as official split_to_even_chunks deals
    # (10 -> a, 9 -> b, 8 -> b, the lighter, which is then full, 7 -> a), then the 4 shortest alike
    assert ModalityLengthGroupedSampler([10, 9, 8, 7, 4, 3, 2, 1], batch_size=8, micro_batch=2,
                                        num_replicas=2).global_batches() == [[0, 3, 1, 2, 4, 7, 5, 6]]


def test_sampler_epochs_and_seeds():
    lengths = random_lengths(100, 0.5)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=8, seed=0)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=8, seed=0, epoch=1)) == list(sampler)
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=8, seed=1)) != first
    one_modality = ModalityLengthGroupedSampler([abs(n) for n in lengths], batch_size=8)
    assert sorted(one_modality) == list(range(100)) and len(one_modality) == 100
    with pytest.raises(ValueError, match="length of 0"):
        ModalityLengthGroupedSampler([1, 0, -2], batch_size=2)


@pytest.mark.parametrize("num_replicas, micro_batch, batch_size", [(2, 4, 8), (3, 2, 12)])  # 12: 2 accumulation steps
def test_sampler_shards_across_ranks(num_replicas, micro_batch, batch_size):
    lengths = random_lengths(211, 0.6, seed=1)
    samplers = [ModalityLengthGroupedSampler(lengths, batch_size, micro_batch, num_replicas, rank, seed=5)
                for rank in range(num_replicas)]
    shares = [list(s) for s in samplers]
    assert all(len(share) == len(samplers[0]) for share in shares)  # equal steps on every rank, or DDP hangs
    everything = [i for share in shares for i in share]
    assert set(everything) == set(range(211)) and len(everything) - 211 < num_replicas  # padding only
    n_full = batch_size // num_replicas * (len(samplers[0].global_batches()) - 1)
    for step in range(0, n_full, micro_batch):  # the micro-batches all ranks run together: one modality
        together = [i for share in shares for i in share[step:step + micro_batch]]
        assert len(is_image(lengths, together)) == 1
    for step in range(0, n_full, batch_size // num_replicas):  # and each global batch is one sampler batch
        together = {i for share in shares for i in share[step:step + batch_size // num_replicas]}
        assert together in [set(b) for b in samplers[0].global_batches()]


# -----------------------------------------------------------------------------
# LLaVA-Plus's unified format (llava/mm_utils.py: reorganize_source_for_tool_use) and its training strings

TOOL_OUTPUT = "{'boxes': [[0.35, 0.37, 0.66, 0.97], [0.0, 0.57, 0.69, 1.0]], 'logits': [0.51, 0.37], 'phrases': ['girl', 'cart']}"
PLUS_QUESTION = "Can you detect the girl and the cart in the image?"
PLUS_SAMPLE = [  # the LLaVA-Plus fact sheet's example conversation, with THOUGHT1 and ANSWER for the long texts
    {"from": "human", "value": "<image>\n" + PLUS_QUESTION},
    {"from": "gpt", "thoughts": "THOUGHT1",
     "actions": [{"API_name": "grounding_dino", "API_params": {"caption": "girl . cart"}}],
     "value": "I will use grounding_dino to help to answer the question. Please wait for a moment."},
    {"from": "human", "value": f"grounding_dino model outputs: {TOOL_OUTPUT}\n\nPlease summarize the model outputs and "
                               f"answer my first question: {PLUS_QUESTION}"},
    {"from": "gpt", "value": "ANSWER", "actions": [],  # key order as found in data: the marker order is fixed
     "thoughts": "Thanks to the output of grounding_dino. I can answer the question better."}]
PLUS_ANSWERS = ['"thoughts🤔" THOUGHT1\n"actions🚀" [{"API_name": "grounding_dino", "API_params": {"caption": '
                '"girl . cart"}}]\n"value👉" I will use grounding_dino to help to answer the question. Please wait for a '
                'moment.\n', '"thoughts🤔" Thanks to the output of grounding_dino. I can answer the question better.\n'
                '"actions🚀" []\n"value👉" ANSWER\n']
PLUS_TOOL_TURN = (f"grounding_dino model outputs: {TOOL_OUTPUT}\n\nPlease summarize the model outputs and answer my first "
                  f"question: {PLUS_QUESTION}")


def supervised_runs(tokenizer, input_ids, labels):
    """The decoded runs of consecutive supervised tokens."""
    runs, run = [], []
    for token, label in zip(input_ids + [None], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_llava_plus_sample_renders_to_the_official_strings_and_trains_only_the_assistant_turns(llama_tokenizer):
    """The fact sheet's v1 and v0 training strings, character for character, with the real LLaMA tokenizer; the label
    spans are exactly the two assistant turns (v1: each with its "</s>"; v0: each through the "###" after it, the
    string serving stops at), the tool-result turn is a user turn and masked."""
    assert [text for _, text in to_messages(PLUS_SAMPLE, True)] == ["<image>\n" + PLUS_QUESTION, PLUS_ANSWERS[0],
                                                                     PLUS_TOOL_TURN, PLUS_ANSWERS[1]]
    v1 = (f"{SYSTEM_USER} USER: <image>\n{PLUS_QUESTION} ASSISTANT: {PLUS_ANSWERS[0]}</s>USER: {PLUS_TOOL_TURN} "
          f"ASSISTANT: {PLUS_ANSWERS[1]}</s>")
    v0 = (f"{SYSTEM_HUMAN}\n\n### Human: <image>\n{PLUS_QUESTION}\n### Assistant: {PLUS_ANSWERS[0]}\n### Human: "
          f"{PLUS_TOOL_TURN}\n### Assistant: {PLUS_ANSWERS[1]}\n### ")
    for template, prompt, ends in (("vicuna_v1", v1, "</s>"), ("llava_v0", v0, "\n###")):
        input_ids, labels = preprocess(PLUS_SAMPLE, llama_tokenizer, template, has_image=1)
        assert input_ids == tokenize_prompt(llama_tokenizer, prompt), template
        runs = supervised_runs(llama_tokenizer, input_ids, labels)
        assert [run.strip() for run in runs] == [(answer + ends).strip() for answer in PLUS_ANSWERS], template


def test_plain_llava_turns_stay_plain_and_value_only_markers_are_not_added(llama_tokenizer):
    plain = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    assert to_messages(plain, 1)[1][1] == "A cat."
    # a LLaVA-158K turn as LLaVA-Plus converts it: an empty action list and a thought
    converted = [plain[0], {"from": "gpt", "thoughts": "No tool is needed.", "actions": [], "value": "A cat."}]
    assert to_messages(converted, 1)[1][1] == '"thoughts🤔" No tool is needed.\n"actions🚀" []\n"value👉" A cat.\n'
    assert to_messages([plain[0], {"from": "gpt", "actions": [], "value": "A cat."}], 1)[1][1] == \
        '"actions🚀" []\n"value👉" A cat.\n'  # a missing key drops its line


def test_data_and_image_folders_may_each_be_several(tmp_path, toy_world):
    """--data a.json,b.json and --image-folder d1,d2 as the official LLaVA-Plus scripts pass them: the records of both
    files, in order, each image read from the first folder that holds it, errors naming the right file and line."""
    images = Path(toy_world["images"])
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    shutil.copy(images / "train_00000.png", first / "a.png")
    shutil.copy(images / "train_00001.png", first / "both.png")
    shutil.copy(images / "train_00002.png", second / "both.png")
    shutil.copy(images / "train_00003.png", second / "b.png")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]
    (tmp_path / "a.json").write_text(json.dumps([dict(id=name, image=name, conversations=turns)
                                                 for name in ("a.png", "both.png")]))
    (tmp_path / "b.jsonl").write_text(json.dumps(dict(id="b", image="b.png", conversations=turns)) + "\n" +
                                      json.dumps(dict(id="gone", image="nowhere.png", conversations=turns)) + "\n")
    dataset = LazySupervisedDataset(f"{tmp_path / 'a.json'},{tmp_path / 'b.jsonl'}", f"{first},{second}",
                                    load_tokenizer(toy_world["tokenizer"]), "vicuna_v1", image_size=32)
    assert len(dataset) == 4 and [dataset[i]["id"] for i in range(3)] == ["a.png", "both.png", "b"]
    assert dataset.image_path("both.png") == first / "both.png" and dataset.image_path("b.png") == second / "b.png"
    with pytest.raises(DataError, match=r"sample gone \(.*b\.jsonl:2\): .*first.nowhere\.png: image file not found"):
        dataset[3]
    assert dataset.missing_images() == (4, ["nowhere.png"])
