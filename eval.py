"""LLaVA-1.5 evaluation: answer benchmark questions, evaluate on the toy world, and score answers files offline.

    python eval.py                 the newest trained model (runs/LATEST) on the toy world's held-out questions
    python eval.py generate ...    an official question file -> an answers jsonl (llava/eval/model_vqa_loader.py, ...)
    python eval.py score BENCH ... an answers jsonl -> the paper's number for one benchmark

Answer generation reproduces llava/eval/model_vqa_loader.py (spec §10). Each question line {"question_id", "image",
"text", ...} is asked as "<image>\\n" + text (the benchmark's answer-format suffix is already in text) in the vicuna_v1
template, or the template train.py recorded for the model, and answered greedily, up to 128 new tokens. Each answer is
one line {"question_id", "prompt" (the question's text), "text" (decoded, special tokens skipped, stripped),
"answer_id", "model_id", "metadata": {}}. ScienceQA's json and MMBench's tsv are asked as their own runners ask them
(model_vqa_science.py, model_vqa_mmbench.py with --single-pred-prompt, up to 1024 new tokens; see
science_qa_questions and mmbench_questions). Unlike the official runners:
  - questions go in left-padded batches (the official loader needs batch size 1). In fp32 greedy answers are the
    same; in fp16 or bf16 a batch rounds its matrix products otherwise than one question alone, so an answer that
    hangs on a near tie can change: --batch-size 1 answers as the official runner does;
  - a run resumes: questions already in the answers file are skipped;
  - a question whose image cannot be read is reported on stderr and left out of the file (so a rerun retries it),
    where the official runner crashes; a question without an image is asked as text alone;
  - one process per GPU either by --num-chunks/--chunk-idx (the official scripts' split, merged by `cat`) or by
    torchrun (rank 0 merges the ranks' files in question order).

The toy evaluation asks the toy world's eval.jsonl (data.make_toy_world) and counts exact matches with the ground
truth after light normalization (toy_normalize: surrounding space, case and trailing periods don't count), by
category and by how many objects the question's scene holds (one-object scenes never test binding an object to its
attributes).

The answers file is scored by pure functions of its records and of the ground truth as the benchmark ships it, each
reproducing one official script:

  normalize_answer    EvalAIAnswerProcessor in llava/eval/m4c_evaluator.py (from MMF; the VQA servers' normalization)
  score_vqav2         VQAv2 val accuracy: 10-annotator leave-one-out soft accuracy, m4c TextVQAAccuracyEvaluator
  score_textvqa       llava/eval/eval_textvqa.py (answers matched by image id + question text) + the same evaluator
  score_vizwiz        the same accuracy over val.json, plus the unanswerable F1 of the VizWiz VQA evaluation code
  score_gqa           scripts/convert_gqa_for_eval.py (text.rstrip('.').lower()) + the official GQA eval.py accuracy
  score_pope          llava/eval/eval_pope.py
  score_sqa           llava/eval/eval_science_qa.py (Accuracy and IMG-Accuracy)
  score_mme           MME/convert_answer_to_mme.py + MME eval_tool/calculation.py
  score_mmbench       VLMEvalKit circular evaluation with exact matching (vlmeval/evaluate/multiple_choice.py,
                      vlmeval/utils/matching_util.py), the rule of the MMBench leaderboard LLaVA submits to
  score_seed          scripts/convert_seed_for_submission.py

VQAv2 test-dev and VizWiz test are scored by servers; here they are scored against local annotations in the
format of their val splits. All metrics are percentages, like the paper's table (MME: sum of two percentages).
"""

import argparse
import base64
import binascii
import csv
import io
import json
import math
import os
import re
import sys
import uuid
from collections import defaultdict
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from clip import preprocess_image
from data import (CONV_TEMPLATES, IMAGE_MARKER, DataError, ensure_toy_eval, ensure_toy_world, load_tokenizer,
                  open_image, render, tokenize_prompt)
from llama import check_sampling
from model import DTYPES, CheckpointError, load_llava, read_config

REPO = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------
# answer generation (llava/eval/model_vqa_loader.py)

def split_list(items, n):
    """Chunks of ceil(len / n) items, as the official runners split the questions for --num-chunks. There can be
    fewer than n: 9 questions in 4 chunks are 3 + 3 + 3."""
    size = math.ceil(len(items) / n)
    return [items[i:i + size] for i in range(0, len(items), size)] if items else []


def get_chunk(items, n, k):
    """Chunk k of split_list(items, n); empty where the official get_chunk raises IndexError."""
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


def latest_model(runs_dir):
    """The model directory named by <runs_dir>/LATEST, which train.py writes at the end of every stage."""
    latest = Path(runs_dir) / "LATEST"
    if not latest.is_file():
        raise FileNotFoundError(f"no trained model: {latest} does not exist; train one with `python train.py "
                                "--stage 1` (then `python train.py --stage 2`), or pass --model DIR")
    return latest.read_text().strip()


def trained_template(model_dir):
    """The conversation template the model was trained with (train.py records it in train_config.json), else
    vicuna_v1, the one every LLaVA-1.5 eval script passes. A stage-1 model was trained with "plain"."""
    path = Path(model_dir) / "train_config.json"
    return (json.loads(path.read_text()).get("template") if path.is_file() else None) or "vicuna_v1"


def question_prompt(tokenizer, conv, question):
    """Token ids of a question as model_vqa_loader asks it: "<image>\\n" + text as the user's turn, the assistant's
    turn left open. A question without an image is asked as its text alone."""
    text = question["text"]
    if has_image(question):
        text = IMAGE_MARKER + "\n" + text
    return tokenize_prompt(tokenizer, render(conv, [(0, text), (1, None)]))


def has_image(question):
    return bool(question.get("image") or question.get("image_base64"))


def question_image(question, image_folder):
    """A question's image: its file under image_folder, or (MMBench) the image its tsv row holds in base64."""
    if not question.get("image_base64"):
        return open_image(Path(image_folder) / question["image"])
    try:
        data = io.BytesIO(base64.b64decode(question["image_base64"], validate=True))
    except binascii.Error as error:
        raise DataError(f"the image of question {question['question_id']} is not base64 ({error})") from None
    data.name = f"the image of question {question['question_id']}"  # what open_image's errors call it
    return open_image(data)


