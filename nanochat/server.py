"""The chat server's HTTP app: request validation, API errors, nanochat's streaming API, the OpenAI-compatible
API and the web UI, over one or more continuous-batching Schedulers (nanochat/batching.py). scripts/chat_web.py
loads the model and serves this app.

Endpoints
    GET  /                      the chat page (ui/)
    POST /chat/completions      {"messages": [...], "temperature", "top_k", "top_p", "max_tokens", "seed"}
                                -> server-sent events: {"token": text, "part": "text"|"python"|"python_output"}
                                   ..., then {"done": true, "finish_reason", "usage"} (or {"error": ...})
    POST /v1/chat/completions   OpenAI's chat completions (stream and non-stream, n, stop, seed, usage)
    GET  /v1/models             the one model served
    GET  /health, GET /stats    liveness, and load / throughput counters per replica

Requests from all clients share each forward pass; with several schedulers (one per GPU), each request goes to the
least busy one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from nanochat.batching import Event, QueueFull, SamplingParams, Scheduler
from nanochat.engine import Engine
from nanochat.tokenizer import Tokenizer

UI_DIR = Path(__file__).resolve().parents[1] / "ui"

# Input limits: generous for a chat, small enough that one client cannot tie up the server.
MAX_BODY_BYTES = 1024 * 1024
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 16_000
MAX_TOTAL_CHARS = 64_000
MAX_STOP_STRINGS = 4
MAX_SAMPLES = 8  # OpenAI's n


# -----------------------------------------------------------------------------
# Request validation: everything a client sends is checked here, with a message that names the fix


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, error_type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.error_type, self.code = status, message, param, error_type, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class Defaults:
    """Sampling settings for fields a request leaves out."""
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    max_tokens: int = 512


@dataclass
class ChatRequest:
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, low: float, high: float, default, *, integer: bool = False,
            low_inclusive: bool = True):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name)
    if value > high or value < low or (value == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise ApiError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return value


def _messages(body: dict, openai: bool) -> list[dict]:
    """The conversation's messages, in the tokenizer's format (OpenAI text-part lists joined into a string)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"{len(messages)} messages is more than the {MAX_MESSAGES} allowed: start a new chat "
                       "or drop old turns", "messages")
    converted, total_chars = [], 0
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object with 'role' and 'content'", param)
        role, content = message.get("role"), message.get("content")
        if openai and role == "developer":
            role = "system"  # newer OpenAI clients call the system prompt "developer"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{param}.role is {json.dumps(role)}: use 'system', 'user' or 'assistant' "
                           "(tool and function messages are not supported)", f"{param}.role")
        if openai and isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{param}.content parts must all be {{\"type\": \"text\", \"text\": str}} "
                               "(images and audio are not supported)", f"{param}.content")
            content = "".join(part["text"] for part in content)
        chars = _content_chars(content)
        if chars is None:
            allowed = "a string" if openai or role != "assistant" else "a string or a list of parts"
            raise ApiError(400, f"{param}.content must be {allowed}", f"{param}.content")
        if chars > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"{param} has {chars} characters, more than the {MAX_MESSAGE_CHARS} allowed",
                           f"{param}.content")
        total_chars += chars
        converted.append({"role": role, "content": content})
    if total_chars > MAX_TOTAL_CHARS:
        raise ApiError(400, f"the messages hold {total_chars} characters, more than the {MAX_TOTAL_CHARS} allowed: "
                       "drop old turns", "messages")
    return converted


def _content_chars(content) -> int | None:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return sum(len(p["text"]) for p in content)
    return None


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= 100 for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                       "(up to 100 characters each)", "stop")
    return stop


