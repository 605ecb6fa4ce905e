// The chat page: streams replies from POST /chat/completions (server-sent events), renders them as Markdown
// (markdown.js) with python tool calls and their outputs shown apart, and keeps past chats in the browser
// (store.js) in a sidebar. Plain DOM, no build step.
"use strict";

const messagesEl = document.getElementById("messages");
const conversationEl = document.getElementById("conversation");
const hintEl = document.getElementById("empty-hint");
const noticeEl = document.getElementById("notice");
const form = document.getElementById("composer-form");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");
const sidebarToggle = document.getElementById("toggle-sidebar");
const chatListEl = document.getElementById("chat-list");
const chatListEmptyEl = document.getElementById("chat-list-empty");

// The server sends its headers at once (a queued request waits inside the stream), so this long without them
// means it is stuck or unreachable, not busy.
const RESPONSE_TIMEOUT_MS = 30000;
const NARROW = window.matchMedia("(max-width: 720px)");

// A chat: {id, title ("" until renamed), createdAt, updatedAt, messages}, where a message is
// {role: "user", content} or {role: "assistant", parts: [{type, text}], note?, error?, streaming?}.
let current = chatFromAddress() || freshChat();
let stream = null; // {controller, chat, reply} while a reply streams
let streamRenderQueued = false;
let renaming = false; // a sidebar title is being edited: redrawing the list would throw the edit away

function freshChat() {
  const now = Date.now();
  return { id: ChatStore.newId(), title: "", createdAt: now, updatedAt: now, messages: [] };
}

// The chat named in the address (#id), so a reload reopens it.
function chatFromAddress() {
  try {
    const id = decodeURIComponent(location.hash.slice(1));
    return id ? ChatStore.get(id) : null;
  } catch (error) {
    return null; // a malformed %-escape
  }
}

// ---------------------------------------------------------------------------
// Rendering the conversation

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function actionButton(label, onClick) {
  const button = el("button", "", label);
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

function renderPart(part) {
  if (part.type === "text") return Markdown.render(part.text);
  const box = el("div", part.type === "python" ? "tool-call" : "tool-output");
  box.appendChild(el("div", "label", part.type === "python" ? "python" : "output"));
  const pre = el("pre");
  pre.appendChild(el("code", "", part.text));
  box.appendChild(pre);
  return box;
}

function renderError(message, isLast) {
  const box = el("div", "error");
  box.setAttribute("role", "alert");
  box.appendChild(el("span", "", message.error));
  if (isLast) box.appendChild(actionButton("Retry", regenerate));
  return box;
}

function renderMessage(message, index) {
  const node = el("div", `message ${message.role}`);
  node.dataset.index = index;
  const body = el("div", "body");
  node.appendChild(body);
  const isLast = index === current.messages.length - 1;
  if (message.role === "user") {
    body.appendChild(el("div", "text plain", message.content)); // what the user typed, as typed
    const actions = el("div", "actions");
    const edit = actionButton("Edit", () => startEdit(index));
    edit.disabled = !!stream;
    edit.setAttribute("aria-label", "Edit this message and resend it");
    actions.appendChild(edit);
    node.appendChild(actions);
    return node;
  }
  message.parts.forEach((part) => body.appendChild(renderPart(part)));
  if (message.note) node.appendChild(el("div", "hint", message.note));
  if (message.error) node.appendChild(renderError(message, isLast));
  node.dataset.state = message.streaming ? "streaming" : message.error ? "error" : "done";
  if (!message.streaming && !message.error && isLast) {
    const actions = el("div", "actions");
    actions.appendChild(actionButton("Regenerate", regenerate));
    node.appendChild(actions);
  }
  return node;
}

function render() {
  const nearBottom = conversationEl.scrollHeight - conversationEl.scrollTop - conversationEl.clientHeight < 80;
  messagesEl.replaceChildren(...current.messages.map(renderMessage));
  hintEl.hidden = current.messages.length > 0;
  if (nearBottom) conversationEl.scrollTop = conversationEl.scrollHeight;
}

// Redraw only the message being streamed, at most once a frame: Markdown is re-rendered from the whole text.
function scheduleStreamRender() {
  if (streamRenderQueued) return;
  streamRenderQueued = true;
  requestAnimationFrame(() => {
    streamRenderQueued = false;
    if (!stream || stream.chat !== current) return;
    const index = current.messages.length - 1;
    const old = messagesEl.lastElementChild;
    const fresh = renderMessage(current.messages[index], index);
    if (old && old.dataset.index === String(index)) old.replaceWith(fresh);
    else messagesEl.appendChild(fresh);
    conversationEl.scrollTop = conversationEl.scrollHeight;
  });
}

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  messagesEl.setAttribute("aria-busy", String(busy)); // screen readers read the reply once, not every token
}

