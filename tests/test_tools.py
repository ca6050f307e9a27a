"""LLaVA-Plus: the answer parser, the cleaning of tool results, the loop (driven by a scripted model, so that each
branch is seen), the official tool-worker protocol against a stand-in server on 127.0.0.1, the toy world's tools on
its own pictures, and chat.py and eval.py with tools."""

import base64
import io
import json
import re
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

import chat
import eval
import tools
import toy
from data import CONV_TEMPLATES
from llama import LlamaConfig
from model import Llava, LlavaConfig
from clip import CLIPVisionConfig
from plumbing.checkpoints import save_llava
from plumbing.tokenizer import load_tokenizer

QUESTION = "Give the bounding box of the red circle."
CALL = ('"thoughts🤔" I need detect to answer this.\n"actions🚀" [{"API_name": "detect", "API_params": {"caption": '
        '"red circle"}}]\n"value👉" I will use detect to help to answer the question. Please wait for a moment.\n')


def final(value):
    return f'"thoughts🤔" Thanks to the output of detect. I can answer the question better.\n"actions🚀" []\n' \
           f'"value👉" {value}\n'


class Scripted:
    """A stand-in for ChatSession.ask: answers from a script, and records what it was asked."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def __call__(self, text, stream=None):
        self.asked.append(text)
        return self.answers.pop(0)


@pytest.fixture(scope="module")
def scene_image():
    """A toy scene with a red circle, and the circle's true box."""
    rng = random.Random(0)
    while True:
        scene = toy._scene(rng)
        circle = [o for o in scene["objects"] if (o["colour"], o["shape"]) == ("red", "circle")]
        if circle and len(scene["objects"]) > 1:
            return toy._draw(scene), toy._box(scene, circle[0])


# -----------------------------------------------------------------------------
# parsing, cleaning, the tool-result turn


def test_parse_answer_as_the_official_parser_but_never_eval():
    step = tools.parse_answer(CALL)
    assert step.thoughts == "I need detect to answer this." and not step.problem
    assert step.actions == [{"API_name": "detect", "API_params": {"caption": "red circle"}}]
    assert step.value == "I will use detect to help to answer the question. Please wait for a moment."
    assert tools.parse_answer("A red circle.").value == "A red circle." and not tools.parse_answer("x").actions
    # single quotes, which the official parser also accepts
    quoted = tools.parse_answer(CALL.replace('"API_name"', "'API_name'").replace('"detect"', "'detect'"))
    assert quoted.actions[0]["API_name"] == "detect"
    # what the official demo's eval() would crash on, or run: reported, and no tool
    for actions in ('[{"API_name": "detect", "API_params": {"caption": "red', "__import__('os').system('x')",
                    '{"API_name": "detect"}', '[{"API_params": {}}]', '[{"API_name": "detect", "API_params": 3}]'):
        step = tools.parse_answer(f'"thoughts🤔" t\n"actions🚀" {actions}\n"value👉" v\n')
        assert step.actions == [] and step.problem.startswith("malformed action") and step.value == "v", actions


def test_clean_result_as_the_official_demo():
    raw = {"boxes": [[0.123456, 0.5, 0.75, 0.999]], "logits": [0.4567], "phrases": ["girl"], "size": [480, 640],
           "masks_rle": ["..."]}
    assert tools.clean_result("grounding_dino", raw) == {"boxes": [[0.12, 0.5, 0.75, 1.0]], "logits": [0.46],
                                                         "phrases": ["girl"]}
    assert tools.clean_result("easyocr", {"boxes": [[0, 0, 1, 1]], "scores": [0.9], "texts": ["STOP"]}) == \
        {"texts": ["STOP"]}
    assert tools.clean_result("clip", {"retrieval_results": [{"caption": "a", "similarity": 0.3, "url": "u"}]}) == \
        {"retrieval_results": [{"caption": "a", "similarity": 0.3}]}
    assert tools.clean_result("instruct-pix2pix", {"edited_image": "b64"}) == \
        {"message": "The instruct-pix2pix has processed the image."}
    assert tools.tool_turn("detect", {"boxes": [[0.1, 0.2, 0.3, 0.4]]}, QUESTION) == (
        "detect model outputs: {'boxes': [[0.1, 0.2, 0.3, 0.4]]}\n\nPlease summarize the model outputs and answer my "
        f"first question: {QUESTION}")


# -----------------------------------------------------------------------------
# the loop


