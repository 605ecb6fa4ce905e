"""The serving part of bench/gpu_check.sh: a running chat_web, hit the way its users hit it.

    python -m bench.serve_check --url http://127.0.0.1:8011 --streams 16

Checks, in one line of figures (the exit status says pass or fail): --streams concurrent OpenAI-client streams all finish with text
(tokens/s over all of them); a client that drops its stream after the first chunk leaves the server serving; and
the python tool on this host, through the engine's own call (a served model's tool calls need the kernel sandbox:
the line says whether it is there).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"serve_check: FAIL: {url} did not answer /v1/models within {seconds:.0f} s")
        time.sleep(0.5)


def one_stream(client, index: int, max_tokens: int) -> int:
    """Characters streamed back for one chat."""
    stream = client.chat.completions.create(model="nanochat", stream=True, max_tokens=max_tokens, temperature=0.8,
                                            seed=index, messages=[{"role": "user", "content": f"Tell me a story {index}"}])
    return sum(len(chunk.choices[0].delta.content or "") for chunk in stream if chunk.choices)


def dropped_stream(url: str) -> None:
    """Open a stream, read its first chunk, hang up."""
    body = {"model": "nanochat", "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--wait", type=float, default=180, help="seconds to wait for the server to come up")
    args = parser.parse_args()
    from openai import OpenAI

    from nanochat.engine import run_python_tool
    from nanochat.execution import confinement

    wait_for(args.url, args.wait)
    client = OpenAI(base_url=f"{args.url}/v1", api_key="unused", timeout=120)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.streams) as pool:
        chars = list(pool.map(lambda i: one_stream(client, i, args.max_tokens), range(args.streams)))
    seconds = time.perf_counter() - start
    dropped_stream(args.url)
    after_drop = one_stream(client, 999, 8)
    tool_output = run_python_tool("2**10", require_confinement=False)
    sandbox = confinement()
    failures = [f"{sum(c == 0 for c in chars)} empty streams"] if min(chars) == 0 else []
    failures += [] if after_drop > 0 else ["no answer after a client dropped its stream"]
    failures += [] if tool_output == "1024" else [f"python tool answered {tool_output!r}"]
    print(f"{args.streams} concurrent streams in {seconds:.1f} s ({sum(chars)} characters); answers after a "
          f"dropped stream: {'yes' if after_drop else 'no'}; python tool 2**10 = {tool_output} "
          f"({'kernel sandbox' if sandbox.strong else 'NO kernel sandbox: ' + sandbox.reason})"
          + (f"; FAILED: {'; '.join(failures)}" if failures else ""))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
