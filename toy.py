"""The toy world: a complete miniature of LLaVA's data and base models, made on the spot on a laptop CPU.

Coloured shapes on plain backgrounds stand in for COCO, in the official file formats: stage-1 captions
(blip_laion_cc_sbu_558k-style), stage-2 conversations (mix665k-style: questions with short or sentence answers,
descriptions, text-only chats, two-image questions) and a held-out question file (model_vqa_loader's format). Every
question has one right answer, so `python eval.py` can score exact matches.

The real recipe starts from a downloaded Vicuna and CLIP; the toy makes its own, in "stage 0":
- a LLaMA-style tokenizer learned from the world's text (in the layout of LLaMA's tokenizer.json);
- a small LLaMA trained on next-token prediction over the world's text;
- a small CLIP vision tower trained contrastively against a small text tower, as CLIP was (Radford et al. 2021),
  plus FILIP's token-wise similarity (Yao et al. 2021) so that its patch tokens, which LLaVA reads, say what they
  show, and NegCLIP-style hard negatives (Yuksekgonul et al. 2023) so that it must see shapes and places.
Both are saved as plain transformers directories, exactly what stage 1 of the real recipe loads.

Shapes: B images (and their captions) in a batch, N extra negative captions, T text tokens, P patches, D the shared
embedding size.
"""

import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from clip import CLIPVisionConfig, CLIPVisionTower, preprocess_image
from data import CONV_TEMPLATES, IMAGE_MARKER, SHORT_ANSWER, render, to_messages
from llama import Llama, LlamaConfig
from plumbing.benchmarks import by_key, percent, unknown_question
from plumbing.checkpoints import save_clip, save_llama
from plumbing.files import open_image
from plumbing.tokenizer import BOS, BOS_ID, EOS, UNK, llama_tokenizer, load_tokenizer
import tools

# -----------------------------------------------------------------------------
# the world: scenes, their pictures and their text

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230), "yellow": (240, 210, 30),
           "purple": (140, 50, 190), "orange": (250, 140, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78)}  # centre x, y
SIZES = {"small": 0.16, "large": 0.21}  # radius, as a fraction of the shorter side (large diagonal squares may touch)
CANVASES = ((64, 64), (64, 64), (64, 64), (64, 48), (48, 64))  # some non-square, to exercise the padding
EVAL_CATEGORIES = ("colour", "shape", "count", "position", "yes_no", "grounding", "describe")
# how often stage 2 asks each kind of question: count (read off the whole image, learned first) and size half as often
# as the look-ups, which find an object by one attribute and read another
QUESTION_WEIGHTS = dict(colour=2, shape=2, count=1, position=2, yes_no=2, size=1)
# the kinds of stage-2 sample and how often each comes: mix665k's, and LLaVA-Plus's tool use
STAGE2_MIX = dict(qa=66, describe=12, text=5, two_images=5, detect=10, measure=2)
# what a newcomer asks first; every one of them is answered with the whole description
DESCRIBE = ("Describe the image.", "Describe the image in detail.", "What is in this picture?",
            "What do you see in the image?", "Tell me about this image.", "What does the image show?")
NO_TOOL = "No tool needed."  # the thought of an answer without a tool (LLaVA-Plus's is a longer sentence)
CAPTION_INSTRUCTIONS = ("Describe the image concisely.", "Give a brief description of the image.",
                        "Render a clear and concise summary of the photo.", "What is in this picture?")
COLOUR_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "large": "small", "small": "large"}


def _scene(rng: random.Random) -> dict:
    """1-3 objects, no two sharing a colour, a shape or a position, so every question has one answer."""
    n = rng.randint(1, 3)
    # captions and descriptions name the objects in this random order: listed by place, they would give each place
    # away by its rank, and a model need never learn where a given object is
    objects = [dict(colour=c, shape=s, position=p, size=rng.choice(list(SIZES)), dx=rng.randint(-1, 1),
                    dy=rng.randint(-1, 1))
               for c, s, p in zip(rng.sample(list(COLOURS), n), rng.sample(SHAPES, n), rng.sample(list(POSITIONS), n))]
    return dict(background=rng.choice(list(BACKGROUNDS)), canvas=rng.choice(CANVASES), objects=objects)


def _scene_key(scene: dict) -> tuple:  # what a scene shows, up to a pixel of jitter and the order it is told in
    return scene["background"], scene["canvas"], tuple(sorted((o["colour"], o["shape"], o["position"], o["size"])
                                                              for o in scene["objects"]))


def _centre_radius(scene: dict, o: dict) -> tuple[float, float, float]:
    w, h = scene["canvas"]
    fx, fy = POSITIONS[o["position"]]
    return fx * w + o["dx"], fy * h + o["dy"], SIZES[o["size"]] * min(w, h)


