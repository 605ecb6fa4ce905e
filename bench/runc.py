"""Decode speed at batch 1 of the C runner (runc/run.c) next to the PyTorch engine, fp32 and int8, with peak memory.

    python -m bench.runc                                  # depth 4 (vocab 8192) and depth 12 (vocab 32768)
    python -m bench.runc --depths 4 --rounds 5 --new-tokens 256 --threads 1

Random weights (GPT.init_weights, seed 0: speed does not depend on what the weights say), greedy decoding of the
same 32-token prompt. Four runners per depth:
  C fp32, C int8    runc/run from `make fast` (-Ofast -march=native -fopenmp) in a temporary copy of runc/, over
                    scripts.export's format (nanochat/export_c.py); one process per measurement
  PyTorch fp32/int8 the Engine over prepare_for_serving(model, quantization=...), as chat_cli serves it, in one
                    worker process per runner that builds the model once and then times a generation per round
Decode tok/s counts the forward passes after the prompt per second (prefill excluded on both sides: C times from its
first sampled token to its last, the engine from its first yielded token to its last). Rounds alternate between
the four runners; medians are reported. Both sides use --threads threads (default: every core); where other processes
keep cores busy, torch's threads wait for each other at every op (2 Zen 3 cores, one busy elsewhere: 4 tok/s at depth
4) while the C's tasks do not, so compare at --threads 1 there.
Peak memory: C, the process's max RSS (the mapped weights it touched, the KV cache, the buffers), as
resource.getrusage(RUSAGE_CHILDREN) of a small launcher process sees it (a child's max RSS counts the pages it shared
with its parent before exec, so this bench, which holds the model, must not be that parent); PyTorch, the growth of
the worker's peak RSS (VmHWM) from once torch and nanochat were imported, before the model was built, to the end (so
the libraries' own few hundred MiB are left out, and the model's construction counts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("C fp32", "C int8", "PyTorch fp32", "PyTorch int8")
VOCAB_BY_DEPTH = {4: 8192, 12: 32768}


def build_model(depth: int, vocab_size: int, sequence_len: int):
    from nanochat.gpt import GPT, model_config_from_depth

    torch.manual_seed(0)
    model = GPT(model_config_from_depth(depth, vocab_size, sequence_len))
    model.init_weights()
    return model.eval()


def bench_prompt(length: int) -> list[int]:
    """Byte tokens, never a special token (bench/engine.py's prompt)."""
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(0)).tolist()


# -----------------------------------------------------------------------------
# The PyTorch side: one worker process per runner


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM belongs to this program image alone, where ru_maxrss also counts
    the parent's pages from before exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(depth: int, vocab_size: int, quantization: str, prompt_len: int, new_tokens: int, threads: int) -> int:
    """Reads a token count per line from stdin, answers each with a JSON line {tok_s, tokens} of a generation that
    long; at EOF one with its peak memory."""
    from bench.engine import byte_level_tokenizer_with_vocab
    from nanochat.engine import Engine, prepare_for_serving

    torch.set_num_threads(threads)
    baseline_mib = peak_rss_mib()
    model = prepare_for_serving(build_model(depth, vocab_size, prompt_len + new_tokens), torch.float32,
                                quantization=quantization)
    engine = Engine(model, byte_level_tokenizer_with_vocab(vocab_size))
    prompt = bench_prompt(prompt_len)
    for line in sys.stdin:
        stamps, tokens = [], []
        for column, _masks in engine.generate(prompt, max_tokens=int(line), temperature=0.0):
            stamps.append(time.perf_counter())
            tokens.append(column[0])
        print(json.dumps({"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": tokens}), flush=True)
    print(json.dumps({"peak_mib": peak_rss_mib() - baseline_mib}), flush=True)
    return 0