function showNotice(text) {
  noticeEl.textContent = text;
  noticeEl.hidden = !text;
}

// ---------------------------------------------------------------------------
// Saved chats and the sidebar

function persist(chat) {
  if (!chat.messages.length || chat.deleted) return;
  chat.updatedAt = Date.now();
  const saved = ChatStore.put(chat);
  showNotice(saved ? "" : "This chat could not be saved: the browser's storage is full or switched off. "
    + "Delete old chats to make room.");
  if (chat === current) history.replaceState(null, "", `#${encodeURIComponent(chat.id)}`);
  renderSidebar();
}

function renderSidebar() {
  if (renaming) return;
  const chats = ChatStore.list();
  chatListEl.replaceChildren(...chats.map(chatItem));
  chatListEmptyEl.hidden = chats.length > 0;
}

function chatItem(chat) {
  const item = el("li", "chat-item");
  item.dataset.id = chat.id;
  const title = ChatStore.titleOf(chat);
  const open = actionButton(title, () => openChat(chat.id));
  open.className = "chat-open";
  open.title = title;
  if (chat.id === current.id) open.setAttribute("aria-current", "page");
  const rename = actionButton("✎", () => startRename(item, chat));
  rename.className = "chat-rename";
  rename.title = "Rename";
  rename.setAttribute("aria-label", `Rename chat: ${title}`);
  const remove = actionButton("×", () => deleteChat(chat));
  remove.className = "chat-delete";
  remove.title = "Delete";
  remove.setAttribute("aria-label", `Delete chat: ${title}`);
  item.append(open, rename, remove);
  return item;
}

function startRename(item, chat) {
  const field = el("input", "chat-title-input");
  field.type = "text";
  field.maxLength = 200;
  field.value = ChatStore.titleOf(chat);
  field.setAttribute("aria-label", "New title for this chat (empty: its first message)");
  let finished = false;
  const finish = (save) => {
    if (finished) return;
    finished = true;
    renaming = false;
    if (save) renameChat(chat.id, field.value.trim());
    renderSidebar();
  };
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    else if (event.key === "Escape") finish(false);
    else return;
    event.preventDefault();
  });
  field.addEventListener("blur", () => finish(true));
  renaming = true;
  item.replaceChildren(field);
  field.focus();
  field.select();
}

function renameChat(id, title) {
  ChatStore.rename(id, title);
  if (current.id === id) current.title = title;
}

function deleteChat(chat) {
  if (!window.confirm(`Delete "${ChatStore.titleOf(chat)}"? This cannot be undone.`)) return;
  ChatStore.remove(chat.id);
  if (chat.id !== current.id) {
    renderSidebar();
    return;
  }
  current.deleted = true; // a reply still streaming into it must not save it back
  newChat();
}

function showChat() {
  const address = current.messages.length ? `#${encodeURIComponent(current.id)}` : location.pathname + location.search;
  history.replaceState(null, "", address);
  render();
  renderSidebar();
  if (NARROW.matches) setSidebar(false);
  input.focus();
}

function openChat(id) {
  const chat = ChatStore.get(id);
  if (!chat) {
    renderSidebar(); // deleted meanwhile in another tab
    return;
  }
  abortStream();
  current = chat;
  showChat();
}

function newChat() {
  abortStream();
  current = freshChat();
  showChat();
}

function setSidebar(open) {
  document.body.dataset.sidebar = open ? "open" : "closed";
  sidebarToggle.setAttribute("aria-expanded", String(open));
}

// ---------------------------------------------------------------------------
// Talking to the server

// The conversation in the API's format; failed or empty assistant turns are left out.
function apiMessages(messages) {
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
  } catch (error) {
    return `${response.status} ${response.statusText}`.trim();
  }
}

// Reads the event stream into `reply`; true if the server said it was done (false: the stream was cut short).
async function readEvents(response, reply) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finished;
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
        if (event.done) finished = true;
        if (event.done && event.finish_reason === "length") reply.note = "(stopped: length limit)";
      }
      scheduleStreamRender();
    }
  }
}