def answer_batch(model, tokenizer, conv, questions, image_folder, **sampling):
    """The answer text of each question, from one generate call; a question whose image cannot be read gets its
    DataError instead (and is left out of the batch)."""
    size, aspect_ratio = model.config.vision.image_size, model.config.image_aspect_ratio
    results, prompts, images, asked = [None] * len(questions), [], [], []
    for i, question in enumerate(questions):
        if has_image(question):
            try:
                images.append(preprocess_image(question_image(question, image_folder), size, aspect_ratio))
            except DataError as error:
                results[i] = error
                continue
        prompts.append(question_prompt(tokenizer, conv, question))
        asked.append(i)
    if prompts:
        device = model.language_model.embed_tokens.weight.device
        new_ids = model.generate(prompts, torch.stack(images).to(device) if images else None, **sampling)
        for i, ids in zip(asked, new_ids):
            results[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return results


# The two runners that build their prompts in code (spec §10): model_vqa_science for ScienceQA's json, and
# model_vqa_mmbench for MMBench's tsv, both run with --single-pred-prompt and up to 1024 new tokens.
SINGLE_PRED_PROMPT = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
# pandas.read_table's default missing-value strings: the official runner reads the tsv with pandas, where such a
# cell is NaN, and its is_none also takes the strings "nan" and "none" in any case
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
              "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _is_none(cell):
    return cell is None or cell in _PANDAS_NA or cell.lower() in ("nan", "none")


def science_qa_questions(records, path="the ScienceQA file"):
    """ScienceQA's llava_test_CQM-A.json (a list in LLaVA's conversation format), asked as model_vqa_science: the
    first turn without its "<image>", then the instruction to answer with a letter; "<image>\\n" goes before it
    where the record has an image. The answer's prompt keeps that "<image>": eval_science_qa.py counts those
    questions for IMG-Accuracy, the number LLaVA reports."""
    questions = []
    for number, record in enumerate(records, start=1):
        try:
            text = record["conversations"][0]["value"].replace(IMAGE_MARKER, "").strip()
            question = {"question_id": record["id"], "text": text + "\n" + SINGLE_PRED_PROMPT["en"]}
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(f"{path}: record {number} has no id and first conversation turn") from None
        if "image" in record:
            question.update(image=record["image"], prompt=IMAGE_MARKER + "\n" + question["text"])
        questions.append(question)
    return questions


def mmbench_questions(rows, lang="en", all_rounds=False, path="the MMBench file"):
    """MMBench's tsv, asked as model_vqa_mmbench: the hint (where there is one), the question and each option as
    "A. ...", a line each, then the instruction to answer with a letter (in Chinese for MMBench-CN: lang "cn"). The
    image is the row's own, in base64 (newer tsvs may name another row's index instead of repeating its image).
    all_rounds (the official --all-rounds) asks a question once per rotation of its options; each answer records its
    round_id, the options in the order shown and their letters in the tsv (option_char), which score_mmbench maps
    back. The answer's prompt is the text without the instruction, as the official runner writes it."""
    if rows and not {"index", "question", "image", "A", "B"} <= rows[0].keys():
        raise ValueError(f"{path}: an MMBench tsv needs the columns index, question, image, A, B, ...")
    images = {row["index"]: row["image"] for row in rows}
    questions = []
    for row in rows:
        options = []
        for letter in "ABCD":  # the options up to the first empty one, as the official get_options
            if _is_none(row.get(letter)):
                break
            options.append(row[letter])
        letters = list("ABCD"[:len(options)])
        hint = [] if _is_none(row.get("hint")) else [row["hint"]]
        for round_id in range(len(options) if all_rounds else 1):
            text = "\n".join(hint + [row["question"]] + [f"{c}. {option}" for c, option in zip("ABCD", options)])
            questions.append({"question_id": int(row["index"]), "text": text + "\n" + SINGLE_PRED_PROMPT[lang],
                              "prompt": text, "image_base64": images.get(row["image"], row["image"]),
                              "answer_fields": {"round_id": round_id, "options": options, "option_char": letters}})
            options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    return questions


# What identifies a question, and the answer to it: the id alone does not (TextVQA's is the image id, MME's the
# image file, an MMBench question's rounds share theirs), so the prompt goes with it: the question's text, or what
# the official runner records instead (ScienceQA, MMBench: see their questions' "prompt").
def _question_key(question):
    return question["question_id"], recorded_prompt(question)


def recorded_prompt(question):
    """What an answer records as its prompt: the question's text, or what the official runner records instead."""
    return question.get("prompt", question["text"])


def _answer_key(answer):
    return answer["question_id"], answer["prompt"]


def read_answers(path):
    """The answers already in a file, [] if there is none. Every answer is written as one line with its newline, so
    a last line without one was cut off (a crash, a kill): it does not count, and its question is answered again."""
    if not os.path.exists(path):
        return []
    with open_text(path) as f:
        text = f.read()
    return _parse_jsonl(text[:text.rfind("\n") + 1].split("\n"), path, required=("question_id", "prompt"))


def open_for_append(path):
    """Open an answers file to add lines to, first cutting off a partial last line (see read_answers)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def answer_questions(model, tokenizer, conv, questions, image_folder, answers, model_id, batch_size, progress,
                     **sampling):
    """Answer questions in batches, one line each to the open file `answers`; returns the ids that failed."""
    failed = []
    with tqdm(total=len(questions), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            for question, result in zip(batch, answer_batch(model, tokenizer, conv, batch, image_folder, **sampling)):
                if isinstance(result, DataError):
                    tqdm.write(f"question {question['question_id']}: failed: {result}", file=sys.stderr)
                    failed.append(question["question_id"])
                    continue
                answers.write(json.dumps(dict(question_id=question["question_id"], prompt=recorded_prompt(question),
                                              text=result, **question.get("answer_fields", {}),
                                              answer_id=uuid.uuid4().hex, model_id=model_id, metadata={})) + "\n")
            answers.flush()  # a crash loses at most this batch
            bar.update(len(batch))
    return failed


def merge_answers(questions, answers_file, sources):
    """The answers of the source files, in question order, replace answers_file (written to a temporary file and
    renamed, so a crash here loses nothing)."""
    by_key = {}
    for path in sources:
        for record in read_answers(path):
            by_key.setdefault(_answer_key(record), record)
    tmp = answers_file.with_name(answers_file.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(by_key[_question_key(q)]) + "\n" for q in questions if _question_key(q) in by_key)
    os.replace(tmp, answers_file)


def _rank_file(answers_file, rank, world):  # answers.jsonl -> answers.rank0-of-8.jsonl
    return answers_file.with_name(f"{answers_file.stem}.rank{rank}-of-{world}{answers_file.suffix}")


def resolve_device(name):
    """"auto" is the GPU if there is one; under torchrun each rank takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def resolve_dtype(name, device):
    if name == "auto":  # the official runners load the model in float16
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def run_generation(args, model_dir, questions, image_folder, answers_file, num_chunks=1, chunk_idx=0, resume=True):
    """Answer this process's chunk of `questions` into answers_file, resuming it, or with resume=False starting it
    afresh. Under torchrun, rank r answers chunk r into its own file, and rank 0 merges them into answers_file.
    Returns (answered, failed, skipped as already answered), summed over the processes, on rank 0; None elsewhere."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    answers_file = own_file = Path(answers_file)
    if world > 1:
        if num_chunks > 1:
            raise ValueError("shard the questions with torchrun or with --num-chunks, not both")
        # the process group only carries the counts and the barrier before the merge (gloo works with any device);
        # ranks can finish hours apart, hence the long timeout
        dist.init_process_group("gloo", timeout=timedelta(days=1))
        num_chunks, chunk_idx, own_file = world, rank, _rank_file(answers_file, rank, world)
    mine = get_chunk(questions, num_chunks, chunk_idx)
    earlier = [a for path in {answers_file, own_file} for a in read_answers(path)] if resume else []
    model_id = Path(model_dir).resolve().name
    others = sorted({str(a.get("model_id")) for a in earlier} - {model_id})
    if others:  # the scores would mix two models' answers
        raise ValueError(f"{answers_file}: holds answers of model {others[0]!r}, and this run's is {model_id!r}; "
                         "give another --answers-file, or remove that one to answer afresh")
    done = {_answer_key(a) for a in earlier}
    todo = [q for q in mine if _question_key(q) not in done]
    if todo:  # a finished run does not even load the model
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        conv_mode = args.conv_mode or trained_template(model_dir)
        batch_size = args.batch_size or (8 if device.type == "cuda" else 4)
        if rank == 0:
            print(f"{model_dir}: template {conv_mode}, batch {batch_size}, {device}, {dtype}, up to "
                  f"{args.max_new_tokens} new tokens; answering into {answers_file}", flush=True)
        # before the answers file is touched: a model that cannot be loaded leaves no file behind; what is quick to
        # find missing first (a config, a tokenizer), not after the weights' minutes
        read_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
        model = load_llava(model_dir, args.vision_tower, dtype, device)
    if not resume and own_file.exists():
        own_file.unlink()

    failed = []
    with open_for_append(own_file) as answers:
        if todo:
            failed = answer_questions(model, tokenizer, CONV_TEMPLATES[conv_mode], todo, image_folder, answers,
                                      model_id, batch_size, progress=rank == 0,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p)
    counts = torch.tensor([len(todo) - len(failed), len(failed), len(mine) - len(todo)])
    if world > 1:
        dist.all_reduce(counts)  # every rank has closed its file once this returns
        if rank == 0:
            parts = [_rank_file(answers_file, r, world) for r in range(world)]
            merge_answers(questions, answers_file, ([answers_file] if resume else []) + parts)
            for part in parts:
                part.unlink()
        # leave together: a gloo rank that tears down while a peer is still busy can abort ("terminate called...")
        dist.barrier()
        dist.destroy_process_group()
    return tuple(counts.tolist()) if rank == 0 else None


# ---------------------------------------------------------------------------------------------------------------
# answer normalization (VQAv2, TextVQA, VizWiz)

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# the original list also has ',' and '?', but normalize_answer deletes those first
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", "!"]
# the original pattern (?!<=\d)(\.)(?!\d) meant a look-behind but wrote a look-ahead that always passes,
# so only "followed by a digit" protects a period: "10.5" keeps it, "yes." and "mr. smith" lose it
_PERIOD = re.compile(r"\.(?!\d)")
# the VQA evaluation's table as is; keys like "Im" or "ow's'at" can never match after the steps above
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_answer(text):
    """EvalAIAnswerProcessor: 'Two dogs.' -> '2 dogs', 'a dog' -> 'dog', 'dont' -> "don't", '10.5' stays."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # a mark next to a space is deleted, one inside a word ("red-white") becomes a space; the test looks at the
    # text before any mark was touched (the VQA code's digit,digit exception cannot fire: commas are gone)
    before = text
    for mark in _PUNCTUATION:
        text = text.replace(mark, "" if f"{mark} " in before or f" {mark}" in before else " ")
    # the original passes re.UNICODE (== 32) where re.sub takes `count`: at most 32 periods go
    text = _PERIOD.sub("", text, count=32)
    words = [_NUMBERS.get(word, word) for word in text.split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the scorers

def _percent(hits):
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def _by_key(answers, key):
    """Answer records by `key(record)`; two answers to one question are an error, not a silent overwrite."""
    index = {}
    for answer in answers:
        k = key(answer)
        if k in index:
            raise ValueError(f"two answers for question_id {answer['question_id']!r}")
        index[k] = answer
    return index


def _unknown(question_id):
    return ValueError(f"answer for unknown question_id {question_id!r}: it is not in the ground truth")


# ---------------------------------------------------------------------------------------------------------------
# VQAv2, TextVQA, VizWiz: soft accuracy against 10 human answers

def vqa_accuracy(prediction, gt_answers):
    """Mean over the leave-one-annotator-out subsets of min(1, #matches / 3): 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9."""
    prediction = normalize_answer(prediction)
    gt_answers = [normalize_answer(answer) for answer in gt_answers]
    matches = [answer == prediction for answer in gt_answers]
    return sum(min(1.0, (sum(matches) - left_out) / 3) for left_out in matches) / len(matches)


def _vqa_report(scored):
    """scored: (prediction, gt_answers, answer_type) per answered question."""
    by_type = defaultdict(list)
    for prediction, gt_answers, answer_type in scored:
        by_type[answer_type].append(vqa_accuracy(prediction, gt_answers))
    every = [accuracy for accuracies in by_type.values() for accuracy in accuracies]
    report = {"accuracy": _percent(every), "questions": len(every)}
    if None not in by_type:
        report["by_answer_type"] = {t: _percent(by_type[t]) for t in sorted(by_type)}
    return report


def score_vqav2(answers, annotations):
    """annotations: the parsed v2_mscoco_val2014_annotations.json ({"annotations": [...]}).

    Like m4c, this normalizes the human answers too; the VQA server's vqaEval.py only cleans them when the ten
    disagree, which differs only where the annotation file holds an unnormalized answer."""
    truth = {a["question_id"]: a for a in annotations["annotations"]}
    scored = []
    for answer in _by_key(answers, lambda a: a["question_id"]).values():
        if answer["question_id"] not in truth:
            raise _unknown(answer["question_id"])
        ann = truth[answer["question_id"]]
        scored.append((answer["text"], [a["answer"] for a in ann["answers"]], ann["answer_type"]))
    return _vqa_report(scored)


def _textvqa_question(prompt):
    # the LLaVA prompt is "question\nReference OCR token: ...\nAnswer the question using a single word or phrase."
    return next(line for line in prompt.split("\n") if not line.startswith("Reference OCR token:"))


def score_textvqa(answers, annotations):
    """annotations: the parsed TextVQA_0.5.1_val.json ({"data": [...]}).

    LLaVA's question_id is the TextVQA image_id, so, as eval_textvqa.py does, an answer is matched by
    (image_id, question text lower-cased)."""
    truth = {(a["image_id"], a["question"].lower()): a for a in annotations["data"]}
    scored = []
    for key, answer in _by_key(answers, lambda a: (a["question_id"], _textvqa_question(a["prompt"]).lower())).items():
        if key not in truth:
            raise _unknown(answer["question_id"])
        scored.append((answer["text"], truth[key]["answers"], None))
    return {**_vqa_report(scored), "unanswered": len(truth) - len(scored)}  # official also scores the answered only


def score_vizwiz(answers, questions, annotations):
    """questions: LLaVA's VizWiz question jsonl records (question_id -> image); annotations: the parsed val.json list.

    "unanswerable" is an ordinary answer string for the accuracy, as in the official code; its separate
    unanswerability metric is the F1 of predicting "unanswerable" against answerable == 0. Questions without an
    answer are left out and counted (the official converter refuses such a file)."""
    image_of = {q["question_id"]: q["image"] for q in questions}
    truth = {a["image"]: a for a in annotations}
    scored, tp, fp, fn = [], 0, 0, 0
    for answer in _by_key(answers, lambda a: a["question_id"]).values():
        if image_of.get(answer["question_id"]) not in truth:
            raise _unknown(answer["question_id"])
        ann = truth[image_of[answer["question_id"]]]
        scored.append((answer["text"], [a["answer"] for a in ann["answers"]], ann["answer_type"]))
        said_unanswerable = normalize_answer(answer["text"]) == "unanswerable"
        is_unanswerable = ann["answerable"] == 0
        tp += said_unanswerable and is_unanswerable
        fp += said_unanswerable and not is_unanswerable
        fn += is_unanswerable and not said_unanswerable
    report = _vqa_report(scored)
    report["unanswerable_f1"] = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    report["unanswered"] = len({q["question_id"] for q in questions}) - len(scored)
    return report


# ---------------------------------------------------------------------------------------------------------------
# GQA: exact match

def score_gqa(answers, questions):
    """questions: the parsed testdev_balanced_questions.json ({question_id: {"answer", "types", ...}}).

    Questions without an answer are left out and counted (GQA's eval.py stops at the first one)."""
    hits = defaultdict(list)
    for answer in _by_key(answers, lambda a: str(a["question_id"])).values():
        question = questions.get(str(answer["question_id"]))
        if question is None:
            raise _unknown(answer["question_id"])
        correct = answer["text"].rstrip(".").lower() == question["answer"]
        # GQA's eval.py calls a question "open" when its structural type is query, "binary" otherwise
        hits["open" if question["types"]["structural"] == "query" else "binary"].append(correct)
    every = hits["binary"] + hits["open"]
    return {"accuracy": _percent(every), "binary": _percent(hits["binary"]), "open": _percent(hits["open"]),
            "questions": len(every), "unanswered": len(questions) - len(every)}


# ---------------------------------------------------------------------------------------------------------------
# POPE: yes/no object hallucination

def pope_yes_no(text):
    """Only the first sentence counts; 'No', 'no' or 'not' among its words means no, anything else yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def score_pope(answers, questions, labels):
    """questions: llava_pope_test.jsonl records (question_id, category); labels: {category: records of
    coco_pope_{category}.json in file order}.

    eval_pope.py pairs a category's answers with its label file line by line (the two files number their questions
    differently), so every question needs an answer. The order of the pairs is the question file's: the same as the
    official one when the answers came out in question order, still right when they did not."""
    by_id = _by_key(answers, lambda a: a["question_id"])
    known = {q["question_id"] for q in questions}
    for question_id in by_id:
        if question_id not in known:
            raise _unknown(question_id)
    report = {"categories": {}}
    for category, label_lines in labels.items():
        in_category = [q["question_id"] for q in questions if q["category"] == category]
        if len(in_category) != len(label_lines):
            raise ValueError(f"POPE {category}: {len(in_category)} questions but {len(label_lines)} labels")
        missing = [question_id for question_id in in_category if question_id not in by_id]
        if missing:
            raise ValueError(f"POPE {category}: no answer for question_id {missing[0]!r}")
        said_yes = [pope_yes_no(by_id[question_id]["text"]) == "yes" for question_id in in_category]
        is_yes = [line["label"] != "no" for line in label_lines]
        tp = sum(s and y for s, y in zip(said_yes, is_yes))
        fp = sum(s and not y for s, y in zip(said_yes, is_yes))
        tn = sum(not s and not y for s, y in zip(said_yes, is_yes))
        fn = sum(not s and y for s, y in zip(said_yes, is_yes))
        # 0 where eval_pope.py would divide by zero
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report["categories"][category] = {
            "TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": 100.0 * (tp + tn) / len(said_yes),
            "precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1, "yes_ratio": _percent(said_yes)}
    # the number LLaVA reports is the F1 averaged over the three categories
    report["mean_f1"] = sum(c["f1"] for c in report["categories"].values()) / len(report["categories"])
    return report


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG: multiple choice among up to five options

SQA_OPTIONS = ("A", "B", "C", "D", "E")


def sqa_letter(text):
    """'B', 'B. sandstone' or a single 'The answer is B.' give 'B'; anything else is 'FAILED'."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)  # the '.' is unescaped in the original: any character
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(answers, problems, pid_splits, split="test"):
    """problems / pid_splits: the parsed problems.json and pid_splits.json of ScienceQA.

    A question without an answer counts as FAILED, as in eval_science_qa.py. IMG-Accuracy (the number LLaVA reports)
    is over the answers whose prompt holds "<image>", as the original reads it (model_vqa_science writes it for the
    questions with an image): a question left unanswered counts against Accuracy but not in IMG-Accuracy."""
    if split not in pid_splits:
        raise ValueError(f"pid_splits.json has no split {split!r}")
    split_pids = set(pid_splits[split])
    by_pid = _by_key(answers, lambda a: str(a["question_id"]))
    for pid in by_pid:
        if pid not in split_pids:
            raise _unknown(pid)
    hits, image_hits, failed = [], [], 0
    for pid in pid_splits[split]:
        problem = problems[pid]
        letter = sqa_letter(by_pid[pid]["text"] if pid in by_pid else "FAILED")
        failed += letter == "FAILED"
        # a letter beyond the question's choices is as wrong as no letter
        valid = SQA_OPTIONS[:len(problem["choices"])]
        hits.append(letter in valid and valid.index(letter) == problem["answer"])
        if IMAGE_MARKER in by_pid.get(pid, {}).get("prompt", ""):
            image_hits.append(hits[-1])
    return {"accuracy": _percent(hits), "img_accuracy": _percent(image_hits), "questions": len(hits),
            "img_questions": len(image_hits), "failed": failed}


# ---------------------------------------------------------------------------------------------------------------
# MME: two yes/no questions per image

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_yes_no(text):
    """calculation.py: exactly yes/no, else whichever of 'yes', 'no' occurs in the first 4 characters, else other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def _mme_question(question):
    # LLaVA asks with its short-answer suffix, the ground truth holds MME's "Please answer yes or no."
    # (sometimes after two spaces): compare what is left of both
    question = question.replace("Answer the question using a single word or phrase.", "")
    return question.replace("Please answer yes or no.", "").strip()


def score_mme(answers, ground_truth):
    """ground_truth: records {"category", "file", "question", "answer"} read from MME_Benchmark_release_version.

    acc = right questions / questions, acc+ = images with both questions right / images, and a category's score
    is acc + acc+ (in percent, max 200); perception and cognition are the sums over their categories."""
    truth = {(r["category"], r["file"], _mme_question(r["question"])): r["answer"].lower() for r in ground_truth}
    hits, image_hits = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for answer in _by_key(answers, lambda a: (a["question_id"], a["prompt"])).values():
        # question_id is "category/[images/]name.ext"; the ground truth of that image is in name.txt
        category, name = answer["question_id"].split("/")[0], answer["question_id"].split("/")[-1]
        key = (category, name.rsplit(".", 1)[0] + ".txt", _mme_question(answer["prompt"]))
        if key not in truth:
            raise _unknown(answer["question_id"])
        correct = mme_yes_no(answer["text"]) == truth[key]
        hits[category].append(correct)
        image_hits[category][answer["question_id"]].append(correct)
    order = MME_PERCEPTION + MME_COGNITION
    categories = {}
    for category in sorted(hits, key=lambda c: order.index(c) if c in order else len(order)):
        acc = _percent(hits[category])
        acc_plus = _percent([all(image) for image in image_hits[category].values()])
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"categories": categories,
            "perception": float(sum(c["score"] for name, c in categories.items() if name in MME_PERCEPTION)),
            "cognition": float(sum(c["score"] for name, c in categories.items() if name in MME_COGNITION))}


# ---------------------------------------------------------------------------------------------------------------
# MMBench: circular evaluation

def mmbench_letter(text, choices):
    """VLMEvalKit's can_infer: the one option letter standing alone in the text, else the one option whose text
    the answer contains; None when neither is unique (exact matching: no GPT judge)."""
    spaced = text
    for mark in ".()[],:;!*#{}":
        spaced = spaced.replace(mark, " ")
    words = spaced.split()
    letters = [letter for letter in choices if letter in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in words:
        return None  # 'Z' is VLMEvalKit's "none of the options"; it stops the text match
    texts = [letter for letter, option in choices.items() if str(option).lower() in text.lower()]
    return texts[0] if len(texts) == 1 else None


def score_mmbench(answers, rows):
    """rows: the MMBench tsv rows (index, question, A..D, answer, category, l2-category, ...).

    The dev tsv already holds each question's circular shifts as rows with index + k * 1e6; a question counts as
    right only if every one of its rows is answered right. Answers written with --all-rounds (round_id, options,
    option_char: the options as shown and their letters in the tsv row) are mapped back to the row's letters."""
    by_index = {int(row["index"]): row for row in rows}
    group_hits, answered = defaultdict(list), set()
    for answer in _by_key(answers, lambda a: (a["question_id"], a.get("round_id", 0))).values():
        index = int(answer["question_id"])
        if index not in by_index:
            raise _unknown(answer["question_id"])
        row = by_index[index]
        shown = answer.get("options") or [row[letter] for letter in "ABCD" if row.get(letter)]
        tsv_letter = dict(zip("ABCD", answer.get("option_char") or "ABCD"))
        letter = mmbench_letter(answer["text"], dict(zip("ABCD", shown)))
        group_hits[index % 1_000_000].append(letter is not None and tsv_letter[letter] == row["answer"])
        answered.add(index)
    # a row nobody answered fails its question, as the prediction "None" does on the leaderboard
    for index in by_index.keys() - answered:
        group_hits[index % 1_000_000].append(False)
    right = {index: all(group_hits[index]) for index in by_index if index < 1_000_000}
    report = {"accuracy": _percent(list(right.values())), "questions": len(right)}
    for column in ("category", "l2-category"):
        groups = defaultdict(list)
        for index, is_right in right.items():
            if by_index[index].get(column):
                groups[by_index[index][column]].append(is_right)
        if groups:
            report[f"by_{column.replace('-', '_')}"] = {name: _percent(groups[name]) for name in sorted(groups)}
    return report


# ---------------------------------------------------------------------------------------------------------------
# SEED-Bench: exact letter match

def score_seed(answers, annotations):
    """annotations: the parsed SEED-Bench.json ({"questions": [...], "question_type": {name: id}}).

    Right means text == answer exactly ("A." is wrong); a question without an answer is wrong."""
    by_id = _by_key(answers, lambda a: str(a["question_id"]))
    known = {str(q["question_id"]) for q in annotations["questions"]}
    for question_id in by_id:
        if question_id not in known:
            raise _unknown(question_id)
    type_name = {type_id: name for name, type_id in annotations["question_type"].items()}
    hits, by_data, by_type = [], defaultdict(list), defaultdict(list)
    for question in annotations["questions"]:
        answer = by_id.get(str(question["question_id"]))
        hits.append(answer is not None and answer["text"] == question["answer"])
        by_data[question["data_type"]].append(hits[-1])
        by_type[type_name[question["question_type_id"]]].append(hits[-1])
    return {"accuracy": _percent(hits), "questions": len(hits),
            "by_data_type": {name: _percent(by_data[name]) for name in sorted(by_data)},
            "by_question_type": {name: _percent(by_type[name]) for name in sorted(by_type)}}


# ---------------------------------------------------------------------------------------------------------------
# the toy world: exact match

def toy_normalize(text):
    """'Yellow.' -> 'yellow': surrounding space, case and trailing periods don't count; nothing else is forgiven."""
    return text.strip().lower().rstrip(".").strip()


def score_toy(answers, questions):
    """questions: the toy world's eval.jsonl records (question_id, category, answer, and objects where the world
    has it). A question without an answer (its image could not be read) is wrong. Categories are listed in the order
    they first appear. `by_objects` splits the questions by how many objects their scene holds: a question about one
    of several objects needs the model to bind the object to its attributes, which one-object scenes never test."""
    by_id = _by_key(answers, lambda a: a["question_id"])
    known = {q["question_id"] for q in questions}
    for question_id in by_id:
        if question_id not in known:
            raise _unknown(question_id)
    hits, by_objects = defaultdict(list), defaultdict(list)
    for question in questions:
        answer = by_id.get(question["question_id"])
        hit = answer is not None and toy_normalize(answer["text"]) == toy_normalize(question["answer"])
        hits[question["category"]].append(hit)
        by_objects[question.get("objects")].append(hit)
    every = [hit for category_hits in hits.values() for hit in category_hits]

    def row(h):
        return {"accuracy": _percent(h), "right": sum(h), "questions": len(h)}
    report = {**row(every), "by_category": {category: row(h) for category, h in hits.items()}}
    if None not in by_objects:  # worlds made before `objects` was recorded have no split
        report["by_objects"] = {n: row(by_objects[n]) for n in sorted(by_objects)}
    return report


# ---------------------------------------------------------------------------------------------------------------
# reading the files each benchmark ships

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
        return _parse_jsonl(f, path, required)


def _parse_jsonl(lines, path, required=()):
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


def read_pope_labels(directory):
    """{category: lines} from the coco_pope_{category}.json files (jsonl despite the name) of a directory."""
    labels = {path.name[len("coco_pope_"):-len(".json")]: read_jsonl(path)
              for path in sorted(Path(directory).glob("coco_pope_*.json"))}
    if not labels:
        raise ValueError(f"{directory}: no coco_pope_*.json label files")
    return labels


def read_mme_ground_truth(root):
    """MME_Benchmark_release_version: per category, one name.txt per image with 'question<TAB>Yes|No' lines; the
    five categories with an images/ folder keep them in questions_answers_YN/."""
    records = []
    for category_dir in sorted(path for path in Path(root).iterdir() if path.is_dir()):
        qa_dir = category_dir / "questions_answers_YN"
        for txt in sorted((qa_dir if qa_dir.is_dir() else category_dir).glob("*.txt")):
            with open_text(txt) as f:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    fields = line.strip().split("\t")
                    if len(fields) != 2:
                        raise ValueError(f"{txt}:{line_number}: not 'question<TAB>answer'")
                    records.append({"category": category_dir.name, "file": txt.name,
                                    "question": fields[0], "answer": fields[1]})
    return records


def score_files(bench, answers_path, annotations, questions=None, split="test"):
    """Read the files of one benchmark and score them (the inputs each bench takes are listed in SCORE_INPUTS)."""
    check_input("--answers", answers_path)
    if bench in ("vizwiz", "pope"):
        if questions is None:
            raise ValueError(f"{bench} needs --questions (LLaVA's question jsonl)")
        check_input("--questions", questions)
    check_input("--annotations", annotations, "directory" if bench in ("pope", "sqa", "mme") else "file")
    if bench == "sqa":
        for name in ("problems.json", "pid_splits.json"):
            if not (Path(annotations) / name).is_file():
                raise FileNotFoundError(f"--annotations {annotations}: no {name} in it")
    answers = read_jsonl(answers_path, required=("question_id", "prompt", "text"))
    if bench == "vqav2":
        return score_vqav2(answers, read_json(annotations))
    if bench == "textvqa":
        return score_textvqa(answers, read_json(annotations))
    if bench == "vizwiz":
        return score_vizwiz(answers, read_jsonl(questions), read_json(annotations))
    if bench == "gqa":
        return score_gqa(answers, read_json(annotations))
    if bench == "pope":
        return score_pope(answers, read_jsonl(questions), read_pope_labels(annotations))
    if bench == "sqa":
        base = Path(annotations)
        return score_sqa(answers, read_json(base / "problems.json"), read_json(base / "pid_splits.json"), split)
    if bench == "mme":
        return score_mme(answers, read_mme_ground_truth(annotations))
    if bench == "mmbench":
        return score_mmbench(answers, read_tsv(annotations))
    if bench == "seed":
        return score_seed(answers, read_json(annotations))
    raise ValueError(f"unknown benchmark {bench!r}")


# ---------------------------------------------------------------------------------------------------------------
# printing

def _cell(value):
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_report(title, report):
    """A scorer's dict as text: numbers one per line, per-group numbers indented, per-group dicts as a table."""
    lines = [title]
    for key, value in report.items():
        if not isinstance(value, dict):
            lines.append(f"{key:<16}{_cell(value):>10}")
            continue
        lines.append(f"{key}:")
        width = max((len(name) for name in value), default=0) + 2
        rows = list(value.values())
        if rows and isinstance(rows[0], dict):
            lines.append(" " * (width + 2) + "".join(f"{column:>11}" for column in rows[0]))
            lines += [f"  {name:<{width}}" + "".join(f"{_cell(cell):>11}" for cell in row.values())
                      for name, row in value.items()]
        else:
            lines += [f"  {name:<{width}}{_cell(cell):>10}" for name, cell in value.items()]
    return "\n".join(lines)


def format_toy_table(report):
    """score_toy's dict as a table: one row per category, then the overall row, then (where the world records it)
    one row per scene size."""
    sections = [("category", [*report["by_category"].items(), ("overall", report)])]
    if "by_objects" in report:
        sections.append(("scene of", [(f"{n} object{'s' * (n != 1)}", row) for n, row in report["by_objects"].items()]))
    width = max(len(name) for header, rows in sections for name in [header] + [name for name, _ in rows]) + 2
    return "\n\n".join("\n".join(
        [f"{header:<{width}}{'right':>7}{'questions':>11}{'accuracy':>10}"]
        + [f"{name:<{width}}{row['right']:>7}{row['questions']:>11}{row['accuracy']:>10.2f}" for name, row in rows])
        for header, rows in sections)
# ---------------------------------------------------------------------------------------------------------------
# command line

def model_directory(args):
    """--model, else the one <runs-dir>/LATEST names; checked before anything is printed, drawn or written."""
    model_dir = args.model or latest_model(args.runs_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    return model_dir


def evaluate_toy(args):
    """The bare `python eval.py`: the toy world's held-out questions, answered afresh, scored, printed as a table."""
    model_dir = model_directory(args)
    world = ensure_toy_world(Path(args.runs_dir) / "toy" / "world")
    if args.toy_scenes:  # a larger set, for comparing training recipes
        world = ensure_toy_eval(world["root"], args.toy_scenes)
    questions = read_jsonl(world["eval"], required=("question_id", "text", "category", "answer"))
    args.max_new_tokens = args.max_new_tokens or 128
    # afresh, not resumed: training a stage again overwrites its model directory, and this takes seconds. A larger
    # set has its own file, so that it does not replace the default run's answers
    name = f"toy_eval_answers_{args.toy_scenes}scenes.jsonl" if args.toy_scenes else "toy_eval_answers.jsonl"
    answers_file = Path(args.answers_file or Path(model_dir).parent / name)
    counts = run_generation(args, model_dir, questions, world["images"], answers_file, resume=False)
    if counts is None:
        return
    print(f"toy evaluation of {model_dir} on {world['eval']}: {counts[1]} failed; answers in {answers_file}")
    print("exact match after toy_normalize (surrounding space, case and trailing periods ignored)")
    print(format_toy_table(score_toy(read_jsonl(answers_file), questions)))


def read_questions(args):
    """The question file as its official runner reads it, and that runner's new-token limit: a jsonl
    (model_vqa_loader; model_vqa for LLaVA-Bench and MM-Vet), ScienceQA's json, MMBench's tsv."""
    path = args.question_file
    check_input("--question-file", path)
    if path.endswith(".json"):
        records = read_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json question file is ScienceQA's list in LLaVA's conversation format")
        return science_qa_questions(records, path), 1024
    if path.endswith(".tsv"):
        return mmbench_questions(read_tsv(path), args.lang, args.all_rounds, path), 1024
    return read_jsonl(path, required=("question_id", "text")), 128


def generate_answers(args):
    """`python eval.py generate`: a question file -> an answers jsonl, resumed if it exists."""
    questions, max_new_tokens = read_questions(args)
    args.max_new_tokens = args.max_new_tokens or max_new_tokens
    model_dir = model_directory(args)
    if args.image_folder:
        check_input("--image-folder", args.image_folder, "directory")
    counts = run_generation(args, model_dir, questions, args.image_folder, args.answers_file, args.num_chunks,
                            args.chunk_idx)
    if counts is not None:
        answered, failed, skipped = counts
        print(f"{answered} answered, {failed} failed, {skipped} already answered: {args.answers_file}"
              + (" (run again to retry the failed ones)" if failed else ""))
        if failed and not answered and not skipped:  # not a run to score
            print(f"error: none of the {failed} questions was answered (each one's reason is above); is "
                  f"--image-folder {args.image_folder or '(none given)'} right?", file=sys.stderr)
            sys.exit(1)


def positive_int(text):
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"need a positive whole number, not {text!r}")
    return int(text)


def add_generation_options(parser, defaults=True):
    """The options the toy evaluation and `generate` share. Under `generate` (defaults=False) an option not given
    keeps what was given before the subcommand; with defaults there, argparse would reset it."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--model", default=default(None),
                        help="the model directory: llava-hf layout (ours) or the original LLaVA layout "
                             "(default: the one <runs-dir>/LATEST names)")
    parser.add_argument("--runs-dir", default=default(str(REPO / "runs")),
                        help="train.py's output folder, holding LATEST and toy/world (default: runs/ in the repo)")
    parser.add_argument("--vision-tower", default=default(None),
                        help="the CLIP directory of an original-layout model (default: its config's mm_vision_tower)")
    parser.add_argument("--conv-mode", default=default(None), choices=list(CONV_TEMPLATES), metavar="TEMPLATE",
                        help=f"conversation template: {', '.join(CONV_TEMPLATES)} (default: the one in the "
                             "model's train_config.json, else vicuna_v1, as every LLaVA-1.5 eval script)")
    parser.add_argument("--batch-size", type=positive_int, default=default(None),
                        help="questions per generate call (default: 8 on a GPU, 4 on the CPU; the official runner "
                             "takes 1, and in fp16 a batch can change an answer that hangs on a near tie)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=default(None),
                        help="default: as the official runner, 128 for a question jsonl (model_vqa_loader), 1024 for "
                             "ScienceQA's json and MMBench's tsv; give 1024 for LLaVA-Bench's and MM-Vet's jsonl, "
                             "whose runner (model_vqa) generates up to that")
    parser.add_argument("--temperature", type=float, default=default(0.0), help="default: 0, greedy")
    parser.add_argument("--top-p", type=float, default=default(1.0), help="nucleus sampling (default: 1, off)")
    parser.add_argument("--device", default=default("auto"),
                        help="auto (default: the GPU if there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=default("auto"), choices=["auto", *DTYPES],
                        help="default: auto, fp16 on a GPU (as the official runners) and fp32 on the CPU")


EXAMPLES = """\
examples:
  python eval.py                                  # runs/LATEST on the toy world
  python eval.py --toy-scenes 600                 # ... on 1800 questions, to compare training recipes
  python eval.py generate --model runs/stage2/model --question-file llava_gqa_testdev_balanced.jsonl \\
      --image-folder gqa/images --answers-file answers/gqa.jsonl
  python eval.py score gqa --answers answers/gqa.jsonl --annotations testdev_balanced_questions.json

Errors in the input files (a malformed line, a missing model) exit with status 2.
"""

GENERATE_EXAMPLES = """\
Each question line is {"question_id", "image" (optional, relative to --image-folder), "text", ...}; each answer line
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}. An existing answers file is resumed: its
questions are skipped. A question whose image cannot be read is named on stderr and left out (rerun to retry it).
ScienceQA's llava_test_CQM-A.json and MMBench's tsv (images inside it: no --image-folder) are asked as their own
official runners ask them, with the instruction to answer with the option's letter (mmbench answers add round_id,
options and option_char):
  python eval.py generate --question-file llava_test_CQM-A.json --image-folder scienceqa/images/test \\
      --answers-file answers/sqa.jsonl
  python eval.py generate --question-file mmbench_dev_20230712.tsv --answers-file answers/mmbench.jsonl

