"""chat.py --serve (plumbing/serve.py and its page, plumbing/web/): conversations interleaved on one model, the API
driven over HTTP (each refusal a message, the server still serving), and the page in a real browser: Debian's
chromium and chromium-driver through Selenium (test-only; the browser tests are skipped, saying how to install them,
where they are missing).

The model is test_chat.py's tiny random one, whose greedy answers are words; a model that is too quick to watch is
held at its decode step (a gate), and the tools' test scripts the model's answers, as test_tools.py does.
"""

import base64
import http.client
import io
import json
import os
import random
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from functools import partial

import pytest
from PIL import Image

import chat
import tools
import toy
from data import CONV_TEMPLATES, render, tokenize_prompt
from plumbing import serve
from plumbing.files import open_image
from test_chat import MAX_NEW, Q1, Q2, assert_one_line_error, pixels, reference_answers, run_chat, start_chat
from test_chat import images, ours, tokenizer  # noqa: F401  test_chat.py's fixtures: its tiny model
from test_tools import CALL, QUESTION, final

# -----------------------------------------------------------------------------
# helpers


@contextmanager
def served(model, tokenizer, use_tools=None, max_conversations=4, max_new_tokens=MAX_NEW):
    """plumbing/serve.py in this process, on a free port: its base URL and its Chat."""
    new_session = partial(chat.ChatSession, model, tokenizer, "vicuna_v1", max_new_tokens=max_new_tokens,
                          temperature=0.0)
    server = serve.make_server(new_session, use_tools, "127.0.0.1", 0, max_conversations, "tiny model (tests)")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server.chat
    finally:
        server.shutdown()
        server.server_close()


def post(url, path, body=None, data=None, content_type="application/json"):
    """(status, reply): the JSON object, or a stream's list of JSON lines."""
    data = json.dumps(body).encode() if data is None else data
    request = urllib.request.Request(url + path, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read(), e.headers.get_content_type()
    if kind == "application/x-ndjson":
        return status, [json.loads(line) for line in text.splitlines()]
    return status, json.loads(text)


def new(url):
    status, reply = post(url, "/api/new", {})
    assert status == 200, reply
    return reply["conversation"]


def upload(url, conversation, path_or_bytes, name="image.png"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return post(url, f"/api/image?conversation={conversation}&name={name}", data=data,
                content_type="application/octet-stream")


def asking(conversation, question, images=None, **settings):
    return dict(conversation=conversation, question=question, images=images,
                **{"temperature": 0, "top_p": 1, "max_new_tokens": MAX_NEW, **settings})


def ask(url, conversation, question, images=None, **settings):
    """The answer's events; the last must be done."""
    status, events = post(url, "/api/ask", asking(conversation, question, images, **settings))
    assert status == 200 and events[-1].get("done"), events
    return events


def streamed(events):
    return "".join(e["text"] for e in events if "text" in e)


def open_stream(url, body):
    """An ask over a raw socket, read line by line (its headers skipped): what a page that may go away sees."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    lines = sock.makefile("rb")
    while lines.readline().strip():
        pass
    return sock, lines


def png_claiming(width, height):
    """A small PNG whose header claims width x height pixels: a decompression bomb, as far as a decoder can tell."""
    png = io.BytesIO()
    Image.new("L", (1, 1)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


class Gate:
    """The model's decode step, held while the gate is shut (the first token of an answer still comes out), and
    slowed by `delay` seconds; counts the steps."""

    def __init__(self, model, monkeypatch):
        self.open, self.delay, self.steps = threading.Event(), 0.0, 0
        self.open.set()
        step = model.language_model.decode_step

        def held(*args):
            self.open.wait(30)
            time.sleep(self.delay)
            self.steps += 1
            return step(*args)
        monkeypatch.setattr(model.language_model, "decode_step", held)


def wait_for(condition, timeout=30, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -----------------------------------------------------------------------------
# several conversations on one model


def test_interleaved_conversations_answer_as_each_alone(ours, tokenizer, images, monkeypatch):
    """Each ChatSession brings its own KV cache into the model's layers: turns of two conversations taken in turn
    give each one's answers alone, and each second turn still prefills only its new tokens."""
    _, model = ours
    lm = model.language_model
    starts = []  # the first cache slot each answer's prefill writes

    def recording_forward(embeds, position_ids=None, mask=None, input_pos=None):
        if embeds.shape[1] > 1:
            starts.append(int(input_pos[0]))
        return type(lm).forward(lm, embeds, position_ids, mask, input_pos)
    monkeypatch.setattr(lm, "forward", recording_forward)
    a = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[0])], MAX_NEW, temperature=0.0)
    b = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[1])], MAX_NEW, temperature=0.0)
    answers = [a.ask(Q1), b.ask(Q1), a.ask(Q2), b.ask(Q2)]
    monkeypatch.undo()
    assert answers[::2] == reference_answers(model, tokenizer, images[:1], [Q1, Q2])
    assert answers[1::2] == reference_answers(model, tokenizer, images[1:], [Q1, Q2])
    assert starts[:2] == [0, 0] and all(start > 0 for start in starts[2:4])
    assert not {id(c) for c in a.cache} & {id(c) for c in b.cache}


