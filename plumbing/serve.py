"""chat.py --serve: the chat in a browser. The standard library's HTTP server (no web framework) serves one page,
plumbing/web/ (HTML, CSS and JavaScript: no CDN, no build step, no network needed), and the JSON API below. The
official demo is a Gradio app behind a controller and model workers (llava/serve/gradio_web_server.py); here it is
one process.

One model in memory and one worker thread: answers are generated one at a time, in the order they were asked, and a
question that waits is told how many are ahead of it. Each tab is a conversation (an id the server gives): a chat.py
ChatSession with its own KV cache, kept across turns. At most `max_conversations` are kept; a new one drops the one
unused longest, whose page is told and starts over. A stop press or a closed tab ends its answer at the next token.

    GET  /  (and /page.css, /page.js)   the page; no other file is ever served
    POST /api/new    {"previous": id?}   -> {"conversation", "about", "tools", "settings", "max_upload"}
    POST /api/image?conversation=ID&name=NAME   the image file's bytes -> {"image": n}, decoded and checked at once
    POST /api/ask    {"conversation", "question", "images": [n, ...] (a new conversation about them, optional),
                      "temperature", "top_p", "max_new_tokens"}
                     -> a stream of JSON lines: {"waiting": n ahead} at once, and again while no event comes,
                        {"round": k} as each generation starts (tools: the plan, then the answer), {"text": piece},
                        and last {"done": true, "answer", "steps" (with tools), "stopped", "cut_short"} or {"error"}
    POST /api/stop   {"conversation"}    ends its answer, or takes its question out of the queue
    POST /api/end    {"conversation"}    the tab is closing: stop and forget the conversation

Safe by default: it listens on 127.0.0.1 unless told otherwise, and then answers only requests addressed to this
machine by name (no DNS rebinding); every POST must carry a JSON or octet-stream Content-Type, which a page of
another site cannot send without the browser first asking this server (CORS), which never agrees; an upload is at
most MAX_UPLOAD bytes, decoded from memory as the command line decodes files (plumbing/files.py: open_image, which
refuses decompression bombs and truncated files) and kept in memory with its conversation; the client never names a
file of the server. Every failure is a JSON {"error": message} that the page shows, and the server goes on.
"""

import dataclasses
import io
import json
import queue
import secrets
import sys
import threading
from argparse import ArgumentTypeError
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from plumbing.cli import check_sampling
from plumbing.files import DataError, open_image

WEB = Path(__file__).parent / "web"
FILES = {"/": ("index.html", "text/html"), "/page.css": ("page.css", "text/css"),
         "/page.js": ("page.js", "text/javascript")}
MAX_UPLOAD = 20 * 2**20  # bytes per image
MAX_JSON = 2**20  # bytes per API request
MAX_IMAGES = 8  # uploads waiting for their question, per conversation
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEARTBEAT = 0.5  # seconds between "waiting" lines: a write to a closed tab fails, which ends its answer


class Failure(Exception):
    """A request that cannot be served: the HTTP status, and the message (and fields) the page gets."""

    def __init__(self, status: int, message: str, **fields):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **fields}


@dataclasses.dataclass(eq=False)
class Job:
    """One question for the worker, and the events it sends back (None: the last)."""
    conversation: "Conversation"
    question: str
    images: list | None  # PIL images: a new conversation about them; None: the conversation goes on
    settings: dict
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass(eq=False)
class Conversation:
    session: object  # chat.py's ChatSession
    uploads: list = dataclasses.field(default_factory=list)  # PIL images for the next question
    job: Job | None = None  # the question being answered or waiting