def test_the_loop_calls_the_tool_and_asks_again_with_its_result(scene_image):
    image, box = scene_image
    ask = Scripted(CALL, final("[0.1, 0.2, 0.3, 0.4]"))
    steps = tools.answer(ask, image, QUESTION, toy.TOY_TOOLS)
    assert [s.value for s in steps] == [steps[0].value, "[0.1, 0.2, 0.3, 0.4]"] and len(ask.asked) == 2
    result = tools.clean_result("detect", toy.detect(image, {"caption": "red circle"}))
    assert steps[0].tool == "detect" and steps[0].result == result and result["phrases"] == ["red circle"]
    assert ask.asked == [QUESTION, tools.tool_turn("detect", result, QUESTION)]
    assert toy.box_iou(result["boxes"][0], box) > 0.8
    # no action: the first answer is the reply
    ask = Scripted(final("red"))
    assert [s.value for s in tools.answer(ask, image, "What colour?", toy.TOY_TOOLS)] == ["red"] and len(ask.asked) == 1


def test_an_unknown_tool_a_failing_tool_or_a_second_round_is_told_not_crashed(scene_image):
    image, _ = scene_image
    unknown = CALL.replace("detect", "grounding_dino")
    ask = Scripted(unknown, final("I cannot tell."))
    steps = tools.answer(ask, image, QUESTION, toy.TOY_TOOLS)
    assert "no tool named 'grounding_dino'" in steps[0].problem and steps[0].result is None
    assert ask.asked[1].startswith("grounding_dino model outputs: {'error': \"no tool named 'grounding_dino'")
    assert steps[-1].value == "I cannot tell."

    def broken(image, params):
        raise RuntimeError("out of ink")
    ask = Scripted(CALL, final("sorry"))
    steps = tools.answer(ask, image, QUESTION, {"detect": broken})
    assert steps[0].problem == "detect failed: RuntimeError: out of ink" and "out of ink" in ask.asked[1]
    # one tool round per user message, as official: a second call in the answer is not run
    ask = Scripted(CALL, CALL, final("x"))
    steps = tools.answer(ask, image, QUESTION, toy.TOY_TOOLS)
    assert len(steps) == 2 and len(ask.asked) == 2 and steps[-1].tool == ""
    ask = Scripted(CALL, CALL, final("x"))
    assert len(tools.answer(ask, image, QUESTION, toy.TOY_TOOLS, max_rounds=2)) == 3


# -----------------------------------------------------------------------------
# the official tool-worker protocol


class StandIn(BaseHTTPRequestHandler):
    """A controller and a worker in one, speaking the official protocol; `seen` keeps what it was sent."""
    seen, delay, workers = [], 0.0, {"grounding_dino": "self"}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        if self.path == "/get_worker_address":
            address = self.workers.get(body["model"], "")
            reply = {"address": f"http://127.0.0.1:{self.server.server_port}" if address == "self" else address}
        elif self.path == "/worker_generate":
            time.sleep(self.delay)
            reply = {"boxes": [[0.1234, 0.2, 0.3, 0.4]], "logits": [0.77], "phrases": [body["caption"]],
                     "size": [64, 64]}
            if body["caption"] == "fail":  # what an official worker answers when its model raises
                reply = {"text": "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**",
                         "error_code": 50001}
        else:
            self.send_error(404)
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandIn.seen, StandIn.delay = [], 0.0
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_official_tool_workers_plug_in(stand_in, scene_image):
    image, _ = scene_image
    ask = Scripted(CALL.replace("detect", "grounding_dino").replace('"red circle"', '"red circle", "image": "x.jpg"'),
                   final("[0.12, 0.2, 0.3, 0.4]"))
    steps = tools.answer(ask, image, QUESTION, {}, tools.ToolServer(stand_in))
    assert steps[0].result == {"boxes": [[0.12, 0.2, 0.3, 0.4]], "logits": [0.77], "phrases": ["red circle"]}
    (path1, asked), (path2, sent) = StandIn.seen
    assert (path1, asked, path2) == ("/get_worker_address", {"model": "grounding_dino"}, "/worker_generate")
    assert (sent["caption"], sent["box_threshold"], sent["text_threshold"]) == ("red circle", 0.3, 0.25)
    assert "x.jpg" not in json.dumps(sent)  # an image named by the model is never sent; the user's is
    received = Image.open(io.BytesIO(base64.b64decode(sent["image"])))
    assert received.format == "PNG" and received.size == image.size
    assert ask.asked[1].startswith("grounding_dino model outputs: {'boxes': [[0.12, 0.2, 0.3, 0.4]]")


