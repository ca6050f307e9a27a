"""The benchmarks of the LLaVA-1.5 paper: how two of them are asked (ScienceQA's json, MMBench's tsv), how each is
scored, and how their ground-truth files are read. Each scorer is a pure function of the answers file's records and
of the ground truth as the benchmark ships it, reproducing one official script:

  normalize_answer    EvalAIAnswerProcessor in llava/eval/m4c_evaluator.py (from MMF; the VQA servers' normalization)
  score_vqav2         scripts/convert_vqav2_for_submission.py (an empty answer for each question without one) +
                      VQAv2 val accuracy: 10-annotator leave-one-out soft accuracy, m4c TextVQAAccuracyEvaluator
  score_textvqa       llava/eval/eval_textvqa.py (answers matched by image id + question text) + the same evaluator
  score_vizwiz        the same accuracy over val.json, plus the unanswerable F1 of the VizWiz VQA evaluation code
  score_gqa           scripts/convert_gqa_for_eval.py (text.rstrip('.').lower()) + the official GQA eval.py accuracy
  score_pope          llava/eval/eval_pope.py
  score_sqa           llava/eval/eval_science_qa.py (Accuracy and IMG-Accuracy)
  score_mme           MME/convert_answer_to_mme.py + MME eval_tool/calculation.py
  score_mmbench       VLMEvalKit circular evaluation with exact matching (vlmeval/evaluate/multiple_choice.py,
                      vlmeval/utils/matching_util.py), the rule of the MMBench leaderboard LLaVA submits to
  score_seed          scripts/convert_seed_for_submission.py

VQAv2 test-dev and VizWiz test are scored by servers; here they are scored against local annotations in the format of
their val splits. All metrics are percentages, like the paper's table (MME: sum of two percentages).
"""

import re
from collections import Counter, defaultdict
from pathlib import Path

from model import IMAGE_MARKER
from plumbing.files import check_input, open_text, read_json, read_jsonl, read_tsv

# ---------------------------------------------------------------------------------------------------------------
# asking: the two runners that build their prompts in code, model_vqa_science for ScienceQA's json and
# model_vqa_mmbench for MMBench's tsv, both run with --single-pred-prompt and up to 1024 new tokens

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

def percent(hits):
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def by_key(answers, key):
    """Answer records by `key(record)`; two answers to one question are an error, not a silent overwrite. The
    official scripts keep the last one (dicts), score both (eval_textvqa.py) or shift every later pairing with the
    labels (eval_pope.py, MME's calculation.py); two answers mean files merged twice or two runs mixed."""
    index = {}
    for answer in answers:
        k = key(answer)
        if k in index:
            raise ValueError(f"two answers for question_id {answer['question_id']!r}")
        index[k] = answer
    return index


def unknown_question(question_id):
    # the official converters of VQAv2, VizWiz, GQA, MMBench and SEED drop such an answer unseen; it means the
    # answers or the ground truth are another benchmark's or split's file
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
    """scored: (prediction, gt_answers, answer_type) per scored question."""
    by_type = defaultdict(list)
    for prediction, gt_answers, answer_type in scored:
        by_type[answer_type].append(vqa_accuracy(prediction, gt_answers))
    every = [accuracy for accuracies in by_type.values() for accuracy in accuracies]
    report = {"accuracy": percent(every), "questions": len(every)}
    if None not in by_type:
        report["by_answer_type"] = {t: percent(by_type[t]) for t in sorted(by_type)}
    return report


def score_vqav2(answers, annotations, question_ids=None):
    """annotations: the parsed v2_mscoco_val2014_annotations.json ({"annotations": [...]}); question_ids: the
    questions to score (a question file's), by default every annotated one.

    A question without an answer gets the empty answer scripts/convert_vqav2_for_submission.py writes for it, which
    scores 0, and is counted in `unanswered`; an answer to an annotated question outside question_ids is not
    scored (the converter only writes the question file's). Like m4c, this normalizes the human answers too; the
    VQA server's vqaEval.py only cleans them when the ten disagree, which differs only where the annotation file
    holds an unnormalized answer."""
    truth = {a["question_id"]: a for a in annotations["annotations"]}
    by_id = by_key(answers, lambda a: a["question_id"])
    for question_id in by_id:
        if question_id not in truth:
            raise unknown_question(question_id)
    question_ids = dict.fromkeys(truth if question_ids is None else question_ids)  # file order, once each
    scored = []
    for question_id in question_ids:
        if question_id not in truth:
            raise ValueError(f"question_id {question_id!r} of the question file is not in the annotations")
        ann = truth[question_id]
        text = by_id[question_id]["text"] if question_id in by_id else ""
        scored.append((text, [a["answer"] for a in ann["answers"]], ann["answer_type"]))
    return {**_vqa_report(scored), "unanswered": len(question_ids.keys() - by_id.keys())}


def _textvqa_question(prompt):
    # the LLaVA prompt is "question\nReference OCR token: ...\nAnswer the question using a single word or phrase."
    return next(line for line in prompt.split("\n") if not line.startswith("Reference OCR token:"))


