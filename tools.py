"""LLaVA-Plus: the same LLaVA, trained to use tools (Liu et al. 2023, "Learning to Use Tools for Creating Multimodal
Agents"; official LLaVA-VL/LLaVA-Plus-Codebase). No new module and no new token: only the data teaches it.

One user message is answered in four steps (llava/serve/gradio_web_server_llava_plus.py: http_bot):
1. the model answers in the unified format (data.py: unified_answer): its thoughts, the actions, the value,
       "thoughts🤔" I must find the red circle, so I use the detector.
       "actions🚀" [{"API_name": "detect", "API_params": {"caption": "red circle"}}]
       "value👉" I will use detect to help to answer the question. Please wait for a moment.
2. the answer is parsed and the one tool an action names is called on the image with its params;
3. the tool's result, cleaned to what a language model can read, comes back as a user turn:
       detect model outputs: {'boxes': [[0.09, 0.33, 0.36, 0.64]], 'logits': [1.0], 'phrases': ['red circle']}

       Please summarize the model outputs and answer my first question: Give the bounding box of the red circle.
4. the model answers again (its KV cache holds everything before the new turn), and that answer's value is the reply.
An answer with no action (`"actions🚀" []`, or a plain LLaVA answer) is the reply at once.

The skill repository (`skills`) is a dict {name: function(image, params) -> dict}. The toy world's (toy.py:
TOY_TOOLS) runs here; the official tool workers (Grounding DINO, SAM, BLIP-2, EasyOCR, ...) plug in through their
controller (`ToolServer`). Unlike the official demo, a malformed action, an unknown tool, a tool that fails or a
server that does not answer never crashes the loop: the model is told in the tool-result turn, the user in one
line.

Boxes are normalized [x1, y1, x2, y2] in [0, 1], as the official grounding tools give them.
"""

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from data import ACTIONS, THOUGHTS, VALUE

# the official parser (gradio_web_server_llava_plus.py), greedy groups: the last markers win
ANSWER = re.compile(f"{THOUGHTS}(.*){ACTIONS}(.*){VALUE}(.*)", re.DOTALL)


@dataclass
class Step:
    """One generation of the loop and what came of it."""
    text: str  # what the model wrote
    thoughts: str = ""
    actions: list = field(default_factory=list)
    value: str = ""
    problem: str = ""  # why an action was not run, if one was not
    tool: str = ""  # the tool that ran, its params and its cleaned result
    params: dict = field(default_factory=dict)
    result: dict | None = None


def parse_answer(text: str) -> Step:
    """The model's text as thoughts, actions and value. Actions are JSON; the official parser falls back to reading
    single quotes as double ones, and so does this one, but it never runs `eval` on the model's text: anything else
    is reported in `problem` and treated as no tool. A text without the markers is a plain answer."""
    match = ANSWER.search(text)
    if not match:
        return Step(text, value=text.strip())
    thoughts, actions, value = (part.strip() for part in match.groups())
    step = Step(text, thoughts, [], value)
    for candidate in (actions, actions.replace("'", '"')):
        try:
            parsed = json.loads(candidate)
            break
        except json.JSONDecodeError:
            parsed = None
    if not isinstance(parsed, list) or not all(isinstance(a, dict) and isinstance(a.get("API_name"), str)
                                               and isinstance(a.get("API_params", {}), dict) for a in parsed):
        step.problem = f"malformed action {actions[:80]!r}: no tool was called"
    else:
        step.actions = parsed
    return step


def clean_result(name: str, result: dict) -> dict:
    """What of a tool's result the model reads, as the official demo cleans it: numbers to 2 decimals, masks and
    images left out (they go to the user, not the model), and a message when nothing is left."""
    result = {k: v for k, v in result.items()
              if k not in ("masks_rle", "edited_image", "size", "image_seg", "iou_sort_masks")}
    if name == "easyocr":  # the text is what counts
        result = {k: v for k, v in result.items() if k not in ("boxes", "scores")}
    if "retrieval_results" in result:
        result["retrieval_results"] = [{"caption": r.get("caption"), "similarity": r.get("similarity")}
                                       for r in result["retrieval_results"]]
    for key in ("boxes", "logits", "scores"):
        if isinstance(result.get(key), list):
            result[key] = _rounded(result[key])
    return result or {"message": f"The {name} has processed the image."}


def _rounded(value):
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 2) if isinstance(value, float) else value


def tool_turn(name: str, result: dict, question: str) -> str:
    """The user turn that brings a tool's result back (the official demo's words)."""
    return (f"{name} model outputs: {result}\n\n"
            f"Please summarize the model outputs and answer my first question: {question}")


