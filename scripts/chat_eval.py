"""Evaluate a chat model on multiple-choice and generative tasks, and summarise them as ChatCORE.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft

Categorical tasks (ARC, MMLU): one forward pass per batch of prompts; the answer is the letter on offer with the
highest logit right after <|assistant_start|>. Generative tasks (GSM8K, HumanEval, SpellingBee): --num-samples
completions per problem sampled with the Engine (tool use included), and a problem counts as solved when any of
them is correct (pass@k). ChatCORE is the mean accuracy centered against random guessing (0.25 for four-choice
questions, 0 for open answers) over the tasks that could be loaded; a task whose data is unavailable is reported
as missing, with the reason, never as a zero.
"""

from __future__ import annotations

import argparse
import time

from nanochat.categorical_eval import run_categorical_eval, sum_across_ranks
from nanochat.checkpoint import load_model
from nanochat.common import (
    autocast_context,
    compute_cleanup,
    compute_init,
    get_dist_info,
    parse_script_args,
    print0,
)
from nanochat.engine import Engine
from report import chat_evaluation, get_report
from tasks.arc import ARC
from tasks.common import TASK_LOAD_ERRORS
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

TASKS = {
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}
DEFAULT_TASKS = "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval"
# accuracy of random guessing, the zero point of ChatCORE's centered accuracies
RANDOM_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                    "SpellingBee": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a chat model; prints and reports ChatCORE")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which model")
    parser.add_argument("-a", "--task-name", default=DEFAULT_TASKS, help=f"tasks separated by | (from {list(TASKS)})")
    parser.add_argument("-g", "--tag", default=None, help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="problems per task (default: all)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="longest generated answer, in tokens")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass (categorical)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parse_script_args(parser, argv)
    names = [name.strip() for name in args.task_name.split("|") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        parser.error(f"-a: unknown task(s) {unknown or names}; choose from {list(TASKS)}, separated by |")
    args.task_names = names
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--num-samples, --batch-size and --max-new-tokens must be >= 1")
    if args.max_problems is not None and args.max_problems < 1:
        parser.error(f"--max-problems must be >= 1, got {args.max_problems}")
    if args.temperature < 0 or args.top_k < 0:
        parser.error("--temperature and --top-k must be >= 0")
    if args.num_samples > 1 and args.temperature == 0:
        print0("note: --num-samples > 1 with --temperature 0 draws the same greedy answer n times")
    return args


def run_generative_eval(task, tokenizer, engine: Engine, num_problems: int, args: argparse.Namespace,
                        autocast) -> float:
    """pass@num_samples: a problem is solved when any of its sampled completions is correct."""
    ranks = get_dist_info()
    rank, world_size = ranks.rank, ranks.world_size
    passed, total, started = 0, 0, time.time()
    for i in range(rank, num_problems, world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        with autocast:
            results, _ = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                               temperature=args.temperature, top_k=args.top_k or None, seed=42 + i)
        completions = [tokenizer.decode(tokens[len(prompt):]) for tokens in results]
        passed += any(task.evaluate(conversation, completion) for completion in completions)
        total += 1
        if rank == 0:
            eta = (time.time() - started) / total * (len(range(rank, num_problems, world_size)) - total)
            print(f"\r\033[K  rank 0: {passed}/{total} ({100 * passed / total:.1f}%), ETA {eta:.0f}s", end="",
                  flush=True)
    print0()
    passed, total = sum_across_ranks(passed, total, device=engine.model.get_device())
    return passed / max(total, 1)


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean of accuracies centered against random guessing, over the tasks evaluated."""
    centered = [(acc - RANDOM_BASELINES[name]) / (1.0 - RANDOM_BASELINES[name]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered) if centered else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type or None)
    autocast = autocast_context(dist_info.device_type)

    model, tokenizer, meta = load_model(args.source, dist_info.device, phase="eval", tag=args.tag, step=args.step)
    engine = Engine(model, tokenizer, require_confinement=False)  # weaker layers, warned, where no sandbox

    accuracies: dict[str, float] = {}
    missing: dict[str, str] = {}
    for name in args.task_names:
        try:
            task = TASKS[name]()
        except TASK_LOAD_ERRORS as e:
            missing[name] = f"{type(e).__name__}: {e}"
            print0(f"{name}: MISSING, not evaluated ({missing[name]})")
            continue
        num_problems = len(task) if args.max_problems is None else min(len(task), args.max_problems)
        started = time.time()
        print0(f"{name}: {num_problems} problems ({task.eval_type})")
        if task.eval_type == "categorical":
            accuracies[name] = run_categorical_eval(task, tokenizer, model, args.batch_size, num_problems, autocast)
        else:
            accuracies[name] = run_generative_eval(task, tokenizer, engine, num_problems, args, autocast)
        print0(f"{name}: accuracy {100 * accuracies[name]:.2f}% ({time.time() - started:.0f}s)")

    score = chatcore(accuracies)
    evaluated = f"{len(accuracies)}/{len(args.task_names)}"
    print0(f"ChatCORE metric: {score:.4f} (over {evaluated} tasks)")
    for name, reason in missing.items():
        print0(f"  missing {name}: {reason}")

    summary: dict = {"source": args.source, "step": meta.get("step"), "max problems": args.max_problems,
                     "num samples": args.num_samples, "temperature": args.temperature}
    results: dict = dict(accuracies)
    results["ChatCORE metric"] = score
    results["ChatCORE tasks evaluated"] = evaluated
    data: list[dict | str] = [summary, results]
    if missing:
        data.append({"Missing tasks": missing})
    get_report().log(chat_evaluation(args.source), data)
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
