"""Pretraining-recipe ablations: several configurations of a small model, each trained on identical data for an
identical token budget, one row per configuration (val bpb over seeds, wall time, tok/s).

    python -m bench.recipe                                   # every configuration below, depth 4, 600 steps, 2 seeds
    python -m bench.recipe --compare baseline,rope100k       # one change against the default, with the difference
    python -m bench.recipe --depth 2 --steps 4 --seq-len 64  # a toy run

Each (configuration, seed) is one `python -m scripts.base_train` in its own temporary NANOCHAT_BASE_DIR holding the
same tokenizer (trained once at the start on the data mirror, vocab 4096, or --tokenizer-dir), reading the same
pretraining shards ($NANOCHAT_DATA_DIR/fineweb, else $NANOCHAT_BASE_DIR/base_data) in the same order; the seed changes
only the weight init. The defaults are the tiny speedrun's base training (speedrun.sh): 8 x 256 tokens a step, 600
steps. The final val bpb is read from the run's report metrics, tok/s is the median of its step lines.

A difference "exceeds the spread" when it is larger than the min-max range of either configuration's seeds: with two
seeds that is a weak test, more --seeds make it a better one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import autodetect_device_type
from nanochat.kernels import describe_machine
from report import Report

REPO = Path(__file__).resolve().parents[1]
FIRST_SEED = 42  # base_train's default: seed 42 of a configuration is what base_train does without --seed

# The configurations: name -> the base_train flags that differ from the current default. One idea per entry.
CONFIGS = {
    "baseline": [],
    "rope100k": ["--rope-base=100000"],
    "value_embeds": ["--value-embeddings"],
    "scalars": ["--layer-scalars"],
    "smear": ["--smear"],
    "backout": ["--backout"],
    "warmdown65": ["--warmdown-ratio=0.65", "--final-lr-frac=0.05"],
    "windows": ["--window-pattern=SSSL"],
    "qk_gain": ["--qk-gain=1.35"],
    "init_uniform": ["--init=uniform"],
    "best_fit": ["--packing=best_fit"],
    "polar_express": ["--muon-ns=polar_express"],
    "normuon": ["--normuon"],
    "cautious_wd": ["--muon-weight-decay=0.1"],
    "momentum_warmdown": ["--momentum-warmdown"],
    "embedding_betas": ["--embedding-betas=0.9,0.99"],
    # Not one idea: the pieces that had beaten the baseline beyond its seed spread on both seeds of the tiny shape
    # when it was defined, together (not momentum warmdown, whose second seed came in with these runs).
    "tiny_winners": ["--value-embeddings", "--layer-scalars", "--smear", "--window-pattern=SSSL",
                     "--warmdown-ratio=0.65", "--final-lr-frac=0.05", "--packing=best_fit"],
}

TOKENS_PER_SECOND = re.compile(r"\| tok/s ([\d,]+) \|")


@dataclass
class RunResult:
    val_bpb: float
    wall_seconds: float
    tokens_per_second: float


# -----------------------------------------------------------------------------
# Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="model depth (width and heads follow)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run")
    parser.add_argument("--seq-len", type=int, default=256, help="context length in tokens")
    parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per step (one micro-step)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens of the final val bpb")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per configuration (42, 43, ...)")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED,
                        help=f"the first of the seeds (default {FIRST_SEED}): --first-seed=43 --seeds=1 adds a "
                             "second seed to a configuration already run once")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations to train "
                                                                     f"(default: all of {', '.join(CONFIGS)})")
    which.add_argument("--compare", default=None, help="A,B: train both and print B's bpb minus A's")
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="a tokenizer directory (tokenizer files and token_bytes.pt, as scripts.tok_train writes "
                             "them) to use instead of training one")
    args = parser.parse_args(argv)
    for flag in ("depth", "steps", "seq_len", "device_batch_size", "eval_tokens", "seeds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be 0 or more, got {args.first_seed}")
    names = (args.compare or args.configs).split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if len(set(names)) != len(names):
        parser.error(f"a configuration is named twice in {','.join(names)}")
    if args.compare is not None and len(names) != 2:
        parser.error(f"--compare takes two configurations, A,B; got {args.compare!r}")
    args.names = names
    if args.tokenizer_dir is not None and not (args.tokenizer_dir / "token_bytes.pt").is_file():
        parser.error(f"--tokenizer-dir {args.tokenizer_dir} holds no token_bytes.pt: pass the directory that "
                     "scripts.tok_train wrote ($NANOCHAT_BASE_DIR/tokenizer)")
    return args


# -----------------------------------------------------------------------------
# Runs


def run_stage(module: str, flags: list[str], base_dir: Path) -> str:
    """One `python -m module` with base_dir as its NANOCHAT_BASE_DIR; its stdout, or exit with its output's tail."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        sys.exit(f"bench.recipe: `python -m {module} {' '.join(flags)}` failed (exit {result.returncode}):\n"
                 f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def train_tokenizer(work_dir: Path) -> Path:
    base_dir = work_dir / "tokenizer_run"
    run_stage("scripts.tok_train", ["--vocab-size=4096", "--max-chars=5000000"], base_dir)
    return base_dir / "tokenizer"