class TorchRunner:
    def __init__(self, depth: int, vocab_size: int, quantization: str, args):
        command = [sys.executable, "-m", "bench.runc", "--worker", str(depth), str(vocab_size), quantization,
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--threads", str(args.threads)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def measure(self, new_tokens: int) -> tuple[float, list[int]]:
        self.process.stdin.write(f"{new_tokens}\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["tok_s"], answer["tokens"]

    def close(self) -> float:
        """The worker's peak memory growth in MiB."""
        self.process.stdin.close()
        peak = json.loads(self.process.stdout.readline())["peak_mib"]
        self.process.wait()
        return peak


# -----------------------------------------------------------------------------
# The C side: one process per measurement


def build_fast_runc(directory: Path) -> Path:
    for name in ("run.c", "Makefile"):
        shutil.copy(REPO_ROOT / "runc" / name, directory / name)
    subprocess.run(["make", "-s", "-C", str(directory), "fast"], check=True)
    return directory / "run"


# runs argv[1:], then reports the child's max RSS (KiB) on stderr's last line
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


class CRunner:
    def __init__(self, binary: Path, export_dir: Path, args):
        self.command = [sys.executable, "-c", LAUNCHER, str(binary), str(export_dir), "--raw-ids",
                        " ".join(map(str, bench_prompt(args.prompt_len))), "--ids", "--temperature", "0",
                        "--threads", str(args.threads), "--steps"]
        self.peak_mib = 0.0

    def measure(self, new_tokens: int) -> tuple[float, list[int]]:
        result = subprocess.run([*self.command, str(new_tokens)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"runc/run failed: {result.stderr.strip()}")
        self.peak_mib = max(self.peak_mib, int(result.stderr.split()[-1]) / 1024)
        return float(re.search(r"([\d.]+) tok/s", result.stderr).group(1)), [int(t) for t in result.stdout.split()]

    def close(self) -> float:
        return self.peak_mib


# -----------------------------------------------------------------------------


def bench_depth(depth: int, args, binary: Path, workdir: Path) -> dict[str, float]:
    from bench.engine import byte_level_tokenizer_with_vocab
    from nanochat.export_c import export_c
    from nanochat.gpt import model_config_from_depth, parameter_count

    vocab_size = VOCAB_BY_DEPTH.get(depth, 32768)
    model = build_model(depth, vocab_size, args.prompt_len + args.new_tokens)
    tokenizer = byte_level_tokenizer_with_vocab(vocab_size)
    sizes = {}
    runners = {}
    for quantization, name in (("none", "C fp32"), ("int8", "C int8")):
        directory = workdir / f"d{depth}-{quantization}"
        export_c(model, tokenizer, {}, directory, quantization=quantization)
        sizes[name] = (directory / "model.bin").stat().st_size / 2**20
        runners[name] = CRunner(binary, directory, args)
    del model
    for quantization, name in (("none", "PyTorch fp32"), ("int8", "PyTorch int8")):
        runners[name] = TorchRunner(depth, vocab_size, quantization, args)
    c = model_config_from_depth(depth, vocab_size, args.prompt_len + args.new_tokens)
    print(f"\ndepth {depth}: width {c.n_embd}, heads {c.n_head}, vocab {vocab_size}, "
          f"{parameter_count(c) / 1e6:.1f}M parameters; "
          f"model.bin fp32 {sizes['C fp32']:.0f} MiB, int8 {sizes['C int8']:.0f} MiB")

    rates: dict[str, list[float]] = {name: [] for name in RUNNERS}
    tokens: dict[str, list[int]] = {}
    for name in RUNNERS:  # warm-up: the page cache, oneDNN's first calls
        runners[name].measure(8)
    for _ in range(args.rounds):
        for name in RUNNERS:
            rate, tokens[name] = runners[name].measure(args.new_tokens)
            rates[name].append(rate)
    peaks = {name: runners[name].close() for name in RUNNERS}
    medians = {name: statistics.median(rates[name]) for name in RUNNERS}
    for name in RUNNERS:
        print(f"  {name:<13} {medians[name]:>8.1f} tok/s (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})"
              f"   peak memory {peaks[name]:>7.1f} MiB")
    same = tokens["C fp32"][:len(tokens["PyTorch fp32"])] == tokens["PyTorch fp32"]
    print(f"  C fp32 and PyTorch fp32 generated the same {len(tokens['PyTorch fp32'])} tokens: {same}")
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both C (OpenMP) and torch")
    parser.add_argument("--worker", nargs=3, metavar=("DEPTH", "VOCAB", "QUANTIZATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        depth, vocab_size, quantization = args.worker
        return worker(int(depth), int(vocab_size), quantization, args.prompt_len, args.new_tokens, args.threads)
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        print("bench/runc.py builds runc/run: install a C compiler and make (apt-get install gcc make)",
              file=sys.stderr)
        return 1

    from nanochat.kernels import describe_machine

    print(describe_machine("cpu"))
    print(f"batch 1, greedy, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"{args.threads} threads each, torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-runc-") as tmp:
        binary = build_fast_runc(Path(tmp))
        for depth in args.depths:
            results[depth] = bench_depth(depth, args, binary, Path(tmp))
    summary = []
    if 4 in results:
        summary.append(f"C fp32 / PyTorch engine fp32 at depth 4: "
                       f"{results[4]['C fp32'] / results[4]['PyTorch fp32']:.2f}x (bar >= 3x)")
    if 12 in results:
        summary.append(f"C int8 / C fp32 at depth 12: {results[12]['C int8'] / results[12]['C fp32']:.2f}x "
                       "(bar >= 1.5x)")
    print("\n" + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