def score_textvqa(answers, annotations):
    """annotations: the parsed TextVQA_0.5.1_val.json ({"data": [...]}).

    LLaVA's question_id is the TextVQA image_id, so, as eval_textvqa.py does, an answer is matched by
    (image_id, question text lower-cased)."""
    truth = {(a["image_id"], a["question"].lower()): a for a in annotations["data"]}
    scored = []
    for key, answer in by_key(answers, lambda a: (a["question_id"], _textvqa_question(a["prompt"]).lower())).items():
        if key not in truth:
            raise unknown_question(answer["question_id"])
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
    for answer in by_key(answers, lambda a: a["question_id"]).values():
        if image_of.get(answer["question_id"]) not in truth:
            raise unknown_question(answer["question_id"])
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
    for answer in by_key(answers, lambda a: str(a["question_id"])).values():
        question = questions.get(str(answer["question_id"]))
        if question is None:
            raise unknown_question(answer["question_id"])
        correct = answer["text"].rstrip(".").lower() == question["answer"]
        # GQA's eval.py calls a question "open" when its structural type is query, "binary" otherwise
        hits["open" if question["types"]["structural"] == "query" else "binary"].append(correct)
    every = hits["binary"] + hits["open"]
    return {"accuracy": percent(every), "binary": percent(hits["binary"]), "open": percent(hits["open"]),
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
    by_id = by_key(answers, lambda a: a["question_id"])
    known = {q["question_id"] for q in questions}
    for question_id in by_id:
        if question_id not in known:
            raise unknown_question(question_id)
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
            "precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1, "yes_ratio": percent(said_yes)}
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

    As in eval_science_qa.py, the split's questions are scored and answers to other splits' questions ignored (a
    full answers file scores any split), and a question without an answer counts as FAILED. IMG-Accuracy (the
    number LLaVA reports) is over the answers whose prompt holds "<image>", as the original reads it
    (model_vqa_science writes it for the questions with an image): a question left unanswered counts against
    Accuracy but not in IMG-Accuracy."""
    if split not in pid_splits:
        raise ValueError(f"pid_splits.json has no split {split!r}")
    every_pid = {pid for pids in pid_splits.values() for pid in pids}
    by_pid = by_key(answers, lambda a: str(a["question_id"]))
    for pid in by_pid:
        if pid not in every_pid:
            raise unknown_question(pid)
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
    return {"accuracy": percent(hits), "img_accuracy": percent(image_hits), "questions": len(hits),
            "img_questions": len(image_hits), "failed": failed,
            "unanswered": sum(pid not in by_pid for pid in pid_splits[split])}


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
    is acc + acc+ (in percent, max 200); perception and cognition are the sums over their categories.

    calculation.py takes a category's answers two by two as one image's, so it needs every answer. Here a question
    without an answer is left out and counted in `unanswered`: acc is over the answered questions, acc+ over the
    images with all their questions answered, and a category without answers is not in the sums."""
    truth = {(r["category"], r["file"], _mme_question(r["question"])): r["answer"].lower() for r in ground_truth}
    questions_of_image = Counter((category, file) for category, file, _ in truth)
    hits, image_hits = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for answer in by_key(answers, lambda a: (a["question_id"], a["prompt"])).values():
        # question_id is "category/[images/]name.ext"; the ground truth of that image is in name.txt
        category, name = answer["question_id"].split("/")[0], answer["question_id"].split("/")[-1]
        key = (category, name.rsplit(".", 1)[0] + ".txt", _mme_question(answer["prompt"]))
        if key not in truth:
            raise unknown_question(answer["question_id"])
        correct = mme_yes_no(answer["text"]) == truth[key]
        hits[category].append(correct)
        image_hits[category][key[1]].append(correct)
    order = MME_PERCEPTION + MME_COGNITION
    categories = {}
    for category in sorted(hits, key=lambda c: order.index(c) if c in order else len(order)):
        acc = percent(hits[category])
        acc_plus = percent([all(image) for file, image in image_hits[category].items()
                            if len(image) == questions_of_image[category, file]])
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"categories": categories,
            "perception": float(sum(c["score"] for name, c in categories.items() if name in MME_PERCEPTION)),
            "cognition": float(sum(c["score"] for name, c in categories.items() if name in MME_COGNITION)),
            "unanswered": len(truth) - sum(len(category_hits) for category_hits in hits.values())}


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
    for answer in by_key(answers, lambda a: (a["question_id"], a.get("round_id", 0))).values():
        index = int(answer["question_id"])
        if index not in by_index:
            raise unknown_question(answer["question_id"])
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
    report = {"accuracy": percent(list(right.values())), "questions": len(right),
              "unanswered": len(by_index.keys() - answered)}
    for column in ("category", "l2-category"):
        groups = defaultdict(list)
        for index, is_right in right.items():
            if by_index[index].get(column):
                groups[by_index[index][column]].append(is_right)
        if groups:
            report[f"by_{column.replace('-', '_')}"] = {name: percent(groups[name]) for name in sorted(groups)}
    return report