def parse_chat_request(body: object, tokenizer: Tokenizer, context_len: int, defaults: Defaults,
                       openai: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with a 'messages' list")
    if openai:
        for name in ("tools", "functions"):
            if body.get(name):
                raise ApiError(400, f"'{name}' is not supported: this model calls its own python tool", name)
        if body.get("logprobs"):
            raise ApiError(400, "'logprobs' is not supported", "logprobs")
    messages = _messages(body, openai)
    if messages[-1]["role"] == "assistant" and openai:
        raise ApiError(400, "the last message must be from the user (continuing an assistant message is not "
                       "supported)", "messages")
    try:
        prompt = tokenizer.render_for_completion({"messages": messages})
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from e
    if len(prompt) >= context_len:
        raise ApiError(400, f"the conversation is {len(prompt)} tokens; the model's context holds {context_len}: "
                       "drop old turns or start a new chat", "messages", code="context_length_exceeded")

    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_tokens_name, 1, context_len, None, integer=True)
    n = _number(body, "n", 1, MAX_SAMPLES, 1, integer=True)
    params = SamplingParams(
        max_tokens=max_tokens or defaults.max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0 if openai else defaults.temperature),
        top_k=_number(body, "top_k", 0, tokenizer.get_vocab_size(), None if openai else defaults.top_k,
                      integer=True) or None,
        top_p=_number(body, "top_p", 0.0, 1.0, None if openai else defaults.top_p, low_inclusive=False),
        seed=_number(body, "seed", -(2**63), 2**63 - 1, None, integer=True),
        stop=_stop_strings(body),
        n=n,
    )
    stream = body.get("stream", not openai)  # the UI's API always streams
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {json.dumps(stream)[:40]}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return ChatRequest(prompt, params, stream, bool(options.get("include_usage")))


# -----------------------------------------------------------------------------
# The app


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


# How a tool call reads in OpenAI text content (the nanochat API sends parts instead)
_PART_OPENERS = {"python": "\n```python\n", "python_output": "\n```output\n"}


class _OpenAIText:
    """Flattens one sample's parts into the text of an OpenAI message, with tool calls as fenced code blocks."""

    def __init__(self):
        self.part = "text"

    def __call__(self, event: Event) -> str:
        out = ""
        if event.text and event.part != self.part:
            out += "\n```\n" if self.part != "text" else ""
            out += _PART_OPENERS.get(event.part, "")
            self.part = event.part
        out += event.text
        if event.finish_reason is not None and self.part != "text":
            out += "\n```\n"
        return out


