"""LLaMA's tokenizer files, read with the `tokenizers` library alone (no sentencepiece, no transformers).

A model directory holds `tokenizer.json` (transformers' fast tokenizer) or only SentencePiece's `tokenizer.model`;
both become the same `tokenizers.Tokenizer`, with the legacy text handling that LLaVA-1.5 was trained with.
"""

import json
import struct
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

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
    added = path.parent / "added_tokens.json"  # beside a tokenizer.model: e.g. LLaVA v0's "[PAD]" at 32000
    if path.suffix == ".model" and added.exists():
        for piece, index in sorted(json.loads(added.read_text()).items(), key=lambda item: item[1]):
            if tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)]) and \
                    tokenizer.token_to_id(piece) != index:
                raise ValueError(f"{added}: {piece} would have the id {tokenizer.token_to_id(piece)}, not {index}")
    if tokenizer.encode(EOS + "a").tokens[-1] == "a":
        # saved without the legacy behaviour (transformers' legacy=False: a Metaspace pre-tokenizer that puts "▁" only
        # at the start of the text), it reads "</s>USER" as "USER", where LLaVA-1.5 was trained on "▁US ER"
        _legacy_text_handling(tokenizer)
    for piece, want in ((UNK, PAD_ID), (BOS, BOS_ID), (EOS, EOS_ID)):
        if tokenizer.token_to_id(piece) != want:
            raise ValueError(f"{path}: {piece} has id {tokenizer.token_to_id(piece)}; a LLaMA tokenizer has {want}")
    if tokenizer.encode("a").ids[0] != BOS_ID:
        raise ValueError(f"{path}: the tokenizer must add {BOS} itself, as LLaMA's does")
    return tokenizer


def llama_tokenizer(vocab: dict, merges: list) -> Tokenizer:
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
    return llama_tokenizer(vocab, [(left, right) for left, right, _ in merges])
