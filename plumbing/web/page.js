// The chat page of `python chat.py --serve`; plumbing/serve.py has the API it talks to. Plain JavaScript, no library.
// Whatever comes from the server (the model's text above all) is set as textContent: shown as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  conversation: null,  // the id the server gave this tab
  tools: false,        // LLaVA-Plus: answers come with their steps
  maxUpload: 0,        // bytes per image
  staged: [],          // images uploaded for the next question: {number, url, name}
  images: [],          // the conversation's images (object URLs), for the tools' boxes
  asked: false,        // whether the conversation has had a question
  answering: false,
};

class Failed extends Error {  // the server's message for a request it refused
  constructor(reply) {
    super(reply.error);
    this.dropped = Boolean(reply.dropped);
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function show(node) {
  const messages = $("messages");
  messages.append(node);
  messages.scrollTop = messages.scrollHeight;
  return node;
}

function showError(message) {
  show(el("div", "message error", message)).setAttribute("role", "alert");
}

function status(text) {
  $("status").textContent = text;
}

async function reply(response) {  // the JSON of an answer, or Failed with the server's message
  const body = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
  if (!response.ok) throw new Failed(body);
  return body;
}

async function call(path, body, type = "application/json") {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": type},
                                      body: type === "application/json" ? JSON.stringify(body) : body});
  return reply(response);
}

async function failed(error) {
  if (!(error instanceof Failed)) {
    showError(`cannot reach the server (${error.message}): is chat.py --serve still running?`);
  } else if (error.dropped) {  // the server kept newer conversations: this one starts over
    await startOver();
    showError(error.message);
  } else {
    showError(error.message);
  }
}

async function startOver() {
  const previous = state.conversation;
  Object.assign(state, {conversation: null, staged: [], images: [], asked: false});
  $("messages").replaceChildren();
  renderStaged();
  status("");
  try {
    const info = await call("/api/new", {previous});
    if (previous === null) {  // the first one: the server's settings fill the form
      $("temperature").value = info.settings.temperature;
      $("top-p").value = info.settings.top_p;
      $("max-new-tokens").value = info.settings.max_new_tokens;
      $("about").textContent = info.about + (info.tools ? " · tools on (LLaVA-Plus)" : "");
    }
    Object.assign(state, {conversation: info.conversation, tools: info.tools, maxUpload: info.max_upload});
  } catch (error) {
    await failed(error);
  }
}

// --- images: uploaded (and checked by the server) as they are added; shown once accepted

async function addImages(files) {
  for (const file of files) {
    if (file.size > state.maxUpload) {
      showError(`${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MB, over the limit of ` +
                `${state.maxUpload / 2 ** 20} MB per image`);
      continue;
    }
    const query = `conversation=${encodeURIComponent(state.conversation)}&name=${encodeURIComponent(file.name)}`;
    try {
      const {image} = await call(`/api/image?${query}`, file, "application/octet-stream");
      state.staged.push({number: image, url: URL.createObjectURL(file), name: file.name});
      renderStaged();
    } catch (error) {
      await failed(error);
    }
  }
}

function renderStaged() {
  $("staged").replaceChildren(...state.staged.map((image, i) => {
    const figure = el("figure");
    const img = el("img");
    Object.assign(img, {src: image.url, alt: image.name, title: image.name});
    const remove = el("button", "", "×");
    Object.assign(remove, {type: "button", title: "remove"});
    remove.addEventListener("click", () => { state.staged.splice(i, 1); renderStaged(); });
    figure.append(img, remove);
    return figure;
  }));
}

// --- asking: the answer streams in as JSON lines

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.answering || state.conversation === null) return;
  const images = state.staged.length ? state.staged : null;  // new images: a new conversation about them
  if (images && state.asked) show(el("div", "message note", `a new conversation about ${images.length} image(s)`));
  const user = show(el("div", "message user"));
  if (images) {
    const thumbs = user.appendChild(el("div", "thumbs"));
    for (const image of images) thumbs.append(Object.assign(el("img"), {src: image.url, alt: image.name}));
  }
  user.append(el("div", "text", question));
  $("question").value = "";
  state.staged = [];
  renderStaged();
  const bubble = el("div", "message assistant streaming");
  const text = bubble.appendChild(el("div", "text"));
  busy(true);
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = {conversation: state.conversation, question, images: images && images.map((image) => image.number),
                temperature: number("temperature"), top_p: number("top-p"), max_new_tokens: number("max-new-tokens")};
  try {
    const response = await fetch("/api/ask", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(body)});
    if (!response.ok) {
      state.staged = images || [];  // still on the server: asked again, they go with the next question
      renderStaged();
      await reply(response);
    }
    if (images) state.images = images.map((image) => image.url);
    state.asked = true;
    show(bubble);
    if (!await readLines(response, (event) => handle(event, bubble, text))) {
      showError("the answer ended early: has chat.py --serve stopped?");
    }
  } catch (error) {
    await failed(error);
  } finally {
    bubble.classList.remove("streaming");
    busy(false);
  }
}