several GPUs, the official way (one process per chunk, then concatenate):
  for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python eval.py generate --num-chunks 4 --chunk-idx $i \\
      --question-file Q.jsonl --image-folder IMAGES --answers-file answers/4_$i.jsonl & done; wait
  cat answers/4_{0,1,2,3}.jsonl > answers/merged.jsonl
or with torchrun (rank 0 merges, in question order):
  torchrun --nproc_per_node 4 eval.py generate --question-file Q.jsonl --image-folder IMAGES --answers-file A.jsonl
"""

SCORE_INPUTS = """\
what each benchmark reads (the files of the LLaVA-1.5 eval data and of the benchmarks themselves):
  vqav2    --annotations v2_mscoco_val2014_annotations.json
  textvqa  --annotations TextVQA_0.5.1_val.json
  vizwiz   --questions QUESTIONS.jsonl (LLaVA format: question_id, image)  --annotations val.json
  gqa      --annotations testdev_balanced_questions.json
  pope     --questions llava_pope_test.jsonl  --annotations DIR holding coco_pope_{adversarial,popular,random}.json
  sqa      --annotations DIR holding problems.json and pid_splits.json  [--split test]
  mme      --annotations MME_Benchmark_release_version/
  mmbench  --annotations mmbench_dev_20230712.tsv
  seed     --annotations SEED-Bench.json