def _box(scene: dict, o: dict) -> list[float]:
    """An object's true box, normalized [x1, y1, x2, y2], rounded to 2 decimals as tools give them."""
    (x, y, r), (w, h) = _centre_radius(scene, o), scene["canvas"]
    half = 0.85 * r if o["shape"] == "square" else r  # as _draw draws each shape
    bottom = 0.8 * r if o["shape"] == "triangle" else half
    box = ((x - half) / w, (y - half) / h, (x + half) / w, (y + bottom) / h)
    return [round(min(max(v, 0.0), 1.0), 2) for v in box]  # the canvas cuts off what lies beyond it


def _draw(scene: dict) -> Image.Image:
    w, h = scene["canvas"]
    image = Image.new("RGB", (w, h), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        (x, y, r), fill = _centre_radius(scene, o), COLOURS[o["colour"]]
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


def _turns(pairs: list, unified: bool = False) -> list[dict]:
    """LLaVA's conversation turns of (question, answer) pairs; unified, each answer in LLaVA-Plus's format with no
    tool, as LLaVA-Plus converts LLaVA-158K (an empty action list and a thought)."""
    turns = []
    for question, answer in pairs:
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "thoughts": NO_TOOL, "actions": [], "value": answer} if unified else
                     {"from": "gpt", "value": answer})
    return turns


def _tool_sample(scene: dict, file: str, kind: str, rng: random.Random) -> dict:
    """A LLaVA-Plus conversation: the question, the tool call, the tool's result (run on the image here, as
    LLaVA-Plus's data was made), and the answer read from it (official wordings: collect_data.py). A description
    calls detect with no caption, which names every shape it finds; the answer then tells each one's size and place,
    in the order the tool listed them."""
    o = rng.choice(scene["objects"])
    name = f"{o['colour']} {o['shape']}"
    tool, caption = ("detect", "") if kind == "describe" else (kind, name)
    question = (rng.choice(DESCRIBE) if kind == "describe" else f"Give the bounding box of the {name}."
                if kind == "detect" else f"How many pixels does the {name} cover?")
    result = tools.clean_result(tool, TOY_TOOLS[tool](_draw(scene), {"caption": caption}))
    if kind == "describe":
        rank = {phrase: i for i, phrase in enumerate(result["phrases"])}
        answer = _description(dict(scene, objects=sorted(
            scene["objects"], key=lambda o: rank.get(f"{o['colour']} {o['shape']}", len(rank)))))
    else:  # the rare shape the detector misses (one drawn over another): what the tool said is what the answer says
        found = result["boxes"] if tool == "detect" else result["areas"]
        answer = str(found[0]) if found else f"{tool} found no {name}."
    return dict(image=file, conversations=[
        {"from": "human", "value": _with_image(question, rng)},
        {"from": "gpt", "thoughts": f"I need {tool} to answer this.",
         "actions": [{"API_name": tool, "API_params": {"caption": caption}}],
         "value": f"I will use {tool} to help to answer the question. Please wait for a moment."},
        {"from": "human", "value": tools.tool_turn(tool, result, question)},
        {"from": "gpt", "thoughts": f"Thanks to the output of {tool}. I can answer the question better.", "actions": [],
         "value": answer}])


def without_tools(sample: dict) -> dict:
    """The sample as plain LLaVA data: a tool conversation loses the call and the tool's turn (the model must then
    work out the final answer from the image alone), every answer is its value. For LLaVA vs LLaVA-Plus."""
    turns = sample["conversations"]
    if turns[1].get("actions"):
        turns = turns[:1] + turns[3:]
    return dict(sample, conversations=[{"from": turn["from"], "value": turn["value"]} for turn in turns])


def _stage2_sample(scenes: list, files: list, objects_so_far: list, rng: random.Random) -> dict:
    """One stage-2 sample in LLaVA-Plus's unified format: questions about one image, a text-only chat, two images
    (mix665k's kinds), or a question a tool answers (a box, an area, a description). objects_so_far: the running
    total of the scenes' object counts."""
    short = rng.random() < 0.5  # like the VQA parts of mix665k: one-word answers with the SHORT_ANSWER suffix
    kind = rng.choices(list(STAGE2_MIX), weights=list(STAGE2_MIX.values()))[0]
    if kind == "qa":  # a scene in proportion to its objects: a lone object needs no finding
        k = rng.choices(range(len(scenes)), cum_weights=objects_so_far)[0]
    else:
        k = rng.randrange(len(scenes))
    if kind in ("detect", "measure", "describe"):  # and, in three samples of five, the chat goes on with no tool
        sample = _tool_sample(scenes[k], files[k], kind, rng)
        sample["conversations"] += _turns(_questions(scenes[k], rng.choice([0, 0, 1, 2, 3]), short, rng), True)
        return sample
    if kind == "text":
        facts = [_fact(rng) for _ in range(rng.randint(1, 2))]
        return dict(conversations=_turns([(q + SHORT_ANSWER, w) if short else (q, s) for q, w, s in facts], True))
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
                    conversations=_turns([(question + SHORT_ANSWER, word) if short else (question, sentence)], True))
    # several questions about the image, as mix665k's VQA samples: the image's tokens (and the system prompt) are
    # paid for once, and each question is one more lesson in finding an object by one attribute and reading another
    pairs = _questions(scenes[k], rng.randint(3, 8), short, rng)
    pairs[0] = (_with_image(pairs[0][0], rng), pairs[0][1])
    return dict(image=files[k], conversations=_turns(pairs, True))


