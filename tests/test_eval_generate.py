"""Answer generation and the toy evaluation of eval.py, on a tiny random LLaVA saved in a runs/ layout.

The reference answers are made here one question at a time with Llava.generate, from prompts built by hand with
data.render and data.tokenize_prompt: eval.py's batched, resumed and sharded runs must reproduce them exactly.
"""

import argparse
import base64
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import eval
import toy
from clip import CLIPVisionConfig, preprocess_image
from data import CONV_TEMPLATES, render, tokenize_prompt
from llama import LlamaConfig
from model import Llava, LlavaConfig
from plumbing import answers, benchmarks
from plumbing.checkpoints import load_llava, save_llava
from plumbing.files import DataError, open_image, read_jsonl
from plumbing.tokenizer import load_tokenizer
from toy import make_toy_world

REPO = Path(__file__).parent.parent
MAX_NEW = 6  # tokens per answer: enough to tell answers apart, short enough to keep the tests fast


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/ as train.py leaves it: toy/world (4 held-out images, 12 questions), a tiny random model trained (as far
    as train_config.json says) with the "plain" template, and LATEST naming it."""
    root = tmp_path_factory.mktemp("runs")
    world = make_toy_world(root / "toy" / "world", n_train_images=6, n_stage1=4, n_stage2=6, n_eval_images=4)
    tokenizer = load_tokenizer(world["tokenizer"])
    torch.manual_seed(0)
    model = Llava(LlavaConfig(vision=CLIPVisionConfig.from_name("tiny"),
                              text=replace(LlamaConfig.from_name("tiny"), vocab_size=tokenizer.get_vocab_size()),
                              image_token_index=tokenizer.token_to_id("<image>")))
    with torch.no_grad():  # weights larger than the default init make the answers depend on question and image
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model_dir = root / "toy" / "stage2" / "model"
    save_llava(model, str(model_dir))
    shutil.copy(world["tokenizer"], model_dir)
    (model_dir / "train_config.json").write_text(json.dumps({"template": "plain"}))
    (root / "LATEST").write_text(f"{model_dir}\n")
    questions = read_jsonl(world["eval"])
    # a text-only question, as in a benchmark without images: asked without the image marker
    questions.append({"question_id": "text-only", "text": "Is red a colour or a shape?\nAnswer the question using a "
                                                          "single word or phrase."})
    question_file = root / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return dict(root=root, world=world, model_dir=model_dir, tokenizer=tokenizer, questions=questions,
                question_file=question_file, model=load_llava(str(model_dir)))


def reference_answers(runs, questions, template):
    """Each question answered alone (batch 1, as the official model_vqa_loader), greedy."""
    model, tokenizer = runs["model"], runs["tokenizer"]
    answers = []
    for q in questions:
        text = "<image>\n" + q["text"] if "image" in q else q["text"]
        ids = tokenize_prompt(tokenizer, render(CONV_TEMPLATES[template], [(0, text), (1, None)]))
        image = None
        if "image" in q:
            image = preprocess_image(open_image(runs["world"]["images"] / q["image"]), 32, "pad")[None]
        new = model.generate([ids], image, max_new_tokens=MAX_NEW)[0]
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


@pytest.fixture(scope="module")
def reference(runs):
    answers = reference_answers(runs, runs["questions"], "vicuna_v1")
    # every answer differs, also where two images get the same question: answers matching them means something
    assert len(set(answers)) == len(answers)
    return answers


def generate(runs, answers_file, *options):
    eval.main(["generate", "--runs-dir", str(runs["root"]), "--question-file", str(runs["question_file"]),
               "--image-folder", str(runs["world"]["images"]), "--answers-file", str(answers_file),
               "--conv-mode", "vicuna_v1", "--max-new-tokens", str(MAX_NEW), *options])


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -----------------------------------------------------------------------------
# generate

def test_split_list_is_the_official_split():
    assert answers.split_list(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # ceil(10/4) = 3 each
    assert answers.split_list(list(range(9)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # only 3 chunks
    assert answers.get_chunk(list(range(9)), 4, 3) == []  # the official get_chunk raises IndexError here
    assert answers.get_chunk(list(range(10)), 3, 1) == [4, 5, 6, 7]
    assert answers.split_list([], 2) == []


def test_generate_writes_official_answers_and_batches_change_nothing(runs, reference, tmp_path, capsys):
    answers_file = tmp_path / "answers.jsonl"
    generate(runs, answers_file, "--batch-size", "5")  # 13 questions: batches of 5, 5, 3; one text-only
    assert "13 answered, 0 failed, 0 already answered" in capsys.readouterr().out
    answers = lines(answers_file)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in runs["questions"]]
    for answer, question in zip(answers, runs["questions"]):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"]  # the question text, without "<image>"
        assert answer["model_id"] == "model" and answer["metadata"] == {}
        assert len(answer["answer_id"]) == 32
    assert len({a["answer_id"] for a in answers}) == len(answers)
    assert [a["text"] for a in answers] == reference  # batched, left-padded greedy == one question at a time


def test_resume_keeps_what_is_there_and_drops_a_cut_off_line(runs, reference, tmp_path, capsys):
    answers_file = tmp_path / "answers.jsonl"
    kept = [dict(question_id=q["question_id"], prompt=q["text"], text="PRE-EXISTING", answer_id=str(i),
                 model_id="model", metadata={}) for i, q in enumerate(runs["questions"][:5])]
    written = "".join(json.dumps(a) + "\n" for a in kept)
    cut = json.dumps(dict(question_id=runs["questions"][5]["question_id"], prompt=runs["questions"][5]["text"],
                          text="CUT"))[:30]  # a crash in the middle of the sixth line
    answers_file.write_text(written + cut)
    generate(runs, answers_file, "--batch-size", "4")
    assert "8 answered, 0 failed, 5 already answered" in capsys.readouterr().out
    assert answers_file.read_text().startswith(written)  # untouched, byte for byte
    answers = lines(answers_file)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in runs["questions"]]  # each once
    assert [a["text"] for a in answers[5:]] == reference[5:]
    generate(runs, answers_file)  # nothing left to do
    assert "0 answered, 0 failed, 13 already answered" in capsys.readouterr().out
    assert len(lines(answers_file)) == 13
    # another model's answers are not resumed: scores would mix the two models
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(dict(kept[0], model_id="llava-v1.5-7b")) + "\n")
    with pytest.raises(SystemExit) as stop:
        generate(runs, other)
    assert stop.value.code == 2 and len(lines(other)) == 1
    assert (f"error: {other}: holds answers of model 'llava-v1.5-7b', and this run's is 'model'; give another "
            "--answers-file, or remove that one to answer afresh") in capsys.readouterr().err


def test_a_run_that_answers_nothing_fails_and_names_the_image_folder(runs, tmp_path, capsys):
    """Every question failing (here: no image where --image-folder says) is not a run to score."""
    questions = tmp_path / "image_questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in runs["questions"] if "image" in q))
    (tmp_path / "empty").mkdir()
    argv = ["generate", "--runs-dir", str(runs["root"]), "--question-file", str(questions), "--answers-file",
            str(tmp_path / "a.jsonl")]
    with pytest.raises(SystemExit) as stop:
        eval.main([*argv, "--image-folder", str(tmp_path / "empty")])
    assert stop.value.code == 1
    assert (f"error: none of the 12 questions was answered (each one's reason is above); is --image-folder "
            f"{tmp_path / 'empty'} right?") in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        eval.main([*argv, "--image-folder", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert f"error: --image-folder {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err


def test_num_chunks_split_as_the_official_scripts(runs, reference, tmp_path):
    ids = [q["question_id"] for q in runs["questions"]]
    for k in range(2):
        generate(runs, tmp_path / f"2_{k}.jsonl", "--num-chunks", "2", "--chunk-idx", str(k))
    chunks = [[a["question_id"] for a in lines(tmp_path / f"2_{k}.jsonl")] for k in range(2)]
    assert chunks == [ids[:7], ids[7:]]  # ceil(13 / 2) = 7: disjoint, and together every question
    texts = [a["text"] for k in range(2) for a in lines(tmp_path / f"2_{k}.jsonl")]
    assert texts == reference


def test_torchrun_ranks_answer_their_chunks_and_rank0_merges(runs, reference, tmp_path):
    answers_file = tmp_path / "answers.jsonl"
    # an earlier launch already answered the first question: it is kept, not asked again
    first = runs["questions"][0]
    answers_file.write_text(json.dumps(dict(question_id=first["question_id"], prompt=first["text"], text="EARLIER",
                                            answer_id="x", model_id="model", metadata={})) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "eval.py", "generate", "--runs-dir", str(runs["root"]),
               "--question-file", str(runs["question_file"]), "--image-folder", str(runs["world"]["images"]),
               "--answers-file", str(answers_file), "--conv-mode", "vicuna_v1", "--max-new-tokens", str(MAX_NEW)]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = [subprocess.Popen(command, cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "12 answered, 0 failed, 1 already answered" in outputs[0][0]
    answers = lines(answers_file)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in runs["questions"]]
    assert [a["text"] for a in answers] == ["EARLIER"] + reference[1:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]  # the rank files are merged and gone


def test_unreadable_image_is_reported_and_the_run_goes_on(runs, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    questions = runs["questions"][:3] + [
        {"question_id": "gone", "image": "missing.png", "text": "What shape?"},
        {"question_id": "broken", "image": str(corrupt), "text": "What colour?"}]  # an absolute path works too
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers_file = tmp_path / "answers.jsonl"
    argv = ["generate", "--runs-dir", str(runs["root"]), "--question-file", str(question_file), "--image-folder",
            str(runs["world"]["images"]), "--answers-file", str(answers_file), "--max-new-tokens", "2"]
    eval.main(argv)  # returns: exit status 0
    out, err = capsys.readouterr()
    assert "3 answered, 2 failed, 0 already answered" in out
    failures = [line for line in err.splitlines() if line.startswith("question ")]
    assert len(failures) == 2
    assert "question gone: failed:" in failures[0] and "missing.png: image file not found" in failures[0]
    assert "question broken: failed:" in failures[1] and "corrupt.png: cannot read the image" in failures[1]
    assert [a["question_id"] for a in lines(answers_file)] == [q["question_id"] for q in questions[:3]]
    eval.main(argv)  # nothing was written for them, so a rerun tries them again
    assert "0 answered, 2 failed, 3 already answered" in capsys.readouterr().out


@pytest.mark.parametrize("bad_line, message", [
    ('{"question_id": 7, "image": "eval_00000.png", "te', ":3: not valid JSON"),
    ('{"question_id": 7, "image": "eval_00000.png"}', ":3: no 'text' field"),
])
def test_malformed_question_line_exits_2_naming_it(runs, tmp_path, capsys, bad_line, message):
    question_file = tmp_path / "questions.jsonl"
    good = [json.dumps(q) for q in runs["questions"][:2]]
    question_file.write_text("\n".join(good + [bad_line]) + "\n")
    with pytest.raises(SystemExit) as exit_:
        eval.main(["generate", "--runs-dir", str(runs["root"]), "--question-file", str(question_file),
                   "--answers-file", str(tmp_path / "answers.jsonl")])
    assert exit_.value.code == 2
    assert f"error: {question_file}{message}" in capsys.readouterr().err
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.parametrize("case", ["missing", "malformed json"])
def test_unreadable_question_file_exits_2_naming_it(runs, tmp_path, capsys, case):
    question_file = tmp_path / "llava_test_CQM-A.json"
    if case == "malformed json":
        question_file.write_text('[{"id": "0", "conversations": []},\n {id: "1"}]')
    with pytest.raises(SystemExit) as exit_:
        eval.main(["generate", "--runs-dir", str(runs["root"]), "--question-file", str(question_file),
                   "--answers-file", str(tmp_path / "answers.jsonl")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == {
        "missing": f"error: --question-file {question_file}: no such file\n",
        "malformed json": f"error: {question_file}: not valid JSON at line 2 column 3 "
                          "(Expecting property name enclosed in double quotes)\n"}[case]
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.parametrize("model", ["missing", "empty"])
@pytest.mark.parametrize("command", ["toy", "generate"])
def test_a_model_that_cannot_be_loaded_leaves_no_answers_file(runs, tmp_path, capsys, command, model):
    """A missing model directory is said before anything is printed; one without a model fails before the answers
    file (for the toy evaluation beside the model directory) is created."""
    root = tmp_path / "runs"
    shutil.copytree(runs["world"]["root"], root / "toy" / "world")
    model_dir = tmp_path / "models" / "stage2"
    if model == "empty":
        model_dir.mkdir(parents=True)
    argv = ["--runs-dir", str(root), "--model", str(model_dir)]
    if command == "generate":
        argv = ["generate", *argv, "--question-file", str(runs["question_file"]),
                "--answers-file", str(tmp_path / "models" / "answers.jsonl")]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        eval.main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    if model == "missing":
        assert out == "" and err == f"error: {model_dir}: no such model directory\n"
    else:
        assert err.startswith(f"error: {model_dir}: no config.json") and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


# -----------------------------------------------------------------------------
# ScienceQA and MMBench: the runners that build their prompts in code

def test_science_qa_json_is_asked_as_model_vqa_science(runs, tmp_path):
    """The first turn without "<image>" (stripped at the ends only), the letter instruction after it, "<image>\\n"
    before it where the record has an image; the answer's prompt keeps that "<image>", which tells the scorer the
    IMG questions. 1024 new tokens unless told."""
    images = [q["image"] for q in runs["questions"] if "image" in q][:2]
    turns = ["<image>\nWhich colour is it?\nContext: N/A\nOptions: (A) red (B) blue",
             "Which word names a shape?\nContext: N/A\nOptions: (A) red (B) circle (C) left",
             "Which shape is it? <image>\nOptions: (A) circle (B) square"]
    records = [{"id": str(k), "conversations": [{"from": "human", "value": turn}, {"from": "gpt", "value": "A"}]}
               for k, turn in enumerate(turns)]
    records[0]["image"], records[2]["image"] = images
    question_file = tmp_path / "llava_test_CQM-A.json"
    question_file.write_text(json.dumps(records))
    suffix = "\nAnswer with the option's letter from the given choices directly."
    asked = ["Which colour is it?\nContext: N/A\nOptions: (A) red (B) blue" + suffix,
             "Which word names a shape?\nContext: N/A\nOptions: (A) red (B) circle (C) left" + suffix,
             "Which shape is it? \nOptions: (A) circle (B) square" + suffix]
    questions, max_new_tokens = eval.read_questions(argparse.Namespace(question_file=str(question_file)))
    assert max_new_tokens == 1024 and [q["text"] for q in questions] == asked
    answers_file = tmp_path / "sqa.jsonl"
    eval.main(["generate", "--runs-dir", str(runs["root"]), "--question-file", str(question_file), "--image-folder",
               str(runs["world"]["images"]), "--answers-file", str(answers_file), "--conv-mode", "vicuna_v1",
               "--max-new-tokens", str(MAX_NEW)])
    answers = lines(answers_file)
    assert [a["question_id"] for a in answers] == ["0", "1", "2"]
    assert [a["prompt"] for a in answers] == ["<image>\n" + asked[0], asked[1], "<image>\n" + asked[2]]
    expected = [dict(text=text, **({"image": r["image"]} if "image" in r else {})) for text, r in zip(asked, records)]
    assert [a["text"] for a in answers] == reference_answers(runs, expected, "vicuna_v1")
    # scored as written, with the model's letters put in: "A" is right for questions 0 and 2, wrong for 1
    problems = {str(k): {"choices": ["x", "y", "z"], "answer": int(k == 1), "image": r.get("image")}
                for k, r in enumerate(records)}
    report = benchmarks.score_sqa([dict(a, text="A") for a in answers], problems, {"test": ["0", "1", "2"]})
    assert (report["questions"], report["img_questions"]) == (3, 2)
    assert report["accuracy"] == pytest.approx(200 / 3) and report["img_accuracy"] == 100.0


def mmbench_tsv(runs, path):
    """Three MMBench rows: a hint and two options; no hint ("nan") and three; four options and, as newer tsvs do,
    the index of the row whose image it shares."""
    images = [q["image"] for q in runs["questions"] if "image" in q][:2]
    encoded = [base64.b64encode((runs["world"]["images"] / name).read_bytes()).decode() for name in images]
    rows = [dict(index="0", question="What colour is the object?", hint="Look at the middle.", A="red", B="blue",
                 C="", D="", answer="B", image=encoded[0], category="colour"),
            dict(index="1", question="Which shape is it?", hint="nan", A="circle", B="square", C="cross", D="nan",
                 answer="A", image=encoded[1], category="shape"),
            dict(index="2", question="Where is it?", hint="", A="left", B="right", C="top", D="bottom", answer="C",
                 image="0", category="position")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows, [images[0], images[1], images[0]]


def test_mmbench_tsv_is_asked_as_model_vqa_mmbench_in_every_round(runs, tmp_path, monkeypatch):
    """Hint, question and "A. option" lines, then the letter instruction; the image from the tsv's base64. With
    --all-rounds each question is asked once per rotation of its options, and the answers say how to map them back:
    the scorer reads them."""
    question_file = tmp_path / "mmbench_dev.tsv"
    rows, images = mmbench_tsv(runs, question_file)
    answers_file = tmp_path / "mmbench.jsonl"
    eval.main(["generate", "--runs-dir", str(runs["root"]), "--question-file", str(question_file), "--answers-file",
               str(answers_file), "--conv-mode", "vicuna_v1", "--max-new-tokens", str(MAX_NEW), "--all-rounds"])
    answers = lines(answers_file)
    assert [(a["question_id"], a["round_id"]) for a in answers] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2),
                                                                      (2, 0), (2, 1), (2, 2), (2, 3)]
    assert answers[1]["options"] == ["blue", "red"] and answers[1]["option_char"] == ["B", "A"]
    assert answers[4]["options"] == ["cross", "circle", "square"] and answers[4]["option_char"] == ["C", "A", "B"]
    assert answers[0]["prompt"] == "Look at the middle.\nWhat colour is the object?\nA. red\nB. blue"
    assert answers[2]["prompt"] == "Which shape is it?\nA. circle\nB. square\nC. cross"
    assert answers[6]["prompt"] == "Where is it?\nA. right\nB. top\nC. bottom\nD. left"
    suffix = "\nAnswer with the option's letter from the given choices directly."
    expected = reference_answers(runs, [{"text": a["prompt"] + suffix, "image": images[a["question_id"]]}
                                        for a in answers], "vicuna_v1")
    assert [a["text"] for a in answers] == expected
    # scored as written, with the model's letters put in: the letter it was shown for the right option in every
    # round but one of question 1, which fails that question (circular evaluation)
    right = [dict(a, text="ABCD"[a["option_char"].index(rows[a["question_id"]]["answer"])]) for a in answers]
    assert benchmarks.score_mmbench(right, rows)["accuracy"] == 100.0
    right[3]["text"] = "ABC".replace(right[3]["text"], "")[0]
    report = benchmarks.score_mmbench(right, rows)
    assert report["questions"] == 3 and report["accuracy"] == pytest.approx(200 / 3)
    assert report["by_category"] == {"colour": 100.0, "position": 100.0, "shape": 0.0}

    # --lang cn: the Chinese letter instruction
    asked, answer_batch = [], eval.answer_batch
    monkeypatch.setattr(eval, "answer_batch", lambda model, tokenizer, conv, questions, *a, **k: (
        asked.extend(q["text"] for q in questions) or answer_batch(model, tokenizer, conv, questions, *a, **k)))
    eval.main(["generate", "--runs-dir", str(runs["root"]), "--question-file", str(question_file),
               "--answers-file", str(tmp_path / "cn.jsonl"), "--max-new-tokens", "2", "--lang", "cn"])
    assert len(asked) == 3 and all(text.endswith("\n请直接回答选项字母。") for text in asked)
    # a bad image in the tsv is the question's own error (reported, the run goes on), named by its question
    for cell, message in (("not base64!", "the image of question 5 is not base64"),
                          (base64.b64encode(b"not an image").decode(), "the image of question 5: cannot read")):
        with pytest.raises(DataError, match=message):
            eval.question_image({"question_id": 5, "image_base64": cell}, "")


# -----------------------------------------------------------------------------
# the toy evaluation: python eval.py

def test_score_toy_exact_match_after_light_normalization():
    questions = [dict(question_id=0, category="colour", answer="yellow", objects=3),
                 dict(question_id=1, category="colour", answer="red", objects=1),
                 dict(question_id=2, category="count", answer="2", objects=2),
                 dict(question_id=3, category="count", answer="3", objects=3)]
    answers = [dict(question_id=0, text=" Yellow. "),  # case, space and the trailing period don't count
               dict(question_id=1, text="red circle"),  # anything more does
               dict(question_id=2, text="2.")]  # question 3 has no answer (its image failed): wrong
    report = toy.score_toy(answers, questions)
    assert report["by_category"] == {"colour": {"accuracy": 50.0, "right": 1, "questions": 2},
                                     "count": {"accuracy": 50.0, "right": 1, "questions": 2}}
    assert (report["right"], report["questions"], report["accuracy"]) == (2, 4, 50.0)
    assert report["by_objects"] == {1: {"accuracy": 0.0, "right": 0, "questions": 1},
                                    2: {"accuracy": 100.0, "right": 1, "questions": 1},
                                    3: {"accuracy": 50.0, "right": 1, "questions": 2}}
    assert [line.split() for line in toy.format_toy_table(report).splitlines()[-4:]] == [
        ["scene", "of", "right", "questions", "accuracy"], ["1", "object", "0", "1", "0.00"],
        ["2", "objects", "1", "1", "100.00"], ["3", "objects", "1", "2", "50.00"]]
    # a world written before questions recorded their scene's size: no split, and no empty rows
    old_world = [{k: v for k, v in q.items() if k != "objects"} for q in questions]
    assert "by_objects" not in toy.score_toy(answers, old_world)
    assert toy.format_toy_table(toy.score_toy(answers, old_world)).splitlines()[-1].startswith("overall")


def test_bare_eval_runs_the_toy_evaluation_of_latest(runs, tmp_path):
    """`python eval.py --runs-dir R`: LATEST's model on R/toy/world/eval.jsonl, with the model's own template, each
    question through LLaVA-Plus's loop (an untrained model answers plainly: the answer is its text)."""
    root = tmp_path / "runs"
    shutil.copytree(runs["world"]["root"], root / "toy" / "world")
    (root / "LATEST").write_text(str(runs["model_dir"]))
    eval_file = root / "toy" / "world" / "eval.jsonl"
    questions = read_jsonl(eval_file)
    # make the ground truth of every other question what the model says (as "Capitalised."), so that the table
    # holds numbers other than zero; the rest keep the world's answers
    said = reference_answers(runs, questions, "plain")  # train_config.json says the model was trained with plain
    for q, text in zip(questions[::2], said[::2]):
        if q["category"] not in ("grounding", "describe"):  # a word: compared after toy_normalize
            q["answer"] = text.capitalize() + "."
    eval_file.write_text("".join(json.dumps(q) + "\n" for q in questions))

    result = subprocess.run([sys.executable, "eval.py", "--runs-dir", str(root), "--max-new-tokens", str(MAX_NEW)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answers_file = runs["model_dir"].parent / "toy_eval_answers.jsonl"
    answers = {a["question_id"]: a["text"] for a in lines(answers_file)}
    assert [answers[q["question_id"]] for q in questions] == said

    # the table, recomputed from the answers file
    expected = {}
    for q in questions:
        right = toy.toy_right(q["category"], answers[q["question_id"]], q["answer"])
        for row in (q["category"], "overall", str(q["objects"])):
            expected.setdefault(row, [0, 0])
            expected[row][0] += right
            expected[row][1] += 1
    assert expected["overall"][0] >= sum(q["category"] not in ("grounding", "describe") for q in questions[::2]) > 4
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
             if line.split() and line.split()[0] in expected}
    sizes = sorted({str(q["objects"]) for q in questions})
    assert len(sizes) > 1 and list(table) == ["colour", "shape", "count", "position", "yes_no", "grounding", "describe",
                                              "overall"] + sizes
    for row, (right, total) in expected.items():
        name = ["object" if row == "1" else "objects"] if row.isdigit() else []  # "2 objects  right ..."
        assert table[row] == name + [str(right), str(total), f"{100 * right / total:.2f}"]


def test_bare_eval_on_more_held_out_scenes(runs, tmp_path, capsys):
    """`python eval.py --toy-scenes N`: N scenes drawn once into toy/world/eval-N, 3 questions each, all answered
    and scored in the table; the world's own questions are left alone."""
    root = tmp_path / "runs"
    shutil.copytree(runs["world"]["root"], root / "toy" / "world")
    model_dir = tmp_path / "stage2" / "model"
    shutil.copytree(runs["model_dir"], model_dir)
    (root / "LATEST").write_text(str(model_dir))
    answers_file = tmp_path / "answers.jsonl"
    args = ["--runs-dir", str(root), "--toy-scenes", "7", "--max-new-tokens", "2", "--answers-file", str(answers_file)]
    eval.main(args)
    out = capsys.readouterr().out
    extra = root / "toy" / "world" / "eval-7"
    assert "drawing 7 held-out scenes" in out and f"on {extra / 'eval.jsonl'}" in out
    questions = read_jsonl(extra / "eval.jsonl")
    assert len(questions) == 21 and len(list((extra / "images").iterdir())) == 7
    assert [a["question_id"] for a in lines(answers_file)] == [q["question_id"] for q in questions]
    overall = next(line.split() for line in out.splitlines() if line.startswith("overall"))
    assert overall[2] == "21"
    stamp = (extra / "eval.jsonl").stat().st_mtime_ns
    # the default run's answers, beside the model directory, are not replaced: the larger set has its own file
    (model_dir.parent / "toy_eval_answers.jsonl").write_text("THE DEFAULT RUN'S\n")
    eval.main(args[:-2])  # drawn once: the second run reuses them
    out = capsys.readouterr().out
    assert "drawing" not in out and (extra / "eval.jsonl").stat().st_mtime_ns == stamp
    assert f"answers in {model_dir.parent / 'toy_eval_answers_7scenes.jsonl'}" in out
    assert len(lines(model_dir.parent / "toy_eval_answers_7scenes.jsonl")) == 21
    assert (model_dir.parent / "toy_eval_answers.jsonl").read_text() == "THE DEFAULT RUN'S\n"
    assert read_jsonl(root / "toy" / "world" / "eval.jsonl") == read_jsonl(runs["world"]["eval"])


def test_bare_eval_without_a_trained_model_says_how_to_train_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        eval.main(["--runs-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"no trained model: {tmp_path / 'LATEST'} does not exist" in err and "python train.py --stage 1" in err


@pytest.mark.parametrize("option, says", [(["--batch-size", "-1"], "need a positive whole number, not '-1'"),
                                          (["--batch-size", "0"], "need a positive whole number, not '0'"),
                                          (["--max-new-tokens", "0"], "need a positive whole number, not '0'"),
                                          (["--top-p", "0"], "--top-p 0.0: must be above 0 and at most 1"),
                                          (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more")])
def test_generation_settings_out_of_range_are_usage_errors(option, says, capsys, tmp_path):
    """Each once did something else without a word: batch -1 answered nothing and said all was answered, 0 meant the
    default, top-p 0 answered every question with the empty string."""
    for argv in (option, ["generate", "--question-file", "q.jsonl", "--answers-file", str(tmp_path / "a.jsonl"),
                          *option]):
        with pytest.raises(SystemExit) as stop:
            eval.main(argv)
        assert stop.value.code == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