# ---------------------------------------------------------------------------------------------------------------
# SEED-Bench: exact letter match

def score_seed(answers, annotations):
    """annotations: the parsed SEED-Bench.json ({"questions": [...], "question_type": {name: id}}).

    Right means text == answer exactly ("A." is wrong); a question without an answer is wrong."""
    by_id = by_key(answers, lambda a: str(a["question_id"]))
    known = {str(q["question_id"]) for q in annotations["questions"]}
    for question_id in by_id:
        if question_id not in known:
            raise unknown_question(question_id)
    type_name = {type_id: name for name, type_id in annotations["question_type"].items()}
    hits, by_data, by_type = [], defaultdict(list), defaultdict(list)
    for question in annotations["questions"]:
        answer = by_id.get(str(question["question_id"]))
        hits.append(answer is not None and answer["text"] == question["answer"])
        by_data[question["data_type"]].append(hits[-1])
        by_type[type_name[question["question_type_id"]]].append(hits[-1])
    return {"accuracy": percent(hits), "questions": len(hits),
            "unanswered": sum(str(q["question_id"]) not in by_id for q in annotations["questions"]),
            "by_data_type": {name: percent(by_data[name]) for name in sorted(by_data)},
            "by_question_type": {name: percent(by_type[name]) for name in sorted(by_type)}}


# ---------------------------------------------------------------------------------------------------------------
# reading the files each benchmark ships

def read_question_ids(path):
    """The question_ids of VQAv2's v2_OpenEnded_mscoco_*_questions.json ({"questions": [...]}), or of a question
    jsonl in LLaVA's format (a name ending in .jsonl)."""
    if str(path).endswith(".jsonl"):
        return [q["question_id"] for q in read_jsonl(path, required=("question_id",))]
    return [q["question_id"] for q in read_json(path)["questions"]]


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
    if bench in ("vizwiz", "pope") and questions is None:
        raise ValueError(f"{bench} needs --questions (LLaVA's question jsonl)")
    if questions is not None:
        if bench not in ("vqav2", "vizwiz", "pope"):
            raise ValueError(f"{bench} takes no --questions: its ground truth lists the questions")
        check_input("--questions", questions)
    check_input("--annotations", annotations, "directory" if bench in ("pope", "sqa", "mme") else "file")
    if bench == "sqa":
        for name in ("problems.json", "pid_splits.json"):
            if not (Path(annotations) / name).is_file():
                raise FileNotFoundError(f"--annotations {annotations}: no {name} in it")
    answers = read_jsonl(answers_path, required=("question_id", "prompt", "text"))
    if bench == "vqav2":
        return score_vqav2(answers, read_json(annotations), None if questions is None else read_question_ids(questions))
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


SCORE_INPUTS = """\
what each benchmark reads (the files of the LLaVA-1.5 eval data and of the benchmarks themselves):
  vqav2    --annotations v2_mscoco_val2014_annotations.json  [--questions v2_OpenEnded_mscoco_val2014_questions.json
           or LLaVA's QUESTIONS.jsonl: the questions to score; default every annotated one]
  textvqa  --annotations TextVQA_0.5.1_val.json
  vizwiz   --questions QUESTIONS.jsonl (LLaVA format: question_id, image)  --annotations val.json
  gqa      --annotations testdev_balanced_questions.json
  pope     --questions llava_pope_test.jsonl  --annotations DIR holding coco_pope_{adversarial,popular,random}.json
  sqa      --annotations DIR holding problems.json and pid_splits.json  [--split test]
  mme      --annotations MME_Benchmark_release_version/
  mmbench  --annotations mmbench_dev_20230712.tsv
  seed     --annotations SEED-Bench.json

a question without an answer (each report but pope's counts them as `unanswered`; mmbench counts tsv rows):
  is wrong     vqav2 (the official converter writes an empty answer for it), sqa (FAILED), mmbench (its question
               fails), seed; over every question of the ground truth, of --questions (vqav2) or of --split (sqa)
  is left out  textvqa (eval_textvqa.py scores the answered ones), vizwiz, gqa (their official scripts refuse the
               file), mme (calculation.py takes the answers two by two as one image's); mme's acc+ then counts only
               the images with all their questions answered
  is an error  pope (eval_pope.py pairs answers with labels by position)
an answer to a question the ground truth does not hold is an error: the answers or the ground truth are another
benchmark's or split's (the official converters of vqav2, vizwiz, gqa, mmbench and seed drop it silently). sqa scores
the questions of --split and ignores answers to the other splits', as eval_science_qa.py does; vqav2 with
--questions ignores answers to annotated questions outside that file, as its converter does.
two answers to one question are an error (official scripts keep the last one, or score both: textvqa, or pair all
later answers with the wrong labels: pope, mme).

example:
  python eval.py score pope --answers answers/pope.jsonl --questions llava_pope_test.jsonl --annotations pope/coco
"""
