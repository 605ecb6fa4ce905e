// The saved conversations: one localStorage key holding {version, chats: [...]}. Every change reads the key
// afresh and rewrites it whole, so two open tabs add, rename and delete chats without undoing each other's.
// A value that is not JSON, is of another version, or holds a malformed chat is ignored (the chat, or all of it):
// the page starts without it rather than crash.
"use strict";

const ChatStore = (() => {
  const KEY = "nanochat.chats.v1";
  const VERSION = 1;
  const PART_TYPES = ["text", "python", "python_output"];
  const TITLE_CHARS = 60;

  function optionalString(value) {
    return value === undefined || typeof value === "string";
  }

  function validMessage(message) {
    if (!message || typeof message !== "object") return false;
    if (message.role === "user") return typeof message.content === "string";
    return message.role === "assistant" && Array.isArray(message.parts)
      && message.parts.every((part) => part && PART_TYPES.includes(part.type) && typeof part.text === "string")
      && optionalString(message.error) && optionalString(message.note);
  }

  function validChat(chat) {
    return !!chat && typeof chat === "object" && typeof chat.id === "string" && chat.id !== ""
      && typeof chat.title === "string" && Number.isFinite(chat.createdAt) && Number.isFinite(chat.updatedAt)
      && Array.isArray(chat.messages) && chat.messages.every(validMessage);
  }

  // All saved chats, newest activity first; [] when storage is empty, unreadable or of another format.
  function list() {
    let stored;
    try {
      stored = JSON.parse(localStorage.getItem(KEY));
    } catch (error) {
      return []; // not JSON, or storage switched off
    }
    if (!stored || stored.version !== VERSION || !Array.isArray(stored.chats)) return [];
    return stored.chats.filter(validChat).sort((a, b) => b.updatedAt - a.updatedAt);
  }

  function get(id) {
    return list().find((chat) => chat.id === id) || null;
  }

  // Writes the chats; false when the browser refuses (storage full or switched off).
  function write(chats) {
    try {
      localStorage.setItem(KEY, JSON.stringify({ version: VERSION, chats }));
      return true;
    } catch (error) {
      return false;
    }
  }

  // Only what a chat means is saved: no in-flight state. A reply cut off by a reload keeps its text.
  function snapshot(chat) {
    const messages = chat.messages.map((message) => {
      if (message.role === "user") return { role: "user", content: message.content };
      const saved = { role: "assistant", parts: message.parts.map(({ type, text }) => ({ type, text })) };
      const note = message.streaming ? "(interrupted)" : message.note;
      if (note) saved.note = note;
      if (message.error) saved.error = message.error;
      return saved;
    });
    return { id: chat.id, title: chat.title, createdAt: chat.createdAt, updatedAt: chat.updatedAt, messages };
  }

  function put(chat) {
    return write([snapshot(chat), ...list().filter((other) => other.id !== chat.id)]);
  }

  function rename(id, title) {
    return write(list().map((chat) => (chat.id === id ? { ...chat, title } : chat)));
  }

  function remove(id) {
    return write(list().filter((chat) => chat.id !== id));
  }

  // The chat's own title if it was renamed, else the first line of its first user message.
  function titleOf(chat) {
    if (chat.title) return chat.title;
    const first = chat.messages.find((message) => message.role === "user");
    const line = first ? first.content.trim().split("\n")[0].trim() : "";
    if (!line) return "New chat";
    return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line;
  }

  // Ids need not be unguessable, only unique; crypto.randomUUID exists only on https and localhost.
  function newId() {
    return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  }

  return { KEY, list, get, put, rename, remove, titleOf, newId };
})();
