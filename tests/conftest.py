"""Fixtures shared across the suites: the local data mirror, a throwaway base dir, and a tiny tokenizer."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# the mirror of real data samples that sits beside the repo (see ../shared/data/README.md)
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _shared_kernel_choices(tmp_path_factory):
    """The kernels' timed choices, kept for the session in one file that every test's subprocess shares (as a
    machine's processes share ~/.cache/nanochat/kernels.json), outside the user's home."""
    os.environ["NANOCHAT_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels") / "kernels.json")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """No test writes to ~/.cache: every test gets its own NANOCHAT_BASE_DIR and reads the shared mirror."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("nanochat_base")))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(DATA_DIR))


@pytest.fixture
def base_dir(monkeypatch, tmp_path) -> Path:
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def mirror_texts() -> list[str]:
    """A few hundred real documents from the mirror's first pretraining shard."""
    import pyarrow.parquet as pq

    table = pq.read_table(DATA_DIR / "fineweb" / "shard_00000.parquet", columns=["text"])
    return table.column("text").to_pylist()[:400]


@pytest.fixture(scope="session")
def tiny_tokenizer(mirror_texts):
    """A real BPE tokenizer (vocab 512, special tokens included) trained on the mirror's text."""
    from nanochat.tokenizer import Tokenizer

    texts = itertools.islice((text[:4000] for text in mirror_texts), 400)
    return Tokenizer.train_from_iterator(texts, vocab_size=512)


# -----------------------------------------------------------------------------
# Serving (engine, batching, web API, UI): a tiny random chat model, a scripted model, a live HTTP server


def randomized(model, head_std: float):
    """`model` initialized, then its zero-init output projections and its LM head made random too, so that outputs
    depend on the whole context (no identity blocks); returns it."""
    import torch

    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        torch.nn.init.normal_(model.lm_head.weight, std=head_std)
    return model


@pytest.fixture(scope="session")
def tiny_gpt(tiny_tokenizer):
    """A random depth-2 GPT over the tiny tokenizer's vocab. Every weight is random (no zero-init identity blocks)
    so outputs depend on the whole context; the special tokens' logits are pinned at 0, below the best of ~500
    random logits, so greedy replies never end early and run to max_tokens."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(1234)
    config = GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)
    model = randomized(GPT(config), head_std=0.5)
    with torch.no_grad():
        special_ids = [tiny_tokenizer.encode_special(name) for name in tiny_tokenizer.get_special_tokens()]
        model.lm_head.weight[special_ids] = 0.0
    return model.eval()


@pytest.fixture(scope="session")
def served_tiny_gpt(tiny_gpt):
    """tiny_gpt as chat_cli and chat_web serve it: on CPU, its linear layers packed for oneDNN."""
    import copy

    from nanochat.engine import prepare_for_serving

    return prepare_for_serving(copy.deepcopy(tiny_gpt))


@pytest.fixture(params=["trained", "served"])
def either_tiny_gpt(request):
    """tiny_gpt, then the same weights as served: the decoding guarantees must hold for both."""
    return request.getfixturevalue("tiny_gpt" if request.param == "trained" else "served_tiny_gpt")


@pytest.fixture
def scripted_gpt(tiny_tokenizer):
    """Factory: scripted_gpt(prompt_len, script) -> a GPT whose next token after position p is always
    script[p + 1 - prompt_len] (one-hot logits), so tests control exactly what the "model" writes.
    Positions come from the KV cache, so forced tokens (tool output) take their slots in the script too."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    class ScriptedGPT(GPT):
        def __init__(self, prompt_len: int, script: list[int]):
            super().__init__(GPTConfig(sequence_len=prompt_len + len(script) + 8,
                                       vocab_size=tiny_tokenizer.get_vocab_size(),
                                       n_layer=1, n_head=1, n_kv_head=1, n_embd=8))
            self.prompt_len, self.script = prompt_len, script

        def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_to_keep=0):
            B, T = idx.shape
            start = kv_cache.pos.clone() if kv_cache is not None else torch.zeros(B, dtype=torch.long)
            if kv_cache is not None:
                kv_cache.pos += T
            logits = torch.full((B, T, self.config.vocab_size), -10.0)
            for b in range(B):
                for t in range(T):
                    index = int(start[b]) + t + 1 - self.prompt_len
                    if 0 <= index < len(self.script):
                        logits[b, t, self.script[index]] = 10.0
            return logits[:, -logits_to_keep:] if logits_to_keep else logits

    return ScriptedGPT


@pytest.fixture
def live_server():
    """Factory: live_server(app) -> base URL of a real uvicorn server on 127.0.0.1, stopped at teardown.
    The socket is bound and listening before the URL is returned, so clients need not wait for start-up."""
    import socket
    import threading

    import uvicorn

    servers = []

    def start(app) -> str:
        # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on sockets that say they are TCP; without it every
        # small response waits ~40 ms for a delayed ACK (Nagle)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread, sock))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def held_gpt(tiny_gpt):
    """Factory: held_gpt(after_calls) -> (model, release): a copy of tiny_gpt whose forward call number `after_calls`
    blocks until `release` (a threading.Event) is set, so a request is certainly still running while a test looks."""
    import copy
    import threading

    def make(after_calls: int):
        model, release, calls = copy.deepcopy(tiny_gpt), threading.Event(), []
        inner_forward = model.forward

        def forward(*args, **kwargs):
            calls.append(1)
            if len(calls) == after_calls:
                assert release.wait(timeout=60), "the test never released the held model"
            return inner_forward(*args, **kwargs)

        model.forward = forward
        return model, release

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads' synchronisation
    costs more than the work itself (the chat-stage tests ran 4.5x faster on one thread: 57 s -> 13 s under load).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# A local HTTP server for the downloaders' tests


@pytest.fixture
def http_server():
    """Serves `responses` in order (then repeats the last): each (status, body), or (status, body, content_length)
    to promise more bytes than it sends (HTTP/1.0 closes the connection after the body, cutting it short).
    Records the paths requested."""
    import http.server
    import threading

    state = {"responses": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append(self.path)
            status, body, *declared = state["responses"][min(len(state["requests"]), len(state["responses"])) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(declared[0] if declared else len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/download"
    yield state
    server.shutdown()
    server.server_close()