def _questions(scene: dict, n: int, short: bool, rng: random.Random) -> list[tuple[str, str]]:
    """Up to n (question, answer) pairs about a scene, no question twice."""
    asked = {}
    for category in rng.choices(list(QUESTION_WEIGHTS), list(QUESTION_WEIGHTS.values()), k=n):
        q, w, s = _question(scene, category, rng)
        asked.setdefault(q, (q + SHORT_ANSWER, w) if short else (q, s))
    return list(asked.values())


# -----------------------------------------------------------------------------
# the toy world's tools (a skill repository for tools.py): a detector of its flat-coloured shapes, and a ruler


def find_shapes(image: Image.Image) -> list[dict]:
    """Every shape in a picture of the toy world, found in its pixels (not read from the generator's records): the
    connected regions of one palette colour, each with its colour, shape, box (normalized [x1, y1, x2, y2]) and area
    in pixels. Shape from the region's outline: a square fills its box, a circle π/4 of it, a triangle and a cross
    about half, the triangle's top rows narrow and its bottom rows wide, the cross's both narrow."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)  # (H, W, 3)
    H, W, _ = pixels.shape
    palette = np.array(list(COLOURS.values()))  # (K, 3)
    distance = np.abs(pixels[:, :, None] - palette).sum(-1)  # (H, W, K)
    colour = np.where(distance.min(-1) <= 60, distance.argmin(-1), -1)  # (H, W): palette index, -1 elsewhere
    # connected components: every pixel takes the smallest label among its 4 neighbours of its colour, until none
    # changes (as many rounds as a shape is wide)
    label = np.where(colour >= 0, np.arange(H * W).reshape(H, W), H * W)
    padded_colour = np.pad(colour, 1, constant_values=-2)
    while True:
        padded = np.pad(label, 1, constant_values=H * W)
        new = label
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            same = (padded_colour[dy:dy + H, dx:dx + W] == colour) & (colour >= 0)
            new = np.where(same, np.minimum(new, padded[dy:dy + H, dx:dx + W]), new)
        if np.array_equal(new, label):
            break
        label = new
    shapes = []
    for value in np.unique(label[colour >= 0]):
        ys, xs = np.nonzero(label == value)
        if len(ys) < 12:  # a speck, not a shape
            continue
        mask = label[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == value  # (h, w)
        rows = mask.sum(1)
        quarter = max(1, len(rows) // 4)
        fill = mask.mean()
        shape = ("square" if fill > 0.9 else "circle" if fill > 0.68 else
                 "triangle" if rows[:quarter].mean() < 0.6 * rows[-quarter:].mean() else "cross")
        shapes.append(dict(colour=list(COLOURS)[colour[ys[0], xs[0]]], shape=shape, area=len(ys),
                           box=[float(xs.min() / W), float(ys.min() / H), float((xs.max() + 1) / W),
                                float((ys.max() + 1) / H)]))
    return shapes


def _matching(image: Image.Image, caption: str) -> list[tuple[str, dict]]:
    """(phrase, shape) for each phrase of a Grounding-DINO-style caption ("red circle . blue square") and each shape
    it names: every word of the phrase is the shape's colour or shape. No caption: every shape, named."""
    shapes = find_shapes(image)
    phrases = [p.strip() for p in caption.lower().split(".") if p.strip()]
    if not phrases:
        return [(f"{s['colour']} {s['shape']}", s) for s in shapes]
    return [(phrase, s) for phrase in phrases for s in shapes
            if set(phrase.split()) - {"a", "an", "the"} <= {s["colour"], s["shape"], "object", "shape"}]


