"""LLaVA-1.5 evaluation: answer benchmark questions, evaluate on the toy world, and score answers files offline.

    python eval.py                 the newest trained model (runs/LATEST) on the toy world's held-out questions
    python eval.py generate ...    an official question file -> an answers jsonl (llava/eval/model_vqa_loader.py, ...)
    python eval.py score BENCH ... an answers jsonl -> the paper's number for one benchmark

A question {"question_id", "image", "text"} is asked as model_vqa_loader asks it: "<image>\\n" + text (the
benchmark's answer-format suffix is already in the text) as the user's turn of the vicuna_v1 template (or the one
train.py recorded for the model), answered greedily up to 128 new tokens. Each answer is one line {"question_id",
"prompt", "text", "answer_id", "model_id", "metadata"}. ScienceQA's json and MMBench's tsv are asked as their own
runners ask them (plumbing/benchmarks.py). Unlike the official runners:
  - questions go in left-padded batches. In fp32 the greedy answers are the same; in fp16 or bf16 a batch rounds its
    matrix products otherwise than one question alone, so an answer that hangs on a near tie can change:
    --batch-size 1 answers as the official runner does;
  - a run resumes (questions already in the answers file are skipped), and a question whose image cannot be read is
    reported and left out (a rerun retries it), where the official runner crashes;
  - one process per GPU either by --num-chunks/--chunk-idx (the official split, merged by `cat`) or by torchrun
    (rank 0 merges the ranks' files in question order).

With tools (LLaVA-Plus, tools.py: `generate --tools` or `--tool-server URL`), each question goes through the tool
loop, one at a time: the answer's text is the final value, and its `trace` the steps. The toy evaluation always
does so (the toy's model is LLaVA-Plus), and scores by category (toy.py's score_toy: exact words, boxes by IoU,
descriptions by their objects). The scorers, each reproducing one official script, are in plumbing/benchmarks.py.
"""

import argparse
import dataclasses
import json
import os
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

import tools
from chat import ChatSession
from clip import preprocess_image
from data import CONV_TEMPLATES, render, tokenize_prompt
from model import IMAGE_MARKER
from plumbing.answers import finish_share, open_for_append, recorded_prompt, this_share
from plumbing.benchmarks import SCORE_INPUTS, format_report, mmbench_questions, science_qa_questions, score_files
from plumbing.checkpoints import CheckpointError, latest_model, load_for_inference
from plumbing.cli import (DTYPES, check_quantize, check_sampling, leave_process_group, positive_int, resolve_device,
                          resolve_dtype)
from plumbing.files import DataError, check_input, open_base64_image, open_image, read_json, read_jsonl, read_tsv
from quantize import QUANTIZED
from tools import ToolServer
from toy import TOY_TOOLS, ensure_toy_eval, ensure_toy_world, format_toy_table, score_toy

REPO = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------
# asking questions (llava/eval/model_vqa_loader.py)


def has_image(question):
    return bool(question.get("image") or question.get("image_base64"))


def question_prompt(tokenizer, conv, question):
    """Token ids of a question as model_vqa_loader asks it: "<image>\\n" + text as the user's turn, the assistant's
    turn left open. A question without an image is asked as its text alone."""
    text = question["text"]
    if has_image(question):
        text = IMAGE_MARKER + "\n" + text
    return tokenize_prompt(tokenizer, render(conv, [(0, text), (1, None)]))


def question_image(question, image_folder):
    """A question's image: its file under image_folder, or (MMBench) the image its tsv row holds in base64."""
    if question.get("image_base64"):
        return open_base64_image(question["image_base64"], f"the image of question {question['question_id']}")
    return open_image(Path(image_folder) / question["image"])


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


def answer_with_tools(model, tokenizer, template, question, image_folder, skills, server, **sampling):
    """One question through LLaVA-Plus's loop (tools.py): the steps, whose last value is the answer, or the DataError
    of an image that cannot be read."""
    try:
        images = [question_image(question, image_folder)] if has_image(question) else []
    except DataError as error:
        return error
    session = ChatSession(model, tokenizer, template, images, **sampling)
    return tools.answer(session.ask, images[0] if images else None, question["text"], skills, server)