def train_flags(args: argparse.Namespace, config: str, seed: int) -> list[str]:
    tokens_per_step = args.device_batch_size * args.seq_len
    return [f"--depth={args.depth}", f"--max-seq-len={args.seq_len}", f"--device-batch-size={args.device_batch_size}",
            f"--total-batch-size={tokens_per_step}", f"--num-iterations={args.steps}", "--eval-every=-1",
            f"--eval-tokens={args.eval_tokens}", "--core-metric-every=-1", "--sample-every=-1", "--save-every=-1",
            f"--model-tag={config}", f"--seed={seed}", *CONFIGS[config]]


def train_one(args: argparse.Namespace, config: str, seed: int, tokenizer_dir: Path, work_dir: Path) -> RunResult:
    base_dir = work_dir / f"{config}_seed{seed}"
    shutil.copytree(tokenizer_dir, base_dir / "tokenizer")
    start = time.perf_counter()
    stdout = run_stage("scripts.base_train", train_flags(args, config, seed), base_dir)
    wall_seconds = time.perf_counter() - start
    rows = Report(base_dir / "report").read_metrics()["base_train"]
    val_bpb = [row["val_bpb"] for row in rows if "val_bpb" in row][-1]
    speeds = [float(match.replace(",", "")) for match in TOKENS_PER_SECOND.findall(stdout)]
    shutil.rmtree(base_dir)  # a depth-4 checkpoint is ~100 MB with its optimizer state
    return RunResult(val_bpb, wall_seconds, statistics.median(speeds))


# -----------------------------------------------------------------------------
# The table


def spread(results: list[RunResult]) -> float:
    bpbs = [result.val_bpb for result in results]
    return max(bpbs) - min(bpbs)


def table_row(name: str, results: list[RunResult]) -> str:
    bpbs = [result.val_bpb for result in results]
    wall = statistics.mean(result.wall_seconds for result in results)
    speed = statistics.mean(result.tokens_per_second for result in results)
    return (f"{name:<12} {statistics.mean(bpbs):>10.4f}  {min(bpbs):.4f}-{max(bpbs):.4f}  {wall:>9.1f}s  "
            f"{speed:>10,.0f}")


def comparison_line(a: str, b: str, results: dict[str, list[RunResult]]) -> str:
    difference = (statistics.mean(r.val_bpb for r in results[b]) - statistics.mean(r.val_bpb for r in results[a]))
    widest = max(spread(results[a]), spread(results[b]))
    verdict = "exceeds" if abs(difference) > widest else "within"
    return f"{b} - {a}: val bpb {difference:+.4f}, {verdict} the seeds' spread ({widest:.4f})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(describe_machine(autodetect_device_type()), flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tokens_per_step = args.device_batch_size * args.seq_len
    print(f"recipe: depth {args.depth}, {args.device_batch_size} x {args.seq_len} tokens a step, {args.steps} steps "
          f"({args.steps * tokens_per_step:,} tokens), seeds {', '.join(map(str, seeds))}, val bpb on "
          f"{args.eval_tokens:,} tokens", flush=True)
    results: dict[str, list[RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="nanochat_recipe_") as work:
        work_dir = Path(work)
        tokenizer_dir = args.tokenizer_dir or train_tokenizer(work_dir)
        for name in args.names:
            results[name] = []
            for seed in seeds:
                result = train_one(args, name, seed, tokenizer_dir, work_dir)
                results[name].append(result)
                print(f"run {name} seed {seed}: val bpb {result.val_bpb:.6f}, {result.wall_seconds:.1f}s, "
                      f"{result.tokens_per_second:,.0f} tok/s", flush=True)
    print(f"{'config':<12} {'val bpb':>10}  {'min-max':<13}  {'wall/run':>10}  {'tok/s':>10}")
    for name in args.names:
        print(table_row(name, results[name]))
    if args.compare is not None:
        print(comparison_line(*args.names, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