def call_tool(step: Step, image: Image.Image, skills: dict, server=None):
    """Run the first action of `step` (the official demo runs one) on the image; the result, or the reason there is
    none, is recorded in the step."""
    action = step.actions[0]
    step.tool, step.params = action["API_name"], dict(action.get("API_params") or {})
    step.params.pop("image", None)  # generated data sometimes names an image path here; the image is the user's
    try:
        if step.tool in skills:
            result = skills[step.tool](image, step.params)
        elif server is not None:
            result = server.call(step.tool, image, step.params)
        else:
            raise ToolError(f"no tool named {step.tool!r} (there are: {', '.join(sorted(skills)) or 'none'})")
        step.result = clean_result(step.tool, result)
    except ToolError as e:
        step.problem = str(e)
    except Exception as e:  # a tool's own failure is the model's and the user's to know, not a crash
        step.problem = f"{step.tool} failed: {type(e).__name__}: {e}"


def answer(ask, image: Image.Image, question: str, skills: dict, server=None, max_rounds: int = 1) -> list[Step]:
    """One user message through the loop. ask(text) -> the model's answer to one more user turn (chat.py's
    ChatSession.ask, which keeps the conversation and its KV cache). Returns the steps; the last one's value is the
    reply. At most max_rounds tools run (the official demo: one), after which the answer is the reply, whatever it
    says."""
    steps = [parse_answer(ask(question))]
    while steps[-1].actions and len(steps) <= max_rounds:
        step = steps[-1]
        call_tool(step, image, skills, server)
        result = step.result if step.result is not None else {"error": step.problem}
        steps.append(parse_answer(ask(tool_turn(step.tool, result, question))))
    return steps


class ToolError(Exception):
    """A tool that cannot be called or did not answer; the loop tells the model and the user."""


class ToolServer:
    """The official tool workers, reached through their controller (llava/serve/controller.py, FastChat's
    protocol): POST /get_worker_address {"model": name} -> {"address": url}, then POST {url}/worker_generate with the
    image (base64 PNG, longest side at most 800) and the params, as gradio_web_server_llava_plus.py sends them."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def post(self, url: str, payload: dict) -> dict:
        request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            raise ToolError(f"{url}: no answer ({getattr(e, 'reason', e)})") from None

    def call(self, name: str, image: Image.Image, params: dict) -> dict:
        address = self.post(self.url + "/get_worker_address", {"model": name}).get("address")
        if not address:
            raise ToolError(f"the tool server at {self.url} has no worker for {name!r}")
        image = image.convert("RGB")
        image.thumbnail((800, 800))
        png = io.BytesIO()
        image.save(png, format="PNG")
        payload = {"image": base64.b64encode(png.getvalue()).decode(), "box_threshold": 0.3, "text_threshold": 0.25,
                   **params}
        result = self.post(address.rstrip("/") + "/worker_generate", payload)
        if result.get("error_code"):
            raise ToolError(f"{name} failed: {result.get('text', 'error ' + str(result['error_code']))}")
        return result


def draw_boxes(image: Image.Image, boxes: list, phrases: list) -> Image.Image:
    """A copy of the image with each normalized box drawn and labelled by its phrase."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for box, phrase in zip(boxes, phrases or [""] * len(boxes)):
        x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
        draw.rectangle((x1, y1, x2, y2), outline=(255, 0, 255), width=max(1, round(min(w, h) / 100)))
        draw.text((x1 + 2, y1 + 1), str(phrase), fill=(255, 0, 255))
    return image


def save_boxes(image: Image.Image, result: dict, folder: str) -> str:
    """The image with a tool's boxes drawn, saved as the next free folder/boxes-N.png; its path."""
    os.makedirs(folder, exist_ok=True)
    n = 1
    while os.path.exists(os.path.join(folder, f"boxes-{n}.png")):
        n += 1
    path = os.path.join(folder, f"boxes-{n}.png")
    draw_boxes(image, result["boxes"], result.get("phrases")).save(path)
    return path


def show(step: Step) -> str:
    """A step as the official demo's debug view shows it: the thoughts, the actions, and what the tool gave."""
    lines = [f"thoughts: {step.thoughts}", f"actions: {json.dumps(step.actions)}"] if step.thoughts else []
    if step.tool:
        outcome = step.result if step.result is not None else step.problem
        lines.append(f"{step.tool}({json.dumps(step.params)}) -> {outcome}")
    return "\n".join(lines + [f"value: {step.value}"])