def test_a_tool_server_that_lacks_the_tool_fails_or_does_not_answer_is_told(stand_in, scene_image):
    image, _ = scene_image
    server = tools.ToolServer(stand_in, timeout=1.0)
    for call, says in ((CALL.replace("detect", "sam"), "has no worker for 'sam'"),
                       (CALL.replace("detect", "grounding_dino").replace("red circle", "fail"),
                        "grounding_dino failed: **NETWORK ERROR")):
        ask = Scripted(call, final("sorry"))
        steps = tools.answer(ask, image, QUESTION, {}, server)
        assert says in steps[0].problem and says.split(":")[0] in ask.asked[1], says
    StandIn.delay = 2.0
    ask = Scripted(CALL.replace("detect", "grounding_dino"), final("sorry"))
    started = time.time()
    steps = tools.answer(ask, image, QUESTION, {}, server)
    assert time.time() - started < 2.0 and "no answer" in steps[0].problem
    steps = tools.answer(Scripted(CALL, final("x")), image, QUESTION, {}, tools.ToolServer("http://127.0.0.1:9"))
    assert "no answer" in steps[0].problem  # nobody listens there


# -----------------------------------------------------------------------------
# the toy world's tools


def test_the_toy_detector_finds_every_shape_from_its_pixels():
    """On 300 scenes: each shape's colour and shape (any mix-up counts), and a box that overlaps the true one."""
    rng, exact, ious = random.Random(5), 0, []
    for _ in range(300):
        scene = toy._scene(rng)
        found = toy.find_shapes(toy._draw(scene))
        exact += {(f["colour"], f["shape"]) for f in found} == {(o["colour"], o["shape"]) for o in scene["objects"]}
        for o in scene["objects"]:
            boxes = [f["box"] for f in found if f["colour"] == o["colour"]]
            ious.append(max((toy.box_iou(b, toy._box(scene, o)) for b in boxes), default=0.0))
    assert exact >= 297 and sorted(ious)[len(ious) // 100] > 0.75  # 99 % of boxes


def test_detect_and_measure_answer_for_the_named_shapes(scene_image):
    image, box = scene_image
    assert toy.detect(image, {"caption": "red circle . green cross"})["phrases"] in (["red circle"],
                                                                                      ["red circle", "green cross"])
    result = toy.detect(image, {"caption": "the red circle"})
    assert result["logits"] == [1.0] and toy.box_iou(result["boxes"][0], box) > 0.8
    present = {(f["colour"], f["shape"]) for f in toy.find_shapes(image)}
    absent = next(f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES if (c, s) not in present and c != "red")
    assert toy.detect(image, {"caption": absent}) == {"boxes": [], "logits": [], "phrases": []}
    everything = toy.detect(image, {})
    assert len(everything["boxes"]) == len(toy.find_shapes(image)) >= 2
    area = toy.measure(image, {"caption": "red circle"})
    (x1, y1, x2, y2), (w, h) = box, image.size
    disc = 3.1416 * (x2 - x1) * w * (y2 - y1) * h / 4  # the area of the ellipse in the true box, in pixels
    assert area["phrases"] == ["red circle"] and 0.8 < area["areas"][0] / disc < 1.2


def test_tool_samples_carry_the_tools_own_results_and_convert_to_plain_llava(toy_world):
    stage2 = json.loads(toy_world["stage2"].read_text())
    tool_samples = [s for s in stage2 if s["conversations"][1].get("actions")]
    assert tool_samples and all(t.get("thoughts") for s in stage2 for t in s["conversations"][1::2])
    for sample in tool_samples:
        call = sample["conversations"][1]["actions"][0]
        image = Image.open(toy_world["images"] / sample["image"])
        result = tools.clean_result(call["API_name"], toy.TOY_TOOLS[call["API_name"]](image, call["API_params"]))
        question = sample["conversations"][0]["value"].replace("<image>", "").strip()
        assert sample["conversations"][2]["value"] == tools.tool_turn(call["API_name"], result, question)
        if call["API_params"]["caption"]:  # a box or an area: the tool's, copied
            assert sample["conversations"][3]["value"] == str((result.get("boxes") or result.get("areas"))[0])
        else:  # a description: the shapes the tool named, in its order, each told once
            told = re.findall(r"A \w+ (\w+ \w+) is", sample["conversations"][3]["value"])
            assert told == result["phrases"] and question in toy.DESCRIBE
        plain = toy.without_tools(sample)["conversations"]
        assert plain == [{"from": turn["from"], "value": turn["value"]}  # the call and the tool's turn dropped
                         for turn in sample["conversations"][:1] + sample["conversations"][3:]]
        assert all(not turn.get("actions") for turn in sample["conversations"][3::2])  # what follows: no tool


def test_toy_scoring_of_boxes_and_descriptions():
    truth = [0.1, 0.2, 0.5, 0.6]
    assert toy.toy_right("grounding", "[0.1, 0.2, 0.5, 0.6]", truth)
    assert toy.toy_right("grounding", "It is at [0.15, 0.25, 0.5, 0.6].", truth)  # IoU 0.77
    assert not toy.toy_right("grounding", "[0.3, 0.4, 0.7, 0.8]", truth)  # IoU 0.14
    assert not toy.toy_right("grounding", "[0.1, 0.2]", truth) and not toy.toy_right("grounding", "left", truth)
    scene = "There are 2 objects on a white background. A large red circle is on the left. A small blue square " \
            "is at the top."
    assert toy.toy_right("describe", "A small blue square is at the top. A large red circle is on the left.", scene)
    assert not toy.toy_right("describe", "A large red circle is on the left.", scene)  # one missing
    assert not toy.toy_right("describe", scene + " A small green cross is on the right.", scene)  # one too many
    assert not toy.toy_right("describe", scene.replace("large red", "small red"), scene)


# -----------------------------------------------------------------------------
# chat.py and eval.py with tools


@pytest.fixture(scope="module")
def tiny_model_dir(toy_world, tmp_path_factory):
    tokenizer = load_tokenizer(toy_world["tokenizer"])
    torch.manual_seed(0)
    model = Llava(LlavaConfig(vision=CLIPVisionConfig.from_name("tiny"),
                              text=LlamaConfig(**{**LlamaConfig.from_name("tiny").__dict__,
                                                  "vocab_size": tokenizer.get_vocab_size()}),
                              image_token_index=tokenizer.token_to_id("<image>")))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_llava(model, path)
    (path / "tokenizer.json").write_text(toy_world["tokenizer"].read_text())
    return path


def test_chat_with_tools_prints_the_final_value_and_saves_the_boxes(tiny_model_dir, scene_image, tmp_path,
                                                                    monkeypatch, capsys):
    image, _ = scene_image
    image.save(tmp_path / "scene.png")
    monkeypatch.setattr(chat, "RUNS", str(tmp_path / "runs"))
    script = Scripted(CALL, final("[0.1, 0.2, 0.3, 0.4]"), final("red"))
    monkeypatch.setattr(chat.ChatSession, "ask", lambda self, text, stream=None: script(text))
    assert chat.main([str(tmp_path / "scene.png"), "--model", str(tiny_model_dir), "--tools", "--show-thoughts",
                      "-p", QUESTION, "-p", "What colour is it?"]) == 0
    out, err = capsys.readouterr()
    assert out == "[0.1, 0.2, 0.3, 0.4]\nred\n"  # -p: only the final values
    assert "thoughts: I need detect to answer this." in err and 'detect({"caption": "red circle"}) -> {' in err
    saved = tmp_path / "runs" / "chat" / "boxes-1.png"
    assert f"detect's boxes drawn on the image: {saved}" in err
    drawn = Image.open(saved)
    assert drawn.size == image.size and drawn.tobytes() != image.convert("RGB").tobytes()


def test_eval_generate_with_tools_keeps_the_value_and_the_trace(tiny_model_dir, scene_image, tmp_path, monkeypatch):
    image, _ = scene_image
    image.save(tmp_path / "scene.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 7, "image": "scene.png", "text": QUESTION}) + "\n")
    script = Scripted(CALL, final("[0.1, 0.2, 0.3, 0.4]"))
    monkeypatch.setattr(chat.ChatSession, "ask", lambda self, text, stream=None: script(text))
    eval.main(["generate", "--model", str(tiny_model_dir), "--question-file", str(tmp_path / "q.jsonl"),
               "--image-folder", str(tmp_path), "--answers-file", str(tmp_path / "a.jsonl"), "--tools"])
    answer = json.loads((tmp_path / "a.jsonl").read_text())
    assert answer["text"] == "[0.1, 0.2, 0.3, 0.4]" and answer["question_id"] == 7
    assert [step["tool"] for step in answer["trace"]] == ["detect", ""]
    assert answer["trace"][0]["result"]["phrases"] == ["red circle"] and answer["trace"][0]["text"] == CALL
    assert answer["trace"][1]["value"] == "[0.1, 0.2, 0.3, 0.4]"


def test_llava_v0_answers_end_at_the_stop_string(tiny_model_dir, scene_image, toy_world):
    """The released LLaVA-Plus model is served in llava_v0, whose answers end with "###", not EOS: generation stops
    there and the answer is cut before it."""
    tokenizer = load_tokenizer(toy_world["tokenizer"])
    model = chat.load_for_inference(str(tiny_model_dir))[0]
    session = chat.ChatSession(model, tokenizer, "llava_v0", [scene_image[0]], max_new_tokens=40, temperature=0)
    pieces = tokenizer.encode("red### Human: more", add_special_tokens=False).ids
    fed = []

    def fake_generate(prompts, images, on_token=None, **kwargs):
        for token in pieces:
            fed.append(token)
            if on_token(torch.tensor([token])) is not None:
                break
        return [fed]
    session.model.generate = fake_generate
    assert session.ask("What colour?") == "red" and len(fed) < len(pieces)
    assert CONV_TEMPLATES["llava_v0"].sep == "###"
