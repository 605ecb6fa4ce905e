"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import copy
import json
import shutil
import threading

import pytest

from nanochat.batching import Scheduler
from nanochat.engine import Engine
from nanochat.server import Defaults, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 30


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.fail("the browser test needs Debian's Chromium and its driver: apt-get install -y chromium "
                    "chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs Selenium: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


class Gate:
    """Holds the model after `allowed` forward passes until opened: the test sees a reply mid-stream."""

    def __init__(self, model):
        self.model, self.inner_forward = model, model.forward
        self.open, self.calls, self.allowed = threading.Event(), 0, 10**9
        model.forward = self.forward

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.allowed:
            self.open.wait(timeout=WAIT_S)
        return self.inner_forward(*args, **kwargs)

    def close_after(self, passes: int) -> None:
        self.open.clear()
        self.calls, self.allowed = 0, passes


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(d), message=message)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def last_assistant(driver) -> dict | None:
    return js(driver, """
        const nodes = document.querySelectorAll('.message.assistant');
        const node = nodes[nodes.length - 1];
        if (!node) return null;
        const error = node.querySelector('.error');
        return {state: node.dataset.state, text: node.querySelector('.body').textContent,
                error: error ? error.textContent : null};
    """)


def rendered(driver, *texts: str) -> str | list[str]:
    """The text a reply shows once the page's Markdown renderer has had it (a list for several texts)."""
    shown = js(driver, "return arguments[0].map((text) => Markdown.render(text).textContent);", list(texts))
    return shown[0] if len(texts) == 1 else shown


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    js(driver, "arguments[0].value = arguments[1];", box, text)
    box.send_keys(Keys.ENTER)


def test_chat_page_streams_stops_edits_and_shows_errors(browser, live_server, tiny_gpt, tiny_tokenizer):
    from selenium.webdriver.common.by import By

    model = copy.deepcopy(tiny_gpt)
    gate = Gate(model)
    engine = Engine(model, tiny_tokenizer)
    scheduler = Scheduler(engine, max_batch_size=2)
    url = live_server(create_app(scheduler, tiny_tokenizer, defaults=Defaults(temperature=0.0, max_tokens=12)))

    def expected_tokens(messages):
        prompt = tiny_tokenizer.render_for_completion({"messages": messages})
        tokens = Engine(tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=12, temperature=0.0)[0][0]
        return tokens[len(prompt):]

    def expected_reply(messages):
        return rendered(browser, tiny_tokenizer.decode(expected_tokens(messages)))

    browser.get(url)
    assert browser.title == "nanochat"
    assert browser.find_element(By.ID, "empty-hint").is_displayed()

    # the reply streams in: part of it is on the page while the model is still held
    gate.close_after(4)
    send(browser, "Hello there")
    partial = wait_for(browser, lambda d: (r := last_assistant(d)) and r["state"] == "streaming" and r["text"] and r,
                       "no partial reply appeared")
    assert browser.find_element(By.ID, "stop").is_displayed()
    assert not browser.find_element(By.ID, "send").is_displayed()
    gate.open.set()
    done = wait_for(browser, lambda d: (r := last_assistant(d)) and r["state"] == "done" and r, "reply never finished")
    first_tokens = expected_tokens([{"role": "user", "content": "Hello there"}])
    prefixes = [tiny_tokenizer.decode(first_tokens[:k]) for k in range(1, len(first_tokens))]
    assert partial["text"] != done["text"] and partial["text"] in rendered(browser, *prefixes)
    assert done["text"] == rendered(browser, tiny_tokenizer.decode(first_tokens))

    # stop: the reply ends where it is and the server frees the row
    gate.close_after(3)
    send(browser, "Tell me more")
    wait_for(browser, lambda d: (r := last_assistant(d)) and r["state"] == "streaming" and r["text"],
             "second reply did not start")
    browser.find_element(By.ID, "stop").click()
    wait_for(browser, lambda d: last_assistant(d)["state"] == "done", "stop did not end the reply")
    # the model is still held: the request can only end by the server noticing the disconnect
    wait_for(browser, lambda d: any(sample.request.cancelled for sample in list(scheduler.rows)),
             "the server never saw the client go away")
    gate.open.set()
    wait_for(browser, lambda d: scheduler.stats()["requests_cancelled"] == 1, "the server never saw the stop")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 4

    # regenerate the stopped reply: it is replaced by a whole new one
    browser.find_element(By.XPATH, "//button[text()='Regenerate']").click()
    regenerated = wait_for(browser, lambda d: (r := last_assistant(d)) and r["state"] == "done" and r,
                           "regenerate did not answer")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 4
    assert regenerated["text"] == expected_reply([{"role": "user", "content": "Hello there"},
                                                  {"role": "assistant", "content": done["text"]},
                                                  {"role": "user", "content": "Tell me more"}])

    # edit the first message and regenerate: the conversation is cut there and answered afresh
    browser.find_element(By.CSS_SELECTOR, '.message.user[data-index="0"] .actions button').click()
    editor = browser.find_element(By.CSS_SELECTOR, ".edit-box textarea")
    editor.clear()
    editor.send_keys("What is the weather like?")
    browser.find_element(By.XPATH, "//button[text()='Save & submit']").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message")) == 2
             and last_assistant(d)["state"] == "done", "the edited conversation was not answered")
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text.startswith("What is the weather like?")
    assert last_assistant(browser)["text"] == expected_reply([{"role": "user", "content": "What is the weather like?"}])

    # an error from the server is shown to the user
    send(browser, "hello " * 400)  # longer than the tiny model's context
    error = wait_for(browser, lambda d: (r := last_assistant(d)) and r["error"], "no error shown")
    assert "context" in error

    # new chat empties the page
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    scheduler.stop()


