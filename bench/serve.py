"""Serving throughput and time to first token: N chats at once against the same chats served one at a time.

    python -m bench.serve                               # random depth-4 model over HTTP, 16 chats x 128 tokens
    python -m bench.serve --concurrency 32 --max-tokens 128 --mode scheduler
    python -m bench.serve --source sft                  # a trained checkpoint instead of random weights

--mode http (default) runs the real server (nanochat/server.py's app under uvicorn on 127.0.0.1) and streams
/v1/chat/completions with httpx, so the numbers include HTTP, JSON and SSE; --mode scheduler talks to the
continuous-batching Scheduler in-process. Sequential: each chat waits for the previous one. Concurrent: all chats
are sent at once and share forward passes. throughput = completion tokens / wall time; TTFT = request sent to the
first streamed token. Without --source the model is random, over the trained tokenizer if there is one, else over
bytes padded to --vocab-size (65536, nanochat's default: the LM head then dominates a small model, as in a real
one); its replies run to --max-tokens (special-token logits are pinned below the top-k), so both runs generate the
same number of tokens. On a shared CPU, --threads 1 gives the steadiest numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import time

import torch

from bench.engine import byte_level_tokenizer_with_vocab
from nanochat.batching import SamplingParams, Scheduler
from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, prepare_for_serving
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.kernels import describe_machine
from nanochat.tokenizer import Tokenizer


def load_engine(args, device: torch.device) -> Engine:
    if args.source:
        from nanochat.checkpoint import load_model

        model, tokenizer, _meta = load_model(args.source, device, phase="eval")
        return Engine(prepare_for_serving(model), tokenizer)
    try:
        from nanochat.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    except (FileNotFoundError, ValueError):  # no trained tokenizer here: bytes, padded to nanochat's vocab size
        tokenizer = byte_level_tokenizer_with_vocab(args.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(model_config_from_depth(args.depth, tokenizer.get_vocab_size(), sequence_len=1024))
    model.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)
        special_ids = [tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()]
        model.lm_head.weight[special_ids] = 0.0
    return Engine(prepare_for_serving(model), tokenizer)  # as chat_web serves it


def conversations(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: tell me something interesting about the number {i}."}]
            for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# -----------------------------------------------------------------------------
# Clients: one chat -> (time to first token, completion tokens)


async def chat_in_process(scheduler: Scheduler, tokenizer: Tokenizer, messages: list[dict], args, seed: int):
    prompt = tokenizer.render_for_completion({"messages": messages})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, seed=seed)
    start, first = time.perf_counter(), None
    request = scheduler.submit(prompt, params, loop=asyncio.get_running_loop())
    async for event in request:
        if first is None and event.token is not None:
            first = time.perf_counter()
    return first - start, request.completion_tokens


async def chat_over_http(http, messages: list[dict], args, seed: int):
    body = {"model": "nanochat", "messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first or time.perf_counter()) - start, tokens


async def run(chat, chats: list[list[dict]], concurrent: bool) -> dict:
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(chat(messages, seed) for seed, messages in enumerate(chats)))
    else:
        results = [await chat(messages, seed) for seed, messages in enumerate(chats)]
    wall = time.perf_counter() - start
    ttfts = [ttft for ttft, _ in results]
    tokens = sum(count for _, count in results)
    return {"tokens": tokens, "wall_s": wall, "throughput": tokens / wall, "ttft_p50": percentile(ttfts, 50),
            "ttft_p95": percentile(ttfts, 95)}


def start_server_process(args) -> tuple[str, multiprocessing.Process]:
    """The server in its own process (as in production: the clients must not share its GIL), on a socket bound
    here, so clients can connect at once; their requests wait in the listen backlog until it is up."""
    # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on sockets that say they are TCP; without it every
    # small response waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    # fork before this process has run any torch op, so no OpenMP state crosses the fork
    process = multiprocessing.get_context("fork").Process(target=serve, args=(args, sock), daemon=True)
    process.start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", process


def serve(args, sock: socket.socket) -> None:
    import uvicorn

    from nanochat.server import create_app

    engine = setup(args)
    scheduler = Scheduler(engine, max_batch_size=args.concurrency, max_queue=4 * args.concurrency)
    uvicorn.Server(uvicorn.Config(create_app(scheduler, engine.tokenizer), log_level="warning")).run(sockets=[sock])


def setup(args) -> Engine:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device_type or autodetect_device_type())
    engine = load_engine(args, device)
    c = engine.model.config
    print(describe_machine(device))
    print(f"device {device}, threads {torch.get_num_threads()}, mode {args.mode}; model depth {c.n_layer}, width "
          f"{c.n_embd}, vocab {c.vocab_size}; {args.concurrency} chats x {args.max_tokens} tokens, "
          f"temperature {args.temperature}, top-k {args.top_k}", flush=True)
    return engine


async def bench(args) -> dict[str, dict]:
    chats = conversations(args.concurrency)
    results = {}
    if args.mode == "scheduler":
        engine = setup(args)
        scheduler = Scheduler(engine, max_batch_size=args.concurrency, max_queue=4 * args.concurrency).start()

        async def chat(messages, seed):
            return await chat_in_process(scheduler, engine.tokenizer, messages, args, seed)

        await chat(chats[0], 0)  # warm-up
        for name, concurrent in (("one at a time", False), (f"{args.concurrency} at once", True)):
            results[name] = await run(chat, chats, concurrent)
        scheduler.stop()
        return results

    import httpx

    url, server = start_server_process(args)
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def chat(messages, seed):
            return await chat_over_http(http, messages, args, seed)

        await chat(chats[0], 0)  # warm-up
        for name, concurrent in (("one at a time", False), (f"{args.concurrency} at once", True)):
            results[name] = await run(chat, chats, concurrent)
    server.terminate()
    server.join()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16, help="chats served at once")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per reply (both runs pay the same "
                        "prefill, so short replies understate what batching buys a chat)")
    parser.add_argument("--mode", choices=["http", "scheduler"], default="http")
    parser.add_argument("--depth", type=int, default=4, help="random model depth (without --source)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="random model vocab when no tokenizer is "
                        "trained (65536 = tok_train's default; a trained tokenizer sets its own)")
    parser.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"], help="load a checkpoint")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    results = asyncio.run(bench(args))
    for name, r in results.items():
        print(f"{name:>14}: {r['throughput']:8.1f} tok/s  ({r['tokens']} tokens in {r['wall_s']:.2f} s)  "
              f"TTFT p50 {r['ttft_p50'] * 1000:7.1f} ms  p95 {r['ttft_p95'] * 1000:7.1f} ms")
    sequential, concurrent = results.values()
    print(f"throughput ratio, concurrent / one at a time: {concurrent['throughput'] / sequential['throughput']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