def detect(image: Image.Image, params: dict) -> dict:
    """The grounding tool, in Grounding DINO's schema: boxes, logits (the confidence: 1 for a whole shape of one
    flat colour) and phrases, for the phrases of params["caption"]."""
    found = _matching(image, str(params.get("caption", "")))
    return dict(boxes=[s["box"] for _, s in found], logits=[1.0] * len(found), phrases=[p for p, _ in found])


def measure(image: Image.Image, params: dict) -> dict:
    """The ruler: how many pixels each shape the caption names covers."""
    found = _matching(image, str(params.get("caption", "")))
    return dict(areas=[s["area"] for _, s in found], phrases=[p for p, _ in found])


TOY_TOOLS = {"detect": detect, "measure": measure}


# -----------------------------------------------------------------------------
# the world's files, in the official formats


def _train_tokenizer(texts: list, vocab_size: int) -> Tokenizer:
    """A small LLaMA-style tokenizer for the toy world, in the same structure as LLaMA's tokenizer.json: <unk>, <s>,
    </s>, the 256 byte tokens, BPE pieces learned from the texts, and "<image>" last (the id transformers' LLaVA
    needs for its image token; our pipeline never emits it)."""
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # learn within words, each with its leading "▁", and keep "\n" apart, as SentencePiece does for LLaMA; numbers
    # apart too, so that a box's ("[[0.09, 0.31, ...]]") are learned as pieces of their own, which an answer that
    # reads a tool's result copies whole
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("▁", behavior="merged_with_next"), pre_tokenizers.Split("\n", behavior="isolated"),
         pre_tokenizers.Split(Regex("▁?[0-9]+(?:\\.[0-9]+)?"), behavior="isolated")])
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 260, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = [UNK, BOS, EOS] + [f"<0x{b:02X}>" for b in range(256)] + sorted(learned["vocab"], key=learned["vocab"].get)
    tokenizer = llama_tokenizer({piece: i for i, piece in enumerate(pieces)}, [tuple(m) for m in learned["merges"]])
    tokenizer.add_special_tokens([AddedToken(IMAGE_MARKER, normalized=False, special=True)])
    return tokenizer


def world_paths(root: Path) -> dict:
    return dict(root=root, images=root / "images", stage1=root / "stage1.json", stage2=root / "stage2.json",
                stage2_without_tools=root / "stage2_without_tools.json", eval=root / "eval.jsonl",
                tokenizer=root / "tokenizer.json")


def _unseen_scenes(rng: random.Random, train: list, n: int) -> list:
    """n scenes drawn as the training ones were, none showing what a training scene (or another of them) shows."""
    seen, scenes = {_scene_key(s) for s in train}, []
    while len(scenes) < n:
        scene = _scene(rng)
        if _scene_key(scene) not in seen:
            scenes.append(scene)
            seen.add(_scene_key(scene))
    return scenes


def _eval_question(scene: dict, category: str, rng: random.Random) -> tuple[str, object]:
    """(question, answer) of one held-out question: one word (toy_normalize compares), a box (IoU), or a
    description (the same objects)."""
    if category == "grounding":
        o = rng.choice(scene["objects"])
        return f"Give the bounding box of the {o['colour']} {o['shape']}.", _box(scene, o)
    if category == "describe":
        return rng.choice(DESCRIBE), _description(scene)
    question, answer, _ = _question(scene, category, rng)
    return question + SHORT_ANSWER, answer


def _write_eval(scenes: list, images: Path, eval_file: Path, rng: random.Random):
    """eval_*.png, and 3 questions per scene in the official eval format plus `category`, `answer` and `objects` (how
    many the scene holds); the categories take turns, so each gets an equal share of the questions."""
    questions = []
    for i, scene in enumerate(scenes):
        _draw(scene).save(images / f"eval_{i:05d}.png")
        for j in range(3):
            category = EVAL_CATEGORIES[(3 * i + j) % len(EVAL_CATEGORIES)]
            question, answer = _eval_question(scene, category, rng)
            questions.append(dict(question_id=len(questions), image=f"eval_{i:05d}.png", text=question,
                                  category=category, answer=answer, objects=len(scene["objects"])))
    eval_file.write_text("".join(json.dumps(q) + "\n" for q in questions))