class Chat:
    """The conversations, the queue of questions, and the one worker thread that answers them in order."""

    def __init__(self, new_session, use_tools, max_conversations: int, about: str):
        self.new_session, self.use_tools, self.about = new_session, use_tools, about
        self.max_conversations = max_conversations
        self.conversations = OrderedDict()  # id -> Conversation, the one unused longest first
        self.waiting = []  # Jobs, in arrival order
        self.running = None
        self.closed = False
        self.lock = threading.Condition()

    def start(self):
        threading.Thread(target=self.work, daemon=True).start()

    # --- what the request handlers call (any thread)

    def new(self, previous=None) -> dict:
        session = self.new_session([])
        with self.lock:
            self.forget(previous)
            while len(self.conversations) >= self.max_conversations:
                self.forget(next(iter(self.conversations)))
            conversation_id = secrets.token_urlsafe(16)
            self.conversations[conversation_id] = Conversation(session)
        settings = dict(temperature=session.temperature, top_p=session.top_p, max_new_tokens=session.max_new_tokens)
        return dict(conversation=conversation_id, about=self.about, tools=self.use_tools is not None,
                    settings=settings, max_upload=MAX_UPLOAD)

    def get(self, conversation_id) -> Conversation:
        """The conversation, now the most recently used one (call with the lock held)."""
        conversation = self.conversations.get(conversation_id) if isinstance(conversation_id, str) else None
        if conversation is None:
            raise Failure(410, f"this conversation is no longer kept (the server keeps the {self.max_conversations} "
                               "used last): starting over", dropped=True)
        self.conversations.move_to_end(conversation_id)
        return conversation

    def forget(self, conversation_id):
        with self.lock:
            conversation = self.conversations.pop(conversation_id, None) if isinstance(conversation_id, str) else None
            if conversation is not None and conversation.job is not None:
                self.stop(conversation.job)

    def upload(self, conversation_id, image):
        with self.lock:
            conversation = self.get(conversation_id)
            if len(conversation.uploads) >= MAX_IMAGES:
                raise Failure(400, f"at most {MAX_IMAGES} images per question")
            conversation.uploads.append(image)
            return len(conversation.uploads) - 1

    def ask(self, conversation_id, question: str, image_numbers, settings: dict) -> Job:
        with self.lock:
            conversation = self.get(conversation_id)
            if conversation.job is not None:
                raise Failure(409, "the last question is still being answered: wait for it, or press stop")
            if image_numbers is not None and not all(type(n) is int and 0 <= n < len(conversation.uploads)
                                                     for n in image_numbers):
                raise Failure(400, "that image was not uploaded to this conversation: add it again")
            images = None if image_numbers is None else [conversation.uploads[n] for n in image_numbers]
            conversation.uploads = []
            job = conversation.job = Job(conversation, question, images, settings)
            self.waiting.append(job)
            self.lock.notify()
            return job

    def ahead(self, job: Job) -> int:
        """How many questions will be answered before this one."""
        with self.lock:
            return self.waiting.index(job) + (self.running is not None) if job in self.waiting else 0

    def stop(self, job: Job):
        """End the answer at its next token, or take the question out of the queue."""
        with self.lock:
            job.stop.set()
            if job in self.waiting:
                self.waiting.remove(job)
                self.finish(job, {"done": True, "answer": "", "stopped": True, "cut_short": False})

    def finish(self, job: Job, last: dict):
        with self.lock:
            job.events.put(last)
            job.events.put(None)
            if job.conversation.job is job:
                job.conversation.job = None

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify()

    # --- the worker

    def work(self):
        while True:
            with self.lock:
                while not self.waiting and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                job = self.running = self.waiting.pop(0)
            try:
                last = self.answer(job)
            except Exception as e:  # the page shows it; the server goes on
                last = {"error": f"{type(e).__name__}: {e}"}
                print(f"chat.py: {last['error']}", file=sys.stderr)
            with self.lock:
                self.running = None
                self.finish(job, last)

    def answer(self, job: Job) -> dict:
        session = job.conversation.session
        if job.images is not None:
            session.reset(job.images)
        session.temperature, session.top_p, session.max_new_tokens = (
            job.settings["temperature"], job.settings["top_p"], job.settings["max_new_tokens"])
        rounds = 0

        def ask(text):  # one generation, streamed; once stopped, no further round
            nonlocal rounds
            if job.stop.is_set():
                return ""
            job.events.put({"round": rounds})
            rounds += 1
            return session.ask(text, lambda piece: job.events.put({"text": piece}), job.stop.is_set)

        if self.use_tools is None:
            answer, steps = ask(job.question), None
        else:  # LLaVA-Plus's loop (tools.answer) on the conversation's first image
            steps = self.use_tools(ask, session.images[0] if session.images else None, job.question)
            answer, steps = steps[-1].value, [dataclasses.asdict(step) for step in steps]
        return {"done": True, "answer": answer, "steps": steps, "stopped": job.stop.is_set(),
                "cut_short": session.cut_short}