// What went wrong, for the user; null when the user stopped the reply.
function describeError(error, phase) {
  if (phase === "timeout") return `Error: the server did not answer within ${RESPONSE_TIMEOUT_MS / 1000} s.`;
  if (error.name === "AbortError") return null;
  if (error instanceof TypeError && phase === "connect") {
    return "Error: could not reach the server. Check that it is running, then retry.";
  }
  if (error instanceof TypeError) return "Error: the connection to the server was lost.";
  return `Error: ${error.message}`;
}

async function streamReply(chat) {
  const payload = { messages: apiMessages(chat.messages) };
  const reply = { role: "assistant", parts: [], streaming: true };
  chat.messages.push(reply);
  const controller = new AbortController();
  stream = { controller, chat, reply };
  setBusy(true);
  render();
  let phase = "connect";
  const timer = setTimeout(() => {
    phase = "timeout";
    controller.abort();
  }, RESPONSE_TIMEOUT_MS);
  try {
    const response = await fetch("chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
      signal: controller.signal,
    });
    clearTimeout(timer);
    phase = "stream";
    if (!response.ok) throw new Error(await errorMessage(response));
    if (!(await readEvents(response, reply))) throw new Error("the reply was cut off before it finished.");
  } catch (error) {
    const message = describeError(error, phase);
    if (message) reply.error = message;
    else reply.note = "Stopped.";
  } finally {
    clearTimeout(timer);
    reply.streaming = false;
    if (stream && stream.controller === controller) {
      stream = null;
      setBusy(false);
    }
    persist(chat);
    if (chat === current) {
      render();
      input.focus();
    }
  }
}

// Stops the reply being streamed, keeping what arrived; the server sees the disconnect and frees the slot.
function abortStream() {
  if (!stream) return;
  const { controller, chat, reply } = stream;
  stream = null;
  reply.streaming = false;
  reply.note = "Stopped.";
  controller.abort();
  setBusy(false);
  persist(chat); // now, not when the fetch settles: the chat may be reopened before that
}

// ---------------------------------------------------------------------------
// User actions

function send(text) {
  if (!text.trim() || stream) return;
  current.messages.push({ role: "user", content: text });
  input.value = "";
  autosize();
  persist(current);
  streamReply(current);
}

function regenerate() {
  if (stream) return;
  const messages = current.messages;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  if (messages.length) streamReply(current);
}

// Edit a user message in place; submitting drops everything after it and asks again.
function startEdit(index) {
  if (stream) return;
  const node = messagesEl.querySelector(`[data-index="${index}"]`);
  const box = el("div", "edit-box");
  const area = el("textarea");
  area.value = current.messages[index].content;
  area.setAttribute("aria-label", "Edit your message");
  const submit = () => {
    if (!area.value.trim()) return;
    current.messages = current.messages.slice(0, index);
    current.messages.push({ role: "user", content: area.value });
    persist(current);
    streamReply(current);
  };
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit();
    else if (event.key === "Escape") render();
    else return;
    event.preventDefault();
  });
  const actions = el("div", "actions");
  actions.appendChild(actionButton("Save & submit", submit));
  actions.appendChild(actionButton("Cancel", render));
  box.append(area, actions);
  node.replaceChildren(box);
  area.focus();
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
  } else if (event.key === "Escape" && stream) {
    abortStream();
  }
});
input.addEventListener("input", autosize);
stopButton.addEventListener("click", abortStream);
newChatButton.addEventListener("click", newChat);
sidebarToggle.addEventListener("click", () => setSidebar(document.body.dataset.sidebar !== "open"));
document.getElementById("close-sidebar").addEventListener("click", () => setSidebar(false));
document.querySelector(".chat-pane").addEventListener("click", (event) => {
  // on a narrow window the open sidebar covers the chat: a click beside it closes it
  if (NARROW.matches && document.body.dataset.sidebar === "open" && !sidebarToggle.contains(event.target)) {
    setSidebar(false);
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && NARROW.matches && document.body.dataset.sidebar === "open") setSidebar(false);
});
NARROW.addEventListener("change", () => setSidebar(!NARROW.matches));
window.addEventListener("storage", (event) => {
  if (event.key === ChatStore.KEY || event.key === null) renderSidebar(); // another tab changed the chats
});
window.addEventListener("hashchange", () => {
  const chat = chatFromAddress(); // an address typed or pasted into this tab
  if (chat && chat.id !== current.id) openChat(chat.id);
});
window.addEventListener("pagehide", () => {
  if (stream) persist(stream.chat); // a reload mid-reply keeps the text so far
});
setSidebar(!NARROW.matches);
setBusy(false);
showChat();