def make_toy_world(root, seed: int = 0, n_train_images: int = 4000, n_stage1: int = 4000, n_stage2: int = 8000,
                   n_eval_images: int = 100, vocab_size: int = 1000) -> dict:
    """Write the toy world under root and return its paths. Same seed, same bytes.

    images/: train_*.png (stage 1 and 2) and eval_*.png (held out: no eval scene repeats a training scene);
    stage1.json: blip_laion_cc_sbu_558k-style captions; stage2.json: mix665k-style chats (some text-only, some with
    two images) and tool use, in LLaVA-Plus's unified format; stage2_without_tools.json: the same as plain LLaVA data;
    eval.jsonl: 3 questions per eval image (see _write_eval); tokenizer.json: see _train_tokenizer."""
    paths, rng = world_paths(Path(root)), random.Random(seed)
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
    paths["stage2_without_tools"].write_text(json.dumps([without_tools(s) for s in stage2], indent=1))

    # the tokenizer learns the text as training will show it: inside the vicuna_v1 template, cut at the special
    # tokens (tokenize_prompt encodes the text between them separately)
    conv = CONV_TEMPLATES["vicuna_v1"]
    texts = [chunk for s in stage2 for part in render(conv, to_messages(s["conversations"], False)).split(EOS)
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
    return world_paths(root)


def ensure_toy_eval(world_root, n_scenes: int, seed: int = 0) -> dict:
    """The paths of make_toy_eval's question set for the toy world at world_root (made by ensure_toy_world with the
    same seed), in world_root/eval-<n_scenes>/, generated first (once) if it does not exist."""
    root = Path(world_root) / f"eval-{n_scenes}"
    _make_once(root, lambda folder: make_toy_eval(folder, n_scenes, seed),
               f"drawing {n_scenes} held-out scenes and their questions in {root}/, once")
    return dict(root=root, images=root / "images", eval=root / "eval.jsonl")

# -----------------------------------------------------------------------------
# stage 0: the base models (a stand-in for downloading Vicuna and CLIP)


class ContrastiveCLIP(torch.nn.Module):
    """CLIP's training setup (Radford et al. 2021, Fig. 3): image and text towers, projections into a shared space,
    symmetric cross-entropy over the batch's image-text similarity matrix. The text tower is a small causal
    transformer read out at its last token, like CLIP's (here our Llama class). A second, token-wise similarity
    (FILIP, Yao et al. 2021) trains the patch tokens too; see `token_wise_similarity`."""

    def __init__(self, vision: CLIPVisionConfig, vocab_size: int):
        super().__init__()
        self.vision = CLIPVisionTower(vision)
        self.text = Llama(LlamaConfig(vocab_size=vocab_size, hidden_size=vision.hidden_size,
                                      intermediate_size=2 * vision.hidden_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
        self.visual_projection = torch.nn.Linear(vision.hidden_size, vision.projection_dim, bias=False)
        self.text_projection = torch.nn.Linear(vision.hidden_size, vision.projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, images, text_ids, text_mask):
        """images (B, 3, H, W); text_ids, text_mask (B + N, T): row i < B is image i's caption, rows after B are
        extra negatives (hard ones) that only the image-to-text direction sees."""
        image_tokens = self.vision.post_layernorm(self.vision(images, select_layer=-1))  # (B, 1 + P, C)
        image_emb = F.normalize(self.visual_projection(image_tokens), dim=-1)  # (B, 1 + P, D)
        text_emb = F.normalize(self.text_projection(self.text(self.text.embed_tokens(text_ids))), dim=-1)  # (B+N, T, D)
        last = text_emb[torch.arange(len(text_ids)), text_mask.sum(1) - 1]  # (B + N, D) at each text's last token
        words = text_mask.clone()
        words[:, 0] = False  # BOS is no word
        word_to_patch, patch_to_word = token_wise_similarity(image_emb[:, 1:], text_emb, words)
        scale = self.logit_scale.exp().clamp(max=100)
        return (contrastive_loss(scale * image_emb[:, 0] @ last.T)  # CLIP's: class token against last text token
                + (contrastive_loss(scale * word_to_patch) + contrastive_loss(scale * patch_to_word)) / 2)


def token_wise_similarity(patches, words, word_mask):
    """FILIP's late interaction (Yao et al. 2021, eq. 4-5) between B images and B + N texts: each word is matched to
    its most similar patch and the scores averaged over the text's words, and each patch to its most similar word,
    averaged over the image's patches. patches (B, P, D) and words (B + N, T, D) unit vectors; word_mask (B + N, T)
    is False at padding. Returns (word_to_patch, patch_to_word), each (B, B + N).

    Why the toy needs it: with the class token's similarity alone, the patches may stay a private code that only the
    class token reads (shape came out of the toy's patches non-linearly, and the LLM learned it slowly). LLaVA's LLM
    reads the patches, so this term makes each patch say what it shows in the words of the captions."""
    sim = torch.einsum("ipd,jtd->ijpt", patches, words)  # (B, B + N, P, T)
    word_to_patch = (sim.amax(2) * word_mask).sum(-1) / word_mask.sum(-1)
    patch_to_word = sim.masked_fill(~word_mask[None, :, None, :], -1.0).amax(3).mean(-1)  # cosines are >= -1
    return word_to_patch, patch_to_word


def contrastive_loss(logits):
    """CLIP's symmetric cross-entropy on a (B, B + N) similarity matrix: each image picks its own text among all,
    and each of the first B texts picks its image (extra texts, hard negatives, have no image of their own)."""
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :len(logits)].T, targets)) / 2