def test_should_stop_ends_the_answer_and_the_conversation_goes_on(ours, tokenizer, images, monkeypatch):
    """should_stop() (a stop button, a closed tab) ends the answer at the token just generated; the next turn
    continues the KV cache as a recomputation of the whole conversation does."""
    _, model = ours
    monkeypatch.setattr(model.config.text, "eos_token_id", -1)  # no EOS: the answers run until they are stopped
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", [open_image(images[0])], 40, temperature=0.0)
    asked = []
    first = session.ask(Q1, should_stop=lambda: asked.append(1) or len(asked) == 3)
    assert len(asked) == 3 and len(tokenizer.encode(first, add_special_tokens=False).ids) == 3
    second = session.ask(Q2)
    messages = [(0, "<image>\n" + Q1), (1, first), (0, Q2), (1, None)]
    ids = tokenize_prompt(tokenizer, render(CONV_TEMPLATES["vicuna_v1"], messages))
    recomputed = model.generate([ids], pixels(model, images[:1]), 40, temperature=0.0)[0]
    assert second == tokenizer.decode(recomputed).strip()


# -----------------------------------------------------------------------------
# the API


def test_the_api_streams_each_conversations_answers(ours, tokenizer, images):
    _, model = ours
    with served(model, tokenizer) as (url, _):
        a, b = new(url), new(url)
        assert upload(url, a, images[0]) == (200, {"image": 0})
        assert upload(url, b, images[1]) == (200, {"image": 0})
        events = [ask(url, a, Q1, [0]), ask(url, b, Q1, [0]), ask(url, a, Q2), ask(url, b, Q2)]
        answers = [e[-1]["answer"] for e in events]
        assert answers[::2] == reference_answers(model, tokenizer, images[:1], [Q1, Q2])
        assert answers[1::2] == reference_answers(model, tokenizer, images[1:], [Q1, Q2])
        for e in events:  # streamed piece by piece, the pieces adding up to the answer
            assert streamed(e).strip() == e[-1]["answer"] and sum("text" in x for x in e) > 1
            assert e[-1]["stopped"] is False and e[-1]["steps"] is None
        # new images in a conversation: a new conversation about them
        upload(url, a, images[1])
        assert ask(url, a, Q1, [0])[-1]["answer"] == answers[1]


def test_questions_wait_their_turn_and_a_stop_or_a_closed_page_ends_its_answer(ours, tokenizer, images,
                                                                               monkeypatch):
    _, model = ours
    monkeypatch.setattr(model.config.text, "eos_token_id", -1)  # answers as long as allowed, unless ended
    expected = reference_answers(model, tokenizer, images[1:], [Q1])[0]
    gate = Gate(model, monkeypatch)
    with served(model, tokenizer) as (url, chat_):
        a, b, c = new(url), new(url), new(url)
        for conversation, image in ((a, images[0]), (b, images[1]), (c, images[0])):
            upload(url, conversation, image)
        gate.open.clear()
        long_answer, lines = open_stream(url, asking(a, Q1, [0], max_new_tokens=200))
        first = [json.loads(lines.readline()) for _ in range(3)]  # the first token comes before the decode step
        assert first[:2] == [{"waiting": 0}, {"round": 0}] and "text" in first[2]
        waiting = {}
        for name, conversation in (("b", b), ("c", c)):
            waiting[name] = open_stream(url, asking(conversation, Q1, [0]))[1]
        assert json.loads(waiting["b"].readline()) == {"waiting": 1}  # how many are ahead
        assert json.loads(waiting["c"].readline()) == {"waiting": 2}
        assert post(url, "/api/stop", {"conversation": c}) == (200, {"stopping": True})  # out of the queue
        assert [json.loads(line) for line in waiting["c"]][-1] == {"done": True, "answer": "", "stopped": True,
                                                                   "cut_short": False}
        assert post(url, "/api/ask", asking(a, Q2))[0] == 409  # one question at a time per conversation
        lines.close()  # the tab goes away: its answer ends within a few tokens
        long_answer.close()
        gate.delay = 0.01
        gate.open.set()
        events = [json.loads(line) for line in waiting["b"]]
        assert events[-1]["done"] and events[-1]["answer"] == expected
        assert gate.steps < MAX_NEW + 50  # the closed page's answer ended long before its 200 tokens
        assert chat_.conversations[a].job is None and len(chat_.conversations[a].session.messages) == 2