async def _cancel_on_disconnect(http_request: Request, handle) -> None:
    """Cancel `handle` the moment the client goes away (after the body, the next ASGI message is the disconnect)."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


def create_app(backend: Engine | Scheduler | list[Scheduler], tokenizer: Tokenizer, *, model_name: str = "nanochat",
               defaults: Defaults | None = None, max_concurrent: int = 16, max_queue: int = 64,
               ui_dir: Path = UI_DIR) -> FastAPI:
    """The FastAPI app. `backend` is an Engine (wrapped in a Scheduler of `max_concurrent` rows), a Scheduler,
    or one Scheduler per device; schedulers are started here and stopped when the app shuts down."""
    if isinstance(backend, Engine):
        backend = Scheduler(backend, max_batch_size=max_concurrent, max_queue=max_queue)
    schedulers = backend if isinstance(backend, list) else [backend]
    for scheduler in schedulers:
        scheduler.start()
    defaults = defaults or Defaults()
    context_len = min(s.seq_len for s in schedulers)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for scheduler in schedulers:
            scheduler.stop()

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    async def read_json(http_request: Request) -> object:
        declared = http_request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {declared} bytes, more than the {MAX_BODY_BYTES} allowed")
        body = b""
        async for chunk in http_request.stream():  # counted as it arrives: a missing Content-Length is no way around
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is more than the {MAX_BODY_BYTES} bytes allowed")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from e

    def submit(chat: ChatRequest):
        scheduler = min(schedulers, key=lambda s: s.load())
        try:
            return scheduler.submit(chat.prompt, chat.params, loop=asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e})", error_type="rate_limit_error") from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def usage(chat: ChatRequest, handle) -> dict:
        return {"prompt_tokens": len(chat.prompt), "completion_tokens": handle.completion_tokens,
                "total_tokens": len(chat.prompt) + handle.completion_tokens}

    # ---- the page

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(ui_dir / "index.html")

    app.mount("/static", StaticFiles(directory=ui_dir), name="static")

    # ---- nanochat's own streaming API (what the UI uses)

    @app.post("/chat/completions")
    async def chat_completions(http_request: Request) -> StreamingResponse:
        chat = parse_chat_request(await read_json(http_request), tokenizer, context_len, defaults, openai=False)
        if chat.params.n != 1:
            raise ApiError(400, "'n' must be 1 here; use /v1/chat/completions for several samples", "n")
        handle = submit(chat)

        async def events() -> AsyncIterator[str]:
            try:
                async for event in handle:
                    if event.text:
                        yield _sse({"token": event.text, "part": event.part})
                    if event.finish_reason == "error":
                        yield _sse({"error": f"generation failed: {event.error}"})
                    elif event.finish_reason is not None:
                        yield _sse({"done": True, "finish_reason": event.finish_reason, "usage": usage(chat, handle)})
            finally:
                handle.cancel()  # no-op once finished; frees the rows if the client went away

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    # ---- OpenAI-compatible API

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(http_request: Request):
        chat = parse_chat_request(await read_json(http_request), tokenizer, context_len, defaults, openai=True)
        handle = submit(chat)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        base = {"id": completion_id, "created": int(time.time()), "model": model_name}
        texts = [_OpenAIText() for _ in range(chat.params.n)]
        if chat.stream:
            return StreamingResponse(_openai_stream(chat, handle, base, texts, usage), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)

        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, handle))
        contents, reasons = [""] * chat.params.n, ["stop"] * chat.params.n
        try:
            async for event in handle:
                contents[event.sample] += texts[event.sample](event)
                if event.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {event.error}", error_type="server_error")
                if event.finish_reason is not None:
                    reasons[event.sample] = event.finish_reason
        finally:
            watcher.cancel()
            handle.cancel()
        choices = [{"index": i, "message": {"role": "assistant", "content": contents[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(chat.params.n)]
        return {**base, "object": "chat.completion", "choices": choices, "usage": usage(chat, handle)}

    # ---- operations

    @app.get("/health")
    def health() -> JSONResponse:
        alive = all(s.running for s in schedulers)
        return JSONResponse({"status": "ok" if alive else "down", "model": model_name, "replicas": len(schedulers)},
                            status_code=200 if alive else 503)

    @app.get("/stats")
    def stats() -> dict:
        replicas = [s.stats() for s in schedulers]
        totals = {key: sum(r[key] for r in replicas) for key in ("active_requests", "waiting_requests",
                                                                 "requests_finished", "tokens_generated")}
        return {"model": model_name, "context_len": context_len, **totals, "replicas": replicas}

    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _openai_stream(chat: ChatRequest, handle, base: dict, texts: list, usage) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role delta per choice, content deltas, a finish chunk per choice, [DONE]."""
    chunk = {**base, "object": "chat.completion.chunk"}

    def choice(index: int, delta: dict, finish_reason: str | None = None) -> str:
        return _sse({**chunk, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                           "finish_reason": finish_reason}]})

    try:
        started = False
        async for event in handle:
            if not started:  # the role chunks go out with the first token, so a client's TTFT means something
                started = True
                for index in range(chat.params.n):
                    yield choice(index, {"role": "assistant", "content": ""})
            if event.finish_reason == "error":
                yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                      "param": None, "code": None}})
                return
            text = texts[event.sample](event)
            if text:
                yield choice(event.sample, {"content": text})
            if event.finish_reason is not None:
                yield choice(event.sample, {}, event.finish_reason)
        if chat.include_usage:
            yield _sse({**chunk, "choices": [], "usage": usage(chat, handle)})
        yield _sse("[DONE]")
    finally:
        handle.cancel()

