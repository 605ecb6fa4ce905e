"""Continuous batching: many chats share every forward pass.

A Scheduler owns the model on a background thread and one preallocated KV cache of `max_batch_size` rows.
Each step it
  1. admits waiting requests into free rows: prefills their prompts together (one right-padded forward,
     written straight into the free rows), copies a row for each extra sample (`n`), and keeps each prompt's
     last logits so the first token comes with this very step;
  2. samples one token for every active row, each with its request's own settings and random generator;
  3. turns tokens into events (complete UTF-8 text, tool calls, stop strings: engine.py's SampleStream) on
     each request's queue;
  4. retires finished or cancelled rows, moving the last active row into the hole so the active rows stay
     the prefix [0, n_active) and the forward pass only ever runs on live rows;
  5. runs one decode forward over the active rows.
Tool calls run on a thread pool; the calling row sits out (its cache position is rolled back after each
forward) until the output is ready, and other chats keep decoding meanwhile.

Consumers iterate a Request (plain or `async for`) to receive Events; `Request.cancel()` (or a client that
goes away) ends a waiting request at once and frees a running one's rows at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nanochat.engine import Engine, Event, SampleStream
from nanochat.sampling import draw_uniforms, sample_generators, sample_next_tokens, sampling_tensors

# -----------------------------------------------------------------------------
# What a request asks for, and what it gets back


@dataclass
class SamplingParams:
    max_tokens: int = 256  # tokens generated per sample (tool output included)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None = a random seed
    stop: list[str] = field(default_factory=list)  # stop strings; the text stops before them
    n: int = 1  # independent samples from one prefill


class QueueFull(Exception):
    """The scheduler's waiting line is full: the caller should retry later (HTTP 429)."""