def test_refused_uploads_and_requests_say_why_and_the_server_goes_on(ours, tokenizer, images, tmp_path):
    _, model = ours
    good = open(images[0], "rb").read()
    with served(model, tokenizer, max_conversations=2) as (url, _):
        a = new(url)
        host = url.removeprefix("http://")
        connection = http.client.HTTPConnection(host, timeout=30)  # an upload over the limit is refused unread
        connection.putrequest("POST", f"/api/image?conversation={a}")
        connection.putheader("Content-Type", "application/octet-stream")
        connection.putheader("Content-Length", str(serve.MAX_UPLOAD + 1))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "send an image of at most 20 MB" in json.loads(response.read())["error"]
        refused = [  # ((status, reply), (the status it must be, the start of its message))
            (upload(url, a, b"just some notes\n", "notes.txt"), (400, "notes.txt: cannot read the image")),
            (upload(url, a, png_claiming(9000, 9000), "bomb.png"),
             (400, "bomb.png: 9000x9000 pixels is over the limit")),
            (upload(url, a, good[:len(good) // 2], "half.png"), (400, "half.png: cannot read the image")),
            (upload(url, "made-up", good), (410, "this conversation is no longer kept")),
            (post(url, "/api/ask", data=b"{not json"), (400, "the request is not a JSON object")),
            (post(url, "/api/ask", asking(a, Q1), content_type="text/plain"), (415, "send application/json")),
            (post(url, "/api/ask", asking(a, "  ")), (400, "ask a question")),
            (post(url, "/api/ask", asking(a, Q1, [3])), (400, "that image was not uploaded")),
            (post(url, "/api/ask", asking(a, Q1, temperature=-1)), (400, "temperature -1.0: must be 0 (greedy)")),
            (post(url, "/api/ask", asking(a, Q1, top_p=0)), (400, "top-p 0.0: must be above 0")),
            (post(url, "/api/ask", asking(a, Q1, max_new_tokens="many")), (400, "temperature, top-p and max new")),
            (post(url, "/api/ask", asking(a, Q1, max_new_tokens=0)), (400, "max new tokens must be at least 1")),
            (post(url, "/api/nothing", {}), (404, "no API '/api/nothing' here")),
        ]
        for (status, reply), (expected_status, says) in refused:
            assert status == expected_status and reply["error"].startswith(says), (reply, says)
        # the client never names a server file: only the page's own three are served
        for path in ("/chat.py", "/../chat.py", "/page.js/../../chat.py", "/plumbing/serve.py", "/index.html"):
            connection = http.client.HTTPConnection(host, timeout=30)
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 404 and b"import" not in response.read(), path
        # addressed by another name (DNS rebinding): refused
        connection = http.client.HTTPConnection(host, timeout=30)
        connection.request("GET", "/", headers={"Host": "attacker.example:80"})
        assert connection.getresponse().status == 403
        # and then it all works: the page (nothing fetched from elsewhere), an upload, an answer
        for path in ("/", "/page.js", "/page.css"):
            page = urllib.request.urlopen(url + path).read().decode()
            assert not re.search(r"(src|href)=\"?(https?:)?//|url\(|@import|https?://", page), path
        assert upload(url, a, good) == (200, {"image": 0})
        assert ask(url, a, Q1, [0])[-1]["answer"] == reference_answers(model, tokenizer, images[:1], [Q1])[0]
        # at most 2 conversations: a third drops the one unused longest, which is told
        b = new(url)
        ask(url, a, Q2)
        c = new(url)
        status, reply = post(url, "/api/ask", asking(b, Q1))
        assert status == 410 and reply["dropped"] is True
        assert upload(url, c, good)[0] == 200 and ask(url, a, Q1)[-1]["done"]


def test_a_failing_answer_is_a_message_and_the_server_goes_on(ours, tokenizer, images, monkeypatch):
    _, model = ours
    real_ask = chat.ChatSession.ask
    failures = [RuntimeError("out of memory")]

    def failing_once(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return real_ask(self, *args, **kwargs)
    monkeypatch.setattr(chat.ChatSession, "ask", failing_once)
    with served(model, tokenizer) as (url, _):
        a = new(url)
        upload(url, a, images[0])
        assert post(url, "/api/ask", asking(a, Q1, [0]))[1][-1] == {"error": "RuntimeError: out of memory"}
        long_question = "Is there a red circle or a blue square? " * 40
        status, events = post(url, "/api/ask", asking(a, long_question))
        assert events[-1]["error"].startswith("ContextFull: context full (")
        assert ask(url, a, Q1)[-1]["answer"] == reference_answers(model, tokenizer, images[:1], [Q1])[0]


def test_chat_py_serve_options(ours, capsys):
    """IMAGE is required but with --serve, which takes none (nor -p): usage errors; a port in use is one line."""
    for argv, says in (([], "error: give the IMAGE file(s)"), (["--serve", "a.png"], "error: --serve takes no IMAGE"),
                       (["--serve", "-p", Q1], "error: --serve takes no IMAGE nor -p")):
        with pytest.raises(SystemExit) as stop:
            chat.parse_args(argv)
        assert stop.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    args = chat.parse_args(["--serve"])
    assert (args.host, args.port, args.max_conversations, args.images) == ("127.0.0.1", 8000, 4, [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_chat("--serve", "--model", ours[0], "--port", port)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1 port {port}")


@pytest.fixture(scope="module")
def chat_py_p_answers(ours, images):
    """What `chat.py IMAGE -p Q1 -p Q2` answers, greedy."""
    result = run_chat(images[0], "--model", ours[0], "-p", Q1, "-p", Q2, "--temperature", 0, "--max-new-tokens",
                      MAX_NEW)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def chat_py_serving(ours):
    """`chat.py --serve --port 0` in a subprocess, greedy: its address."""
    process = start_chat("--serve", "--port", 0, "--model", ours[0], "--temperature", 0, "--max-new-tokens", MAX_NEW)
    line = process.stdout.readline()
    address = re.search(r"the chat page is at (http://127\.0\.0\.1:\d+/)", line)
    assert address, line + process.stderr.read()
    yield address.group(1).rstrip("/")
    process.terminate()
    process.communicate(timeout=30)


def test_chat_py_serve_answers_as_chat_py_p(images, chat_py_serving, chat_py_p_answers):
    a = new(chat_py_serving)
    upload(chat_py_serving, a, images[0])
    answers = [ask(chat_py_serving, a, Q1, [0])[-1]["answer"], ask(chat_py_serving, a, Q2)[-1]["answer"]]
    assert answers == chat_py_p_answers


# -----------------------------------------------------------------------------
# the page in a real browser

INSTALL = ("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium "
           "(pip install -r requirements-test.txt)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason=INSTALL)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip(INSTALL)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                     "--window-size=1000,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """One tab (a window of its own) of the chat page."""

    def __init__(self, driver, url):
        self.driver = driver
        driver.switch_to.new_window("window")
        self.handle = driver.current_window_handle
        driver.get(url)
        wait_for(lambda: self.js("return document.getElementById('about').textContent"), what="the page")

    def js(self, script, *args):
        self.driver.switch_to.window(self.handle)
        return self.driver.execute_script(script, *args)

    def texts(self, selector):
        return self.js("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)

    def add(self, path):
        self.driver.switch_to.window(self.handle)
        self.driver.find_element("id", "files").send_keys(str(path))

    def drop(self, path):
        """Drag and drop, as a file dragged from the desktop arrives."""
        data = base64.b64encode(open(path, "rb").read()).decode()
        self.js("""const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
                   const transfer = new DataTransfer();
                   transfer.items.add(new File([bytes], arguments[1], {type: "image/png"}));
                   document.getElementById("messages").dispatchEvent(
                       new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));""",
                data, os.path.basename(path))

    def ask(self, question, **settings):
        for name, value in settings.items():
            self.js("document.getElementById(arguments[0]).value = arguments[1]", name.replace("_", "-"), value)
        self.js("document.getElementById('question').value = arguments[0]", question)
        self.driver.find_element("id", "send").click()

    def answers(self):
        return self.texts(".assistant:not(.streaming) > .text")

    def answer(self, n):
        """The n-th answer, once done."""
        wait_for(lambda: len(self.answers()) >= n and not self.js("return document.getElementById('send').disabled"),
                 what=f"answer {n}")
        return self.answers()[n - 1]

    def errors(self, n):
        return wait_for(lambda: len(self.texts(".error")) >= n and self.texts(".error"), what=f"{n} errors")


@pytest.mark.slow
def test_page_uploads_refuses_bad_images_and_streams_chat_py_p_answers(browser, images, chat_py_serving,
                                                                       chat_py_p_answers, tmp_path):
    expected = chat_py_p_answers
    (tmp_path / "notes.png").write_text("not an image\n")
    (tmp_path / "bomb.png").write_bytes(png_claiming(9000, 9000))
    page = Page(browser, chat_py_serving)
    page.add(tmp_path / "notes.png")
    assert page.errors(1)[0].startswith("notes.png: cannot read the image")
    page.add(tmp_path / "bomb.png")
    assert page.errors(2)[1].startswith("bomb.png: 9000x9000 pixels is over the limit")
    page.add(images[0])
    wait_for(lambda: page.js("return document.querySelectorAll('#staged img').length") == 1, what="the preview")
    assert page.js("return document.querySelector('#staged img').naturalWidth") == open_image(images[0]).width
    page.ask(Q1)
    assert page.answer(1) == expected[0]
    page.ask(Q2)  # multi-turn: the KV cache kept by the server
    assert page.answer(2) == expected[1]
    assert page.js("return document.querySelectorAll('.user .thumbs img').length") == 1


@pytest.mark.slow
def test_two_tabs_wait_their_turn_get_their_own_answers_and_stop(browser, ours, tokenizer, images, monkeypatch):
    _, model = ours
    expected = [reference_answers(model, tokenizer, [image], [Q1, Q2]) for image in images]
    gate = Gate(model, monkeypatch)
    with served(model, tokenizer) as (url, chat_):
        first, second = Page(browser, url), Page(browser, url)
        first.add(images[0])
        second.drop(images[1])  # by drag and drop
        for page in (first, second):
            wait_for(lambda: page.js("return document.querySelectorAll('#staged img').length") == 1)
        gate.open.clear()
        first.ask(Q1)
        # the answer streams in: its first word shows while the model is held
        streaming = wait_for(lambda: first.texts(".assistant.streaming > .text") and
                             first.texts(".assistant.streaming > .text")[0], what="the first word")
        assert expected[0][0].startswith(streaming.strip()) and streaming.strip() != expected[0][0]
        second.ask(Q1)
        wait_for(lambda: second.js("return document.getElementById('status').textContent") == "waiting: 1 ahead",
                 what="the second tab to say it waits")
        gate.open.set()
        assert first.answer(1) == expected[0][0] and second.answer(1) == expected[1][0]
        second.ask(Q2)
        assert second.answer(2) == expected[1][1]

        # the stop button ends a long answer, and the conversation goes on
        monkeypatch.setattr(model.config.text, "eos_token_id", -1)
        gate.delay = 0.05
        first.ask(Q2, max_new_tokens=200)
        wait_for(lambda: len(" ".join(first.texts(".assistant.streaming > .text")).split()) >= 3, what="3 words")
        first.driver.find_element("id", "stop").click()
        stopped = first.answer(2)
        assert 3 <= len(stopped.split()) < 100 and first.texts(".assistant .note")[-1] == "(stopped)"
        monkeypatch.setattr(model.config.text, "eos_token_id", 2)
        gate.delay = 0.0
        first.ask(Q1, max_new_tokens=MAX_NEW)
        assert first.answer(3) and not first.texts(".error")

        # a closed tab: the server forgets its conversation
        assert len(chat_.conversations) == 2
        browser.switch_to.window(second.handle)
        browser.close()
        wait_for(lambda: len(chat_.conversations) == 1, what="the closed tab's conversation to go")
        browser.switch_to.window(first.handle)
        browser.close()
        browser.switch_to.window(browser.window_handles[0])


@pytest.mark.slow
def test_tool_answers_show_the_value_the_steps_and_the_boxes(browser, ours, tokenizer, monkeypatch, tmp_path):
    """LLaVA-Plus with the toy's tools: the model's answers are scripted (the tiny model calls no tool by itself); the
    toy's detector really runs on the uploaded image. Saves the page's screenshot (docs/chat_page.png is one)."""
    _, model = ours
    rng = random.Random(3)
    while True:
        scene = toy._scene(rng)
        if ("red", "circle") in {(o["colour"], o["shape"]) for o in scene["objects"]} and len(scene["objects"]) > 1:
            break
    image = toy._draw(scene)
    image = image.resize((image.width * 6, image.height * 6), Image.NEAREST)  # larger, to be seen
    image.save(tmp_path / "shapes.png")
    result = tools.clean_result("detect", toy.detect(image, {"caption": "red circle"}))
    shapes = [f"{toy._a(s['colour'])} {s['shape']}" for s in toy.find_shapes(image)]
    described = f"I see {', '.join(shapes[:-1])} and {shapes[-1]}."
    value = f"The red circle is at {result['boxes'][0]}."
    markup = '<img src=x onerror="window.ran = true"> <b>not bold</b>'  # a page that renders HTML would run it
    script = [final(described), CALL, final(value), markup, "Yes."]

    def scripted(self, text, stream=None, should_stop=None):
        answer = script.pop(0)
        for piece in re.findall(r"\S+\s*", answer):
            stream(piece)
        return answer.strip()
    monkeypatch.setattr(chat.ChatSession, "ask", scripted)
    use_tools = partial(tools.answer, skills=toy.TOY_TOOLS, server=None, max_rounds=1)
    with served(model, tokenizer, use_tools) as (url, chat_):
        page = Page(browser, url)
        assert "tools on" in page.js("return document.getElementById('about').textContent")
        page.add(tmp_path / "shapes.png")
        wait_for(lambda: page.js("return document.querySelectorAll('#staged img').length") == 1)
        page.ask("What shapes do you see?")
        assert page.answer(1) == described
        page.ask(QUESTION)
        assert page.answer(2) == value  # the final value
        summaries = page.texts(".assistant:last-child summary")
        assert summaries == ["step 1: thoughts, actions and what detect gave", "step 2: thoughts"]
        assert page.js("return [...document.querySelectorAll('details')].some(d => d.open)") is False  # on a click
        page.js("const m = document.getElementById('messages'); m.scrollTop = m.scrollHeight")
        page.driver.save_screenshot(str(tmp_path / "chat_page.png"))
        assert Image.open(tmp_path / "chat_page.png").size[0] > 500
        # the boxes over the image, where the tool found them, with their phrases
        boxes = page.js("""const figure = document.querySelector('.assistant:last-child .boxes');
            const image = figure.querySelector('img').getBoundingClientRect();
            return [...figure.querySelectorAll('.box')].map(b => { const r = b.getBoundingClientRect();
                return [b.textContent, (r.left - image.left) / image.width, (r.top - image.top) / image.height,
                        (r.right - image.left) / image.width, (r.bottom - image.top) / image.height]; });""")
        assert [b[0] for b in boxes] == result["phrases"] == ["red circle"]
        assert all(abs(got - want) < 0.01 for b, box in zip(boxes, result["boxes"]) for got, want in zip(b[1:], box))
        page.driver.find_elements("css selector", ".assistant:last-child summary")[0].click()
        shown = page.texts(".assistant:last-child details pre")
        call = 'detect({"caption":"red circle"}): '
        assert [json.loads(line.removeprefix(call)) for line in shown if line.startswith(call)] == [result]
        assert "thoughts: I need detect to answer this." in shown
        # the model's text is shown as text, never as HTML
        page.ask("And now?")
        assert page.answer(3) == markup
        assert page.js("return [document.querySelectorAll('#messages b').length, window.ran === undefined]") == \
            [0, True]
        # a new conversation starts with an empty page
        page.driver.find_element("id", "new").click()
        wait_for(lambda: page.js("return document.querySelectorAll('.message').length") == 0)
        # a conversation the server no longer keeps: the page is told, and starts over
        dropped = wait_for(lambda: len(chat_.conversations) == 1 and next(iter(chat_.conversations)))
        chat_.forget(dropped)
        page.ask("Still there?")
        assert page.errors(1)[0].startswith("this conversation is no longer kept")
        wait_for(lambda: len(chat_.conversations) == 1 and dropped not in chat_.conversations, what="a new one")
        page.ask("Still there?")
        assert page.answer(1) == "Yes."