def test_tool_calls_outputs_and_code_blocks_render_distinctly(browser, live_server, scripted_gpt, tiny_tokenizer):
    from selenium.webdriver.common.by import By

    special = tiny_tokenizer.encode_special
    question = "What is 6 times 7?"
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": question}]})
    call = [special("<|python_start|>"), *tiny_tokenizer.encode("6*7"), special("<|python_end|>")]
    answer = tiny_tokenizer.encode(" It is 42:\n```python\nprint(6 * 7)\n```")
    script = call + [0] * (len(tiny_tokenizer.encode("42")) + 2) + answer + [special("<|assistant_end|>")]
    scheduler = Scheduler(Engine(scripted_gpt(len(prompt), script), tiny_tokenizer), max_batch_size=1)
    url = live_server(create_app(scheduler, tiny_tokenizer, defaults=Defaults(temperature=0.0, max_tokens=80)))

    browser.get(url)
    send(browser, question)
    wait_for(browser, lambda d: (r := last_assistant(d)) and r["state"] == "done", "reply never finished")
    assistant = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    assert assistant.find_element(By.CSS_SELECTOR, ".tool-call code").text == "6*7"
    assert assistant.find_element(By.CSS_SELECTOR, ".tool-output code").text == "42"
    assert assistant.find_element(By.CSS_SELECTOR, ".text pre code").text == "print(6 * 7)"
    scheduler.stop()


# -----------------------------------------------------------------------------
# Markdown, saved chats, stop, edit and errors, over a model that answers from a book of replies

STORE_KEY = "nanochat.chats.v1"
MARKDOWN_REPLY = """# Plan

Some **bold** and *italic* text with `inline code`.
A second line.

- first
- second
  - nested
1. one
2. two

```python
print("<b>hi</b>")
```

See https://example.com/docs and [the guide](https://example.org/guide), not [this](javascript:window.__pwned=1).
"""
HOSTILE_REPLY = ('Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
                 '[click](javascript:window.__pwned=3) **still bold**')


