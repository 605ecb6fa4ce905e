"""CORE evaluation of a base model (the DCLM paper's metric, see nanochat/core_eval.py), plus a few greedy samples.

    python -m scripts.base_eval
    python -m scripts.base_eval --max-per-task 100          # quick look
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

Finds the eval bundle in $NANOCHAT_DATA_DIR/eval_bundle, else $NANOCHAT_BASE_DIR/eval_bundle, downloading it there
when absent (--bundle-url or $NANOCHAT_EVAL_BUNDLE_URL override the source). Tasks the bundle lacks are named and
CORE is the mean over the ones present. Writes $NANOCHAT_BASE_DIR/base_eval/<model>.csv and the report section
"Base model evaluation".
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time

import torch.distributed as dist

from nanochat.checkpoint import load_model
from nanochat.common import (
    atomic_write_text,
    autocast_context,
    compute_cleanup,
    compute_init,
    get_base_dir,
    parse_script_args,
    print0,
)
from nanochat.core_eval import CoreResult, evaluate_core
from nanochat.engine import Engine
from nanochat.eval_bundle import CORE_TASKS, get_eval_bundle
from report import BASE_EVALUATION, get_report

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CORE metric of a base model")
    parser.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"], help="which stage's model")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="items per task, a fixed random subset (-1: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--bundle-url", default=None, help="where to download eval_bundle.zip from when it is absent")
    parser.add_argument("--sample-tokens", type=int, default=16, help="tokens per greedy sample (0: no samples)")
    args = parse_script_args(parser, argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_per_task == 0 or args.max_per_task < -1:
        parser.error(f"--max-per-task must be a positive count or -1 for all, got {args.max_per_task}")
    if args.sample_tokens < 0:
        parser.error(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    return args


def greedy_samples(engine: Engine, tokenizer, max_tokens: int, autocast) -> list[str]:
    """What the model says after a few factual prompts: a quick sanity check that it learned something."""
    samples = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast:
            results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        samples.append(prompt + tokenizer.decode(results[0][len(tokens):]))
    return samples


def results_csv(result: CoreResult) -> str:
    """One row per CORE task (evaluated or missing), then the CORE row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "task_type", "num_fewshot", "items", "accuracy", "random_baseline", "centered", "status"])
    specs = {spec.label: spec for spec in result.tasks}
    for label in [*CORE_TASKS, *(label for label in specs if label not in CORE_TASKS)]:
        if label in result.accuracy:
            spec = specs[label]
            writer.writerow([label, spec.task_type, spec.num_fewshot, result.num_items[label],
                             f"{result.accuracy[label]:.6f}", f"{spec.random_baseline:.4f}",
                             f"{result.centered[label]:.6f}", "ok"])
        else:
            writer.writerow([label, "", "", 0, "", "", "", f"missing: {result.missing.get(label, 'not evaluated')}"])
    writer.writerow(["CORE", "", "", sum(result.num_items.values()), "", "", f"{result.core:.6f}",
                     f"mean centered accuracy over {len(result.centered)}/{len(CORE_TASKS)} tasks"])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type or None)
    autocast = autocast_context(dist_info.device_type)

    model, tokenizer, meta = load_model(args.source, dist_info.device, phase="eval", tag=args.tag, step=args.step)
    step = meta.get("step", args.step)
    tag = args.tag or meta.get("model_tag") or meta.get("tag") or f"d{meta['model_config']['n_layer']}"
    model_name = f"{args.source}_{tag}_step{step:06d}" if isinstance(step, int) else f"{args.source}_{tag}"
    print0(f"evaluating {model_name} on {dist_info.world_size} rank(s), device {dist_info.device}")

    # rank 0 downloads the bundle if it must; the others wait, then find it in place
    if dist_info.master:
        bundle_dir = get_eval_bundle(args.bundle_url)
    if dist_info.ddp:
        dist.barrier()
    if not dist_info.master:
        bundle_dir = get_eval_bundle(args.bundle_url)

    samples = []
    if args.sample_tokens > 0 and dist_info.master:
        samples = greedy_samples(Engine(model, tokenizer), tokenizer, args.sample_tokens, autocast)
        print0("\n".join(["greedy samples:", *(f"  {sample!r}" for sample in samples)]))

    started = time.time()
    with autocast:
        result = evaluate_core(model, tokenizer, dist_info.device, bundle_dir, max_per_task=args.max_per_task,
                               batch_size=args.batch_size, log=print0)
    evaluated = f"{len(result.centered)}/{len(CORE_TASKS)}"
    print0(f"CORE metric: {result.core:.4f} (mean of {evaluated} tasks, {time.time() - started:.0f}s)")
    if result.missing:
        print0("missing tasks (not averaged): " + "; ".join(f"{k}: {v}" for k, v in result.missing.items()))

    if dist_info.master:
        csv_path = get_base_dir() / "base_eval" / f"{model_name}.csv"
        atomic_write_text(csv_path, results_csv(result))
        print0(f"results: {csv_path}")
        summary = {"Model": model_name, "CORE metric": result.core, "CORE tasks evaluated": evaluated,
                   "Max items per task": args.max_per_task}
        if result.missing:
            summary["Missing CORE tasks"] = ", ".join(result.missing)
        data: list[dict | str] = [summary, {label: value for label, value in result.centered.items()}]
        if samples:
            data.append({"Samples": samples})
        get_report().log(BASE_EVALUATION, data)
    compute_cleanup()
    return 0 if math.isfinite(result.core) else 1


if __name__ == "__main__":
    raise SystemExit(main())
