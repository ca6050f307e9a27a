"""Reading what users give the scripts: image files, LLaVA data files, benchmark files, and the checks that keep a
bad one from failing silently or in a traceback.

The official code fails on a bad sample in one of three ways: a crash mid-run, a KeyError, or (worst) a "tokenization
mismatch" that masks the whole sample and trains nothing from it. Here each one is a DataError (or, for benchmark
files, a ValueError) whose message names the file, the line or sample, and what is wrong.
"""

import base64
import binascii
import csv
import gc
import io
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from model import IMAGE_MARKER


class DataError(Exception):
    """A bad sample or data file. The message names the sample id and the file (and line) it came from."""


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


def open_base64_image(data: str, name: str) -> Image.Image:
    """An image given as base64 text (MMBench's tsv holds its images so), called `name` in errors."""
    try:
        file = io.BytesIO(base64.b64decode(data, validate=True))
    except binascii.Error as error:
        raise DataError(f"{name} is not base64 ({error})") from None
    file.name = name  # what open_image's errors call it
    return open_image(file)


def open_local_image(path: str) -> Image.Image:
    """The official CLI also fetches http(s) images; chat.py reads files only, and says so."""
    if path.startswith(("http://", "https://")):
        raise DataError(f"{path}: a URL; chat.py reads image files (download it first)")
    return open_image(path)


# -----------------------------------------------------------------------------
# LLaVA training data


def read_records(path: Path) -> tuple[list, list | None]:
    """The samples of a LLaVA JSON file (one list) or JSONL file (one sample per line; with their line numbers).
    A line that is not JSON is kept as its DataError, to fail (or be skipped) when the sample is read."""
    text = path.read_text(encoding="utf-8")
    collecting = gc.isenabled()
    gc.disable()  # parsing makes millions of objects, which the cycle collector would rescan again and again
    try:
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
                except json.JSONDecodeError as e:
                    records.append(DataError(f"invalid JSON ({e.msg} at column {e.colno})"))
                line_numbers.append(n)
        return records, line_numbers
    finally:
        if collecting:
            gc.enable()


def image_files(record) -> list:
    """A sample's "image" as a list of paths: one path, a list of paths, or none."""
    files = record.get("image") or [] if isinstance(record, dict) else []
    return [files] if isinstance(files, str) else files


def check_record(record) -> list:
    """A record's image paths, after checking that it is a sample at all."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError("a sample is a JSON object with a list of conversations")
    files = image_files(record)
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise DataError(f"image must be a path or a list of paths, not {files!r:.80}")
    return files


def check_conversation(conversations: list, has_image: int) -> list:
    """The turns that official preprocessing trains, or a DataError where it would fail or mask the sample."""
    others = {str(turn.get("from")) for turn in conversations if isinstance(turn, dict)} - {"human", "gpt"}
    if others:  # e.g. OpenAI's "user" and "assistant" (official preprocess fails on them with a KeyError)
        raise DataError(f"turns come \"from\" human or gpt, as in LLaVA's data, not {', '.join(sorted(others))}")
    if conversations and isinstance(conversations[0], dict) and conversations[0].get("from") != "human":
        conversations = conversations[1:]  # official: a conversation that opens with the assistant loses that turn
    if not conversations or len(conversations) % 2:
        raise DataError(f"{len(conversations)} turns: a conversation is pairs of human and gpt turns")
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
    return conversations


def check_round_separators(messages: list, cuts: tuple):
    """Official preprocess_v1 finds the rounds by cutting the prompt at these strings, so a message holding one
    throws its count off ("tokenization mismatch") and the whole sample is masked; an answer holding "</s>" would
    otherwise teach the model to stop there."""
    for _, text in messages:
        for cut in cuts:
            if cut in text:
                raise DataError(f"{cut!r} in a message: the official preprocessing cuts rounds there and masks the "
                                "whole sample")


def missing_images(records: list, image_folders: list, probes: int = 1000) -> tuple[int, list[str]]:
    """(how many image files were looked for, those in none of the folders) over up to `probes` samples spread evenly
    through the data: a quick look, before training, for a wrong image folder or a subfolder left out, which skipping
    bad samples would otherwise turn into a run that silently learns from fewer images, or none."""
    files = [f for record in records[::max(1, len(records) // probes)] for f in image_files(record)
             if isinstance(f, str)]
    return len(files), [f for f in files if not any((Path(folder) / f).is_file() for folder in image_folders)]


# -----------------------------------------------------------------------------
# benchmark files: a malformed one is a ValueError naming the file (and line)


@contextmanager
def open_text(path, newline=None):
    """A UTF-8 text file opened for reading; bytes that are not UTF-8 are an error naming the file (Python's own
    UnicodeDecodeError does not)."""
    with open(path, encoding="utf-8", newline=newline) as f:
        try:
            yield f
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None


def check_input(option, path, kind="file"):
    """A missing input file or folder is named by its option, so that the message says which argument to fix."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path}: no such {kind}")
    if os.path.isdir(path) != (kind == "directory"):
        raise ValueError(f"{option} {path}: not a {kind}")


def read_jsonl(path, required=()):
    """One JSON object per line; a bad line, or one without a `required` field, is an error naming it."""
    with open_text(path) as f:
        return parse_jsonl(f, path, required)


def parse_jsonl(lines, path, required=()):
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: not a JSON object")
        missing = [field for field in required if field not in record]
        if missing:
            raise ValueError(f"{path}:{line_number}: no {missing[0]!r} field")
        records.append(record)
    return records


def read_json(path):
    """A JSON file; a malformed one is an error naming it (json's own message names no file)."""
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON at line {error.lineno} column {error.colno} "
                             f"({error.msg})") from None


def read_tsv(path):
    # MMBench rows carry the image as base64, far over the csv module's default 128 KiB field limit
    csv.field_size_limit(2**31 - 1)
    with open_text(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))