example:
  python eval.py score pope --answers answers/pope.jsonl --questions llava_pope_test.jsonl --annotations pope/coco
"""


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate LLaVA-1.5. Without a command: the newest trained model (<runs-dir>/LATEST) answers the "
                    "toy world's held-out questions (<runs-dir>/toy/world/eval.jsonl) and a table of exact-match "
                    "accuracy per question type is printed.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_options(parser)
    parser.add_argument("--answers-file",
                        help="where the toy answers go (default: beside the model directory, toy_eval_answers.jsonl, "
                             "or toy_eval_answers_<N>scenes.jsonl with --toy-scenes N)")
    parser.add_argument("--toy-scenes", type=positive_int, default=0, metavar="N",
                        help="ask about this many held-out scenes instead of the world's 100, 3 questions each "
                             "(drawn once into <runs-dir>/toy/world/eval-<N>/): the 300 questions measure accuracy "
                             "to about ± 2.6 points (one standard error), too coarse to compare training recipes")
    commands = parser.add_subparsers(dest="command", title="commands (optional)")

    generate = commands.add_parser(
        "generate", help="answer an official question file into an answers jsonl (model_vqa_loader, ...)",
        description="Answer an official LLaVA question file with a model, as llava/eval/model_vqa_loader.py (a "
                    "jsonl), model_vqa_science.py (ScienceQA's .json) or model_vqa_mmbench.py (MMBench's .tsv).",
        epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("--question-file", required=True,
                          help="the question jsonl, ScienceQA's llava_test_CQM-A.json or an MMBench .tsv")
    generate.add_argument("--image-folder", default="", help="the folder the questions' images are relative to")
    generate.add_argument("--answers-file", required=True, help="the answers jsonl to write (or to resume)")
    generate.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks "
                          "(the official split_list) ...")
    generate.add_argument("--chunk-idx", type=int, default=0, help="... and answer this one (from 0)")
    generate.add_argument("--lang", choices=["en", "cn"], default="en",
                          help="MMBench: the language of the instruction to answer with a letter (cn for MMBench-CN)")
    generate.add_argument("--all-rounds", action="store_true",
                          help="MMBench: ask each question once per rotation of its options (the official "
                               "--all-rounds; the official script asks once)")
    add_generation_options(generate, defaults=False)

    score = commands.add_parser(
        "score", help="score an answers jsonl against a benchmark's ground truth (offline)",
        description="Score an answers jsonl (one {question_id, prompt, text, ...} per line, as the official LLaVA "
                    "runners write it) with the benchmark's official rules, and print a table.",
        epilog=SCORE_INPUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("bench", choices=["vqav2", "textvqa", "vizwiz", "gqa", "pope", "sqa", "mme", "mmbench", "seed"])
    score.add_argument("--answers", required=True, help="the answers jsonl")
    score.add_argument("--annotations", required=True, help="the ground truth file or folder (see below)")
    score.add_argument("--questions", help="the question jsonl (vizwiz and pope only)")
    score.add_argument("--split", default="test", help="ScienceQA split in pid_splits.json (default: test)")

    args = parser.parse_args(argv)
    if args.command == "generate" and not 0 <= args.chunk_idx < args.num_chunks:
        generate.error("need 0 <= --chunk-idx < --num-chunks")
    if args.command != "score":
        try:
            check_sampling(args.temperature, args.top_p)
        except ValueError as e:
            (generate if args.command == "generate" else parser).error(str(e))
    try:
        if args.command == "score":
            try:
                report = score_files(args.bench, args.answers, args.annotations, args.questions, args.split)
            except (KeyError, TypeError, AttributeError, IndexError) as error:  # valid JSON, another layout
                raise ValueError(f"the {args.bench} files are not laid out as its scorer reads them "
                                 f"({type(error).__name__}: {error}); `eval.py score --help` lists what each "
                                 "benchmark takes") from None
            print(format_report(f"{args.bench}  ({args.answers})", report))
        elif args.command == "generate":
            generate_answers(args)
        else:
            evaluate_toy(args)
    except (ValueError, OSError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # a torchrun rank: even after the barrier, a gloo thread can still abort the process as the interpreter
        # finalizes (an upstream race; train.py's main has the same exit). The answers are merged and every file
        # is closed, so leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
