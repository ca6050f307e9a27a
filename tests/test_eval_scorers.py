"""The benchmark scorers of eval.py on small hand-made fixtures (tests/fixtures/eval/<bench>/, real file formats).

Every expected number is worked out by hand in the comment next to it. For the VQA-style soft accuracy, with k of
the 10 human answers equal to the prediction, the mean over the 10 leave-one-out subsets of min(1, matches / 3) is
  k=1: (1 * 0/3 + 9 * 1/3) / 10 = 0.3,   k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6,   k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9,
  k>=4: 1.0 (every subset keeps at least 3 matches).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import eval
from plumbing import benchmarks
from plumbing.files import read_json, read_jsonl, read_tsv

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
REPO = Path(__file__).parent.parent


def fixture(*parts):
    return FIXTURES.joinpath(*parts)


# ---------------------------------------------------------------------------------------------------------------
# answer normalization

@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),                  # number words become digits
    ("two dogs", "2 dogs"),
    ("None", "0"),                 # "none" is in the number map too
    ("a dog", "dog"),              # articles go
    ("The Dog.", "dog"),
    ("yes.", "yes"),               # a period not followed by a digit goes
    ("Yes", "yes"),
    ("yes!", "yes"),               # '!' inside the text becomes a space, then split/join drops it
    ("dont", "don't"),             # contractions get their apostrophe
    ("10.5", "10.5"),              # a period followed by a digit stays
    ("1,000", "1000"),             # commas are deleted first
    ("red-white", "red white"),    # a mark inside a word becomes a space...
    ("red - white", "red white"),  # ...and one touching a space is deleted
    ("man's hat", "man 's hat"),
    ("Mr. Smith?", "mr smith"),
])
def test_normalize_answer(raw, normalized):
    assert benchmarks.normalize_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    assert benchmarks.vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)   # k=2
    assert benchmarks.vqa_accuracy("3", ["2"] * 2 + ["3"] * 8) == pytest.approx(1.0)     # k=8
    assert benchmarks.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)   # k=1
    assert benchmarks.vqa_accuracy("bird", ["cat"] + ["dog"] * 9) == 0.0                 # k=0


# ---------------------------------------------------------------------------------------------------------------
# VQAv2, TextVQA, VizWiz

def test_vqav2():
    # q262148000 (number)  "Two"       -> "2";        "2" x2, "3" x8            k=2 -> 0.6
    # q262148001 (yes/no)  "Yes."      -> "yes";      "yes" x10                 k=10 -> 1.0
    # q393225000 (other)   "A dog"     -> "dog";      "dog","dog","a dog" + "puppy" x7   k=3 -> 0.9
    # q393225001 (other)   "dont know" -> "don't know"; "don't know" x1 + "no idea" x9  k=1 -> 0.3
    # q393226000 (number)  "10.5" keeps its period;   "10.5" x2, "105" x8       k=2 -> 0.6 (1.0 if the period went)
    # accuracy = (0.6 + 1.0 + 0.9 + 0.3 + 0.6) / 5 = 3.4 / 5 = 68%
    # number = (0.6 + 0.6) / 2 = 60%, other = (0.9 + 0.3) / 2 = 60%, yes/no = 100%
    report = benchmarks.score_vqav2(read_jsonl(fixture("vqav2", "answers.jsonl")),
                              read_json(fixture("vqav2", "v2_mscoco_val2014_annotations.json")))
    assert report["accuracy"] == pytest.approx(68.0)
    assert report["questions"] == 5
    assert report["by_answer_type"] == pytest.approx({"number": 60.0, "other": 60.0, "yes/no": 100.0})


def test_vqav2_unanswered_question_scores_zero():
    # scripts/convert_vqav2_for_submission.py writes an empty answer for every question without one: it scores 0
    # and the average stays over all 5 annotated questions. Left out: q262148001 (1.0) and q393225001 (0.3)
    # accuracy = (0.6 + 0 + 0.9 + 0 + 0.6) / 5 = 2.1 / 5 = 42% (over the answered ones it would be 2.1 / 3 = 70%)
    # number (0.6 + 0.6) / 2 = 60%, other (0.9 + 0) / 2 = 45%, yes/no 0 / 1 = 0%
    answers = [a for a in read_jsonl(fixture("vqav2", "answers.jsonl"))
               if a["question_id"] not in (262148001, 393225001)]
    report = benchmarks.score_vqav2(answers, read_json(fixture("vqav2", "v2_mscoco_val2014_annotations.json")))
    assert report == {"accuracy": pytest.approx(42.0), "questions": 5, "unanswered": 2,
                      "by_answer_type": pytest.approx({"number": 60.0, "other": 45.0, "yes/no": 0.0})}


VQAV2_QUESTIONS = [{"image_id": 262148, "question": "How many giraffes are there?", "question_id": 262148000},
                   {"image_id": 262148, "question": "Is the sky blue?", "question_id": 262148001},
                   {"image_id": 393225, "question": "What animal is this?", "question_id": 393225000}]


@pytest.mark.parametrize("layout", ["official json", "llava jsonl"])
def test_vqav2_question_file_chooses_the_questions(tmp_path, layout):
    # --questions holds 3 of the 5 annotated questions; the answer to 262148001 is dropped:
    #   262148000 "Two" 0.6, 262148001 unanswered 0, 393225000 "A dog" 0.9 -> (0.6 + 0 + 0.9) / 3 = 50%
    # the answers to 393225001 and 393226000 are annotated but not asked: not scored, as the converter writes
    # only the question file's
    if layout == "official json":
        questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
        questions.write_text(json.dumps({"data_subtype": "val2014", "questions": VQAV2_QUESTIONS}))
    else:
        questions = tmp_path / "llava_vqav2_val.jsonl"
        questions.write_text("".join(json.dumps({"question_id": q["question_id"], "image": "x.jpg",
                                                 "text": q["question"]}) + "\n" for q in VQAV2_QUESTIONS))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(a) + "\n" for a in read_jsonl(fixture("vqav2", "answers.jsonl"))
                               if a["question_id"] != 262148001))
    report = benchmarks.score_files("vqav2", answers, fixture("vqav2", "v2_mscoco_val2014_annotations.json"),
                                    questions)
    assert report == {"accuracy": pytest.approx(50.0), "questions": 3, "unanswered": 1,
                      "by_answer_type": pytest.approx({"number": 60.0, "other": 90.0, "yes/no": 0.0})}


def test_vqav2_question_without_annotation_is_an_error():
    answers = read_jsonl(fixture("vqav2", "answers.jsonl"))
    annotations = read_json(fixture("vqav2", "v2_mscoco_val2014_annotations.json"))
    with pytest.raises(ValueError, match="question_id 999 of the question file is not in the annotations"):
        benchmarks.score_vqav2(answers, annotations, [262148000, 999])


def test_textvqa_matches_by_image_and_question():
    # two answers share question_id 003a8ae2ef43b901 (it is the image id); the question text tells them apart
    # "Dakota Digital" vs "dakota" x7, "dakota digital" x3            k=3  -> 0.9
    # "The Copenhagen" -> "copenhagen" vs "copenhagen" x10           k=10 -> 1.0
    # "3" vs "2" x9, "3" x1 (prompt with an empty OCR token line)    k=1  -> 0.3
    # accuracy = (0.9 + 1.0 + 0.3) / 3 = 2.2 / 3 = 73.33%
    report = benchmarks.score_textvqa(read_jsonl(fixture("textvqa", "answers.jsonl")),
                                read_json(fixture("textvqa", "TextVQA_0.5.1_val.json")))
    assert report == {"accuracy": pytest.approx(220 / 3), "questions": 3, "unanswered": 0}


def test_vizwiz_unanswerable():
    # image 0 (unanswerable, answerable 0): "Unanswerable" vs "unanswerable" x10   k=10 -> 1.0   said unanswerable: TP
    # image 1 (other, answerable 1): "Unanswerable." vs "unanswerable" x2, "soup" x8   k=2 -> 0.6   FP
    # image 2 (yes/no): "yes" vs "yes" x10                                          k=10 -> 1.0
    # image 3 (unanswerable, answerable 0): "Blue" vs "unanswerable" x9, "blue" x1  k=1 -> 0.3    FN
    # accuracy = (1.0 + 0.6 + 1.0 + 0.3) / 4 = 72.5%; unanswerable type = (1.0 + 0.3) / 2 = 65%
    # unanswerable F1 = 2TP / (2TP + FP + FN) = 2 / 4 = 50%
    report = benchmarks.score_vizwiz(read_jsonl(fixture("vizwiz", "answers.jsonl")),
                               read_jsonl(fixture("vizwiz", "llava_val.jsonl")),
                               read_json(fixture("vizwiz", "val.json")))
    assert report["accuracy"] == pytest.approx(72.5)
    assert report["by_answer_type"] == pytest.approx({"other": 60.0, "unanswerable": 65.0, "yes/no": 100.0})
    assert report["unanswerable_f1"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------------------------
# GQA

def test_gqa_exact_match():
    # verify  "No"         -> "no"         == "no"        right (binary)
    # query   "Woman."     -> "woman"      == "woman"     right (open)
    # query   "A tank top" -> "a tank top" != "tank top"  wrong (open): GQA removes no articles
    # choose  "Brown"      -> "brown"      == "brown"     right (binary)
    # accuracy 3/4 = 75%, binary 2/2 = 100%, open 1/2 = 50%
    report = benchmarks.score_gqa(read_jsonl(fixture("gqa", "answers.jsonl")),
                            read_json(fixture("gqa", "testdev_balanced_questions.json")))
    assert report == {"accuracy": 75.0, "binary": 100.0, "open": 50.0, "questions": 4, "unanswered": 0}


def test_unanswered_questions_are_left_out_and_counted():
    """Where the official scripts stop at (GQA) or refuse (VizWiz) a file with questions unanswered, or score the
    answered ones (TextVQA), the accuracy is over the answered questions and the report says how many are not."""
    gqa = read_jsonl(fixture("gqa", "answers.jsonl"))[1:]  # the first, right, answer left out: 2 of 3 right
    report = benchmarks.score_gqa(gqa, read_json(fixture("gqa", "testdev_balanced_questions.json")))
    assert (report["accuracy"], report["questions"], report["unanswered"]) == (pytest.approx(200 / 3), 3, 1)
    vizwiz = read_jsonl(fixture("vizwiz", "answers.jsonl"))[:-1]  # the 0.3 left out: (1.0 + 0.6 + 1.0) / 3
    report = benchmarks.score_vizwiz(vizwiz, read_jsonl(fixture("vizwiz", "llava_val.jsonl")),
                               read_json(fixture("vizwiz", "val.json")))
    assert (report["accuracy"], report["questions"], report["unanswered"]) == (pytest.approx(260 / 3), 3, 1)
    textvqa = read_jsonl(fixture("textvqa", "answers.jsonl"))[:-1]  # the 0.3 left out: (0.9 + 1.0) / 2
    report = benchmarks.score_textvqa(textvqa, read_json(fixture("textvqa", "TextVQA_0.5.1_val.json")))
    assert report == {"accuracy": pytest.approx(95.0), "questions": 2, "unanswered": 1}


# ---------------------------------------------------------------------------------------------------------------
# POPE

@pytest.mark.parametrize("text, said", [
    ("Yes, there is a dog.", "yes"),
    ("No, there is not.", "no"),                 # "No there is not" -> 'No'
    ("There is no dog in the image.", "no"),     # 'no' anywhere in the first sentence
    ("Yes. But it is not clear.", "yes"),        # only the first sentence counts
    ("Not really.", "yes"),                      # 'Not' is not in the list: the official rule says yes
    ("NO", "yes"),
])
def test_pope_yes_no(text, said):
    assert benchmarks.pope_yes_no(text) == said


def test_pope():
    # adversarial, labels yes yes no no:
    #   "Yes, there is a snowboard." yes/TP, "No, there is not." no/FN, "There is no dog ..." no/TN, "Not really." yes/FP
    #   TP=FP=TN=FN=1: accuracy 2/4 = 50%, precision 1/2, recall 1/2, F1 50%, yes ratio 2/4 = 50%
    # popular, labels yes no: "yes" TP, "No" TN -> accuracy, precision, recall, F1 100%, yes ratio 1/2 = 50%
    # random, labels yes no yes:
    #   "Yes" TP, "Yes. But it is not clear." yes/FP, "There is a dog, not a person." no/FN
    #   accuracy 1/3 = 33.33%, precision 1/2, recall 1/2, F1 50%, yes ratio 2/3 = 66.67%
    # mean F1 = (50 + 100 + 50) / 3 = 66.67%
    # (the answers file lists popular first and the label files number from 1: pairing is by question-file order)
    report = benchmarks.score_pope(read_jsonl(fixture("pope", "answers.jsonl")),
                             read_jsonl(fixture("pope", "llava_pope_test.jsonl")),
                             benchmarks.read_pope_labels(fixture("pope", "coco")))
    assert report["categories"]["adversarial"] == pytest.approx(
        {"TP": 1, "FP": 1, "TN": 1, "FN": 1, "accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0,
         "yes_ratio": 50.0})
    assert report["categories"]["popular"] == pytest.approx(
        {"TP": 1, "FP": 0, "TN": 1, "FN": 0, "accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0,
         "yes_ratio": 50.0})
    assert report["categories"]["random"] == pytest.approx(
        {"TP": 1, "FP": 1, "TN": 0, "FN": 1, "accuracy": 100 / 3, "precision": 50.0, "recall": 50.0, "f1": 50.0,
         "yes_ratio": 200 / 3})
    assert report["mean_f1"] == pytest.approx(200 / 3)


def test_pope_needs_every_answer():
    answers = [a for a in read_jsonl(fixture("pope", "answers.jsonl")) if a["question_id"] != 3]
    with pytest.raises(ValueError, match="no answer for question_id 3"):
        benchmarks.score_pope(answers, read_jsonl(fixture("pope", "llava_pope_test.jsonl")),
                        benchmarks.read_pope_labels(fixture("pope", "coco")))


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA

@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("C. sandstone", "C"),
    ("The answer is B.", "B"),
    ("The answer is B. The answer is C.", "FAILED"),  # the regex must match exactly once
    ("I think it is the first one", "FAILED"),
    ("AB", "FAILED"),
])
def test_sqa_letter(text, letter):
    assert benchmarks.sqa_letter(text) == letter


def test_sqa():
    # test split: pids 1 2 3 4 5 7 8 (pid 6 is train and is ignored)
    #   1 image  "B"                 -> B == B right
    #   2 image  "The answer is B."  -> B == B right
    #   3        "C. sandstone"      -> C == C right
    #   4 image  "I think it is ..." -> FAILED, wrong
    #   5        "E"                 -> E, but only A-B exist: wrong
    #   7        no answer           -> FAILED, wrong
    #   8 image  no answer           -> FAILED, wrong; not an IMG question: the original reads IMG off the answer's
    #                                   prompt, and a missing answer's is "Unknown"
    # accuracy 3/7 = 42.86%; IMG (1, 2, 4) 2/3 = 66.67%; 3 FAILED
    report = benchmarks.score_sqa(read_jsonl(fixture("sqa", "answers.jsonl")),
                            read_json(fixture("sqa", "problems.json")),
                            read_json(fixture("sqa", "pid_splits.json")))
    assert report == pytest.approx(
        {"accuracy": 300 / 7, "img_accuracy": 200 / 3, "questions": 7, "img_questions": 3, "failed": 3,
         "unanswered": 2})


def test_sqa_split_of_a_full_answers_file():
    # eval_science_qa.py scores the split's questions and ignores the other answers. The answers file also answers
    # pid 6 (train); --split minitest holds pids 1 4 7:
    #   1 image "B" right; 4 image "I think it is ..." FAILED; 7 no answer, FAILED (not IMG)
    #   accuracy 1/3 = 33.33%, IMG (1, 4) 1/2 = 50%, 2 FAILED, 1 unanswered; answers to 2 3 5 6 not scored
    # and --split test scores as test_sqa does: the train answer is ignored there too
    answers = read_jsonl(fixture("sqa", "answers.jsonl")) + [
        {"question_id": "6", "prompt": "<image>\nWhich ocean is highlighted?", "text": "A"}]
    problems, pid_splits = read_json(fixture("sqa", "problems.json")), read_json(fixture("sqa", "pid_splits.json"))
    report = benchmarks.score_sqa(answers, problems, pid_splits, split="minitest")
    assert report == pytest.approx(
        {"accuracy": 100 / 3, "img_accuracy": 50.0, "questions": 3, "img_questions": 2, "failed": 2, "unanswered": 1})
    assert benchmarks.score_sqa(answers, problems, pid_splits)["accuracy"] == pytest.approx(300 / 7)
    # an answer to a question of no split is still an error: the answers are another benchmark's
    with pytest.raises(ValueError, match="unknown question_id '99'"):
        benchmarks.score_sqa(answers + [{"question_id": "99", "prompt": "?", "text": "A"}], problems, pid_splits,
                             split="minitest")


# ---------------------------------------------------------------------------------------------------------------
# MME

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"),
    ("No.", "no"),                  # not exactly "no", but "no" is within the first 4 characters
    ("Yes, there is.", "yes"),
    ("Not sure", "no"),             # "not " contains "no"
    ("I am not sure", "other"),     # "i am" has neither
    ("The answer is yes", "other"),
])
def test_mme_yes_no(text, parsed):
    assert benchmarks.mme_yes_no(text) == parsed


def test_mme():
    # existence (perception), two images:
    #   000000006040: train "Yes" = Yes right, bed "No" = No right                -> image right
    #   000000018150: bed "Yes, there is." = Yes right, dog "Yes" != No wrong     -> image wrong (acc+ miss)
    #   acc 3/4 = 75, acc+ 1/2 = 50, score 125
    # artwork (perception, questions_answers_YN/ layout), one image:
    #   religious "Not sure" -> no != Yes wrong, historical "no." -> no = No right
    #   acc 1/2 = 50, acc+ 0/1 = 0, score 50
    # code_reasoning (cognition), one image (its ground truth has two spaces before "Please answer yes or no."):
    #   python "yes" right, c++ "I am not sure" -> other wrong: acc 50, acc+ 0, score 50
    # perception = 125 + 50 = 175, cognition = 50
    report = benchmarks.score_mme(read_jsonl(fixture("mme", "answers.jsonl")),
                            benchmarks.read_mme_ground_truth(fixture("mme", "MME_Benchmark_release_version")))
    assert report == {
        "categories": {"existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
                       "artwork": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0},
                       "code_reasoning": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}},
        "perception": 175.0, "cognition": 50.0, "unanswered": 0}
    perception_only = [a for a in read_jsonl(fixture("mme", "answers.jsonl")) if "code" not in a["question_id"]]
    ground_truth = benchmarks.read_mme_ground_truth(fixture("mme", "MME_Benchmark_release_version"))
    report = benchmarks.score_mme(perception_only, ground_truth)
    assert report["cognition"] == 0.0  # printed as perception is ("0.00"), not as an int ("0")
    assert report["unanswered"] == 2  # code_reasoning's two questions
    assert f"{'cognition':<16}{'0.00':>10}" in benchmarks.format_report("mme", report).splitlines()


def test_mme_unanswered_question_is_left_out_of_acc_and_acc_plus():
    # calculation.py takes the answers two by two as one image's, so it cannot score a file with one missing.
    # Left out: existence 000000006040 "train" (right). existence then:
    #   acc over the 3 answered: bed right, bed right, dog wrong -> 2/3 = 66.67
    #   acc+ over the images with both questions answered: only 000000018150, wrong -> 0/1 = 0
    #   score 66.67 (judging 000000006040 on its one answer would give acc+ 1/2 and 116.67)
    # artwork 50 and code_reasoning 50 as in test_mme: perception = 66.67 + 50, cognition 50, 1 unanswered
    answers = [a for a in read_jsonl(fixture("mme", "answers.jsonl")) if "train" not in a["prompt"]]
    report = benchmarks.score_mme(answers,
                                  benchmarks.read_mme_ground_truth(fixture("mme", "MME_Benchmark_release_version")))
    assert report["categories"]["existence"] == pytest.approx({"acc": 200 / 3, "acc_plus": 0.0, "score": 200 / 3})
    assert report["perception"] == pytest.approx(200 / 3 + 50)
    assert (report["cognition"], report["unanswered"]) == (50.0, 1)


# ---------------------------------------------------------------------------------------------------------------
# MMBench

@pytest.mark.parametrize("text, letter", [
    ("A", "A"),
    ("B. a green truck", "B"),
    ("(C)", "C"),
    ("The answer is B", "B"),   # 'B' is the only option letter standing alone
    ("green", "A"),             # no letter: the one option whose text the answer contains
    ("A or B", None),           # two letters and no option text: no match, wrong
    ("Z", None),
])
def test_mmbench_letter(text, letter):
    assert benchmarks.mmbench_letter(text, {"A": "green", "B": "blue", "C": "red"}) == letter


def test_mmbench_circular():
    # q0 (image_scene, coarse):      rows 0 "A" right, 1000000 "B" right                           -> right
    # q1 (image_scene, coarse):      rows 1 "C", 1000001 "B. a green truck", 2000001 "A" right,
    #                                3000001 "C" but the truck is D there                          -> wrong
    # q2 (attribute_recognition, finegrained): 2 "The answer is B" right, 1000002 "green" = A right (text match),
    #                                2000002 "C" right                                             -> right
    # q3 (image_style, coarse):      3 "A" right, 1000003 "A or B" no match                         -> wrong
    # overall 2/4 = 50%; image_scene 1/2 = 50%, attribute_recognition 1/1 = 100%, image_style 0/1 = 0%
    # coarse_perception (q0, q1, q3) 1/3 = 33.33%, finegrained (q2) 1/1 = 100%
    report = benchmarks.score_mmbench(read_jsonl(fixture("mmbench", "answers.jsonl")),
                                read_tsv(fixture("mmbench", "mmbench_dev_20230712.tsv")))
    assert report["accuracy"] == 50.0
    assert (report["questions"], report["unanswered"]) == (4, 0)
    assert report["by_category"] == {"attribute_recognition": 100.0, "image_scene": 50.0, "image_style": 0.0}
    assert report["by_l2_category"] == pytest.approx(
        {"coarse_perception": 100 / 3, "finegrained_perception (instance-level)": 100.0})


def test_mmbench_unanswered_row_fails_its_question():
    # drop the answer of row 1000000: q0 loses its second rotation -> q0 wrong; right: q2 only -> 1/4 = 25%
    answers = [a for a in read_jsonl(fixture("mmbench", "answers.jsonl")) if a["question_id"] != 1000000]
    report = benchmarks.score_mmbench(answers, read_tsv(fixture("mmbench", "mmbench_dev_20230712.tsv")))
    assert (report["accuracy"], report["questions"], report["unanswered"]) == (25.0, 4, 1)


def test_mmbench_all_rounds_answers():
    # llava's --all-rounds asks one tsv row in every rotation; option_char gives each shown option's tsv letter.
    # row 7: A red, B green, C blue, answer B (green)
    # round 0 shows red green blue  (A B C): "B" -> B right
    # round 1 shows green blue red  (B C A): "A" -> B right
    # round 2 shows blue red green  (C A B): "C" -> B right, or "A" -> C wrong
    rows = [{"index": "7", "question": "What color is the shirt?", "A": "red", "B": "green", "C": "blue", "D": "",
             "answer": "B", "category": "attribute_recognition"}]
    shown = [(["red", "green", "blue"], ["A", "B", "C"]), (["green", "blue", "red"], ["B", "C", "A"]),
             (["blue", "red", "green"], ["C", "A", "B"])]

    def rounds(texts):
        return [{"question_id": 7, "round_id": r, "prompt": "", "text": text, "options": options, "option_char": chars}
                for r, (text, (options, chars)) in enumerate(zip(texts, shown))]

    assert benchmarks.score_mmbench(rounds(["B", "A", "C"]), rows)["accuracy"] == 100.0
    assert benchmarks.score_mmbench(rounds(["B", "A", "A"]), rows)["accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# SEED-Bench

def test_seed():
    # 101669 (image, Scene Understanding)     "B"  == "B" right   (question_id written as an int)
    # 104933 (image, Scene Understanding)     "A." != "A" wrong   (exact match only)
    # 89257  (image, Instance Identity)       "C"  == "C" right
    # 300001 (video, Action Recognition)      "D"  == "D" right
    # 300002 (video, Action Recognition)      no answer   wrong
    # total 3/5 = 60%; image 2/3 = 66.67%, video 1/2 = 50%
    # Scene Understanding 1/2 = 50%, Instance Identity 1/1 = 100%, Action Recognition 1/2 = 50%
    report = benchmarks.score_seed(read_jsonl(fixture("seed", "answers.jsonl")),
                             read_json(fixture("seed", "SEED-Bench.json")))
    assert (report["accuracy"], report["questions"], report["unanswered"]) == (60.0, 5, 1)
    assert report["by_data_type"] == pytest.approx({"image": 200 / 3, "video": 50.0})
    assert report["by_question_type"] == {"Action Recognition": 50.0, "Instance Identity": 100.0,
                                          "Scene Understanding": 50.0}


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_unknown_question_id_is_an_error():
    answers = read_jsonl(fixture("gqa", "answers.jsonl"))
    answers.append({"question_id": "999", "prompt": "?", "text": "yes"})
    with pytest.raises(ValueError, match="unknown question_id '999'"):
        benchmarks.score_gqa(answers, read_json(fixture("gqa", "testdev_balanced_questions.json")))


def test_duplicate_answer_is_an_error():
    answers = read_jsonl(fixture("seed", "answers.jsonl"))
    with pytest.raises(ValueError, match="two answers for question_id"):
        benchmarks.score_seed(answers + answers[:1], read_json(fixture("seed", "SEED-Bench.json")))


# ---------------------------------------------------------------------------------------------------------------
# command line

def run_cli(*args):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_scores_pope():
    result = run_cli("score", "pope", "--answers", str(fixture("pope", "answers.jsonl")),
                     "--questions", str(fixture("pope", "llava_pope_test.jsonl")),
                     "--annotations", str(fixture("pope", "coco")))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].split() == ["mean_f1", "66.67"]
    assert "random" in result.stdout and "33.33" in result.stdout


def test_cli_scores_vqav2_with_questions(tmp_path):
    # the question file holds 3 of the 5 annotated questions, all answered: (0.6 + 1.0 + 0.9) / 3 = 83.33%
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"questions": VQAV2_QUESTIONS}))
    result = run_cli("score", "vqav2", "--answers", str(fixture("vqav2", "answers.jsonl")), "--questions",
                     str(questions), "--annotations", str(fixture("vqav2", "v2_mscoco_val2014_annotations.json")))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["accuracy", "83.33"] in lines and ["questions", "3"] in lines and ["unanswered", "0"] in lines


def test_cli_names_the_malformed_line(tmp_path):
    answers = [json.dumps(a) for a in read_jsonl(fixture("gqa", "answers.jsonl"))]
    answers[2] = answers[2][:-5]  # cut off the end of the third line
    bad = tmp_path / "answers.jsonl"
    bad.write_text("\n".join(answers) + "\n")
    result = run_cli("score", "gqa", "--answers", str(bad),
                     "--annotations", str(fixture("gqa", "testdev_balanced_questions.json")))
    assert result.returncode != 0
    assert f"{bad}:3: not valid JSON" in result.stderr


def test_answer_without_text_names_its_line(tmp_path):
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"question_id": "201307251", "prompt": "Is it overcast?", "text": "No"}\n\n'
                   '{"question_id": "201640614", "prompt": "Who is wearing the dress?"}\n')
    with pytest.raises(ValueError, match=":3: no 'text' field"):
        benchmarks.score_files("gqa", bad, fixture("gqa", "testdev_balanced_questions.json"))


def test_cli_names_the_malformed_json_file(tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text("{'question_id': 'single quotes are not JSON'}")
    result = run_cli("score", "gqa", "--answers", str(fixture("gqa", "answers.jsonl")), "--annotations", str(bad))
    assert result.returncode == 2
    assert result.stderr == (f"error: {bad}: not valid JSON at line 1 column 2 "
                             "(Expecting property name enclosed in double quotes)\n")


def test_cli_annotations_of_another_layout_is_one_line(tmp_path, capsys):
    wrong = tmp_path / "v2_mscoco_val2014_annotations.json"
    wrong.write_text('{"questions": []}')  # valid JSON, but VQAv2's questions file, not its annotations
    with pytest.raises(SystemExit) as exit_:
        eval.main(["score", "vqav2", "--answers", str(fixture("vqav2", "answers.jsonl")), "--annotations", str(wrong)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: the vqav2 files are not laid out as its scorer reads them (KeyError: "
                                       "'annotations'); `eval.py score --help` lists what each benchmark takes\n")


def unreadable_inputs(tmp_path):
    """{case: (the arguments after `score`, the error line eval.py must print)}."""
    gqa = ["--answers", fixture("gqa", "answers.jsonl"),
           "--annotations", fixture("gqa", "testdev_balanced_questions.json")]
    pope = ["--answers", fixture("pope", "answers.jsonl"), "--questions", fixture("pope", "llava_pope_test.jsonl")]
    gone = tmp_path / "gone"
    sqa = tmp_path / "sqa"
    sqa.mkdir()
    (sqa / "problems.json").write_bytes(fixture("sqa", "problems.json").read_bytes())
    latin1 = tmp_path / "mmbench.tsv"
    latin1.write_bytes(fixture("mmbench", "mmbench_dev_20230712.tsv").read_bytes() + "café\n".encode("latin-1"))
    mme = tmp_path / "MME"
    shutil.copytree(fixture("mme", "MME_Benchmark_release_version"), mme)
    with open(mme / "existence" / "000000006040.txt", "a") as f:
        f.write("Is there a question without its answer?\n")
    return {
        # a missing input is named by its option
        "answers": (["gqa", *gqa[2:], "--answers", gone], f"--answers {gone}: no such file"),
        "annotations": (["gqa", *gqa[:2], "--annotations", gone], f"--annotations {gone}: no such file"),
        "questions": (["pope", "--answers", pope[1], "--questions", gone, "--annotations", fixture("pope", "coco")],
                      f"--questions {gone}: no such file"),
        "annotation folder": (["pope", *pope, "--annotations", gone], f"--annotations {gone}: no such directory"),
        "questions not taken": (["gqa", *gqa, "--questions", pope[3]],
                                "gqa takes no --questions: its ground truth lists the questions"),
        "answers folder": (["gqa", *gqa[2:], "--answers", tmp_path], f"--answers {tmp_path}: not a file"),
        "sqa file": (["sqa", "--answers", fixture("sqa", "answers.jsonl"), "--annotations", sqa],
                     f"--annotations {sqa}: no pid_splits.json in it"),
        # a file that cannot be read names itself
        "not utf-8": (["mmbench", "--answers", fixture("mmbench", "answers.jsonl"), "--annotations", latin1],
                      f"{latin1}: not UTF-8 text (invalid continuation byte)"),
        "mme line": (["mme", "--answers", fixture("mme", "answers.jsonl"), "--annotations", mme],
                     f"{mme / 'existence' / '000000006040.txt'}:3: not 'question<TAB>answer'"),
    }


@pytest.mark.parametrize("case", ["answers", "annotations", "questions", "annotation folder", "questions not taken",
                                  "answers folder", "sqa file", "not utf-8", "mme line"])
def test_cli_unreadable_input_is_one_line_naming_it(tmp_path, capsys, case):
    args, message = unreadable_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_:
        eval.main(["score", *map(str, args)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
