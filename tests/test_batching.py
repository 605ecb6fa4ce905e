"""Continuous batching: requests share forward passes yet each gets exactly what it would get alone."""

from __future__ import annotations

import asyncio

import pytest

from nanochat.batching import QueueFull, SamplingParams, Scheduler, collect
from nanochat.engine import Engine

QUESTIONS = ["hi", "What is the capital of France?", "Write a long poem about the sea and the stars above it",
             "2+2?", "Tell me about transformers.", "ok", "Why?"]


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})


@pytest.fixture
def scheduler_factory():
    schedulers = []

    def make(engine: Engine, **kwargs) -> Scheduler:
        scheduler = Scheduler(engine, **kwargs).start()
        schedulers.append(scheduler)
        return scheduler

    yield make
    for scheduler in schedulers:
        scheduler.stop()


def test_each_request_gets_what_it_gets_alone_while_requests_come_and_go(either_tiny_gpt, tiny_tokenizer,
                                                                        scheduler_factory):
    engine = Engine(either_tiny_gpt, tiny_tokenizer)
    prompts = [chat_prompt(tiny_tokenizer, q) for q in QUESTIONS]
    lengths = [20, 7, 13, 25, 3, 16, 9]
    alone = [engine.generate_batch(p, max_tokens=n, temperature=0.0)[0][0][len(p):] for p, n in zip(prompts, lengths)]

    # 3 rows for 7 requests: some wait for a row; each new request arrives while the previous one is mid-reply
    scheduler = scheduler_factory(engine, max_batch_size=3)
    requests, streams = [], []
    for prompt, max_tokens in zip(prompts, lengths):
        request = scheduler.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        stream = iter(request)
        first = next(stream)
        requests.append((request, [first]))
        streams.append(stream)
    for (request, events), stream in zip(requests, streams):
        events.extend(stream)
    results = [collect(events)[0] for _, events in requests]
    assert [r.tokens for r in results] == alone
    assert all(r.finish_reason == "length" for r in results)
    assert scheduler.counters["forward_passes"] < sum(lengths)  # they really shared forward passes
    assert scheduler.stats()["active_rows"] == 0


def test_newcomers_prefilled_together_in_one_padded_batch_match_alone(either_tiny_gpt, tiny_tokenizer):
    engine = Engine(either_tiny_gpt, tiny_tokenizer)
    prompts = [chat_prompt(tiny_tokenizer, q) for q in QUESTIONS]
    alone = [engine.generate_batch(p, max_tokens=10, temperature=0.0)[0][0][len(p):] for p in prompts]
    scheduler = Scheduler(engine, max_batch_size=16)
    # submitted before the thread starts: all of them are admitted in the first step, prompts of mixed lengths
    requests = [scheduler.submit(p, SamplingParams(max_tokens=10, temperature=0.0, n=2)) for p in prompts]
    scheduler.start()
    try:
        results = [collect(request) for request in requests]
    finally:
        scheduler.stop()
    assert [[c.tokens for c in r] for r in results] == [[a, a] for a in alone]
    assert scheduler.counters["prefill_passes"] == 1
    assert scheduler.counters["forward_passes"] == 9  # 10 tokens: the first comes from the prefill


def test_seeded_sampling_is_the_same_alone_and_in_company(tiny_gpt, tiny_tokenizer, scheduler_factory):
    engine = Engine(tiny_gpt, tiny_tokenizer)
    scheduler = scheduler_factory(engine, max_batch_size=8)
    prompt = chat_prompt(tiny_tokenizer, "Tell me a story")
    params = SamplingParams(max_tokens=15, temperature=1.0, top_k=50, seed=123, n=2)
    alone = scheduler.generate(prompt, params)
    others = [scheduler.submit(chat_prompt(tiny_tokenizer, q), SamplingParams(max_tokens=15, temperature=1.0))
              for q in QUESTIONS[:4]]
    in_company = scheduler.generate(prompt, params)
    for request in others:
        collect(request)
    assert [c.tokens for c in alone] == [c.tokens for c in in_company]
    assert alone[0].tokens != alone[1].tokens  # the n samples are independent draws


def test_text_events_decode_the_tokens(tiny_gpt, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(Engine(tiny_gpt, tiny_tokenizer))
    [completion] = scheduler.generate(chat_prompt(tiny_tokenizer, "hello"), SamplingParams(max_tokens=20,
                                                                                          temperature=0.0))
    assert completion.text == tiny_tokenizer.decode(completion.tokens)


def test_stop_strings_cut_the_text_before_them(tiny_gpt, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(Engine(tiny_gpt, tiny_tokenizer))
    prompt = chat_prompt(tiny_tokenizer, "hello")
    [full] = scheduler.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0))
    stop = full.text[10:13]
    cut = full.text.index(stop)
    [stopped] = scheduler.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=["\x00never", stop]))
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop"
    assert len(stopped.tokens) < len(full.tokens)


def test_cancel_frees_the_row_at_once(held_gpt, tiny_tokenizer, scheduler_factory):
    model, cancelled = held_gpt(after_calls=3)  # held mid-reply until the cancel arrives
    scheduler = scheduler_factory(Engine(model, tiny_tokenizer), max_batch_size=1)
    wake = scheduler._wake
    scheduler._wake = lambda: (cancelled.set(), wake())  # Request.cancel() wakes the scheduler
    prompt = chat_prompt(tiny_tokenizer, "hello")
    long_request = scheduler.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0))
    stream = iter(long_request)
    next(stream)
    waiting = scheduler.submit(prompt, SamplingParams(max_tokens=5, temperature=0.0))
    long_request.cancel()
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert len(rest) <= 3  # the tokens of the steps already under way, nothing more
    [done] = collect(waiting)  # it gets the only row as soon as the cancelled request leaves it
    assert done.finish_reason == "length" and len(done.tokens) == 5
    assert scheduler.stats()["requests_cancelled"] == 1


