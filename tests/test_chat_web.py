"""The web server: the UI's streaming API, the OpenAI-compatible API, validation, load and disconnects."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from nanochat.batching import Scheduler
from nanochat.engine import Engine
from nanochat.server import MAX_BODY_BYTES, MAX_MESSAGES, create_app

HELLO = [{"role": "user", "content": "Hello! How are you?"}]


@pytest.fixture
def make_app(tiny_gpt, tiny_tokenizer):
    """Factory for apps over the tiny model; their schedulers stop at teardown."""
    schedulers = []

    def make(**scheduler_kwargs):
        scheduler = Scheduler(Engine(tiny_gpt, tiny_tokenizer), **scheduler_kwargs)
        schedulers.append(scheduler)
        return create_app(scheduler, tiny_tokenizer, model_name="nanochat-test"), scheduler

    yield make
    for scheduler in schedulers:
        scheduler.stop()


@pytest.fixture
def client(make_app):
    app, _ = make_app(max_batch_size=4)
    with TestClient(app) as client:
        yield client


def greedy_reply(tiny_gpt, tiny_tokenizer, messages, max_tokens: int) -> str:
    prompt = tiny_tokenizer.render_for_completion({"messages": messages})
    tokens = Engine(tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)[0][0]
    return tiny_tokenizer.decode(tokens[len(prompt):])


def sse_payloads(lines) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# -----------------------------------------------------------------------------
# The page and the UI's API


def test_serves_the_chat_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="static/app.js"' in page.text
    assert "chat/completions" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_ui_api_streams_the_greedy_reply(client, tiny_gpt, tiny_tokenizer):
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 12}
    with client.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(p) for p in sse_payloads(response.iter_lines())]
    tokens = [e for e in events if "token" in e]
    assert len(tokens) > 1 and all(e["part"] == "text" for e in tokens)
    assert "".join(e["token"] for e in tokens) == greedy_reply(tiny_gpt, tiny_tokenizer, HELLO, 12)
    assert events[-1]["done"] is True and events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_ui_api_accepts_assistant_turns_with_tool_parts(client):
    messages = [{"role": "user", "content": "what is 2+3?"},
                {"role": "assistant", "content": [{"type": "python", "text": "2+3"},
                                                  {"type": "python_output", "text": "5"},
                                                  {"type": "text", "text": "It is 5."}]},
                {"role": "user", "content": "and 3+4?"}]
    with client.stream("POST", "/chat/completions", json={"messages": messages, "max_tokens": 3}) as response:
        assert response.status_code == 200
        assert json.loads(sse_payloads(response.iter_lines())[-1])["done"] is True


# -----------------------------------------------------------------------------
# The OpenAI-compatible API


def test_openai_non_stream_response_and_usage(client, tiny_gpt, tiny_tokenizer):
    response = client.post("/v1/chat/completions", json={"model": "nanochat-test", "messages": HELLO,
                                                          "max_tokens": 9, "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "nanochat-test"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": greedy_reply(tiny_gpt, tiny_tokenizer, HELLO, 9)}
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(tiny_tokenizer.render_for_completion({"messages": HELLO}))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 9,
                             "total_tokens": prompt_tokens + 9}


def test_openai_stream_chunks_add_up_to_the_non_stream_reply(client):
    body = {"messages": HELLO, "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_openai_n_seed_and_stop(client):
    body = {"messages": HELLO, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 5}
    first = client.post("/v1/chat/completions", json=body).json()
    again = client.post("/v1/chat/completions", json=body).json()
    contents = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert contents == [c["message"]["content"] for c in again["choices"]]
    assert len(set(contents)) == 3

    greedy = client.post("/v1/chat/completions", json={**body, "n": 1, "temperature": 0}).json()
    text = greedy["choices"][0]["message"]["content"]
    stop = text[6:9]
    stopped = client.post("/v1/chat/completions", json={**body, "n": 1, "temperature": 0, "stop": stop}).json()
    assert stopped["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_models_health_and_stats(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-test"
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    stats = client.get("/stats").json()
    assert stats["requests_finished"] >= 1 and stats["tokens_generated"] >= 4
    assert stats["replicas"][0]["max_batch_size"] == 4


# -----------------------------------------------------------------------------
# Bad requests: 4xx with a message that says what is wrong, and the server stays healthy

BAD_REQUESTS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ([1, 2, 3], None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": HELLO + HELLO}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 20_000}]}, "messages[0].content"),
    ({"messages": HELLO * (MAX_MESSAGES + 1)}, "messages"),
    ({"messages": [{"role": "user", "content": "hello " * 1000}]}, "messages"),  # longer than the context
    ({"messages": HELLO, "temperature": 5}, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"messages": HELLO, "top_k": -1}, "top_k"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": HELLO, "n": 100}, "n"),
    ({"messages": HELLO, "n": True}, "n"),
    ({"messages": HELLO, "seed": "abc"}, "seed"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HELLO, "stop": [""]}, "stop"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_bad_requests_get_4xx_with_a_clear_message_and_the_server_stays_healthy(client, path):
    for body, param in BAD_REQUESTS:
        if path == "/chat/completions" and param == "tools":
            continue  # the UI's API has no tools field to reject
        response = client.post(path, json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
        if path.startswith("/v1"):
            assert error["param"] == param, (body, error)
    assert client.post(path, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * MAX_BODY_BYTES + b'"}]}'
    assert client.post(path, content=huge, headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_answers_429(held_gpt, tiny_tokenizer, live_server):
    model, release = held_gpt(after_calls=3)
    scheduler = Scheduler(Engine(model, tiny_tokenizer), max_batch_size=1, max_queue=0)
    url = live_server(create_app(scheduler, tiny_tokenizer))
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/chat/completions", json={"messages": HELLO, "max_tokens": 20}) as busy:
            lines = busy.iter_lines()
            next(lines)  # the only row is taken (and held)
            refused = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert refused.headers["retry-after"] == "1"
            release.set()
            assert json.loads(sse_payloads(lines)[-1])["done"] is True
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}).status_code == 200
    scheduler.stop()


# -----------------------------------------------------------------------------
# A live server: disconnects and many concurrent clients


def test_a_client_that_disconnects_frees_its_row_at_once(held_gpt, tiny_tokenizer, live_server):
    # the model is held after its first decode step until the request is cancelled, so the request can only
    # end early by the server noticing the disconnect
    model, cancelled = held_gpt(after_calls=3)
    scheduler = Scheduler(Engine(model, tiny_tokenizer), max_batch_size=1)
    wake = scheduler._wake
    scheduler._wake = lambda: (cancelled.set(), wake())  # Request.cancel() wakes the scheduler
    url = live_server(create_app(scheduler, tiny_tokenizer))
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/chat/completions", json={"messages": HELLO, "max_tokens": 200}) as response:
            next(response.iter_lines())
        # the only row is free again: the next request is served
        reply = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5})
    assert reply.status_code == 200
    stats = scheduler.stats()
    assert stats["requests_cancelled"] == 1
    assert stats["tokens_generated"] < 10
    scheduler.stop()


def test_32_concurrent_streaming_clients_all_complete(make_app, live_server, tiny_gpt, tiny_tokenizer):
    app, scheduler = make_app(max_batch_size=8, max_queue=64)
    url = live_server(app)
    questions = [f"Question number {i}?" for i in range(4)]
    expected = [greedy_reply(tiny_gpt, tiny_tokenizer, [{"role": "user", "content": q}], 10) for q in questions]

    async def one_client(http: httpx.AsyncClient, i: int) -> str:
        body = {"messages": [{"role": "user", "content": questions[i % 4]}], "max_tokens": 10, "temperature": 0,
                "stream": True}
        content = ""
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        for payload in payloads[:-1]:
            chunk = json.loads(payload)
            content += chunk["choices"][0]["delta"].get("content", "")
        return content

    async def all_clients() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one_client(http, i) for i in range(32)))

    contents = asyncio.run(all_clients())
    assert contents == [expected[i % 4] for i in range(32)]
    stats = scheduler.stats()
    assert stats["requests_finished"] == 32 and stats["errors"] == 0 and stats["active_rows"] == 0
    with httpx.Client(base_url=url) as http:
        assert http.get("/health").json()["status"] == "ok"



def test_tool_calls_stream_as_parts_and_read_as_code_blocks_in_openai_content(scripted_gpt, tiny_tokenizer):
    special = tiny_tokenizer.encode_special
    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    prompt = tiny_tokenizer.render_for_completion({"messages": messages})
    call = [special("<|python_start|>"), *tiny_tokenizer.encode("6*7"), special("<|python_end|>")]
    script = (call + [0] * (len(tiny_tokenizer.encode("42")) + 2) + tiny_tokenizer.encode("It is 42.")
              + [special("<|assistant_end|>")])
    scheduler = Scheduler(Engine(scripted_gpt(len(prompt), script), tiny_tokenizer), max_batch_size=2)
    with TestClient(create_app(scheduler, tiny_tokenizer)) as client:
        with client.stream("POST", "/chat/completions", json={"messages": messages}) as response:
            assert response.status_code == 200
            events = [json.loads(p) for p in sse_payloads(response.iter_lines())]
        reply = client.post("/v1/chat/completions", json={"messages": messages}).json()
    parts = [(e["part"], e["token"]) for e in events if "token" in e]
    merged = {}
    for part, text in parts:
        merged[part] = merged.get(part, "") + text
    assert merged == {"python": "6*7", "python_output": "42", "text": "It is 42."}
    assert events[-1]["finish_reason"] == "stop"
    content = reply["choices"][0]["message"]["content"]
    assert content == "\n```python\n6*7\n```\n\n```output\n42\n```\nIt is 42."
    assert reply["choices"][0]["finish_reason"] == "stop"