def answer_questions(model, tokenizer, template, questions, image_folder, answers, model_id, batch_size, progress,
                     skills=None, server=None, **sampling):
    """Answer questions in batches, one line each to the open file `answers`; returns the ids that failed. With
    skills (tools.py), one question at a time through LLaVA-Plus's loop: the answer's text is the last value, and its
    `trace` every step."""
    failed, conv = [], CONV_TEMPLATES[template]
    with tqdm(total=len(questions), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            if skills is None:
                results = answer_batch(model, tokenizer, conv, batch, image_folder, **sampling)
            else:
                results = [answer_with_tools(model, tokenizer, template, q, image_folder, skills, server, **sampling)
                           for q in batch]
            for question, result in zip(batch, results):
                if isinstance(result, DataError):
                    tqdm.write(f"question {question['question_id']}: failed: {result}", file=sys.stderr)
                    failed.append(question["question_id"])
                    continue
                trace = {} if skills is None else dict(trace=[dataclasses.asdict(step) for step in result])
                answers.write(json.dumps(dict(question_id=question["question_id"], prompt=recorded_prompt(question),
                                              text=result if skills is None else result[-1].value, **trace,
                                              **question.get("answer_fields", {}), answer_id=uuid.uuid4().hex,
                                              model_id=model_id, metadata={})) + "\n")
            answers.flush()  # a crash loses at most this batch
            bar.update(len(batch))
    return failed


def run_generation(args, model_dir, questions, image_folder, answers_file, num_chunks=1, chunk_idx=0, resume=True,
                   skills=None):
    """Answer this process's share of `questions` into answers_file, resuming it, or with resume=False starting it
    afresh (plumbing/answers.py: the share, the resume, the torchrun merge). Returns (answered, failed, skipped as
    already answered), summed over the processes, on rank 0; None elsewhere."""
    model_id = Path(model_dir).resolve().name
    todo, own_file, done = this_share(questions, answers_file, num_chunks, chunk_idx, model_id, resume)
    rank = int(os.environ.get("RANK", 0))
    if todo:  # a finished run does not even load the model; one that cannot be loaded leaves no file behind
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer, template = load_for_inference(model_dir, args.vision_tower, dtype, device, runner="eval",
                                                        quantize=args.quantize, model_base=args.model_base)
        conv_mode = args.conv_mode or template
        batch_size = args.batch_size or (8 if device.type == "cuda" else 4)
        if rank == 0:
            print(f"{model_dir}: template {conv_mode}, batch {batch_size}, {device}, {dtype}, up to "
                  f"{args.max_new_tokens} new tokens; answering into {answers_file}", flush=True)
    failed = []
    with open_for_append(own_file, afresh=not resume) as answers:
        if todo:
            server = ToolServer(args.tool_server) if args.tool_server else None
            failed = answer_questions(model, tokenizer, conv_mode, todo, image_folder, answers, model_id, batch_size,
                                      progress=rank == 0, skills=skills, server=server,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p)
    return finish_share([len(todo) - len(failed), len(failed), done], questions, answers_file, resume)


# ---------------------------------------------------------------------------------------------------------------
# the toy world, and benchmark question files


def model_directory(args):
    """--model, else the one <runs-dir>/LATEST names; checked before anything is printed, drawn or written."""
    model_dir = args.model or latest_model(args.runs_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    return model_dir


def evaluate_toy(args):
    """The bare `python eval.py`: the toy world's held-out questions, answered afresh, scored, printed as a table."""
    model_dir = model_directory(args)
    if args.toy_questions:  # another question set about the toy world (toy.py's make_toy_task writes one)
        world = dict(eval=Path(args.toy_questions), images=Path(args.toy_questions).parent / "images")
    else:
        world = ensure_toy_world(Path(args.runs_dir) / "toy" / "world")
    if args.toy_scenes:  # a larger set, for comparing training recipes
        world = ensure_toy_eval(world["root"], args.toy_scenes)
    questions = read_jsonl(world["eval"], required=("question_id", "text", "category", "answer"))
    args.max_new_tokens = args.max_new_tokens or 128
    # afresh, not resumed: training a stage again overwrites its model directory, and this takes seconds. A larger
    # set, another one or a quantized model has its own file, so that it does not replace the default run's answers
    name = "toy_eval_answers" + (f"_{args.toy_scenes}scenes" if args.toy_scenes else
                                 f"_{Path(args.toy_questions).parent.name}" if args.toy_questions else "") + (
        f"_{args.quantize}" if args.quantize else "") + ".jsonl"
    answers_file = Path(args.answers_file or Path(model_dir).parent / name)
    # LLaVA-Plus's loop with the toy's tools; a model never taught the format answers plainly, which is its value
    counts = run_generation(args, model_dir, questions, world["images"], answers_file, resume=False, skills=TOY_TOOLS)
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
    skills = TOY_TOOLS if args.tools else {} if args.tool_server else None
    counts = run_generation(args, model_dir, questions, args.image_folder, args.answers_file, args.num_chunks,
                            args.chunk_idx, skills=skills)
    if counts is not None:
        answered, failed, skipped = counts
        print(f"{answered} answered, {failed} failed, {skipped} already answered: {args.answers_file}"
              + (" (run again to retry the failed ones)" if failed else ""))
        if failed and not answered and not skipped:  # not a run to score
            print(f"error: none of the {failed} questions was answered (each one's reason is above); is "
                  f"--image-folder {args.image_folder or '(none given)'} right?", file=sys.stderr)
            sys.exit(1)


# ---------------------------------------------------------------------------------------------------------------
# command line


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
    parser.add_argument("--model-base", default=default(None),
                        help="what a LoRA --model (official layout) was trained from, as the official --model-base: "
                             "a Vicuna, or the finished LLaVA of a task LoRA; merged into it")
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
    parser.add_argument("--quantize", default=default(None), choices=QUANTIZED,
                        help="the LLM's linear layers, as they load (quantize.py)")
    parser.add_argument("--tool-server", default=default(None), metavar="URL",
                        help="LLaVA-Plus: the controller of the official tool workers, for the tools a model calls")


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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate LLaVA-1.5. Without a command: the newest trained model (<runs-dir>/LATEST) answers the "
                    "toy world's held-out questions (<runs-dir>/toy/world/eval.jsonl) and a table of exact-match "
                    "accuracy per question type is printed.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_options(parser)
    parser.add_argument("--answers-file",
                        help="where the toy answers go (default: beside the model directory, toy_eval_answers.jsonl, "
                             "or toy_eval_answers_<N>scenes.jsonl with --toy-scenes N, toy_eval_answers_<DIR>.jsonl "
                             "with --toy-questions DIR/FILE; _int8 or _int4 before .jsonl with --quantize)")
    parser.add_argument("--toy-scenes", type=positive_int, default=0, metavar="N",
                        help="ask about this many held-out scenes instead of the world's 100, 3 questions each "
                             "(drawn once into <runs-dir>/toy/world/eval-<N>/): the 300 questions measure accuracy "
                             "to about ± 2.6 points (one standard error), too coarse to compare training recipes")
    parser.add_argument("--toy-questions", metavar="FILE",
                        help="ask these questions instead, in the toy world's eval.jsonl format, their images in the "
                             "images/ folder beside the file (toy.py's make_toy_task writes such a set)")
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
    generate.add_argument("--tools", action="store_true",
                          help="LLaVA-Plus: answer through the tool loop with the toy world's tools (detect, measure); "
                               "the answers file keeps each answer's steps as `trace`")
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
    score.add_argument("--questions", help="the question file (vizwiz and pope: required; vqav2: the questions to "
                       "score; not taken by the others)")
    score.add_argument("--split", default="test", help="ScienceQA split in pid_splits.json (default: test)")

    args = parser.parse_args(argv)
    if args.toy_scenes and args.toy_questions:
        parser.error("--toy-scenes and --toy-questions: give one")
    if args.command == "generate" and not 0 <= args.chunk_idx < args.num_chunks:
        generate.error("need 0 <= --chunk-idx < --num-chunks")
    if args.command != "score":
        try:
            check_sampling(args.temperature, args.top_p)
            check_quantize(args.quantize, resolve_device(args.device))
        except argparse.ArgumentTypeError as e:
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
    except (ValueError, OSError, DataError, CheckpointError, argparse.ArgumentTypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    leave_process_group()


if __name__ == "__main__":
    main()
