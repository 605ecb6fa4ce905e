"""The official `openai` Python client, unmodified, talks to a live nanochat server on 127.0.0.1."""

from __future__ import annotations

import openai
import pytest

from nanochat.batching import Scheduler
from nanochat.engine import Engine
from nanochat.server import create_app

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say something nice."}]


@pytest.fixture
def client(tiny_gpt, tiny_tokenizer, live_server):
    scheduler = Scheduler(Engine(tiny_gpt, tiny_tokenizer), max_batch_size=4)
    url = live_server(create_app(scheduler, tiny_tokenizer, model_name="nanochat-test"))
    with openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60) as client:
        yield client
    scheduler.stop()


def test_models_list(client):
    assert [model.id for model in client.models.list()] == ["nanochat-test"]


def test_non_stream_completion(client, tiny_gpt, tiny_tokenizer):
    completion = client.chat.completions.create(model="nanochat-test", messages=MESSAGES, max_tokens=8,
                                                temperature=0)
    [choice] = completion.choices
    prompt = tiny_tokenizer.render_for_completion({"messages": MESSAGES})
    tokens = Engine(tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=8, temperature=0.0)[0][0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tiny_tokenizer.decode(tokens[len(prompt):])
    assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == len(prompt) + 8


def test_stream_completion_matches_non_stream(client):
    kwargs = {"model": "nanochat-test", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    content, finish_reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert content == whole
    assert finish_reasons == ["length"]
    assert usage.completion_tokens == 10


def test_n_samples_with_a_seed_and_stop(client):
    kwargs = {"model": "nanochat-test", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 3}
    first = client.chat.completions.create(**kwargs, n=2)
    again = client.chat.completions.create(**kwargs, n=2)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content
    text = first.choices[0].message.content
    stopped = client.chat.completions.create(**kwargs, n=1, stop=[text[4:7]])
    assert stopped.choices[0].message.content == text[:text.index(text[4:7])]
    assert stopped.choices[0].finish_reason == "stop"


def test_bad_parameters_raise_bad_request_with_the_reason(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nanochat-test", messages=MESSAGES, temperature=3.5)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="nanochat-test", messages=[{"role": "tool", "content": "x",
                                                                          "tool_call_id": "1"}])
