"""LLaVA-1.5 training data: chat templates, tokenization with label masking, datasets, batches and the sampler.

Reproduces the official data path (haotian-liu/LLaVA):
- llava/conversation.py: the conversation templates and their exact prompt strings;
- llava/mm_utils.py `tokenizer_image_token`: one IMAGE_TOKEN_INDEX per "<image>" in the token ids;
- llava/train/train.py `preprocess_multimodal`, `preprocess_plain`, `preprocess_v1` / `_llama_2` / `_mpt`,
  `LazySupervisedDataset` and `DataCollatorForSupervisedDataset`;
- llava/train/llava_trainer.py `group_by_modality_length`: batches that hold only image or only text-only samples.

Where the official code fails silently (a "tokenization mismatch" masks a whole sample), a bad sample here is a
DataError naming its id and file; the checks live in plumbing/files.py, where the data is read. Tokenizer files are
read by plumbing/tokenizer.py; the toy world's data is made by toy.py.

Shapes: T tokens of a sample (each image is one IMAGE_TOKEN_INDEX), B samples in a batch, S image side in pixels.
"""

import bisect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from clip import preprocess_image
from model import IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN_INDEX
from plumbing.files import (MAX_PIXELS, DataError, check_conversation, check_record, check_round_separators,
                            missing_images, open_image, read_records)
from plumbing.tokenizer import BOS_ID, PAD_ID

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # the suffix of LLaVA-1.5's short-answer data

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


# LLaVA-Plus's unified format (llava/mm_utils.py: reorganize_source_for_tool_use): an assistant turn that decides on a
# tool writes its thoughts, the actions (tool calls, JSON) and the value (what the user is shown), each after its
# marker, the quotes being part of it; tools.py parses them back
THOUGHTS, ACTIONS, VALUE = '"thoughts🤔"', '"actions🚀"', '"value👉"'


