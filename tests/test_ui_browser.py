"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import copy
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

    def expected_reply(messages):
        prompt = tiny_tokenizer.render_for_completion({"messages": messages})
        tokens = Engine(tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=12, temperature=0.0)[0][0]
        return tiny_tokenizer.decode(tokens[len(prompt):]).replace("`", "")  # backticks render as code

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
    first_reply = expected_reply([{"role": "user", "content": "Hello there"}])
    assert partial["text"] != done["text"] and first_reply.startswith(partial["text"])
    assert done["text"] == first_reply

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
