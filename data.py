"""LLaVA-1.5 training data: chat templates, tokenization with label masking, images, batches, and the toy world.

Reproduces the official data path (haotian-liu/LLaVA, spec §1-3, 8, 9):
- llava/conversation.py: the conversation templates and their exact prompt strings;
- llava/mm_utils.py `tokenizer_image_token`: one IMAGE_TOKEN_INDEX per "<image>" in the token ids;
- llava/train/train.py `preprocess_multimodal`, `preprocess_plain`, `preprocess_v1` / `_llama_2` / `_mpt`,
  `LazySupervisedDataset` and `DataCollatorForSupervisedDataset`;
- llava/train/llava_trainer.py `group_by_modality_length`: batches that hold only image or only text-only samples.

Where the official code fails silently we raise `DataError` instead: a label/token mismatch cannot happen here by
construction (and is checked), a bad sample names its id and file, and truncation never cuts inside an image.

The last section generates the toy world: a small synthetic dataset of coloured shapes, in the official file
formats and with a LLaMA-style tokenizer, so the whole pipeline runs on a laptop in minutes.

Shapes: T tokens of a sample (each image is one IMAGE_TOKEN_INDEX), B samples in a batch, S image side in pixels.
"""

import bisect
import gc
import itertools
import json
import os
import random
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from clip import preprocess_image
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_MARKER = "<image>"  # official DEFAULT_IMAGE_TOKEN: where an image goes in the text
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # the suffix of LLaVA-1.5's short-answer data


class DataError(Exception):
    """A bad sample or data file. The message names the sample id and the file (and line) it came from."""


# -----------------------------------------------------------------------------
# conversation templates (llava/conversation.py)


@dataclass(frozen=True)
class Conversation:
    system: str
    roles: tuple[str, str]  # (user, assistant) as written in the prompt
    style: str  # how turns are joined, official SeparatorStyle: "two", "llama_2", "mpt", "plain", "single"
    sep: str
    sep2: str | None = None


_VICUNA = Conversation(
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ("USER", "ASSISTANT"), "two", " ", "</s>")
_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

CONV_TEMPLATES = {
    # stage 1: just the image and its caption. Official sep2 is None, which crashes on an answer; "\n" ends it as
    # preprocess_plain ends the caption.
    "plain": Conversation("", ("", ""), "plain", "\n", "\n"),
    "vicuna_v1": _VICUNA,  # stage 2 trains with this one ("--version v1"), and the v1.5 eval scripts use it
    "v1": _VICUNA,
    "llava_v1": Conversation(_HUMAN_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),  # the CLI's pick for v1 names
    "llava_llama_2": Conversation(
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.",
        ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>"),
    "mistral_instruct": Conversation("", ("USER", "ASSISTANT"), "llama_2", "", "</s>"),
    "chatml_direct": Conversation("<|im_start|>system\nAnswer the questions.", _CHATML_ROLES, "mpt", "<|im_end|>"),
    "mpt": Conversation("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                        "The assistant gives helpful and honest answers.", _CHATML_ROLES, "mpt", "<|im_end|>"),
    "llava_v0": Conversation(_HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###"),
}


def render(conv: Conversation, messages: list) -> str:
    """The prompt string of messages [(role, text), ...], alternating user and assistant from the user. A role is
    0/1, "human"/"gpt" or the template's own name; text None is the turn the model is to write (a generation prompt,
    e.g. "... USER: <image>\\nWhat is this? ASSISTANT:"). An empty text renders the same, as in the official
    get_prompt ("if message: ... else: role:"), also mid-conversation."""
    for i, (role, _) in enumerate(messages):
        index = role if isinstance(role, int) else {"human": 0, "gpt": 1, conv.roles[0]: 0, conv.roles[1]: 1}.get(role)
        if index != i % 2:
            raise ValueError(f"message {i} is from {role!r}: messages alternate user, assistant, from the user")
    texts = [text for _, text in messages]
    if conv.style == "llama_2":
        prompt = ""
        for i, text in enumerate(texts):
            if not text:
                continue
            if i == 0 and conv.system:
                text = f"<<SYS>>\n{conv.system}\n<</SYS>>\n\n{text}"
            prompt += f"{conv.sep}[INST] {text} [/INST]" if i % 2 == 0 else f" {text} {conv.sep2}"
        return prompt[len(conv.sep):]  # no sep before the first turn (official: ret.lstrip(sep))
    if conv.style == "plain":
        return conv.system + "".join(text + (conv.sep, conv.sep2)[i % 2] for i, text in enumerate(texts) if text)
    prompt = conv.system + conv.sep
    for i, text in enumerate(texts):
        role = conv.roles[i % 2]
        if conv.style == "two":
            prompt += f"{role}: {text}{(conv.sep, conv.sep2)[i % 2]}" if text else f"{role}:"
        elif conv.style == "single":
            prompt += f"{role}: {text}{conv.sep}" if text else f"{role}:"
        else:  # mpt: the role strings end with "\n"
            prompt += f"{role}{text}{conv.sep}" if text else role
    return prompt


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


# -----------------------------------------------------------------------------
# tokenizer: LLaMA's SentencePiece BPE, run by the `tokenizers` library

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # LLaMA's ids; official training pads with <unk> (pad_token = unk_token)


def load_tokenizer(path) -> Tokenizer:
    """A LLaMA tokenizer from a directory (or file): its tokenizer.json, else the SentencePiece tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path / "tokenizer.model"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model at {path.parent}; copy them from the model's "
                                "checkpoint directory (e.g. lmsys/vicuna-7b-v1.5 on the Hugging Face hub)")
    tokenizer = tokenizer_from_sentencepiece(path) if path.suffix == ".model" else Tokenizer.from_file(str(path))
    if tokenizer.encode(EOS + "a").tokens[-1] == "a":
        # saved without the legacy behaviour (transformers' legacy=False: a Metaspace pre-tokenizer that puts "▁" only
        # at the start of the text), it reads "</s>USER" as "USER", where LLaVA-1.5 was trained on "▁US ER" (spec §2)
        _legacy_text_handling(tokenizer)
    for piece, want in ((UNK, PAD_ID), (BOS, BOS_ID), (EOS, EOS_ID)):
        if tokenizer.token_to_id(piece) != want:
            raise ValueError(f"{path}: {piece} has id {tokenizer.token_to_id(piece)}; a LLaMA tokenizer has {want}")
    if tokenizer.encode("a").ids[0] != BOS_ID:
        raise ValueError(f"{path}: the tokenizer must add {BOS} itself, as LLaMA's does")
    return tokenizer


def save_llava_tokenizer(llm_dir, directory, image_token_index: int):
    """The LLM's tokenizer files in a llava-hf model directory, with "<image>" added at image_token_index as
    transformers' converter adds it (spec §7): its LlavaProcessor expands that token into the image's positions.
    Our own pipeline never needs it, since it splits prompts at "<image>" before tokenizing."""
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


def _llama_tokenizer(vocab: dict, merges: list) -> Tokenizer:
    """A BPE tokenizer built as transformers' LlamaConverter builds LLaMA's tokenizer.json (legacy behaviour, which
    LLaVA-1.5 was trained with): "▁" is prepended and every space becomes "▁" (SentencePiece's dummy prefix),
    characters outside the vocabulary fall back to their UTF-8 bytes <0x..>, and <s> is put in front."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    _legacy_text_handling(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)])
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True) for piece in (UNK, BOS, EOS)])
    return tokenizer


def _legacy_text_handling(tokenizer: Tokenizer):
    """LLaMA's legacy normalizer and decoder: each stretch of text between special tokens gets its own "▁" in front
    and its spaces become "▁"; decoding undoes it."""
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])