def swap_shapes(caption: str, rng: random.Random) -> str:
    """The caption with every shape word replaced by another shape: a hard negative (as NegCLIP, Yuksekgonul et al.
    2023). In a batch of random scenes, colours and positions alone tell the captions apart; without these negatives
    the tower never needs to see shapes, and the LLM cannot learn what it is not shown."""
    return re.sub("|".join(SHAPES), lambda m: rng.choice([s for s in SHAPES if s != m.group()]), caption)


PLACE = f"(?:on|at) the ({'|'.join(POSITIONS)})"  # place_phrase's words


def swap_positions(caption: str, rng: random.Random) -> str:
    """The caption with the objects' places permuted among them (a lone object moved elsewhere): a hard negative
    with the same words as the caption, which only a tower that binds each object to its place tells apart."""
    places = re.findall(PLACE, caption)
    if len(places) > 1:
        shift = rng.randrange(1, len(places))  # a cyclic shift moves every object
        moved = places[shift:] + places[:shift]
    else:
        moved = [rng.choice([p for p in POSITIONS if p not in places])]
    phrases = iter(place_phrase(p) for p in moved)
    return re.sub(PLACE, lambda m: next(phrases), caption)


def lm_texts(world: dict) -> list[str]:
    """What the LM reads: each caption and conversation as one text, answers in LLaVA-Plus's format and the tools'
    outputs included, as stage 2 writes them. A stage 2 that must first learn the format's fixed tokens loses the
    look-ups (docs/toy_accuracy.md)."""
    return [" ".join(text.replace(IMAGE_MARKER, "").strip() for _, text in to_messages(sample["conversations"], False))
            for name in ("stage1", "stage2") for sample in json.loads(Path(world[name]).read_text())]


def train_toy_lm(world: dict, tokenizer: Tokenizer, steps: int, generator, lr_schedule) -> Llama:
    """The LM: next-token prediction on the world's captions and conversations, packed into blocks (nanoGPT style)."""
    ids = [t for enc in tokenizer.encode_batch(lm_texts(world)) for t in enc.ids + [tokenizer.token_to_id(EOS)]]
    block = 128
    data = torch.tensor(ids[:len(ids) // block * block]).view(-1, block)  # (n_blocks, block)
    llm = Llama(dataclasses.replace(LlamaConfig.from_name("toy"), vocab_size=tokenizer.get_vocab_size()))
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3, weight_decay=0.0)
    for step in tqdm(range(steps), desc="stage 0 LM"):
        batch = data[torch.randint(len(data), (32,), generator=generator)]  # (32, block)
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step, steps, 3e-3, 0.05)
        logits = llm.lm_head(llm(llm.embed_tokens(batch[:, :-1])))
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    tqdm.write(f"stage 0 LM: final loss {loss.item():.3f}")
    return llm


