// medcot chat page: streams /v1/chat/completions (SSE over fetch), reasoning apart from the answer.
// Plain JavaScript, no dependencies. Text is always inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null, authRequired: false };

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollToEnd() {
  window.scrollTo({ top: document.body.scrollHeight });
}

function setBusy(busy, status) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("status").textContent = status || "";
}

function apiKey() {
  return $("api-key").value.trim() || sessionStorage.getItem("medcot-api-key") || "";
}

async function loadServerInfo() {
  try {
    const info = await (await fetch("/health")).json();
    state.model = info.model;
    state.authRequired = info.auth_required;
    $("model-name").textContent = `model: ${info.model}`;
    $("max-tokens").max = info.max_tokens_limit;
    $("key-row").hidden = !info.auth_required;
    const saved = sessionStorage.getItem("medcot-api-key");
    if (saved) $("api-key").value = saved;
    if (info.status === "loading") {  // the server listens while the model loads: ask again until it is ready
      $("status").textContent = "The model is loading…";
      setTimeout(loadServerInfo, 2000);
      return;
    }
    if (!$("max-tokens").value) $("max-tokens").value = info.default_max_tokens ?? "";
    $("status").textContent = info.status === "ok" ? "" : `The server is ${info.status}.`;
  } catch (e) {
    $("status").textContent = "The server did not answer /health.";
  }
}

// The form is not validated by the browser (novalidate): its message bubble cannot show on a field inside the
// collapsed Settings, so Send did nothing. Say what is wrong and open Settings on the field instead.
function maxTokensProblem() {
  const input = $("max-tokens");
  const raw = input.value.trim();
  if (raw === "") return null;  // the server's default
  const value = Number(raw);
  const limit = Number(input.max) || Infinity;
  if (Number.isInteger(value) && value >= 1 && value <= limit) return null;
  return `Max tokens must be a whole number from 1 to ${limit} (this server's limit): change it under Settings.`;
}

function addUserMessage(text) {
  $("empty")?.remove();
  const msg = el("div", "msg user");
  msg.append(el("div", "role", "You"), el("div", "text", text));
  $("conversation").append(msg);
}

function addAssistantMessage() {
  const msg = el("div", "msg assistant");
  const reasoning = el("details", "reasoning");
  reasoning.open = true;
  reasoning.hidden = true;
  const summary = el("summary", null, "Reasoning");
  const reasoningText = el("div", "reasoning-text");
  reasoning.append(summary, reasoningText);
  const answer = el("div", "answer");
  const meta = el("div", "meta");
  msg.append(el("div", "role", "medcot"), reasoning, answer, meta);
  $("conversation").append(msg);
  return { msg, reasoning, summary, reasoningText, answer, meta, reasoningChars: 0, content: "", started: performance.now() };
}

function showError(view, message) {
  view.answer.classList.remove("streaming");
  view.reasoningText.classList.remove("streaming");
  view.meta.append(el("div", "error", message));
}

// Reads an SSE body ("data: {...}\n\n" blocks) and calls onData for each JSON payload until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  addUserMessage(question);
  state.history.push({ role: "user", content: question });
  const view = addAssistantMessage();
  view.reasoningText.classList.add("streaming");
  scrollToEnd();
  const body = {
    model: state.model || undefined,
    messages: state.history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value || 0),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const headers = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;

  state.controller = new AbortController();
  setBusy(true, "Thinking…");
  let finish = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({ error: { message: response.statusText } }));
      let message = err.error?.message || `HTTP ${response.status}`;
      if (response.status === 401) {
        $("key-row").hidden = false;
        document.querySelector(".settings").open = true;
        if (key) {  // a wrong key needs correcting, a missing one entering: say which
          sessionStorage.removeItem("medcot-api-key");
          message = "The API key was not accepted: check the key under Settings (the server's MEDCOT_API_KEY) and send again.";
        } else {
          message = "This server needs an API key: enter it under Settings and send again.";
        }
        $("api-key").focus();
      } else if (response.status === 429 || response.status === 503) {
        message = `The server is busy; try again in ${response.headers.get("Retry-After") || "a few"} s. (${message})`;
      }
      state.history.pop();
      showError(view, message);
      return;
    }
    if (key) sessionStorage.setItem("medcot-api-key", key);
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning ?? delta.reasoning_content;
      if (reasoning) {
        view.reasoning.hidden = false;
        view.reasoningText.textContent += reasoning;
        view.reasoningChars += reasoning.length;
      }
      if (delta.content) {
        if (!view.content) {
          view.reasoningText.classList.remove("streaming");
          view.answer.classList.add("streaming");
          setBusy(true, "Answering…");
        }
        view.content += delta.content;
        view.answer.textContent = view.content;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      scrollToEnd();
    });
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { showError(view, `Error: ${e.message}`); }
  } finally {
    state.controller = null;
    setBusy(false);
    view.answer.classList.remove("streaming");
    view.reasoningText.classList.remove("streaming");
  }
  const seconds = ((performance.now() - view.started) / 1000).toFixed(1);
  if (view.reasoningChars) {
    view.summary.textContent = `Reasoning (${view.reasoningText.textContent.trim().split(/\s+/).length} words, click to show or hide)`;
    if (view.content) view.reasoning.open = false;  // the answer is what matters; the reasoning is one click away
  }
  if (!view.content && finish && finish !== "stopped") {
    view.answer.append(el("span", "note", finish === "length"
      ? "No final answer: the model was still reasoning when it reached max tokens. Raise Max tokens under Settings."
      : "The model gave no final answer."));
  }
  if (finish === "stopped") view.meta.append(el("span", "note", "Stopped. "));
  if (finish) {
    const tokens = usage ? ` · ${usage.completion_tokens} tokens` : "";
    view.meta.append(el("span", null, `${seconds} s${tokens} · finish: ${finish}`));
  }
  // The conversation keeps what the model said, so that a follow-up has it: the answer (earlier reasoning is not
  // sent back), or, when there is none (stopped, cut short), the reasoning so far. Nothing came back at all:
  // the question leaves the conversation too, rather than an empty assistant turn.
  const said = view.content || view.reasoningText.textContent.trim();
  if (said) state.history.push({ role: "assistant", content: said });
  else state.history.pop();
}

function init() {
  loadServerInfo();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || state.controller) return;
    const problem = maxTokensProblem();
    if (problem) {
      document.querySelector(".settings").open = true;
      $("max-tokens").focus();
      $("status").textContent = problem;
      return;
    }
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", () => {
    state.controller?.abort();
    state.history = [];
    const empty = el("p", "empty", "New conversation. Ask a clinical question.");
    empty.id = "empty";
    $("conversation").replaceChildren(empty);
    $("question").focus();
  });
  $("question").focus();
}

document.addEventListener("DOMContentLoaded", init);