def unified_answer(turn: dict) -> str:
    """An assistant turn of LLaVA-Plus data {"thoughts", "actions", "value"} as the one text the model learns to write:
    '"thoughts🤔" {thoughts}\\n"actions🚀" {json.dumps(actions)}\\n"value👉" {value}\\n', a missing key's line left
    out, in this order whatever the JSON's."""
    parts = [(THOUGHTS, turn.get("thoughts")), (ACTIONS, json.dumps(turn["actions"]) if "actions" in turn else None),
             (VALUE, turn.get("value"))]
    return "".join(f"{marker} {text}\n" for marker, text in parts if text is not None)


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
    """LLaVA JSON turns [{"from": "human"|"gpt", "value": text}, ...] -> [(0|1, text), ...]. has_image: the sample's
    number of images (or a bool).

    As official preprocess_multimodal, in an image sample a turn's "<image>" moves to its front: "Q\\n<image>" becomes
    "<image>\\nQ", and several markers in the turn of a one-image sample become that one. (With several images, our
    extension, a turn's markers stay as written unless there is one.) In a sample without an image, "<image>" is
    text. An assistant turn with LLaVA-Plus's "thoughts" or "actions" becomes its unified_answer; plain LLaVA turns stay
    as they are."""
    messages = []
    for i, turn in enumerate(check_conversation(conversations, has_image)):
        text = unified_answer(turn) if "thoughts" in turn or "actions" in turn else turn["value"]
        if has_image and IMAGE_MARKER in text and (has_image == 1 or text.count(IMAGE_MARKER) == 1):
            text = (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()
        messages.append((i % 2, text))
    return messages


def preprocess(conversations: list, tokenizer: Tokenizer, template: str, has_image: int) -> tuple[list, list]:
    """(input_ids, labels) of one training conversation, as the official preprocess of that template.

    "plain" (stage 1, preprocess_plain): the instruction is dropped; the sample is "<image>" + caption + "\\n" and
    only the caption and "\\n" are supervised. Every other template (preprocess_v1 / _llama_2 / _mpt): the whole
    conversation is rendered and tokenized once; each answer and the separator that ends it ("</s>" for vicuna_v1)
    are supervised; the system prompt, the user turns and the images are not (labels IGNORE_INDEX). The answers are
    found by their character spans in the prompt, cut from the one tokenization."""
    conv = CONV_TEMPLATES[template]
    messages = to_messages(conversations, has_image)
    if conv.style == "plain":
        if len(messages) != 2 or IMAGE_MARKER not in messages[0][1]:
            raise DataError("a plain (stage-1) sample is one human turn with <image> and one caption")
        input_ids = tokenize_prompt(tokenizer, IMAGE_MARKER + messages[1][1] + conv.sep)
        n_prompt = len(tokenize_prompt(tokenizer, IMAGE_MARKER))  # <s> and the image
        return input_ids, [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    if conv.style == "two":
        check_round_separators(messages, (conv.sep2, conv.sep + conv.roles[1] + ": "))
    if conv.style == "single":
        prompt, spans = v0_training_prompt(conv, messages)
    else:
        # an answer's characters are those its text adds: after the prompt up to "ASSISTANT:", up to " answer</s>"
        prompt = render(conv, messages)
        spans = [(len(render(conv, messages[:i] + [(1, None)])), len(render(conv, messages[:i + 1])))
                 for i in range(1, len(messages), 2)]
    input_ids, starts, ends = tokenize_with_offsets(tokenizer, prompt, images=bool(has_image))
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        start, end = (_tokens_before(boundary, starts, ends, prompt) for boundary in (start, end))
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def v0_training_prompt(conv: Conversation, messages: list) -> tuple[str, list]:
    """The text llava_v0 (LLaVA v0, and LLaVA-Plus's released model) trains on, which is not the prompt it is served:
    "{system}\\n\\n### Human: {question}\\n### Assistant: {answer}\\n### " (llava/train/train.py:
    _add_speaker_and_signal), and the character span of each answer: from after "Assistant:" through the "###" that
    follows it, the stop string of serving. (Official v0 masking measures each turn tokenized alone, with a BOS of its
    own, so its spans drift by a token per turn; these are exact.)"""
    prompt, spans = conv.system + "\n\n", []
    for i, (_, text) in enumerate(messages):
        head = f"### {conv.roles[i % 2]}:"
        if i % 2:
            spans.append((len(prompt) + len(head), len(prompt) + len(f"{head} {text}\n###")))
        prompt += f"{head} {text}\n"
    return prompt + "### ", spans


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
# dataset, batches and the modality-grouped sampler


class LazySupervisedDataset(torch.utils.data.Dataset):
    """LLaVA training samples, tokenized and with their images loaded on access (official LazySupervisedDataset).

    data_path: a LLaVA JSON list or JSONL of {"id", "image" (optional; a path or a list of paths relative to
    image_folder), "conversations"}, or several, comma-separated ("a.json,b.json"), as the official scripts pass them;
    image_folder likewise ("coco,hiertext": the first folder that holds an image is where it is read). A sample gives
    dict(id, input_ids (T,), labels (T,), images (n_img, 3, S, S)), n_img = 0 for a text-only sample. Nothing is
    tokenized up front, so 665k samples load in seconds.

    __getitem__ returns None for a sample dropped by truncation (nothing left to supervise), and with skip_bad=True
    for a bad sample (printed to stderr), which otherwise raises DataError; `collate` counts the Nones."""

    def __init__(self, data_path, image_folder, tokenizer: Tokenizer, template: str, image_size: int = 336,
                 image_aspect_ratio: str = "pad", max_len: int = 2048, image_tokens: int = 576,
                 skip_bad: bool = False, max_pixels: int = MAX_PIXELS):
        self.image_folders = [Path(folder) for folder in str(image_folder).split(",")]
        self.tokenizer, self.template = tokenizer, template
        self.image_size, self.image_aspect_ratio, self.max_pixels = image_size, image_aspect_ratio, max_pixels
        self.max_len, self.image_tokens, self.skip_bad = max_len, image_tokens, skip_bad
        self.records, self.files, self.offsets = [], [], []  # offsets[k]: the index of file k's first record
        for path in map(Path, str(data_path).split(",")):
            records, line_numbers = read_records(path)
            self.files.append((path, line_numbers))
            self.offsets.append(len(self.records))
            self.records += records

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

    def missing_images(self) -> tuple[int, list[str]]:
        return missing_images(self.records, self.image_folders)

    def image_path(self, name: str) -> Path:
        """Where an image is read: in the first image folder that holds it (named in the error if none does)."""
        paths = [folder / name for folder in self.image_folders]
        return paths[0] if len(paths) == 1 else next((path for path in paths if path.is_file()), paths[0])

    def where(self, i: int) -> str:
        """Record i's file and line (JSONL) or item (JSON), for error messages."""
        k = bisect.bisect_right(self.offsets, i) - 1
        path, line_numbers = self.files[k]
        return f"{path}:{line_numbers[i - self.offsets[k]]}" if line_numbers else f"{path} item {i - self.offsets[k]}"

    def __getitem__(self, i: int) -> dict | None:
        record = self.records[i]
        sample_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        try:
            return self._sample(record, sample_id)
        except DataError as e:
            error = DataError(f"sample {sample_id} ({self.where(i)}): {e}")
            if not self.skip_bad:
                raise error from None
            print(f"skipping {error}", file=sys.stderr)
            return None

    def _sample(self, record, sample_id: str) -> dict | None:
        files = check_record(record)
        input_ids, labels = preprocess(record["conversations"], self.tokenizer, self.template, len(files))
        if files and IMAGE_TOKEN_INDEX not in input_ids:
            files = []  # official: the image is encoded, then left out (image_features[0:0]): the sample is text
        if input_ids.count(IMAGE_TOKEN_INDEX) != len(files):
            raise DataError(f"{input_ids.count(IMAGE_TOKEN_INDEX)} {IMAGE_MARKER} markers for {len(files)} images")
        kept = truncate(input_ids, labels, self.max_len, self.image_tokens)
        if kept is None:
            return None
        input_ids, labels = kept
        images = [preprocess_image(open_image(self.image_path(f), self.max_pixels), self.image_size,
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
    """Official group_by_modality_length (llava/train/llava_trainer.py): every global batch holds only image samples or only text-only
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
        gradient (the loss is averaged over the global batch's tokens), less padding (docs/training.md)."""
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