def train_toy_clip(world: dict, tokenizer: Tokenizer, steps: int, generator, lr_schedule, seed: int) -> CLIPVisionTower:
    """The vision tower: contrastive image-caption training on stage 1's pairs, all images preprocessed once, each
    batch's captions joined by their two hard negatives."""
    vision = CLIPVisionConfig.from_name("toy")
    pairs = [(s["image"], s["conversations"][1]["value"]) for s in json.loads(Path(world["stage1"]).read_text())]
    images = torch.stack([preprocess_image(open_image(Path(world["images"]) / name), vision.image_size)
                          for name, _ in pairs])  # (n_pairs, 3, H, W)
    clip = ContrastiveCLIP(vision, tokenizer.get_vocab_size())
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.1)
    batch_size, rng = 32, random.Random(seed)
    step, bar = 0, tqdm(total=steps, desc="stage 0 CLIP")
    while step < steps:
        order = torch.randperm(len(pairs), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size].tolist()
            captions = [pairs[i][1] for i in index]
            texts = [[BOS_ID] + tokenizer.encode(c, add_special_tokens=False).ids
                     for c in captions + [swap_shapes(c, rng) for c in captions]
                     + [swap_positions(c, rng) for c in captions]]
            text_ids = torch.zeros(len(texts), max(map(len, texts)), dtype=torch.long)  # (B + N, T) right-padded
            text_mask = torch.zeros_like(text_ids, dtype=torch.bool)
            for i, ids in enumerate(texts):
                text_ids[i, :len(ids)], text_mask[i, :len(ids)] = torch.tensor(ids), True
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(step, steps, 1e-3, 0.05)
            loss = clip(images[index], text_ids, text_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # drawn once, by update
            bar.update()
            if step == steps:
                break
    bar.close()
    tqdm.write(f"stage 0 CLIP: final contrastive loss {loss.item():.3f} (chance: {math.log(batch_size):.2f} for "
               f"texts, {math.log(2 * batch_size):.2f} for images)")
    return clip.vision


def make_base_models(paths: dict, seed: int, lm_steps: int, clip_steps: int, lr_schedule):
    """Stage 0: the world's LM and CLIP tower, saved as plain transformers directories (what stage 1 loads), the
    tokenizer beside the LM as in a Vicuna directory. lr_schedule(step, total, peak, warmup_ratio) is train.py's
    get_lr."""
    world = ensure_toy_world(paths["world"])
    tokenizer = load_tokenizer(world["tokenizer"])
    tqdm.write(f"stage 0: making the toy world's base models in {os.path.dirname(paths['llm'])} (a small LLaMA on "
               "the world's text, a small CLIP tower trained contrastively)")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    save_llama(train_toy_lm(world, tokenizer, lm_steps, generator, lr_schedule), paths["llm"])
    shutil.copy(world["tokenizer"], paths["llm"])
    save_clip(train_toy_clip(world, tokenizer, clip_steps, generator, lr_schedule, seed), paths["vision_tower"])


def prepare_toy(paths: dict, stage: int, seed: int, lm_steps: int, clip_steps: int, lr_schedule):
    """What a toy stage needs: the world (generated once), and base models made for it: stage 0 trains them into
    the run directory; otherwise they are the run directory's, or the shipped ones (toy_base/), which must have been
    made from this world's text (the same tokenizer)."""
    world = ensure_toy_world(paths["world"])
    if stage == 0 or not os.path.exists(os.path.join(paths["vision_tower"], "config.json")):
        make_base_models(paths, seed, lm_steps, clip_steps, lr_schedule)
    elif load_tokenizer(world["tokenizer"]).get_vocab() != load_tokenizer(paths["llm"]).get_vocab():
        raise SystemExit(f"the toy world in {world['root']} has other text than the base models in "
                         f"{os.path.dirname(paths['llm'])} were made for: run `python train.py --stage 0` to make "
                         "base models for it")


# -----------------------------------------------------------------------------
# the toy's training settings and paths (train.py), and its scoring (eval.py)

TOY_DEFAULTS = {  # minutes on a 2-core CPU: tiny models want larger learning rates and batches that fit the world
    1: dict(lr=2e-3, global_batch=32, micro_batch=32, max_len=512, epochs=3.0, num_workers=0,
            gradient_checkpointing=False, save_every=100,
            image_aspect_ratio="pad"),  # the toy's non-square images would lose shapes to a centre crop
    # stage 2: 4 micro-steps of similar lengths (the sampler) pad less than one of 32
    2: dict(lr=2e-3, global_batch=32, micro_batch=8, max_len=512, epochs=5.5, num_workers=0,
            gradient_checkpointing=False, save_every=100),
}


SHIPPED = Path(__file__).resolve().parent / "toy_base"  # stage 0's base models, shipped: stage 1 starts at once


def toy_paths(runs_dir: str, stage: int) -> dict:
    """Where the toy's stages read and write under runs_dir. The base models: stage 0 writes runs_dir/toy/base,
    which the later stages use where it exists, else the shipped ones."""
    toy = os.path.join(runs_dir, "toy")
    base = os.path.join(toy, "base")
    if stage != 0 and not os.path.exists(os.path.join(base, "clip", "config.json")) and SHIPPED.exists():
        base = str(SHIPPED)
    return dict(world=os.path.join(toy, "world"), llm=os.path.join(base, "llm"),
                vision_tower=os.path.join(base, "clip"), stage1=os.path.join(toy, "stage1", "model"),
                out=os.path.join(toy, f"stage{stage}"))


def toy_normalize(text):
    """'Yellow.' -> 'yellow': surrounding space, case and trailing periods don't count; nothing else is forgiven."""
    return text.strip().lower().rstrip(".").strip()


def described_objects(text: str) -> set:
    """The objects a description names, as (size, colour, shape, place): "A large red circle is on the left." ->
    ("large", "red", "circle", "left")."""
    pattern = (f"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) is (?:on|at) the "
               f"({'|'.join(POSITIONS)})")
    return set(re.findall(pattern, text.lower()))


def box_iou(a: list, b: list) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def toy_right(category: str, text: str, answer) -> bool:
    """Whether an answer is right: a box with IoU >= 0.5 with the truth (grounding), a description naming exactly
    the scene's objects (describe), else the same word after toy_normalize."""
    if category == "grounding":
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)]
        return len(numbers) >= 4 and box_iou(numbers[:4], answer) >= 0.5
    if category == "describe":
        return described_objects(text) == described_objects(answer)
    return toy_normalize(text) == toy_normalize(answer)


