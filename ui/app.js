// The chat page: keeps the conversation, streams replies from POST /chat/completions (server-sent events),
// and renders text, fenced code, python tool calls and their outputs. Plain DOM, no build step.
"use strict";

const messagesEl = document.getElementById("messages");
const conversationEl = document.getElementById("conversation");
const hintEl = document.getElementById("empty-hint");
const form = document.getElementById("composer-form");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");

// user: {role: "user", content: string}; assistant: {role: "assistant", parts: [{type, text}], error?: string}
let messages = [];
let controller = null; // the AbortController of the reply being streamed, if any

// ---------------------------------------------------------------------------
// Rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Text with ```fenced``` code blocks and `inline code`; everything goes in through textContent (no HTML injection).
function renderText(text) {
  const container = el("div", "text");
  const pieces = text.split(/```/);
  pieces.forEach((piece, i) => {
    if (i % 2 === 1) {
      const newline = piece.indexOf("\n");
      const lang = newline >= 0 ? piece.slice(0, newline).trim() : "";
      const body = newline >= 0 && /^[\w+-]*$/.test(lang) ? piece.slice(newline + 1) : piece;
      const pre = el("pre");
      const code = el("code", lang ? `language-${lang}` : "", body.replace(/\n$/, ""));
      pre.appendChild(code);
      container.appendChild(pre);
      return;
    }
    // the newlines around a fence belong to the fence, not to the text
    if (i > 0) piece = piece.replace(/^\n/, "");
    if (i < pieces.length - 1) piece = piece.replace(/\n$/, "");
    piece.split(/(`[^`\n]+`)/).forEach((span) => {
      if (span.length > 2 && span.startsWith("`") && span.endsWith("`")) {
        container.appendChild(el("code", "", span.slice(1, -1)));
      } else if (span) {
        container.appendChild(document.createTextNode(span));
      }
    });
  });
  return container;
}

function renderPart(part) {
  if (part.type === "text") return renderText(part.text);
  const box = el("div", part.type === "python" ? "tool-call" : "tool-output");
  box.appendChild(el("div", "label", part.type === "python" ? "python" : "output"));
  const pre = el("pre");
  pre.appendChild(el("code", "", part.text));
  box.appendChild(pre);
  return box;
}

function actionButton(label, onClick) {
  const button = el("button", "", label);
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

function renderMessage(message, index) {
  const node = el("div", `message ${message.role}`);
  node.dataset.index = index;
  const body = el("div", "body");
  node.appendChild(body);
  if (message.role === "user") {
    body.appendChild(renderText(message.content));
    const actions = el("div", "actions");
    actions.appendChild(actionButton("Edit", () => startEdit(index)));
    node.appendChild(actions);
    return node;
  }
  message.parts.forEach((part) => body.appendChild(renderPart(part)));
  if (message.note) node.appendChild(el("div", "hint", message.note));
  if (message.error) node.appendChild(el("div", "error", message.error));
  node.dataset.state = message.streaming ? "streaming" : message.error ? "error" : "done";
  if (!message.streaming && index === messages.length - 1) {
    const actions = el("div", "actions");
    actions.appendChild(actionButton("Regenerate", () => regenerate()));
    node.appendChild(actions);
  }
  return node;
}

function render() {
  const nearBottom = conversationEl.scrollHeight - conversationEl.scrollTop - conversationEl.clientHeight < 80;
  messagesEl.replaceChildren(...messages.map(renderMessage));
  hintEl.hidden = messages.length > 0;
  if (nearBottom) conversationEl.scrollTop = conversationEl.scrollHeight;
}

// Redraw only the message being streamed: cheaper than a full render per token.
function renderLast() {
  const index = messages.length - 1;
  const old = messagesEl.lastElementChild;
  const fresh = renderMessage(messages[index], index);
  if (old && old.dataset.index === String(index)) old.replaceWith(fresh);
  else messagesEl.appendChild(fresh);
  conversationEl.scrollTop = conversationEl.scrollHeight;
}

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  input.disabled = false;
}

// ---------------------------------------------------------------------------
// Talking to the server

// The conversation in the API's format; failed or empty assistant turns are left out.
function apiMessages() {
  const out = [];
  for (const message of messages) {
    if (message.role === "user") {
      out.push({ role: "user", content: message.content });
    } else if (message.parts.length && !message.streaming) {
      const parts = message.parts.filter((part) => part.text);
      out.push({ role: "assistant", content: parts.length === 1 && parts[0].type === "text" ? parts[0].text : parts });
    }
  }
  // the API wants alternating turns: drop an assistant turn that failed before its user turn was answered
  return out.filter((m, i) => !(m.role === "user" && out[i + 1] && out[i + 1].role === "user"));
}

function appendToken(reply, text, type) {
  const last = reply.parts[reply.parts.length - 1];
  if (last && last.type === type) last.text += text;
  else reply.parts.push({ type, text });
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function streamReply() {
  const payload = { messages: apiMessages() };
  const reply = { role: "assistant", parts: [], streaming: true };
  messages.push(reply);
  render();
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let boundary;
      while ((boundary = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const event = JSON.parse(line.slice(6));
          if (event.error) throw new Error(event.error);
          if (event.token !== undefined) appendToken(reply, event.token, event.part || "text");
          if (event.done && event.finish_reason === "length") reply.note = "(stopped: length limit)";
        }
        renderLast();
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") reply.error = `Error: ${error.message}`;
  } finally {
    reply.streaming = false;
    controller = null;
    setBusy(false);
    render();
    input.focus();
  }
}

// ---------------------------------------------------------------------------
// User actions

function send(text) {
  if (!text.trim() || controller) return;
  messages.push({ role: "user", content: text });
  input.value = "";
  autosize();
  streamReply();
}

function regenerate() {
  if (controller) return;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  if (messages.length) streamReply();
}

function startEdit(index) {
  if (controller) return;
  const node = messagesEl.querySelector(`[data-index="${index}"]`);
  const box = el("div", "edit-box");
  const area = el("textarea");
  area.value = messages[index].content;
  const actions = el("div", "actions");
  actions.appendChild(actionButton("Save & submit", () => {
    if (!area.value.trim()) return;
    messages = messages.slice(0, index);
    messages.push({ role: "user", content: area.value });
    streamReply();
  }));
  actions.appendChild(actionButton("Cancel", () => render()));
  box.append(area, actions);
  node.replaceChildren(box);
  area.focus();
}

function stop() {
  if (controller) controller.abort(); // the server sees the disconnect and frees the slot
}

function newChat() {
  stop();
  messages = [];
  render();
  input.focus();
}

function autosize() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
  input.style.overflowY = input.scrollHeight > 200 ? "auto" : "hidden";
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  send(input.value);
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(input.value);
  }
});
input.addEventListener("input", autosize);
stopButton.addEventListener("click", stop);
newChatButton.addEventListener("click", newChat);
render();