# -----------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "llava-chat"
    timeout = 60  # seconds a socket may stall (a body that never comes, a page that reads nothing) before it is closed

    def do_GET(self):
        self.respond(self.page)

    def do_POST(self):
        self.respond(self.api)

    def respond(self, serve):
        try:
            self.check_host()
            serve()
        except Failure as failure:
            self.send(failure.status, failure.body)
        except (ConnectionError, TimeoutError):  # the page went away
            pass
        except Exception as e:  # a bug here: still a message for the page, and the server goes on
            print(f"chat.py: {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
            self.send(500, {"error": f"{type(e).__name__}: {e}"})

    def check_host(self):
        """Bound to this machine, answer only requests addressed to it: another site's name that resolves here (DNS
        rebinding) would otherwise make its pages same-origin with this one."""
        hostname = urlsplit("//" + self.headers.get("Host", "")).hostname
        if self.server.server_address[0] in ("127.0.0.1", "::1") and hostname not in LOOPBACK:
            raise Failure(403, f"this server answers requests to 127.0.0.1 or localhost, not {hostname!r}")

    def page(self):
        if urlsplit(self.path).path not in FILES:
            raise Failure(404, f"no page {self.path!r} here: the chat is at /")
        name, content_type = FILES[urlsplit(self.path).path]
        self.send(200, (WEB / name).read_bytes(), f"{content_type}; charset=utf-8")

    def api(self):
        url = urlsplit(self.path)
        chat = self.server.chat
        if url.path == "/api/image":
            query = parse_qs(url.query)
            file = io.BytesIO(self.body("application/octet-stream", MAX_UPLOAD,
                                        f"an image of at most {MAX_UPLOAD // 2**20} MB"))
            file.name = query.get("name", ["the image"])[0][:200]  # for the messages only
            try:
                image = open_image(file)
            except DataError as e:
                raise Failure(400, str(e)) from None
            self.send(200, {"image": chat.upload(query.get("conversation", [""])[0], image)})
            return
        if url.path not in ("/api/new", "/api/ask", "/api/stop", "/api/end"):
            raise Failure(404, f"no API {url.path!r} here")
        try:
            request = json.loads(self.body("application/json", MAX_JSON, "a request of at most 1 MB"))
            assert isinstance(request, dict)
        except (ValueError, AssertionError):
            raise Failure(400, "the request is not a JSON object") from None
        conversation_id = request.get("previous" if url.path == "/api/new" else "conversation")
        if url.path == "/api/new":
            self.send(200, chat.new(conversation_id))
        elif url.path == "/api/ask":
            question, images = request.get("question"), request.get("images")
            if not isinstance(question, str) or not question.strip():
                raise Failure(400, "ask a question")
            if images is not None and not isinstance(images, list):
                raise Failure(400, "images: a list of upload numbers")
            self.stream(chat.ask(conversation_id, question, images or None, settings(request)))
        elif url.path == "/api/stop":
            with chat.lock:
                job = chat.get(conversation_id).job
            if job is not None:
                chat.stop(job)
            self.send(200, {"stopping": job is not None})
        else:
            chat.forget(conversation_id)
            self.send(200, {})

    def body(self, content_type: str, limit: int, what: str) -> bytes:
        if self.headers.get_content_type() != content_type:
            raise Failure(415, f"send {content_type}, not {self.headers.get_content_type()}")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise Failure(411, "the request needs a Content-Length")
        if int(length) > limit:
            raise Failure(413, f"too large ({int(length) / 2**20:.1f} MB): send {what}")
        return self.rfile.read(int(length))

    def stream(self, job: Job):
        """The answer's events as JSON lines, as they come: first how many are ahead, and again while none comes."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        event = {"waiting": self.server.chat.ahead(job)}
        try:
            while event is not None:
                self.wfile.write(json.dumps(event, default=str).encode() + b"\n")
                try:
                    event = job.events.get(timeout=HEARTBEAT)
                except queue.Empty:
                    event = {"waiting": self.server.chat.ahead(job)}
        except (ConnectionError, TimeoutError):  # a closed tab: its answer ends at the next token
            self.server.chat.stop(job)

    def send(self, status: int, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # quiet: errors reach the page, and the worker's go to stderr
        pass


def settings(request: dict) -> dict:
    """The page's sampling settings, checked as the command line checks them."""
    try:
        values = dict(temperature=float(request["temperature"]), top_p=float(request["top_p"]),
                      max_new_tokens=int(request["max_new_tokens"]))
        check_sampling(values["temperature"], values["top_p"])
    except (KeyError, TypeError, ValueError):
        raise Failure(400, "temperature, top-p and max new tokens must be numbers") from None
    except ArgumentTypeError as e:
        raise Failure(400, str(e).removeprefix("--")) from None
    if values["max_new_tokens"] < 1:
        raise Failure(400, "max new tokens must be at least 1")
    return values


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, chat: Chat):
        self.chat = chat
        super().__init__(address, Handler)
        chat.start()  # once the port is ours: a failed bind leaves no thread behind at exit

    def server_close(self):
        super().server_close()
        self.chat.close()


def make_server(new_session, use_tools, host: str, port: int, max_conversations: int, about: str) -> Server:
    """new_session(images) -> a ChatSession; use_tools: tools.answer with its skills, or None."""
    return Server((host, port), Chat(new_session, use_tools, max_conversations, about))


def serve(new_session, use_tools, host: str, port: int, max_conversations: int, about: str) -> int:
    """chat.py --serve: print the page's address and serve until Ctrl-C."""
    try:
        server = make_server(new_session, use_tools, host, port, max_conversations, about)
    except (OSError, OverflowError) as e:  # a port in use or out of range, an unknown host
        print(f"chat.py: cannot listen on {host} port {port}: {e}", file=sys.stderr)
        return 2
    print(f"chat.py: {about}; the chat page is at http://{host}:{server.server_port}/ (Ctrl-C ends)", flush=True)
    with server:
        server.serve_forever()
    return 0