class Request:
    """A submitted prompt: iterate it (sync or async) for Events until every sample has finished."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.cancelled = False
        self.created = time.perf_counter()
        self.first_token_time: float | None = None
        self.completion_tokens = 0
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._scheduler: Scheduler | None = None
        self._finished_samples = 0

    @property
    def done(self) -> bool:
        """Every sample has finished (as seen by the consumer)."""
        return self._finished_samples == self.params.n

    def cancel(self) -> None:
        """Stop generating; the request's rows are freed at the scheduler's next step. No-op once done."""
        if not self.cancelled and not self.done and self._scheduler is not None:
            self.cancelled = True
            self._scheduler._cancel(self)

    def _push(self, event: Event) -> None:  # called on the scheduler thread
        _deliver([(self, event)])

    def _end_unstarted(self, reason: str, error: str | None = None) -> None:
        """The final event of every sample of a request that never got rows (it was waiting or never prefilled)."""
        _deliver([(self, Event(index, None, 0, "", "text", reason, error)) for index in range(self.params.n)])

    def _track(self, event: Event) -> bool:
        """Count finished samples; True once the whole request is done."""
        if event.finish_reason is not None:
            self._finished_samples += 1
        return self._finished_samples == self.params.n

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if self._track(event):
                return

    async def __aiter__(self):
        while True:
            event = await self._events.get()
            yield event
            if self._track(event):
                return


def _deliver(items: list[tuple[Request, Event]]) -> None:
    """Hand events to their consumers (from the scheduler thread). Async consumers get one callback per event loop
    per step, not one per event: each call_soon_threadsafe wakes the loop, and at 32 chats that adds up."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
    for request, event in items:
        if request.first_token_time is None and event.token is not None:
            request.first_token_time = time.perf_counter()
        if request._loop is None:
            request._events.put(event)
        else:
            by_loop.setdefault(request._loop, []).append((request, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the consumer's event loop is gone: nobody will read these requests
            for request, _event in batch:
                request.cancelled = True


def _put_all(batch: list[tuple[Request, Event]]) -> None:  # runs on the consumer's event loop
    for request, event in batch:
        request._events.put_nowait(event)


@dataclass
class Completion:
    """One sample's final result, for callers that do not stream."""
    tokens: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


def collect(events) -> list[Completion]:
    """Gather a request's events (an iterable of Event) into one Completion per sample."""
    completions: dict[int, Completion] = {}
    for event in events:
        completion = completions.setdefault(event.sample, Completion())
        if event.token is not None:
            completion.tokens.append(event.token)
            completion.masks.append(event.mask)
        completion.text += event.text
        if event.finish_reason is not None:
            completion.finish_reason, completion.error = event.finish_reason, event.error
    return [completions[i] for i in sorted(completions)]


# -----------------------------------------------------------------------------
# One sample in the batch: its event stream (nanochat/engine.py) and its row's bookkeeping


class _Sample(SampleStream):
    def __init__(self, request: Request, index: int, engine: Engine, generator: torch.Generator):
        super().__init__(index, engine.special, engine.tokenizer, request.params.stop, request.params.max_tokens)
        self.request = request
        self.generator = generator
        self.tool_call: Future | None = None  # set while the sample waits for its python output
        self.last_token = request.prompt[-1]  # fed again (a dummy input) while the sample waits for a tool
        self.cached = len(request.prompt)  # positions in its KV cache row (kept here: no device sync to read it)


# -----------------------------------------------------------------------------
# The scheduler


class Scheduler:
    def __init__(self, engine: Engine, max_batch_size: int = 16, max_queue: int = 64, seq_len: int | None = None,
                 tool_workers: int = 4, prefill_tokens: int = 4096, prefill_logit_rows: int = 256):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per prefill forward
        self.prefill_logit_rows = prefill_logit_rows  # rows x kept positions of logits per prefill forward
        self.seq_len = min(seq_len or engine.model.config.sequence_len, engine.max_context())
        self.device = engine.model.get_device()
        self.cache = engine.model.new_kv_cache(max_batch_size, self.seq_len)  # allocated once, rows reused
        self.logits = torch.zeros(max_batch_size, engine.model.config.vocab_size, device=self.device)
        self.rows: list[_Sample] = []  # row i of the cache belongs to rows[i]
        self.waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._next_id = 0
        self._tools = ThreadPoolExecutor(max_workers=tool_workers, thread_name_prefix="nanochat-tool")
        self._thread = threading.Thread(target=self._loop, name="nanochat-scheduler", daemon=True)
        self.counters = {"requests_submitted": 0, "requests_finished": 0, "requests_cancelled": 0,
                         "requests_rejected": 0, "tokens_generated": 0, "prefill_passes": 0, "forward_passes": 0,
                         "errors": 0}
        self.started = time.time()

    # ---- public API, callable from any thread

    def start(self) -> Scheduler:
        """Start the scheduler thread (once; later calls do nothing)."""
        with self._cond:
            if not self._thread.is_alive() and not self._stopping:
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Finish the current step, end every request (finish_reason "cancelled") and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._tools.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue a prompt. Pass the running event loop to consume the Request with `async for`.
        Raises ValueError for a request that can never run, QueueFull when the waiting line is full."""
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least the <|bos|> token")
        if len(prompt) >= self.seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.seq_len}, "
                             "so shorten the conversation")
        if not 1 <= params.n <= self.max_batch_size:
            raise ValueError(f"n={params.n} samples do not fit a batch of {self.max_batch_size} rows")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        with self._cond:
            if self._queued() >= self.max_queue and self._free_rows() < params.n:
                self.counters["requests_rejected"] += 1
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry shortly")
            request = Request(self._next_id, list(prompt), params, loop)
            request._scheduler = self
            self._next_id += 1
            self.waiting.append(request)
            self.counters["requests_submitted"] += 1
            self._cond.notify_all()
        return request

    def generate(self, prompt: list[int], params: SamplingParams) -> list[Completion]:
        """Submit and wait: one Completion per sample."""
        return collect(self.submit(prompt, params))

    def _free_rows(self) -> int:
        return self.max_batch_size - len(self.rows) - sum(request.params.n for request in self.waiting)

    def _queued(self) -> int:
        """Waiting requests that will not fit in the free rows at the next step: the real queue."""
        free, queued = self.max_batch_size - len(self.rows), 0
        for request in self.waiting:
            if queued == 0 and request.params.n <= free:
                free -= request.params.n
            else:
                queued += 1
        return queued

    def load(self) -> int:
        """Rows in use plus rows wanted by waiting requests: how busy this replica is."""
        with self._cond:
            return len(self.rows) + sum(request.params.n for request in self.waiting)

    def stats(self) -> dict:
        with self._cond:
            active_requests = len({sample.request.id for sample in self.rows})
            return {"device": str(self.device), "max_batch_size": self.max_batch_size, "seq_len": self.seq_len,
                    "active_rows": len(self.rows), "active_requests": active_requests,
                    "waiting_requests": len(self.waiting), "max_queue": self.max_queue,
                    "uptime_s": round(time.time() - self.started, 1), **self.counters}

    def _cancel(self, request: Request) -> None:
        """A waiting request ends here and now; a running one at the scheduler's next step."""
        with self._cond:
            if request in self.waiting:
                self._drop_waiting(request)
        self._wake()

    def _drop_waiting(self, request: Request) -> None:
        """A cancelled request leaves the waiting line and ends. Called with the lock held."""
        self.waiting.remove(request)
        self.counters["requests_cancelled"] += 1
        request._end_unstarted("cancelled")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the loop, on the scheduler thread

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a replica's thread works on its own GPU, not on cuda:0
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    break
                self._drop_cancelled_waiting()
                admitted = self._take_admissible()
            try:
                with torch.inference_mode():
                    for group in self._prefill_groups(admitted):
                        self._admit(group)
                    self._step()
            except Exception as e:  # noqa: BLE001 -- a failed step must not take the server down: fail its requests, go on
                self.counters["errors"] += 1
                self._fail_all(f"{type(e).__name__}: {e}", admitted=admitted)
        self._fail_all("the server is shutting down", reason="cancelled")

    def _has_work(self) -> bool:
        if self.waiting and (len(self.rows) + self.waiting[0].params.n <= self.max_batch_size
                             or self.waiting[0].cancelled or any(r.cancelled for r in self.waiting)):
            return True
        if any(sample.request.cancelled for sample in self.rows):
            return True
        # rows waiting on a tool call do not need the model; sleep until one is ready (its callback wakes us)
        return any(sample.tool_call is None or sample.tool_call.done() for sample in self.rows)

    def _drop_cancelled_waiting(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self._drop_waiting(request)

    def _take_admissible(self) -> list[Request]:
        """First come, first served: the head of the line waits until its n rows are free."""
        admitted, free = [], self.max_batch_size - len(self.rows)
        while self.waiting and self.waiting[0].params.n <= free:
            request = self.waiting.popleft()
            free -= request.params.n
            admitted.append(request)
        return admitted

    def _prefill_groups(self, requests: list[Request]) -> list[list[Request]]:
        """Split newcomers into prefill batches: at most `prefill_tokens` padded prompt tokens (compute) and
        `prefill_logit_rows` rows of logits (memory: each is a vocabulary of floats) per forward."""
        groups: list[list[Request]] = []
        for request in requests:
            group = (groups[-1] if groups else []) + [request]
            lengths = [len(r.prompt) for r in group]
            keep = max(lengths) - min(lengths) + 1
            if len(group) > 1 and (len(group) * max(lengths) <= self.prefill_tokens
                                   and len(group) * keep <= self.prefill_logit_rows):
                groups[-1] = group
            else:
                groups.append([request])
        return groups

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the prompts in one forward, straight into the free rows after the active ones. Prompts are
        right-padded to the longest; each row's position is then set back to its own length, so a padding key
        is never attended to (causal mask) and is overwritten by that row's next token. Only the positions that
        hold some row's last prompt token go through the LM head. Extra samples (n > 1) get a copy of their
        request's row."""
        first, count = len(self.rows), len(requests)
        lengths = [len(r.prompt) for r in requests]
        longest = max(lengths)
        keep = longest - min(lengths) + 1
        padded = torch.zeros(count, longest, dtype=torch.long)
        for row, request in enumerate(requests):
            padded[row, :lengths[row]] = torch.tensor(request.prompt)
        view = self.cache.rows(first, first + count)
        view.pos.zero_()
        logits = self.engine.model(padded.to(self.device), kv_cache=view, logits_to_keep=keep)
        self.counters["prefill_passes"] += 1
        view.pos.copy_(torch.tensor(lengths))
        last = torch.tensor(lengths, device=self.device) - 1 - (longest - keep)  # index into the kept positions
        self.logits[first:first + count] = logits[torch.arange(count, device=self.device), last]
        prefilled, extras = [], []
        for row, request in enumerate(requests):
            generators = sample_generators(request.params.seed, request.params.n)
            prefilled.append(_Sample(request, 0, self.engine, generators[0]))
            for index in range(1, request.params.n):
                extra_row = first + count + len(extras)
                self.cache.copy_row(self.cache, first + row, extra_row)
                self.logits[extra_row] = self.logits[first + row]
                extras.append(_Sample(request, index, self.engine, generators[index]))
        with self._cond:
            self.rows.extend(prefilled + extras)

    def _step(self) -> None:
        self._retire([(row, "cancelled") for row, sample in enumerate(self.rows) if sample.request.cancelled])
        if not self.rows:
            return
        tokens, finished, events = self._sample_tokens()
        self._retire(finished)
        # delivered after retiring: a consumer that sees its request end finds its rows already free
        _deliver([(sample.request, event) for sample, event in events])
        if not self.rows:
            return
        # rows still waiting for tool output are fed a dummy token (None) and their position is rolled back
        waiting_rows = [row for row, sample in enumerate(self.rows) if tokens[sample] is None]
        live = len(self.rows)
        inputs = [sample.last_token if tokens[sample] is None else tokens[sample] for sample in self.rows]
        inputs = torch.tensor(inputs, device=self.device)[:, None]
        self.logits[:live] = self.engine.model(inputs, kv_cache=self.cache.rows(0, live))[:, -1]
        self.counters["forward_passes"] += 1
        if waiting_rows:
            self.cache.pos[waiting_rows] -= 1
        for sample in self.rows:
            sample.cached += tokens[sample] is not None

    def _sample_tokens(self) -> tuple[dict[_Sample, int | None], list[tuple[int, str]], list[tuple[_Sample, Event]]]:
        """Pick each row's token. Returns the token to feed per sample (None: it waits for a tool), the rows
        that finished, and the events to stream out."""
        live = len(self.rows)
        params = [sample.request.params for sample in self.rows]
        settings = sampling_tensors([(p.temperature, p.top_k, p.top_p) for p in params], self.device)
        # a sample draws a uniform only when it samples: its tokens never depend on tool latency or company
        uniforms = draw_uniforms([sample.generator if sample.request.params.temperature > 0
                                  and sample.state.samples_next and sample.tool_call is None
                                  else None for sample in self.rows])
        sampled = sample_next_tokens(self.logits[:live], *settings, uniforms).tolist()

        tokens: dict[_Sample, int | None] = {}
        finished: list[tuple[int, str]] = []
        events: list[tuple[_Sample, Event]] = []
        special = self.engine.special
        for row, sample in enumerate(self.rows):
            if sample.tool_call is not None:
                if not sample.tool_call.done():
                    tokens[sample] = None
                    continue
                output = sample.tool_call.result()
                sample.tool_call = None
                sample.state.force_output(self.engine.tokenizer.encode(output))
            token, mask, code = sample.state.next_token(sampled[row])
            event = sample.emit(token, mask)
            sample.last_token = token
            # Feeding this token takes position `cached`; stop one short of the end so a row that then waits
            # for a tool still has room for the dummy token it is fed meanwhile.
            if event.finish_reason is None and sample.cached + 1 >= self.seq_len:
                event.text += sample.flush()
                event.finish_reason = "length"  # the context window is full
            if event.finish_reason is None and code is not None:
                sample.tool_call = self._tools.submit(self.engine.run_tool, code)
                sample.tool_call.add_done_callback(lambda _: self._wake())
            if token not in special.stops:
                sample.request.completion_tokens += 1
                self.counters["tokens_generated"] += 1
            events.append((sample, event))
            tokens[sample] = token
            if event.finish_reason is not None:
                finished.append((row, event.finish_reason))
        return tokens, finished, events

    def _retire(self, rows: list[tuple[int, str]]) -> None:
        """Free rows; a cancelled row gets its final event here. Highest rows first, so moving the last row into
        a hole never moves a row that is about to be retired."""
        for row, reason in sorted(rows, reverse=True):
            sample = self.rows[row]
            last = len(self.rows) - 1
            if row != last:
                self.cache.copy_row(self.cache, last, row)
                self.logits[row] = self.logits[last]
            with self._cond:
                self.rows[row] = self.rows[last]
                self.rows.pop()
            self._request_done_if_last(sample.request, reason)
            if reason == "cancelled":
                sample.request._push(sample.final_event("cancelled"))

    def _request_done_if_last(self, request: Request, reason: str) -> None:
        if any(sample.request is request for sample in self.rows):
            return
        self.counters["requests_cancelled" if reason == "cancelled" else "requests_finished"] += 1

    def _fail_all(self, error: str, reason: str = "error", admitted: list[Request] = ()) -> None:
        """End every request: active rows, waiting ones, and `admitted` ones whose prefill never finished."""
        with self._cond:
            rows, self.rows = self.rows, []
            in_rows = {sample.request.id for sample in rows}
            waiting = [r for r in admitted if r.id not in in_rows] + list(self.waiting)
            self.waiting = deque()
        self.cache.pos.zero_()
        for sample in rows:
            sample.request._push(sample.final_event(reason, error))
        for request in waiting:
            request._end_unstarted(reason, error)