def _protobuf_fields(buf: bytes):
    """(field number, value) of each field of a serialized protobuf message; value is an int or bytes."""

    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:  # length-delimited: strings and sub-messages
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):  # fixed 64 / 32 bits
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def tokenizer_from_sentencepiece(path) -> Tokenizer:
    """The tokenizers-library equivalent of a LLaMA SentencePiece tokenizer.model, read without sentencepiece.

    The file is a ModelProto whose field 1 lists the pieces in id order, each {1: piece, 2: score (float32),
    3: type}. BPE merges are not stored: as LlamaConverter does, every split of a piece into two pieces is a merge,
    ranked by the merged piece's score (SentencePiece applies the highest-scoring merge first)."""
    pieces, scores = [], []
    for field, value in _protobuf_fields(Path(path).read_bytes()):
        if field == 1:
            piece = dict(_protobuf_fields(value))
            pieces.append(piece[1].decode())
            scores.append(struct.unpack("<f", piece.get(2, bytes(4)))[0])
    if pieces[:3] != [UNK, BOS, EOS]:
        raise ValueError(f"{path}: expected {UNK}, {BOS}, {EOS} as pieces 0-2, found {pieces[:3]}")
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(left, right, score) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep piece order, as in the converter
    return _llama_tokenizer(vocab, [(left, right) for left, right, _ in merges])


def tokenize_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt with one IMAGE_TOKEN_INDEX per "<image>" (official tokenizer_image_token).

    Each text chunk between images is tokenized on its own, so it starts with its own "▁" dummy prefix: "<image>\\nQ"
    gives [.., -200, 29871 "▁", 13 "\\n", ..]. The chunks' own <s> are dropped; the prompt starts with one."""
    return tokenize_with_offsets(tokenizer, prompt)[0]


def tokenize_with_offsets(tokenizer: Tokenizer, prompt: str, images: bool = True) -> tuple[list, list, list]:
    """tokenize_prompt's ids, and where each token starts and ends in the prompt (character offsets; an image token
    spans its marker, <s> is empty at 0). images=False reads "<image>" as text, as official preprocess does for a
    sample without an image."""
    ids, starts, ends, offset = [BOS_ID], [0], [0], 0
    for i, chunk in enumerate(prompt.split(IMAGE_MARKER) if images else [prompt]):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            starts.append(offset)
            offset += len(IMAGE_MARKER)
            ends.append(offset)
        encoding = tokenizer.encode(chunk)
        ids += encoding.ids[1:]
        starts += [offset + start for start, _ in encoding.offsets[1:]]
        ends += [offset + end for _, end in encoding.offsets[1:]]
        offset += len(chunk)
    return ids, starts, ends


# -----------------------------------------------------------------------------
# tokenization and label masking (llava/train/train.py preprocess_*)