def score_toy(answers, questions):
    """questions: the toy world's eval.jsonl records (question_id, category, answer, and objects where the world
    has it). A question without an answer (its image could not be read) is wrong. Categories are listed in the order
    they first appear. `by_objects` splits the questions by how many objects their scene holds: a question about one
    of several objects needs the model to bind the object to its attributes, which one-object scenes never test."""
    by_id = by_key(answers, lambda a: a["question_id"])
    known = {q["question_id"] for q in questions}
    for question_id in by_id:
        if question_id not in known:
            raise unknown_question(question_id)
    hits, by_objects = defaultdict(list), defaultdict(list)
    for question in questions:
        answer = by_id.get(question["question_id"])
        hit = answer is not None and toy_right(question["category"], answer["text"], question["answer"])
        hits[question["category"]].append(hit)
        by_objects[question.get("objects")].append(hit)
    every = [hit for category_hits in hits.values() for hit in category_hits]

    def row(h):
        return {"accuracy": percent(h), "right": sum(h), "questions": len(h)}
    report = {**row(every), "by_category": {category: row(h) for category, h in hits.items()}}
    if None not in by_objects:  # a question file not made by toy.py may not say
        report["by_objects"] = {n: row(by_objects[n]) for n in sorted(by_objects)}
    return report


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


# -----------------------------------------------------------------------------
# your own data: a question type the finished toy model was never taught (README, "Fine-tune on your own data")

TASK_CATEGORIES = ("object at a place", "empty place")


def what_is_at(scene: dict, position: str) -> tuple[str, str]:
    """The new question type: "What is on the left?" -> "red circle", or "no object" where none is."""
    there = [f"{o['colour']} {o['shape']}" for o in scene["objects"] if o["position"] == position]
    return f"What is {place_phrase(position)}?", there[0] if there else "no object"


def make_toy_task(root, seed: int = 1, n_train: int = 2000, n_eval_scenes: int = 100, world_seed: int = 0,
                  n_world_images: int = 4000) -> dict:
    """A fine-tuning task as a user brings one, in the official formats under root: images/, train.json (LLaVA's
    conversation JSON in the format the toy's model speaks, LLaVA-Plus's: each image asked "What is on the left?" and
    the like for its four places, in a random order, and once something the toy already knows, so that it keeps what
    it knows) and eval.jsonl (the toy world's eval format: one question per place of held-out scenes, for
    `python eval.py --toy-questions root/eval.jsonl`).

    The scenes are new ones, none of them one of the held-out scenes of the toy world made with world_seed and
    n_world_images (its eval.jsonl measures what fine-tuning makes the model forget)."""
    root, rng, world_rng = Path(root), random.Random(seed), random.Random(world_seed)
    world_train = [_scene(world_rng) for _ in range(n_world_images)]  # drawn again, only to find its held-out scenes
    world_eval = _unseen_scenes(world_rng, world_train, 100)  # a world of up to 100 held-out scenes has these first
    train = _unseen_scenes(rng, world_eval, n_train)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i, scene in enumerate(train):
        _draw(scene).save(root / "images" / f"task_{i:05d}.png")
        pairs = [what_is_at(scene, position) for position in rng.sample(list(POSITIONS), len(POSITIONS))]
        question, answer, _ = _question(scene, rng.choice(list(QUESTION_WEIGHTS)), rng)
        pairs.insert(rng.randrange(len(pairs) + 1), (question, answer))
        pairs = [(q + SHORT_ANSWER, a) for q, a in pairs]
        pairs[0] = (_with_image(pairs[0][0], rng), pairs[0][1])
        samples.append(dict(id=f"task_{i:05d}", image=f"task_{i:05d}.png", conversations=_turns(pairs, True)))
    questions = []
    for i, scene in enumerate(_unseen_scenes(rng, train, n_eval_scenes)):
        _draw(scene).save(root / "images" / f"task_eval_{i:05d}.png")
        for position in POSITIONS:
            question, answer = what_is_at(scene, position)
            questions.append(dict(question_id=len(questions), image=f"task_eval_{i:05d}.png",
                                  text=question + SHORT_ANSWER, category=TASK_CATEGORIES[answer == "no object"],
                                  answer=answer, objects=len(scene["objects"])))
    (root / "train.json").write_text(json.dumps(samples, indent=1))
    (root / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return dict(root=root, images=root / "images", train=root / "train.json", eval=root / "eval.jsonl")