async function readLines(response, onEvent) {  // whether the stream ended with its last event
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", ended = false;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return ended;
    buffer += decoder.decode(value, {stream: true});
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.trim()) continue;
      const event = JSON.parse(line);
      ended = ended || Boolean(event.done || event.error);
      onEvent(event);
    }
  }
}

function handle(event, bubble, text) {
  if ("waiting" in event) {
    if (!$("status").textContent.startsWith("stopping")) {
      status(event.waiting ? `waiting: ${event.waiting} ahead` : "answering…");
    }
  } else if ("round" in event) {  // a new generation; with tools its raw text shows until the answer is known
    status("answering…");
    text.textContent = "";
    text.className = state.tools ? "text raw" : "text";
  } else if ("text" in event) {
    text.textContent += event.text;
    $("messages").scrollTop = $("messages").scrollHeight;
  } else if (event.done) {
    status("");
    text.className = "text";
    text.textContent = event.answer;
    if (event.steps) showSteps(bubble, event.steps);
    if (event.stopped) bubble.append(el("div", "note", "(stopped)"));
    if (event.cut_short) bubble.append(el("div", "note", "(cut short: the context is full; start a new conversation)"));
  } else if (event.error) {
    status("");
    if (!text.textContent) bubble.remove();
    showError(event.error);
  }
}

// --- LLaVA-Plus: the steps open on a click; a tool's boxes are drawn over the conversation's first image

function showSteps(bubble, steps) {
  for (const step of steps) {  // first the boxes, under the answer
    if (step.result && Array.isArray(step.result.boxes) && state.images.length) {
      bubble.append(drawBoxes(state.images[0], step.result.boxes, step.result.phrases || []));
    }
  }
  steps.forEach((step, i) => {  // then each step, opened on a click
    if (step.problem) bubble.append(el("div", "note", step.problem));
    if (!step.thoughts && !step.tool && !(step.actions || []).length) return;
    const details = bubble.appendChild(el("details"));
    details.append(el("summary", "", step.tool ? `step ${i + 1}: thoughts, actions and what ${step.tool} gave`
                                               : `step ${i + 1}: thoughts`));
    const outcome = step.result ? JSON.stringify(step.result) : step.problem;
    for (const [label, value] of [["thoughts", step.thoughts], ["actions", JSON.stringify(step.actions)],
                                  [step.tool && `${step.tool}(${JSON.stringify(step.params)})`, outcome],
                                  ["value", step.value]]) {
      if (label && value) details.append(el("pre", "", `${label}: ${value}`));
    }
  });
}

function drawBoxes(url, boxes, phrases) {
  const figure = el("figure", "boxes");
  figure.append(Object.assign(el("img"), {src: url, alt: "the image with the tool's boxes"}));
  boxes.forEach((box, i) => {
    if (!Array.isArray(box) || box.length !== 4) return;
    const [x1, y1, x2, y2] = box.map((v) => Math.min(1, Math.max(0, Number(v) || 0)));  // normalized [x1, y1, x2, y2]
    const div = figure.appendChild(el("div", "box"));
    Object.assign(div.style, {left: `${100 * x1}%`, top: `${100 * y1}%`, width: `${100 * (x2 - x1)}%`,
                              height: `${100 * (y2 - y1)}%`});
    div.append(el("span", "phrase", String(phrases[i] ?? "")));
  });
  return figure;
}

// --- the controls

function busy(on) {
  state.answering = on;
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function start() {
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    status("stopping…");
    call("/api/stop", {conversation: state.conversation}).catch(failed);
  });
  $("new").addEventListener("click", startOver);
  $("files").addEventListener("change", async () => {
    await addImages([...$("files").files]);
    $("files").value = "";  // the same file may be added again
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    addImages([...event.dataTransfer.files]);
  });
  window.addEventListener("pagehide", () => {  // the tab closes: the server forgets its conversation
    fetch("/api/end", {method: "POST", keepalive: true, headers: {"Content-Type": "application/json"},
                       body: JSON.stringify({conversation: state.conversation})});
  });
  startOver();
}

start();
