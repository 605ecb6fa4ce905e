// Markdown for the model's replies, built straight into DOM nodes. Every piece of model text enters the page through
// textContent or a text node, never innerHTML, so a reply can show "<script>" or "<img onerror=...>" but never run
// it; a link is made only for an http(s) URL. Renders any prefix of a reply sensibly, so the page can re-render a
// message on every streamed chunk (an unclosed ``` fence is a code block that is still growing).
// The subset: ATX headings, paragraphs (each newline a line break), bullet and numbered lists (nested), block
// quotes, rules, fenced code blocks with a Copy button, **bold**, *italic*, ~~strike~~, `code`, [links](url) and
// bare URLs.
"use strict";

const Markdown = (() => {
  // nesting deeper than this renders as plain text: a reply of 10,000 ">" cannot exhaust the stack
  const MAX_DEPTH = 8;
  const FENCE_OPEN = /^([ \t]*)(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
  const ESCAPABLE = /[\\`*_{}[\]()#+\-.!~>|<]/;
  const LINK = /\[([^[\]\n]+)\]\(\s*<?([^\s()<>]*(?:\([^\s()<>]*\)[^\s()<>]*)*)>?(?:\s+"[^"\n]*")?\s*\)/y;
  const BARE_URL = /https?:\/\/[^\s<>"'`]+/iy;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Columns of leading whitespace (a tab counts to the next multiple of 4).
  function indentOf(line) {
    let columns = 0;
    for (const ch of line) {
      if (ch === " ") columns += 1;
      else if (ch === "\t") columns += 4 - (columns % 4);
      else break;
    }
    return columns;
  }

  // The line without up to `columns` columns of leading whitespace.
  function dedent(line, columns) {
    let i = 0;
    let removed = 0;
    while (i < line.length && removed < columns && (line[i] === " " || line[i] === "\t")) {
      removed += line[i] === "\t" ? 4 - (removed % 4) : 1;
      i += 1;
    }
    return line.slice(i);
  }

  function listItem(line) {
    const match = ITEM.exec(line);
    if (!match || RULE.test(line)) return null;
    const indent = indentOf(match[1]);
    const marker = match[2];
    const gap = match[3] ? Math.min(indentOf(match[3]), 4) : 1;
    const ordered = /\d/.test(marker);
    return { indent, ordered, number: ordered ? parseInt(marker, 10) : 1, text: match[4] || "",
             contentIndent: indent + marker.length + gap };
  }

  function startsBlock(line) {
    return FENCE_OPEN.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || !!listItem(line);
  }

  function isBlank(line) {
    return line.trim() === "";
  }

  function nextNonBlank(lines, i) {
    while (i < lines.length && isBlank(lines[i])) i += 1;
    return i;
  }

  // ---------------------------------------------------------------------------
  // Blocks: each takes the lines and the index of its first line, appends its node to `out`, returns the next index

  function renderBlocks(lines, depth) {
    const out = document.createDocumentFragment();
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let match;
      if (isBlank(line)) i += 1;
      else if ((match = FENCE_OPEN.exec(line))) i = codeBlock(lines, i, match, out);
      else if ((match = HEADING.exec(line))) i = heading(match, i, depth, out);
      else if (RULE.test(line)) i = rule(i, out);
      else if (depth < MAX_DEPTH && QUOTE.test(line)) i = blockquote(lines, i, depth, out);
      else if (depth < MAX_DEPTH && listItem(line)) i = list(lines, i, depth, out);
      else i = paragraph(lines, i, depth, out);
    }
    return out;
  }

  function codeBlock(lines, i, open, out) {
    const [, indent, fence, lang] = open;
    const closing = new RegExp(`^[ \\t]*${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
    const body = [];
    let j = i + 1;
    while (j < lines.length && !closing.test(lines[j])) {
      body.push(dedent(lines[j], indentOf(indent)));
      j += 1;
    }
    // still streaming: the newline that ends the text so far is not yet part of the code
    if (j === lines.length && body.length && body[body.length - 1] === "") body.pop();
    out.appendChild(codeBlockNode(body.join("\n"), lang.replace(/[^\w+#.-]/g, "")));
    return j + 1; // past the closing fence (or the end, while it is still streaming)
  }

  function codeBlockNode(code, lang) {
    const block = el("div", "code-block");
    const header = el("div", "code-header");
    header.appendChild(el("span", "code-lang", lang || "code"));
    header.appendChild(copyButton(code));
    const pre = el("pre");
    pre.appendChild(el("code", lang ? `language-${lang}` : "", code));
    block.append(header, pre);
    return block;
  }

  function heading(match, i, depth, out) {
    const node = el(`h${match[1].length}`);
    appendInline(node, match[2], depth);
    out.appendChild(node);
    return i + 1;
  }

  function rule(i, out) {
    out.appendChild(el("hr"));
    return i + 1;
  }

  function blockquote(lines, i, depth, out) {
    const inner = [];
    let match;
    while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
      inner.push(match[1]);
      i += 1;
    }
    const node = el("blockquote");
    node.appendChild(renderBlocks(inner, depth + 1));
    out.appendChild(node);
    return i;
  }

  function list(lines, i, depth, out) {
    const first = listItem(lines[i]);
    const node = el(first.ordered ? "ol" : "ul");
    if (first.ordered && first.number !== 1) node.start = first.number;
    let item;
    while (i < lines.length && (item = listItem(lines[i])) && item.ordered === first.ordered) {
      const [body, next] = itemBody(lines, i, item);
      const li = el("li");
      const content = renderBlocks(body, depth + 1);
      // a one-paragraph item (a tight list) holds its text directly, without the paragraph's margins
      const only = content.childNodes.length === 1 ? content.firstChild : null;
      if (only && only.tagName === "P") li.append(...only.childNodes);
      else li.appendChild(content);
      node.appendChild(li);
      i = next;
      const after = nextNonBlank(lines, i);
      const sibling = after < lines.length ? listItem(lines[after]) : null;
      if (after > i && sibling && sibling.ordered === first.ordered && sibling.indent <= first.indent) i = after;
    }
    out.appendChild(node);
    return i;
  }

  // An item's lines (its marker removed, children dedented) and the index after them. Children are the lines
  // indented past the marker, blank lines between them, and unindented lines that continue its paragraph.
  function itemBody(lines, i, item) {
    const body = [item.text];
    let j = i + 1;
    while (j < lines.length) {
      const line = lines[j];
      if (isBlank(line)) {
        const after = nextNonBlank(lines, j);
        if (after >= lines.length || indentOf(lines[after]) <= item.indent) break;
        body.push("");
      } else if (indentOf(line) > item.indent) {
        body.push(dedent(line, item.contentIndent));
      } else if (startsBlock(line) || isBlank(body[body.length - 1])) {
        break;
      } else {
        body.push(line.trim());
      }
      j += 1;
    }
    return [body, j];
  }

  function paragraph(lines, i, depth, out) {
    const text = [lines[i].trim()];
    i += 1;
    while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i])) {
      text.push(lines[i].trim());
      i += 1;
    }
    const node = el("p");
    appendInline(node, text.join("\n"), depth);
    out.appendChild(node);
    return i;
  }

  // ---------------------------------------------------------------------------
  // Inline: code spans, emphasis, links. Each matcher returns {node, end} or null (the text stays literal).

  function appendText(parent, text) {
    text.split("\n").forEach((piece, k) => {
      if (k > 0) parent.appendChild(el("br"));
      if (piece) parent.appendChild(document.createTextNode(piece));
    });
  }

  function runLength(text, i) {
    let end = i;
    while (text[end] === text[i]) end += 1;
    return end - i;
  }

  function appendInline(parent, text, depth, inLink = false) {
    // delimiter runs ("**", "`") known to have no closer further on: later ones of the same kind have none either,
    // so a reply full of lone asterisks renders in linear time, not quadratic
    const unclosed = new Set();
    let plain = "";
    let i = 0;
    while (i < text.length) {
      const ch = text[i];
      if (ch === "\\" && ESCAPABLE.test(text[i + 1] || "")) {
        plain += text[i + 1];
        i += 2;
        continue;
      }
      let span = null;
      const run = "`*_~".includes(ch) ? ch.repeat(runLength(text, i)) : "";
      if (unclosed.has(run)) span = null;
      else if (ch === "`") span = codeSpan(text, i, unclosed);
      else if (run && depth < MAX_DEPTH) span = emphasis(text, i, depth, inLink, unclosed);
      else if (ch === "[" && !inLink) span = link(text, i, depth);
      else if ((ch === "h" || ch === "H") && !inLink) span = bareUrl(text, i);
      if (span) {
        appendText(parent, plain);
        plain = "";
        parent.appendChild(span.node);
        i = span.end;
      } else {
        // an unmatched run of backticks or asterisks is literal as a whole, not re-tried one character later
        const length = run ? run.length : 1;
        plain += text.slice(i, i + length);
        i += length;
      }
    }
    appendText(parent, plain);
  }

  function codeSpan(text, i, unclosed) {
    const length = runLength(text, i);
    const fence = "`".repeat(length);
    let close = text.indexOf(fence, i + length);
    while (close >= 0 && runLength(text, close) !== length) close = text.indexOf(fence, close + runLength(text, close));
    if (close < 0) {
      unclosed.add(fence);
      return null;
    }
    let code = text.slice(i + length, close).replace(/\n/g, " ");
    if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1); // "`` `x` ``" shows `x`
    return { node: el("code", "", code), end: close + length };
  }

  function emphasis(text, i, depth, inLink, unclosed) {
    const ch = text[i];
    const length = runLength(text, i);
    if (length > 3 || (ch === "~" && length !== 2)) return null;
    const wordChar = /[\p{L}\p{N}]/u;
    if (ch === "_" && i > 0 && wordChar.test(text[i - 1])) return null; // snake_case is not emphasis
    if (!text[i + length] || /\s/.test(text[i + length])) return null;
    for (let close = text.indexOf(ch, i + length); close >= 0; close = text.indexOf(ch, close + 1)) {
      const closeLength = runLength(text, close);
      const ok = closeLength === length && !/\s/.test(text[close - 1])
        && !(ch === "_" && wordChar.test(text[close + length] || ""));
      if (ok) {
        const inner = text.slice(i + length, close);
        const node = length === 1 ? el("em") : ch === "~" ? el("del") : el("strong");
        let target = node;
        if (length === 3) target = node.appendChild(el("em"));
        appendInline(target, inner, depth + 1, inLink);
        return { node, end: close + length };
      }
      close += closeLength - 1;
    }
    unclosed.add(ch.repeat(length));
    return null;
  }

  // The URL as the page may use it: http(s) only (no javascript:, data:, file:), else null.
  function safeHref(url) {
    if (!/^https?:\/\//i.test(url)) return null;
    try {
      const parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (error) {
      return null;
    }
  }

  function anchor(href) {
    const node = el("a");
    node.href = href;
    node.target = "_blank";
    node.rel = "noopener noreferrer";
    return node;
  }

  function link(text, i, depth) {
    LINK.lastIndex = i;
    const match = LINK.exec(text);
    if (!match) return null;
    const end = LINK.lastIndex;
    const href = safeHref(match[2]);
    if (!href) return { node: document.createTextNode(match[0]), end }; // shown as written, not followed
    const node = anchor(href);
    appendInline(node, match[1], depth + 1, true);
    return { node, end };
  }

  function bareUrl(text, i) {
    if (i > 0 && /[\p{L}\p{N}/]/u.test(text[i - 1])) return null;
    BARE_URL.lastIndex = i;
    const match = BARE_URL.exec(text);
    if (!match) return null;
    let url = match[0].replace(/[.,;:!?'"*_~]+$/, "");
    // a closing parenthesis belongs to the URL only if it opened one: "(see https://x.org/a)"
    while (url.endsWith(")") && (url.match(/\(/g) || []).length < (url.match(/\)/g) || []).length) {
      url = url.slice(0, -1);
    }
    const href = safeHref(url);
    if (!href) return null;
    const node = anchor(href);
    node.textContent = url;
    return { node, end: i + url.length };
  }

  // ---------------------------------------------------------------------------
  // Copying code: the async clipboard API where the page may use it (a secure context), else a hidden textarea

  function copyButton(code) {
    const button = el("button", "copy", "Copy");
    button.type = "button";
    button.setAttribute("aria-label", "Copy code");
    button.addEventListener("click", async () => {
      const copied = await copyText(code);
      button.textContent = copied ? "Copied" : "Copy failed";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    return button;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch (error) {
        // denied (an unfocused page, a browser setting): the fallback below may still work
      }
    }
    const area = el("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch (error) {
      copied = false;
    }
    area.remove();
    return copied;
  }

  // A reply's text as a <div class="text markdown">.
  function render(text) {
    const root = el("div", "text markdown");
    root.appendChild(renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), 0));
    return root;
  }

  return { render, copyText };
})();
