"""An answers file (one JSON line per answered question, as the official runners write it) that a run can resume,
split among processes the official way (--num-chunks / --chunk-idx) or under torchrun (each rank writes its own
file, rank 0 merges them in question order).

What identifies a question, and the answer to it: the id alone does not (TextVQA's is the image id, MME's the image
file, an MMBench question's rounds share theirs), so the prompt goes with it: the question's text, or what the
official runner records instead (ScienceQA, MMBench: see their questions' "prompt").
"""

import json
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing.files import open_text, parse_jsonl


def split_list(items, n):
    """Chunks of ceil(len / n) items, as the official runners split the questions for --num-chunks. There can be
    fewer than n: 9 questions in 4 chunks are 3 + 3 + 3."""
    size = math.ceil(len(items) / n)
    return [items[i:i + size] for i in range(0, len(items), size)] if items else []


def get_chunk(items, n, k):
    """Chunk k of split_list(items, n); empty where the official get_chunk raises IndexError."""
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


def recorded_prompt(question):
    """What an answer records as its prompt: the question's text, or what the official runner records instead."""
    return question.get("prompt", question["text"])


def question_key(question):
    return question["question_id"], recorded_prompt(question)


def answer_key(answer):
    return answer["question_id"], answer["prompt"]


def read_answers(path):
    """The answers already in a file, [] if there is none. Every answer is written as one line with its newline, so
    a last line without one was cut off (a crash, a kill): it does not count, and its question is answered again."""
    if not os.path.exists(path):
        return []
    with open_text(path) as f:
        text = f.read()
    return parse_jsonl(text[:text.rfind("\n") + 1].split("\n"), path, required=("question_id", "prompt"))


def open_for_append(path, afresh=False):
    """Open an answers file to add lines to, first cutting off a partial last line (see read_answers), or with
    afresh=True emptied."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if afresh:
        Path(path).unlink(missing_ok=True)
    with open(path, "ab+") as f:
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def merge_answers(questions, answers_file, sources):
    """The answers of the source files, in question order, replace answers_file (written to a temporary file and
    renamed, so a crash here loses nothing)."""
    by_key = {}
    for path in sources:
        for record in read_answers(path):
            by_key.setdefault(answer_key(record), record)
    tmp = answers_file.with_name(answers_file.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(by_key[question_key(q)]) + "\n" for q in questions if question_key(q) in by_key)
    os.replace(tmp, answers_file)


def rank_file(answers_file, rank, world):  # answers.jsonl -> answers.rank0-of-8.jsonl
    return answers_file.with_name(f"{answers_file.stem}.rank{rank}-of-{world}{answers_file.suffix}")


def this_share(questions, answers_file, num_chunks, chunk_idx, model_id, resume):
    """(this process's questions not answered yet, the file it writes, how many of its share were answered before).
    Under torchrun rank r takes chunk r and writes its own file. Answers of another model are refused: the scores
    would mix two models."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    answers_file = own_file = Path(answers_file)
    if world > 1:
        if num_chunks > 1:
            raise ValueError("shard the questions with torchrun or with --num-chunks, not both")
        # the process group only carries the counts and the barrier before the merge (gloo works with any device);
        # ranks can finish hours apart, hence the long timeout
        dist.init_process_group("gloo", timeout=timedelta(days=1))
        num_chunks, chunk_idx, own_file = world, rank, rank_file(answers_file, rank, world)
    mine = get_chunk(questions, num_chunks, chunk_idx)
    earlier = [a for path in {answers_file, own_file} for a in read_answers(path)] if resume else []
    others = sorted({str(a.get("model_id")) for a in earlier} - {model_id})
    if others:
        raise ValueError(f"{answers_file}: holds answers of model {others[0]!r}, and this run's is {model_id!r}; "
                         "give another --answers-file, or remove that one to answer afresh")
    done = {answer_key(a) for a in earlier}
    todo = [q for q in mine if question_key(q) not in done]
    return todo, own_file, len(mine) - len(todo)


def finish_share(counts: list, questions, answers_file, resume):
    """Sum the processes' counts; under torchrun rank 0 merges the ranks' files into answers_file. The counts on
    rank 0, None elsewhere."""
    if not dist.is_initialized():
        return tuple(counts)
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor(counts)
    dist.all_reduce(total)  # every rank has closed its file once this returns
    answers_file = Path(answers_file)
    if rank == 0:
        parts = [rank_file(answers_file, r, world) for r in range(world)]
        merge_answers(questions, answers_file, ([answers_file] if resume else []) + parts)
        for part in parts:
            part.unlink()
    return tuple(total.tolist()) if rank == 0 else None