def test_a_cancelled_waiting_request_never_runs(held_gpt, tiny_tokenizer, scheduler_factory):
    model, release = held_gpt(after_calls=3)
    scheduler = scheduler_factory(Engine(model, tiny_tokenizer), max_batch_size=1)
    prompt = chat_prompt(tiny_tokenizer, "hello")
    running = scheduler.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0))
    next(iter(running))
    waiting = scheduler.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0))
    waiting.cancel()
    events = list(waiting)
    assert [e.finish_reason for e in events] == ["cancelled"] and events[0].token is None
    release.set()
    assert collect(running)[0].finish_reason == "length"


def test_a_full_queue_rejects_new_requests(held_gpt, tiny_tokenizer, scheduler_factory):
    model, release = held_gpt(after_calls=3)
    scheduler = scheduler_factory(Engine(model, tiny_tokenizer), max_batch_size=1, max_queue=1)
    prompt = chat_prompt(tiny_tokenizer, "hello")
    running = scheduler.submit(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    queued = scheduler.submit(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    with pytest.raises(QueueFull):
        scheduler.submit(prompt, SamplingParams(max_tokens=5, temperature=0.0))
    assert scheduler.stats()["requests_rejected"] == 1
    release.set()
    assert [collect(r)[0].finish_reason for r in (running, queued)] == ["length", "length"]


def test_requests_that_cannot_fit_are_refused(tiny_gpt, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(Engine(tiny_gpt, tiny_tokenizer), max_batch_size=2)
    with pytest.raises(ValueError, match="context holds"):
        scheduler.submit([1] * 300, SamplingParams())
    with pytest.raises(ValueError, match="do not fit"):
        scheduler.submit([1, 2], SamplingParams(n=3))


def test_a_reply_stops_when_the_context_is_full(tiny_gpt, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(Engine(tiny_gpt, tiny_tokenizer), seq_len=40)
    prompt = chat_prompt(tiny_tokenizer, "hello")
    [completion] = scheduler.generate(prompt, SamplingParams(max_tokens=100, temperature=0.0))
    assert completion.finish_reason == "length"
    assert len(prompt) + len(completion.tokens) <= 40


def test_tool_call_waits_without_holding_up_the_batch(scripted_gpt, tiny_tokenizer, scheduler_factory):
    special = tiny_tokenizer.encode_special
    prompt = chat_prompt(tiny_tokenizer, "What is 6 times 7?")
    call = [special("<|python_start|>"), *tiny_tokenizer.encode("6*7"), special("<|python_end|>")]
    output = tiny_tokenizer.encode("42")
    answer = tiny_tokenizer.encode(" It is 42.")
    script = call + [0] * (len(output) + 2) + answer + [special("<|assistant_end|>")]
    engine = Engine(scripted_gpt(len(prompt), script), tiny_tokenizer)
    alone, masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)

    scheduler = scheduler_factory(engine, max_batch_size=4)
    tool_request = scheduler.submit(prompt, SamplingParams(max_tokens=60, temperature=0.0))
    # a longer prompt starts further along the script: it skips the tool call and answers while the other waits
    plain = scheduler.submit(prompt + [0] * (len(call) + len(output) + 2), SamplingParams(max_tokens=60,
                                                                                          temperature=0.0))
    events = list(tool_request)
    [completion] = collect(events)
    [plain_completion] = collect(plain)
    assert plain_completion.text == " It is 42."
    assert prompt + completion.tokens[:-1] == alone[0]  # [:-1]: the stream also shows <|assistant_end|>
    assert completion.masks[:-1] == masks[0][len(prompt):]
    parts = {}
    for event in events:
        parts[event.part] = parts.get(event.part, "") + event.text
    assert parts == {"python": "6*7", "python_output": "42", "text": " It is 42."}


def test_async_iteration(tiny_gpt, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(Engine(tiny_gpt, tiny_tokenizer))
    prompts = [chat_prompt(tiny_tokenizer, q) for q in QUESTIONS[:3]]

    async def run_all():
        loop = asyncio.get_running_loop()

        async def one(prompt):
            request = scheduler.submit(prompt, SamplingParams(max_tokens=8, temperature=0.0), loop=loop)
            return [event async for event in request]

        return await asyncio.gather(*(one(p) for p in prompts))

    for events in asyncio.run(run_all()):
        assert len(events) == 8 and events[-1].finish_reason == "length"


def test_a_failing_step_fails_its_requests_and_the_scheduler_keeps_serving(tiny_gpt, tiny_tokenizer,
                                                                          scheduler_factory):
    engine = Engine(tiny_gpt, tiny_tokenizer)
    scheduler = scheduler_factory(engine)
    prompt = chat_prompt(tiny_tokenizer, "hello")
    real_forward = engine.model.forward
    engine.model.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("device fell over"))
    try:
        [failed] = scheduler.generate(prompt, SamplingParams(max_tokens=5))
    finally:
        engine.model.forward = real_forward
    assert failed.finish_reason == "error" and "device fell over" in failed.error
    [ok] = scheduler.generate(prompt, SamplingParams(max_tokens=5, temperature=0.0))
    assert ok.finish_reason == "length" and len(ok.tokens) == 5