@pytest.fixture
def book_app(live_server, tiny_tokenizer):
    """Factory: book_app({user message: reply}) -> (url, gate): a live app whose model answers each conversation
    with the book's reply to its last user message (any unknown message gets "I do not know."), however long the
    conversation before it; `gate` holds the model mid-reply when asked."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    special = tiny_tokenizer.encode_special
    user_start, user_end, reply_end = special("<|user_start|>"), special("<|user_end|>"), special("<|assistant_end|>")

    class BookGPT(GPT):
        def __init__(self, book: dict[str, str]):
            super().__init__(GPTConfig(sequence_len=1024, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1,
                                       n_head=1, n_kv_head=1, n_embd=8))
            self.book, self.prompt_len, self.script = book, 0, []

        def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_to_keep=0):
            rows, length = idx.shape
            assert rows == 1, "the book model serves one request at a time (max_batch_size=1)"
            start = int(kv_cache.pos[0])
            if start == 0:  # a prefill: look the reply up
                prompt = idx[0].tolist()
                last = len(prompt) - 1 - prompt[::-1].index(user_start)
                question = tiny_tokenizer.decode(prompt[last + 1:prompt.index(user_end, last)])
                self.prompt_len = length
                self.script = tiny_tokenizer.encode(self.book.get(question, "I do not know.")) + [reply_end]
            kv_cache.pos += length
            logits = torch.full((1, length, self.config.vocab_size), -10.0)
            for t in range(length):
                index = start + t + 1 - self.prompt_len
                if 0 <= index < len(self.script):
                    logits[0, t, self.script[index]] = 10.0
            return logits[:, -logits_to_keep:] if logits_to_keep else logits

    schedulers = []

    def make(book: dict[str, str]):
        model = BookGPT(book)
        gate = Gate(model)
        scheduler = Scheduler(Engine(model, tiny_tokenizer), max_batch_size=1)
        schedulers.append(scheduler)
        app = create_app(scheduler, tiny_tokenizer, defaults=Defaults(temperature=0.0, max_tokens=400))
        return live_server(app), gate

    yield make
    for scheduler in schedulers:
        scheduler.stop()


def wait_done(driver, message: str = "the reply never finished") -> dict:
    return wait_for(driver, lambda d: (r := last_assistant(d)) and r["state"] != "streaming" and r, message)


def sidebar_titles(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('#chat-list .chat-open')].map((b) => b.textContent);")


def shown_messages(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('#messages .message .body')].map((b) => b.textContent);")


def test_reply_renders_markdown_lists_code_and_only_http_links(browser, book_app, tiny_tokenizer):
    from selenium.webdriver.common.by import By

    url, gate = book_app({"Show me markdown": MARKDOWN_REPLY})
    browser.get(url)
    js(browser, "window.__pwned = 0;")

    # mid-stream, the part that has arrived is already Markdown: the list, and the code block still open
    tokens = tiny_tokenizer.encode(MARKDOWN_REPLY)
    gate.close_after(next(k for k in range(len(tokens)) if "print" in tiny_tokenizer.decode(tokens[:k])))
    send(browser, "Show me markdown")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant pre code"),
             "the open code block never showed mid-stream")
    assert last_assistant(browser)["state"] == "streaming"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant ul > li")) == 3
    gate.open.set()
    wait_done(browser)

    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant .markdown")
    assert reply.find_element(By.TAG_NAME, "h1").text == "Plan"
    assert reply.find_element(By.TAG_NAME, "strong").text == "bold"
    assert reply.find_element(By.TAG_NAME, "em").text == "italic"
    assert reply.find_element(By.CSS_SELECTOR, "p > code").text == "inline code"
    assert reply.find_elements(By.CSS_SELECTOR, "p > br"), "a newline inside a paragraph is a line break"
    assert [li.text for li in reply.find_elements(By.CSS_SELECTOR, ":scope > ul > li")] == ["first", "second\nnested"]
    assert reply.find_element(By.CSS_SELECTOR, "ul > li > ul > li").text == "nested"
    assert [li.text for li in reply.find_elements(By.CSS_SELECTOR, ":scope > ol > li")] == ["one", "two"]
    code = reply.find_element(By.CSS_SELECTOR, ".code-block pre > code")
    assert code.text == 'print("<b>hi</b>")' and code.get_attribute("class") == "language-python"
    copy = reply.find_element(By.CSS_SELECTOR, ".code-block button.copy")
    assert copy.text == "Copy" and copy.get_attribute("aria-label") == "Copy code"
    copy.click()
    wait_for(browser, lambda d: copy.text == "Copied", "the copy button did not report copying")

    links = [(a.get_attribute("href"), a.get_attribute("target"), a.get_attribute("rel"), a.text)
             for a in reply.find_elements(By.TAG_NAME, "a")]
    assert links == [("https://example.com/docs", "_blank", "noopener noreferrer", "https://example.com/docs"),
                     ("https://example.org/guide", "_blank", "noopener noreferrer", "the guide")]
    assert "[this](javascript:window.__pwned=1)" in reply.text  # shown as written, not a link


def test_html_in_a_reply_is_shown_as_text_and_never_runs(browser, book_app):
    from selenium.webdriver.common.by import By

    url, _gate = book_app({"Say something nasty": HOSTILE_REPLY})
    browser.get(url)
    js(browser, "window.__pwned = 0;")
    send(browser, "Say something nasty")
    wait_done(browser)
    messages = browser.find_element(By.ID, "messages")
    assert messages.find_elements(By.CSS_SELECTOR, "img, script, a") == []
    text = browser.find_element(By.CSS_SELECTOR, ".message.assistant .markdown").text
    assert '<img src=x onerror="window.__pwned=1">' in text and "<script>window.__pwned=2</script>" in text
    assert "[click](javascript:window.__pwned=3)" in text
    assert browser.find_element(By.CSS_SELECTOR, ".message.assistant strong").text == "still bold"
    assert js(browser, "return window.__pwned;") == 0
    assert js(browser, "return document.images.length;") == 0


def test_chats_survive_a_reload_and_can_be_reopened_renamed_and_deleted(browser, book_app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _gate = book_app({"First question": "First *answer*.", "Second question\nwith two lines": "Second answer."})
    browser.get(url)
    assert sidebar_titles(browser) == []
    send(browser, "First question")
    wait_done(browser)
    browser.find_element(By.ID, "new-chat").click()
    assert shown_messages(browser) == []
    box = browser.find_element(By.ID, "input")  # typed: Shift+Enter is a new line, Enter sends
    box.send_keys("Second question")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    assert box.get_attribute("value") == "Second question\n" and len(shown_messages(browser)) == 0
    box.send_keys("with two lines", Keys.ENTER)
    wait_done(browser)
    assert sidebar_titles(browser) == ["Second question", "First question"]  # newest first, first line as title

    browser.refresh()
    assert shown_messages(browser) == ["Second question\nwith two lines", "Second answer."]
    assert sidebar_titles(browser) == ["Second question", "First question"]

    # reopen the first chat from the sidebar
    browser.find_element(By.XPATH, "//button[@class='chat-open'][text()='First question']").click()
    assert shown_messages(browser) == ["First question", "First answer."]
    assert browser.find_element(By.CSS_SELECTOR, ".message.assistant em").text == "answer"
    assert browser.find_element(By.CSS_SELECTOR, ".chat-open[aria-current]").text == "First question"

    # rename it inline; the new title outlives a reload
    browser.find_element(By.CSS_SELECTOR, ".chat-item:nth-child(2) .chat-rename").click()
    field = browser.find_element(By.CSS_SELECTOR, ".chat-title-input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Renamed chat", Keys.ENTER)
    assert sidebar_titles(browser) == ["Second question", "Renamed chat"]
    browser.refresh()
    assert sidebar_titles(browser) == ["Second question", "Renamed chat"]
    assert shown_messages(browser) == ["First question", "First answer."]

    # delete asks first: dismissed keeps the chat, accepted removes it (and the open chat with it)
    delete = browser.find_element(By.CSS_SELECTOR, ".chat-item:nth-child(2) .chat-delete")
    assert delete.get_attribute("aria-label") == "Delete chat: Renamed chat"
    delete.click()
    browser.switch_to.alert.dismiss()
    assert sidebar_titles(browser) == ["Second question", "Renamed chat"]
    browser.find_element(By.CSS_SELECTOR, ".chat-item:nth-child(2) .chat-delete").click()
    browser.switch_to.alert.accept()
    assert sidebar_titles(browser) == ["Second question"]
    assert shown_messages(browser) == []
    browser.refresh()
    assert sidebar_titles(browser) == ["Second question"]


def test_stop_keeps_the_partial_reply_and_edit_resends_from_there(browser, book_app, tiny_tokenizer):
    from selenium.webdriver.common.by import By

    long_reply = "This answer goes on and on, " * 10
    url, gate = book_app({"Tell a long story": long_reply, "Next": "Next answer.", "Be brief": "Brief answer."})
    browser.get(url)

    gate.close_after(6)
    send(browser, "Tell a long story")
    wait_for(browser, lambda d: (r := last_assistant(d)) and r["state"] == "streaming" and r["text"],
             "the reply did not start")
    browser.find_element(By.ID, "stop").click()
    stopped = wait_done(browser, "stop did not end the reply")
    gate.open.set()
    partial = browser.find_element(By.CSS_SELECTOR, ".message.assistant .body").text
    assert partial and long_reply.startswith(partial.rstrip()) and len(partial) < len(long_reply) / 2
    assert stopped["error"] is None and "Stopped." in browser.find_element(By.CSS_SELECTOR, ".message.assistant").text
    assert browser.find_element(By.ID, "send").is_displayed() and not browser.find_element(By.ID, "stop").is_displayed()
    browser.refresh()
    assert shown_messages(browser) == ["Tell a long story", partial]

    # the conversation goes on past the stopped reply; editing the first message drops both later turns
    send(browser, "Next")
    wait_done(browser)
    assert shown_messages(browser) == ["Tell a long story", partial, "Next", "Next answer."]
    browser.find_element(By.CSS_SELECTOR, '.message.user[data-index="0"] .actions button').click()
    editor = browser.find_element(By.CSS_SELECTOR, ".edit-box textarea")
    editor.clear()
    editor.send_keys("Be brief")
    browser.find_element(By.XPATH, "//button[text()='Save & submit']").click()
    wait_for(browser, lambda d: len(shown_messages(d)) == 2 and last_assistant(d)["state"] == "done",
             "the edited message was not answered")
    assert shown_messages(browser) == ["Be brief", "Brief answer."]
    browser.refresh()
    assert shown_messages(browser) == ["Be brief", "Brief answer."]
    assert sidebar_titles(browser) == ["Be brief"]


def test_server_down_shows_an_error_with_retry(browser, book_app):
    from selenium.webdriver.common.by import By

    url, _gate = book_app({"Are you there?": "Yes, back again."})
    browser.get(url)
    # the browser's network switched off: a fetch fails as it does when nothing listens on the port
    network = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {**network, "offline": True})
    try:
        send(browser, "Are you there?")
        failed = wait_done(browser, "no error shown")
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {**network, "offline": False})
    assert failed["state"] == "error" and "could not reach the server" in failed["error"]
    error = browser.find_element(By.CSS_SELECTOR, ".message.assistant .error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert browser.find_element(By.ID, "send").is_displayed()  # not stuck streaming

    error.find_element(By.XPATH, ".//button[text()='Retry']").click()
    wait_for(browser, lambda d: last_assistant(d)["state"] == "done", "retry did not answer")
    assert shown_messages(browser) == ["Are you there?", "Yes, back again."]


def test_saved_chats_that_are_corrupt_or_of_another_version_are_ignored(browser, book_app):
    url, _gate = book_app({})
    browser.get(url)
    good = {"id": "good", "title": "", "createdAt": 1, "updatedAt": 2,
            "messages": [{"role": "user", "content": "Kept"}, {"role": "assistant", "parts": [{"type": "text",
                                                                                              "text": "Yes."}]}]}
    bad = {"id": "bad", "title": "", "createdAt": 1, "updatedAt": 3, "messages": [{"role": "user", "content": 5}]}
    for value, titles in [("{not json", []), (json.dumps({"version": 0, "chats": [good]}), []),
                          (json.dumps([good]), []), (json.dumps({"version": 1, "chats": [bad, good, 7]}), ["Kept"])]:
        js(browser, "localStorage.setItem(arguments[0], arguments[1]);", STORE_KEY, value)
        browser.refresh()
        assert sidebar_titles(browser) == titles, value
    send(browser, "Still works")
    wait_done(browser)
    assert sidebar_titles(browser) == ["Still works", "Kept"]


def test_sidebar_collapses_on_a_narrow_window(browser, book_app):
    from selenium.webdriver.common.by import By

    url, _gate = book_app({})
    browser.get(url)
    sidebar, toggle = browser.find_element(By.ID, "sidebar"), browser.find_element(By.ID, "toggle-sidebar")
    assert sidebar.is_displayed() and toggle.get_attribute("aria-expanded") == "true"
    size = browser.get_window_size()
    browser.set_window_size(480, 800)
    try:
        wait_for(browser, lambda d: not sidebar.is_displayed(), "the sidebar stayed open on a narrow window")
        assert toggle.get_attribute("aria-expanded") == "false"
        toggle.click()
        assert sidebar.is_displayed() and toggle.get_attribute("aria-expanded") == "true"
        browser.find_element(By.ID, "close-sidebar").click()
        assert not sidebar.is_displayed() and toggle.get_attribute("aria-expanded") == "false"
        assert browser.find_element(By.ID, "new-chat").is_displayed()
    finally:
        browser.set_window_size(size["width"], size["height"])