def to_messages(conversations: list, has_image: int) -> list[tuple[int, str]]:
    """LLaVA JSON turns [{"from": "human"|"gpt", "value": text}, ...] -> [(0|1, text), ...], checked. has_image: the
    sample's number of images (or a bool).

    As official preprocess_multimodal, in an image sample a turn's "<image>" moves to its front: "Q\\n<image>" becomes
    "<image>\\nQ", and several markers in the turn of a one-image sample become that one. (With several images, our
    extension, a turn's markers stay as written unless there is one.) In a sample without an image, "<image>" is
    text."""
    others = {str(turn.get("from")) for turn in conversations if isinstance(turn, dict)} - {"human", "gpt"}
    if others:  # e.g. OpenAI's "user" and "assistant" (official preprocess fails on them with a KeyError)
        raise DataError(f"turns come \"from\" human or gpt, as in LLaVA's data, not {', '.join(sorted(others))}")
    if conversations and isinstance(conversations[0], dict) and conversations[0].get("from") != "human":
        conversations = conversations[1:]  # official: a conversation that opens with the assistant loses that turn
    if not conversations or len(conversations) % 2:
        raise DataError(f"{len(conversations)} turns: a conversation is pairs of human and gpt turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") != ("human", "gpt")[i % 2]:
            raise DataError(f"turn {i} is {turn!r:.80}: turns must alternate human, gpt, human, gpt, ...")
        text = turn.get("value")
        if not isinstance(text, str):
            raise DataError(f"turn {i} has no text")
        # official get_prompt renders an empty message as its role alone ("USER:"); an empty question then glues
        # "USER:ASSISTANT:", which the official round count misses, so it masks the whole sample (we skip it)
        if i % 2 == 0 and not text:
            raise DataError(f"turn {i}: empty question")
        # an empty answer before the last merges its round into the next, whose answer still trains, as official
        # ("USER: Q1 ASSISTANT:USER: Q2 ASSISTANT: A2</s>"); an empty last answer leaves nothing to train, and a
        # blank one ("  ") would teach blank answers, so those skip the sample
        if i % 2 and not text.strip() and (text or i == len(conversations) - 1):
            raise DataError(f"turn {i}: empty answer")
        if i % 2 and has_image and IMAGE_MARKER in text:
            raise DataError(f"turn {i}: {IMAGE_MARKER} in an answer")
        if has_image and IMAGE_MARKER in text and (has_image == 1 or text.count(IMAGE_MARKER) == 1):
            text = (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()
        messages.append((i % 2, text))
    return messages


def preprocess(conversations: list, tokenizer: Tokenizer, template: str, has_image: int) -> tuple[list, list]:
    """(input_ids, labels) of one training conversation, as the official preprocess of that template.

    "plain" (stage 1, preprocess_plain): the instruction is dropped; the sample is "<image>" + caption + "\\n" and
    only the caption and "\\n" are supervised. Every other template (preprocess_v1 / _llama_2 / _mpt): the whole
    conversation is rendered and tokenized once; each answer and the separator that ends it ("</s>" for vicuna_v1)
    are supervised; the system prompt, the user turns and the images are not (labels IGNORE_INDEX)."""
    conv = CONV_TEMPLATES[template]
    messages = to_messages(conversations, has_image)
    if conv.style == "plain":
        if len(messages) != 2 or IMAGE_MARKER not in messages[0][1]:
            raise DataError("a plain (stage-1) sample is one human turn with <image> and one caption")
        input_ids = tokenize_prompt(tokenizer, IMAGE_MARKER + messages[1][1] + conv.sep)
        n_prompt = len(tokenize_prompt(tokenizer, IMAGE_MARKER))  # <s> and the image
        return input_ids, [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    if conv.style == "single":
        raise ValueError(f"{template!r} is for inference only here; train with 'plain' or a v1-style template")
    if conv.style == "two":
        # official preprocess_v1 finds the rounds by cutting the prompt at these strings, so a message holding one
        # throws its count off ("tokenization mismatch") and the whole sample is masked; an answer holding "</s>"
        # would otherwise teach the model to stop there
        for _, text in messages:
            for cut in (conv.sep2, conv.sep + conv.roles[1] + ": "):
                if cut in text:
                    raise DataError(f"{cut!r} in a message: the official preprocessing cuts rounds there and masks "
                                    "the whole sample")
    prompt = render(conv, messages)
    input_ids, starts, ends = tokenize_with_offsets(tokenizer, prompt, images=bool(has_image))
    labels = [IGNORE_INDEX] * len(input_ids)
    for i in range(1, len(messages), 2):
        # an answer's tokens are those its text adds: after the prompt up to "ASSISTANT:", up to " answer</s>"
        before, through = render(conv, messages[:i] + [(1, None)]), render(conv, messages[:i + 1])
        assert prompt.startswith(before) and prompt.startswith(through), \
            f"template {template!r}: each turn's prompt must extend the one before it"
        start, end = (_tokens_before(len(text), starts, ends, prompt) for text in (before, through))
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _tokens_before(boundary: int, starts: list, ends: list, prompt: str) -> int:
    """How many tokens lie before character `boundary` of the prompt, checking that none straddles it. This is the
    check the official code skips (it finds a "tokenization mismatch" only afterwards, and then silently masks the
    whole sample). Cutting the one tokenization of the whole prompt gives the same tokens as tokenizing the prompt up
    to the boundary (BPE merges no pieces across a boundary that no token crosses; tests check it) at a fraction of
    the cost: tokenizing every answer's prefix again costs the square of the number of turns."""
    n = bisect.bisect_right(ends, boundary)
    if n < len(starts) and starts[n] < boundary:
        raise DataError(f"a token straddles the boundary after {prompt[max(0, boundary - 40):boundary]!r}, so the "
                        "answer cannot be masked exactly; does the tokenizer treat the template's separators as "
                        "special tokens?")
    return n


def truncate(input_ids: list, labels: list, max_len: int, image_tokens: int):
    """Cut a sample to at most max_len positions, counting each image as the image_tokens positions it fills in the
    LLM. An image is never cut: if it does not fit, it and everything after it go. Returns (input_ids, labels), or
    None when no supervised label is left (the sample is then dropped). Official code truncates text ids at 2048 and
    then the spliced sequence, which can cut an image in half."""
    length = 0
    for n, token in enumerate(input_ids):
        length += image_tokens if token == IMAGE_TOKEN_INDEX else 1
        if length > max_len:
            input_ids, labels = input_ids[:n], labels[:n]
            break
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels


# -----------------------------------------------------------------------------
# images

MAX_PIXELS = 8192 * 8192  # far beyond any LLaVA training image, far below what would exhaust memory


def open_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and decode an image file (or a file object, named by its .name). A missing or corrupt file, or a
    "decompression bomb" (a small file that decodes to a huge image), raises DataError naming the file. The size is
    checked from the header, before decoding; Pillow's own bomb check (from 89M pixels) is turned into the same
    error."""
    name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as file:
                width, height = file.size
                if width * height > max_pixels:
                    raise DataError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} pixels "
                                    "(a decompression bomb?)")
                file.load()
                return file.copy()  # a copy keeps the pixels after the file is closed
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # whatever Pillow raises on a bad file
        raise DataError(f"{name}: cannot read the image ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# dataset, batches and the modality-grouped sampler


def _read_records(path: Path) -> tuple[list, list | None]:
    """The samples of a LLaVA JSON file (one list) or JSONL file (one sample per line; with their line numbers)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            jsonl = " (one sample per line is JSONL: name the file .jsonl)" if e.msg == "Extra data" else ""
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{jsonl}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a LLaVA JSON file holds a list of samples")
        return records, None
    records, line_numbers = [], []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # kept, to fail (or be skipped) in __getitem__ like any bad sample
                records.append(DataError(f"invalid JSON ({e.msg} at column {e.colno})"))
            line_numbers.append(n)
    return records, line_numbers


def _image_files(record: dict):
    """A sample's "image" as a list: one path, a list of paths, or none (anything else is left for the caller)."""
    files = record.get("image") or []
    return [files] if isinstance(files, str) else files


class LazySupervisedDataset(torch.utils.data.Dataset):
    """LLaVA training samples, tokenized and with their images loaded on access (official LazySupervisedDataset).

    data_path: a LLaVA JSON list or JSONL of {"id", "image" (optional; a path or a list of paths relative to
    image_folder), "conversations"}. A sample gives dict(id, input_ids (T,), labels (T,), images (n_img, 3, S, S)),
    n_img = 0 for a text-only sample. Nothing is tokenized up front, so 665k samples load in seconds.

    __getitem__ returns None for a sample dropped by truncation (nothing left to supervise), and with skip_bad=True
    for a bad sample (printed to stderr), which otherwise raises DataError; `collate` counts the Nones."""

    def __init__(self, data_path, image_folder, tokenizer: Tokenizer, template: str, image_size: int = 336,
                 image_aspect_ratio: str = "pad", max_len: int = 2048, image_tokens: int = 576,
                 skip_bad: bool = False, max_pixels: int = MAX_PIXELS):
        if template not in CONV_TEMPLATES:
            raise ValueError(f"unknown template {template!r}; one of {sorted(CONV_TEMPLATES)}")
        self.data_path, self.image_folder = Path(data_path), Path(image_folder)
        self.tokenizer, self.template = tokenizer, template
        self.image_size, self.image_aspect_ratio, self.max_pixels = image_size, image_aspect_ratio, max_pixels
        self.max_len, self.image_tokens, self.skip_bad = max_len, image_tokens, skip_bad
        collecting = gc.isenabled()
        gc.disable()  # parsing makes millions of objects, which the cycle collector would rescan again and again
        try:
            self.records, self.line_numbers = _read_records(self.data_path)  # (665k samples: 2 s instead of 6)
        finally:
            if collecting:
                gc.enable()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Official: the word count of all turns, positive for image samples and negative for text-only ones (at
        least 1, so that the sign always tells the modality)."""
        lengths = []
        for record in self.records:
            try:
                n = sum(len(turn["value"].split()) for turn in record["conversations"])
            except (TypeError, KeyError, AttributeError):
                n = 0  # a malformed sample; it fails (or is skipped) in __getitem__
            lengths.append(max(n, 1) if isinstance(record, dict) and record.get("image") else -max(n, 1))
        return lengths

    def missing_images(self, probes: int = 1000) -> tuple[int, list[str]]:
        """(how many image files were looked for, those missing) over up to `probes` image samples spread evenly
        through the file: a quick look, before training, for a wrong image_folder or a subfolder left out, which
        skip_bad would otherwise turn into a run that silently learns from fewer images, or none."""
        files = []
        for record in self.records[::max(1, len(self.records) // probes)]:
            if isinstance(record, dict):  # a malformed record fails (or is skipped) in __getitem__
                files += [f for f in _image_files(record) if isinstance(f, str)]
        return len(files), [f for f in files if not (self.image_folder / f).is_file()]

    def __getitem__(self, i: int) -> dict | None:
        record = self.records[i]
        where = f"{self.data_path}:{self.line_numbers[i]}" if self.line_numbers else f"{self.data_path} item {i}"
        sample_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        try:
            return self._sample(record, sample_id)
        except DataError as e:
            error = DataError(f"sample {sample_id} ({where}): {e}")
            if not self.skip_bad:
                raise error from None
            print(f"skipping {error}", file=sys.stderr)
            return None

    def _sample(self, record, sample_id: str) -> dict | None:
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataError("a sample is a JSON object with a list of conversations")
        files = _image_files(record)
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise DataError(f"image must be a path or a list of paths, not {files!r:.80}")
        input_ids, labels = preprocess(record["conversations"], self.tokenizer, self.template, len(files))
        if files and IMAGE_TOKEN_INDEX not in input_ids:
            files = []  # official: the image is encoded, then left out (image_features[0:0]): the sample is text
        if input_ids.count(IMAGE_TOKEN_INDEX) != len(files):
            raise DataError(f"{input_ids.count(IMAGE_TOKEN_INDEX)} {IMAGE_MARKER} markers for {len(files)} images")
        kept = truncate(input_ids, labels, self.max_len, self.image_tokens)
        if kept is None:
            return None
        input_ids, labels = kept
        images = [preprocess_image(open_image(self.image_folder / f, self.max_pixels), self.image_size,
                                   self.image_aspect_ratio) for f in files[:input_ids.count(IMAGE_TOKEN_INDEX)]]
        return dict(id=sample_id, input_ids=torch.tensor(input_ids), labels=torch.tensor(labels),
                    images=torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size))


def collate(batch: list, pad_id: int = PAD_ID, pack: bool = False, image_tokens: int = 1) -> dict:
    """Samples -> one right-padded batch (official DataCollatorForSupervisedDataset): input_ids (B, T) padded with
    pad_id, labels (B, T) with IGNORE_INDEX, attention_mask (B, T) True on real tokens, images (N, 3, S, S) of all
    samples in the order of their placeholders (None if there are none). None samples are left out and counted in
    n_skipped, a count that survives DataLoader worker processes. The mask comes from the lengths; official
    `input_ids != pad_id` would also hide a real <unk> in the text.

    pack puts several samples in a row, so that less compute goes to padding: rows as long as the longest sample (in
    LLM positions, an image counting image_tokens), filled first-fit, longest sample first. No row is longer than
    without packing, so neither memory nor the attention span grows (CPU attention with a mask costs the square of
    the row length, masked or not). segment_ids (B, T) then numbers each row's samples 1, 2, ... (0 at padding) for
    Llava.forward's block-diagonal mask; it is None without packing."""
    samples = [sample for sample in batch if sample is not None]
    rows = [[sample] for sample in samples]
    if pack and samples:
        length = [len(s["input_ids"]) + len(s["images"]) * (image_tokens - 1) for s in samples]  # LLM positions
        capacity = max(length)  # every row as long as the longest sample
        rows, room = [], []
        for i in sorted(range(len(samples)), key=lambda i: -length[i]):
            row = next((r for r in range(len(rows)) if room[r] >= length[i]), None)
            if row is None:
                rows.append([])
                room.append(capacity)
                row = len(rows) - 1
            rows[row].append(samples[i])
            room[row] -= length[i]
    T = max((sum(len(sample["input_ids"]) for sample in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        n = 0
        for k, sample in enumerate(row, start=1):
            m = len(sample["input_ids"])
            input_ids[r, n:n + m], labels[r, n:n + m] = sample["input_ids"], sample["labels"]
            segment_ids[r, n:n + m] = k
            n += m
    images = [sample["images"] for row in rows for sample in row if len(sample["images"])]
    return dict(input_ids=input_ids, labels=labels, attention_mask=segment_ids > 0,
                segment_ids=segment_ids if pack else None,
                images=torch.cat(images) if images else None, n_skipped=len(batch) - len(samples),
                ids=[sample["id"] for row in rows for sample in row])


def _even_chunks(indices: list, lengths: list, n_chunks: int) -> list[list]:
    """Deal indices (longest first) into n_chunks equal-size chunks, each to the chunk with the least total length
    so far (official split_to_even_chunks; when they cannot be equal it just strides)."""
    if len(indices) % n_chunks:
        return [indices[k::n_chunks] for k in range(n_chunks)]
    chunks, totals = [[] for _ in range(n_chunks)], [0.0] * n_chunks
    for i in indices:
        k = totals.index(min(totals))
        chunks[k].append(i)
        totals[k] = totals[k] + abs(lengths[i]) if len(chunks[k]) < len(indices) // n_chunks else float("inf")
    return chunks


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """Official group_by_modality_length (spec §8): every global batch holds only image samples or only text-only
    samples (which speeds up training, official README: ~25%), and the ranks' micro-batches have similar total lengths.

    batch_size is one step's global batch: num_replicas x micro_batch (x gradient-accumulation steps). Each modality
    is shuffled and cut into batches of batch_size; each is sorted longest first and dealt into micro-batches; the
    batches of both modalities are shuffled together. Rank r yields micro-batches r, r + num_replicas, ... of each
    (as accelerate deals a DataLoader's batches to ranks). The exception, as official: the last, partial, batch of
    each modality are merged into one final leftover, which can mix modalities; it is shared evenly between ranks,
    padded by repeating samples (as DistributedSampler pads). Seeded by seed + epoch, so all ranks agree."""

    def __init__(self, modality_lengths: list, batch_size: int, micro_batch: int | None = None,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0):
        self.micro_batch = micro_batch or batch_size // num_replicas
        if batch_size % (self.micro_batch * num_replicas):
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_replicas x micro_batch")
        if 0 in modality_lengths:
            raise ValueError("a length of 0 has no modality (+ image, - text-only)")
        self.lengths, self.batch_size = list(modality_lengths), batch_size
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, epoch

    def set_epoch(self, epoch: int):  # as DistributedSampler: a new order each epoch
        self.epoch = epoch

    def _length_grouped(self, indices: list, generator: torch.Generator) -> list[list]:
        """Official get_length_grouped_indices: shuffle, cut into global batches, sort each longest first and deal
        each micro-step's share (one micro-batch per rank) into micro-batches of similar total length, so that no
        rank waits for another. Official deals one micro-step at a time; with gradient accumulation we deal the
        sorted global batch, so its micro-steps run short samples with short ones and long with long: the same
        gradient (the loss is averaged over the global batch's tokens), less padding (the toy's stage 2 in 4
        micro-steps of 8: 11 % of positions are padding instead of 38 %)."""
        shuffled = [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]
        step = self.num_replicas * self.micro_batch  # one micro-step over all ranks
        batches = []
        for start in range(0, len(shuffled), self.batch_size):
            batch = sorted(shuffled[start:start + self.batch_size], key=lambda i: abs(self.lengths[i]), reverse=True)
            batches.append([i for s in range(0, len(batch), step)
                            for chunk in _even_chunks(batch[s:s + step], self.lengths, self.num_replicas)
                            for i in chunk])
        return batches

    def global_batches(self) -> list[list]:
        """This epoch's global batches, all ranks together; the last one may be partial (and mixed)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        image = [i for i, n in enumerate(self.lengths) if n > 0]
        text = [i for i, n in enumerate(self.lengths) if n < 0]
        if not image or not text:
            return self._length_grouped(image or text, generator)
        image_batches, text_batches = self._length_grouped(image, generator), self._length_grouped(text, generator)
        leftover = sorted(image_batches.pop() + text_batches.pop())
        full = image_batches + text_batches
        return [full[k] for k in torch.randperm(len(full), generator=generator).tolist()] + [leftover]

    def __iter__(self):
        for batch in self.global_batches():
            if len(batch) == self.batch_size:
                for start in range(self.rank * self.micro_batch, len(batch), self.num_replicas * self.micro_batch):
                    yield from batch[start:start + self.micro_batch]
            else:
                share = -(-len(batch) // self.num_replicas)
                yield from (batch * self.num_replicas)[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        def sizes(n):
            return [min(self.batch_size, n - start) for start in range(0, n, self.batch_size)]
        n_image = sum(n > 0 for n in self.lengths)
        if n_image in (0, len(self.lengths)):
            batch_sizes = sizes(len(self.lengths))
        else:
            image, text = sizes(n_image), sizes(len(self.lengths) - n_image)
            batch_sizes = image[:-1] + text[:-1] + [image[-1] + text[-1]]
        return sum(-(-size // self.num_replicas) for size in batch_sizes)


# -----------------------------------------------------------------------------
# the toy world: coloured shapes on plain backgrounds, in the official file formats

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230), "yellow": (240, 210, 30),
           "purple": (140, 50, 190), "orange": (250, 140, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78)}  # centre x, y
SIZES = {"small": 0.16, "large": 0.21}  # radius, as a fraction of the shorter side (large diagonal squares may touch)
CANVASES = ((64, 64), (64, 64), (64, 64), (64, 48), (48, 64))  # some non-square, to exercise the padding
EVAL_CATEGORIES = ("colour", "shape", "count", "position", "yes_no")
# how often stage 2 asks each kind of question: count (read off the whole image, learned first) and size (which the
# eval never asks) half as often as the look-ups, which find an object by one attribute and read another
QUESTION_WEIGHTS = dict(colour=2, shape=2, count=1, position=2, yes_no=2, size=1)
CAPTION_INSTRUCTIONS = ("Describe the image concisely.", "Give a brief description of the image.",
                        "Render a clear and concise summary of the photo.", "What is in this picture?")
COLOUR_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "large": "small", "small": "large"}


def _scene(rng: random.Random) -> dict:
    """1-3 objects, no two sharing a colour, a shape or a position, so every question has one answer."""
    n = rng.randint(1, 3)
    # captions and descriptions name the objects in this random order: listed by place (left, right, top, bottom),
    # they gave each place away by its rank, and models never learned where a given object is (docs/toy_accuracy.md)
    objects = [dict(colour=c, shape=s, position=p, size=rng.choice(list(SIZES)), dx=rng.randint(-1, 1),
                    dy=rng.randint(-1, 1))
               for c, s, p in zip(rng.sample(list(COLOURS), n), rng.sample(SHAPES, n), rng.sample(list(POSITIONS), n))]
    return dict(background=rng.choice(list(BACKGROUNDS)), canvas=rng.choice(CANVASES), objects=objects)


def _scene_key(scene: dict) -> tuple:  # what a scene shows, up to a pixel of jitter and the order it is told in
    return scene["background"], scene["canvas"], tuple(sorted((o["colour"], o["shape"], o["position"], o["size"])
                                                              for o in scene["objects"]))


def _draw(scene: dict) -> Image.Image:
    w, h = scene["canvas"]
    image = Image.new("RGB", (w, h), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        fx, fy = POSITIONS[o["position"]]
        x, y, r, fill = fx * w + o["dx"], fy * h + o["dy"], SIZES[o["size"]] * min(w, h), COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill)
        elif o["shape"] == "square":
            draw.rectangle((x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r), fill)  # about a circle's area
        elif o["shape"] == "triangle":
            draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill)
        else:  # cross
            draw.rectangle((x - r, y - 0.35 * r, x + r, y + 0.35 * r), fill)
            draw.rectangle((x - 0.35 * r, y - r, x + 0.35 * r, y + r), fill)
    return image


def _a(colour: str) -> str:  # "a red", "an orange"
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour}"


def place_phrase(position: str) -> str:  # "on the left", "at the top"
    return f"{'at' if position in ('top', 'bottom') else 'on'} the {position}"


def _caption(scene: dict) -> str:  # "a red circle on the left and a blue square at the top on a white background"
    names = [f"{_a(o['colour'])} {o['shape']} {place_phrase(o['position'])}" for o in scene["objects"]]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on a {scene['background']} background"


def _description(scene: dict) -> str:
    n = len(scene["objects"])
    sentences = [f"There {'is 1 object' if n == 1 else f'are {n} objects'} on a {scene['background']} background."]
    for o in scene["objects"]:
        sentences.append(f"A {o['size']} {o['colour']} {o['shape']} is {place_phrase(o['position'])}.")
    return " ".join(sentences)


def _question(scene: dict, category: str, rng: random.Random) -> tuple[str, str, str]:
    """(question, one-word answer, full-sentence answer) about a scene."""
    o, background = rng.choice(scene["objects"]), scene["background"]
    name = f"{o['colour']} {o['shape']}"
    if category == "colour" and rng.random() < 0.2:
        return "What colour is the background?", background, f"The background is {background}."
    if category == "colour":
        return f"What colour is the {o['shape']}?", o["colour"], f"The {o['shape']} is {o['colour']}."
    if category == "shape":
        return f"What shape is the {o['colour']} object?", o["shape"], f"The {o['colour']} object is a {o['shape']}."
    if category == "count":
        n = len(scene["objects"])
        return "How many objects are there?", str(n), f"There {'is 1 object' if n == 1 else f'are {n} objects'}."
    if category == "position":
        return f"Where is the {name}?", o["position"], f"The {name} is {place_phrase(o['position'])}."
    if category == "size":
        return f"Is the {name} large or small?", o["size"], f"The {name} is {o['size']}."
    if rng.random() < 0.5:  # yes_no, balanced
        return f"Is there {_a(name)}?", "yes", f"Yes, there is {_a(name)}."
    present = {(p["colour"], p["shape"]) for p in scene["objects"]}
    colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
    return f"Is there {_a(colour)} {shape}?", "no", f"No, there is no {colour} {shape}."


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """A text-only question about the world's vocabulary: (question, one-word answer, sentence answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        (a, b), mix = rng.choice(list(COLOUR_MIXES.items()))
        return f"What colour do you get when you mix {a} and {b}?", mix, f"Mixing {a} and {b} gives {mix}."
    if kind == 1:
        shape, sides = rng.choice([("triangle", 3), ("square", 4)])
        return f"How many sides does a {shape} have?", str(sides), f"A {shape} has {sides} sides."
    if kind == 2:
        word = rng.choice(list(COLOURS) + list(SHAPES))
        what = "colour" if word in COLOURS else "shape"
        return f"Is {word} a colour or a shape?", what, f"{word.capitalize()} is a {what}."
    word, opposite = rng.choice(list(OPPOSITES.items()))
    return f"What is the opposite of {word}?", opposite, f"The opposite of {word} is {opposite}."


def _with_image(question: str, rng: random.Random) -> str:  # the marker comes first or last, as in the real data
    return f"{IMAGE_MARKER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_MARKER}"


def _turns(pairs: list) -> list[dict]:
    return [dict(zip(("from", "value"), turn)) for q, a in pairs for turn in (("human", q), ("gpt", a))]


def _stage2_sample(scenes: list, files: list, objects_so_far: list, rng: random.Random) -> dict:
    """One mix665k-style sample: questions about one image, a description, a text-only chat, or two images.
    objects_so_far: the running total of the scenes' object counts."""
    short = rng.random() < 0.5  # like the VQA parts of mix665k: one-word answers with the SHORT_ANSWER suffix
    kind = rng.choices(("qa", "describe", "text", "two_images"), weights=(60, 15, 15, 10))[0]
    if kind == "qa":  # a scene in proportion to its objects: a lone object needs no finding (docs/toy_accuracy.md)
        k = rng.choices(range(len(scenes)), cum_weights=objects_so_far)[0]
    else:
        k = rng.randrange(len(scenes))
    if kind == "text":
        facts = [_fact(rng) for _ in range(rng.randint(1, 2))]
        return dict(conversations=_turns([(q + SHORT_ANSWER, w) if short else (q, s) for q, w, s in facts]))
    if kind == "describe":
        question, answer = rng.choice([("Describe the image in detail.", _description(scenes[k])),
                                       ("Describe the image briefly.", _caption(scenes[k]).capitalize() + ".")])
        return dict(image=files[k], conversations=_turns([(_with_image(question, rng), answer)]))
    if kind == "two_images":
        j = rng.choice([j for j in range(len(scenes)) if j != k])
        a, b = scenes[k]["background"], scenes[j]["background"]
        question, word, sentence = rng.choice([
            ("Do the two images have the same background?", "yes" if a == b else "no",
             f"Yes, both backgrounds are {a}." if a == b else f"No, the first is {a} and the second is {b}."),
            ("How many objects are there in the two images together?",
             str(len(scenes[k]["objects"]) + len(scenes[j]["objects"])),
             f"There are {len(scenes[k]['objects']) + len(scenes[j]['objects'])} objects."),
            ("What colour is the background of the second image?", b, f"The second background is {b}.")])
        question = f"{IMAGE_MARKER}\n{IMAGE_MARKER}\n{question}"
        return dict(image=[files[k], files[j]],
                    conversations=_turns([(question + SHORT_ANSWER, word) if short else (question, sentence)]))
    # several questions about the image, as mix665k's VQA samples: the image's tokens (and the system prompt) are
    # paid for once, and each question is one more lesson in finding an object by one attribute and reading another
    asked = {}
    for category in rng.choices(list(QUESTION_WEIGHTS), list(QUESTION_WEIGHTS.values()), k=rng.randint(3, 8)):
        q, w, s = _question(scenes[k], category, rng)
        asked.setdefault(q, (q + SHORT_ANSWER, w) if short else (q, s))
    pairs = list(asked.values())
    pairs[0] = (_with_image(pairs[0][0], rng), pairs[0][1])
    return dict(image=files[k], conversations=_turns(pairs))


def _train_tokenizer(texts: list, vocab_size: int) -> Tokenizer:
    """A small LLaMA-style tokenizer for the toy world, in the same structure as LLaMA's tokenizer.json: <unk>, <s>,
    </s>, the 256 byte tokens, BPE pieces learned from the texts, and "<image>" last (the id transformers' LLaVA
    needs for its image token; our pipeline never emits it)."""
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # learn within words, each with its leading "▁", and keep "\n" apart, as SentencePiece does for LLaMA
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("▁", behavior="merged_with_next"), pre_tokenizers.Split("\n", behavior="isolated")])
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 260, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = [UNK, BOS, EOS] + [f"<0x{b:02X}>" for b in range(256)] + sorted(learned["vocab"], key=learned["vocab"].get)
    tokenizer = _llama_tokenizer({piece: i for i, piece in enumerate(pieces)}, [tuple(m) for m in learned["merges"]])
    tokenizer.add_special_tokens([AddedToken(IMAGE_MARKER, normalized=False, special=True)])
    return tokenizer


def _toy_paths(root: Path) -> dict:
    return dict(root=root, images=root / "images", stage1=root / "stage1.json", stage2=root / "stage2.json",
                eval=root / "eval.jsonl", tokenizer=root / "tokenizer.json")


def _unseen_scenes(rng: random.Random, train: list, n: int) -> list:
    """n scenes drawn as the training ones were, none showing what a training scene (or another of them) shows."""
    seen, scenes = {_scene_key(s) for s in train}, []
    while len(scenes) < n:
        scene = _scene(rng)
        if _scene_key(scene) not in seen:
            scenes.append(scene)
            seen.add(_scene_key(scene))
    return scenes


def _write_eval(scenes: list, images: Path, eval_file: Path, rng: random.Random):
    """eval_*.png, and 3 one-word questions per scene in the official eval format plus `category`, `answer` and
    `objects` (how many the scene holds); the categories take turns, so each gets a fifth of the questions."""
    questions = []
    for i, scene in enumerate(scenes):
        _draw(scene).save(images / f"eval_{i:05d}.png")
        for j in range(3):
            category = EVAL_CATEGORIES[(3 * i + j) % len(EVAL_CATEGORIES)]
            question, answer, _ = _question(scene, category, rng)
            questions.append(dict(question_id=len(questions), image=f"eval_{i:05d}.png", text=question + SHORT_ANSWER,
                                  category=category, answer=answer, objects=len(scene["objects"])))
    eval_file.write_text("".join(json.dumps(q) + "\n" for q in questions))


def make_toy_world(root, seed: int = 0, n_train_images: int = 4000, n_stage1: int = 4000, n_stage2: int = 8000,
                   n_eval_images: int = 100, vocab_size: int = 600) -> dict:
    """Write the toy world under root and return its paths. Same seed, same bytes.

    images/: train_*.png (stage 1 and 2) and eval_*.png (held out: no eval scene repeats a training scene);
    stage1.json: blip_laion_cc_sbu_558k-style captions; stage2.json: mix665k-style chats, some text-only and some with
    two images; eval.jsonl: 3 one-word questions per eval image (see _write_eval); tokenizer.json: see
    _train_tokenizer."""
    paths, rng = _toy_paths(Path(root)), random.Random(seed)
    paths["images"].mkdir(parents=True, exist_ok=True)
    train = [_scene(rng) for _ in range(n_train_images)]
    held_out = _unseen_scenes(rng, train, n_eval_images)
    files = [f"train_{i:05d}.png" for i in range(n_train_images)]
    for name, scene in zip(files, train):
        _draw(scene).save(paths["images"] / name)

    stage1 = [dict(id=f"s1_{i:05d}", image=files[i % n_train_images], conversations=_turns(
        [(_with_image(rng.choice(CAPTION_INSTRUCTIONS), rng), _caption(train[i % n_train_images]))]))
        for i in range(n_stage1)]
    objects_so_far = list(itertools.accumulate(len(scene["objects"]) for scene in train))
    stage2 = [dict(id=f"s2_{i:05d}", **_stage2_sample(train, files, objects_so_far, rng)) for i in range(n_stage2)]
    _write_eval(held_out, paths["images"], paths["eval"], rng)
    paths["stage1"].write_text(json.dumps(stage1, indent=1))
    paths["stage2"].write_text(json.dumps(stage2, indent=1))

    # the tokenizer learns the text as training will show it: inside the vicuna_v1 template, cut at the special
    # tokens (tokenize_prompt encodes the text between them separately)
    texts = [chunk for s in stage2 for part in render(_VICUNA, to_messages(s["conversations"], False)).split(EOS)
             for chunk in part.split(IMAGE_MARKER)]
    texts += [_caption(scene) for scene in train] + list(CAPTION_INSTRUCTIONS)
    _train_tokenizer(texts, vocab_size).save(str(paths["tokenizer"]))
    return paths


def make_toy_eval(root, n_scenes: int, seed: int = 0, n_train_images: int = 4000) -> dict:
    """A larger held-out question set for the world that make_toy_world(seed=seed, n_train_images=n_train_images)
    makes: n_scenes unseen scenes (the first of them that world's eval scenes) under root/images, and 3 questions each
    in root/eval.jsonl, asked afresh. For experiments: the world's 300 questions measure a run's accuracy only to about
    ± 2.6 points (one standard error)."""
    root, rng = Path(root), random.Random(seed)
    train = [_scene(rng) for _ in range(n_train_images)]  # drawn again, only to leave them out
    (root / "images").mkdir(parents=True, exist_ok=True)
    _write_eval(_unseen_scenes(rng, train, n_scenes), root / "images", root / "eval.jsonl", rng)
    return dict(root=root, images=root / "images", eval=root / "eval.jsonl")


def _make_once(root: Path, make, message: str):
    """make(folder) into a temporary folder renamed into place, unless root exists: an interrupted generation
    never leaves half a folder, and concurrent ranks agree."""
    if root.exists():
        return
    print(message)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    try:
        tmp.rename(root)
    except OSError:  # another process got there first, with the same files
        shutil.rmtree(tmp)


def ensure_toy_world(root="toy_world", seed: int = 0) -> dict:
    """The toy world's paths, generating it first (once) if root does not exist."""
    root = Path(root)
    _make_once(root, lambda folder: make_toy_world(folder, seed),
               f"generating the toy world in {root}/ (seed {seed}), once; it takes a few seconds")
    return _toy_paths(root)


def ensure_toy_eval(world_root, n_scenes: int, seed: int = 0) -> dict:
    """The paths of make_toy_eval's question set for the toy world at world_root (made by ensure_toy_world with the
    same seed), in world_root/eval-<n_scenes>/, generated first (once) if it does not exist."""
    root = Path(world_root) / f"eval-{n_scenes}"
    _make_once(root, lambda folder: make_toy_eval(folder, n_scenes, seed),
               f"drawing {n_scenes} held-out scenes and their questions in {root}/, once")
    return dict(root=root, images=root / "images", eval=root / "eval.jsonl")
