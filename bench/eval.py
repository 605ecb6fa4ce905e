"""Benchmark CORE evaluation: batched (this repo's default) vs one example per forward pass (the original nanochat).

Both modes score the same items of every task in the eval bundle with the same random-init GPT and must reach the
same accuracies (checked). Batched mode packs the sequences of many items into each forward pass and runs a
multiple-choice item's shared few-shot context through the model once (KV cache), instead of once per choice.
Prints examples/second per task and overall, and the overall speedup (target: >= 3x).

    nice python bench/eval.py                                   # depth 4, 16 items per task, autodetected device
    nice python bench/eval.py --depth 12 --max-per-task 200 --device-type cuda
    nice python bench/eval.py --repeats 3                       # best of 3, on a machine shared with other work

The tokenizer is $NANOCHAT_BASE_DIR/tokenizer when one has been trained, else one trained here on the data mirror's
text ($NANOCHAT_DATA_DIR/fineweb, vocab --vocab-size). The bundle is found as base_eval finds it.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from nanochat.common import autocast_context, autodetect_device_type, get_base_dir
from nanochat.core_eval import evaluate_task
from nanochat.eval_bundle import get_eval_bundle, load_core_tasks, load_task_data
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.kernels import describe_machine
from nanochat.tokenizer import Tokenizer


def load_tokenizer(vocab_size: int) -> Tokenizer:
    saved = get_base_dir() / "tokenizer"
    if saved.exists():
        return Tokenizer.from_directory(saved)
    from nanochat.dataset import iter_documents_batched

    documents = (doc[:4000] for batch in iter_documents_batched("train") for doc in batch)
    return Tokenizer.train_from_iterator(itertools.islice(documents, 2000), vocab_size=vocab_size)


def run_once(model, tokenizer, spec, data, device, autocast, per_example: bool, batch_size: int):
    """(wall seconds, CPU seconds of this process, accuracy) of one mode on one task."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    with autocast:
        accuracy = evaluate_task(model, tokenizer, data, spec, device, batch_size=batch_size, per_example=per_example)
    # evaluate_task ends in .item(), so the device has finished
    return time.perf_counter() - wall, time.process_time() - cpu, accuracy


def time_modes(model, tokenizer, tasks, device, autocast, batch_size: int, repeats: int) -> dict:
    """Best-of-`repeats` times of both modes per task. The modes alternate task by task (and swap order every
    repeat) so that a shared machine's changing load falls on both alike."""
    best = {}
    for spec, data in tasks:
        for repeat in range(repeats):
            for per_example in ((False, True) if repeat % 2 == 0 else (True, False)):
                wall, cpu, accuracy = run_once(model, tokenizer, spec, data, device, autocast, per_example, batch_size)
                key = (spec.label, per_example)
                old_wall, old_cpu, _ = best.get(key, (float("inf"), float("inf"), None))
                best[key] = (min(wall, old_wall), min(cpu, old_cpu), accuracy)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description="CORE examples/second, batched vs one example per forward")
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth)")
    parser.add_argument("--sequence-len", type=int, default=2048, help="model context length")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocab of the tokenizer trained when none exists")
    parser.add_argument("--max-per-task", type=int, default=16, help="items per task")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass in batched mode")
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs per task and mode")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args()

    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    autocast = autocast_context(device_type)
    tokenizer = load_tokenizer(args.vocab_size)
    torch.manual_seed(0)
    model = GPT(model_config_from_depth(args.depth, tokenizer.get_vocab_size(), args.sequence_len)).to(device)
    model.init_weights()
    model.eval()
    bundle = get_eval_bundle()
    specs, missing = load_core_tasks(bundle)
    tasks = [(spec, load_task_data(bundle, spec)[:args.max_per_task]) for spec in specs]
    threads = torch.get_num_threads() if device_type == "cpu" else None
    print(describe_machine(device_type))
    print(f"device {device_type}{f' ({threads} threads)' if threads else ''}, depth {args.depth} "
          f"({model.num_params() / 1e6:.1f}M params), vocab {tokenizer.get_vocab_size()}, {len(tasks)} tasks "
          f"({len(missing)} missing from the bundle), {args.max_per_task} items per task, batch {args.batch_size}")

    with autocast:  # warm-up: first-call allocations and kernel selection are not what we measure
        evaluate_task(model, tokenizer, tasks[0][1][:2], tasks[0][0], device)
    best = time_modes(model, tokenizer, tasks, device, autocast, args.batch_size, args.repeats)

    print(f"\n{'task':<34} {'items':>5} {'batched ex/s':>13} {'per-example ex/s':>17} {'speedup':>8} {'(CPU s)':>8}"
          "  accuracy")
    totals = {False: [0.0, 0.0], True: [0.0, 0.0]}
    for spec, data in tasks:
        (wall_b, cpu_b, acc_b), (wall_u, cpu_u, acc_u) = best[(spec.label, False)], best[(spec.label, True)]
        for per_example, wall, cpu in ((False, wall_b, cpu_b), (True, wall_u, cpu_u)):
            totals[per_example][0] += wall
            totals[per_example][1] += cpu
        agree = "" if acc_b == acc_u else f"  MISMATCH: per-example {acc_u:.3f}"
        print(f"{spec.label:<34} {len(data):>5} {len(data) / wall_b:>13.1f} {len(data) / wall_u:>17.1f} "
              f"{wall_u / wall_b:>7.2f}x {cpu_u / cpu_b:>7.2f}x  {acc_b:.3f}{agree}")
    items = sum(len(data) for _, data in tasks)
    (wall_b, cpu_b), (wall_u, cpu_u) = totals[False], totals[True]
    ratio = wall_u / wall_b
    print(f"{'all tasks':<34} {items:>5} {items / wall_b:>13.1f} {items / wall_u:>17.1f} {ratio:>7.2f}x "
          f"{cpu_u / cpu_b:>7.2f}x")
    print(f"speedup batched / one example per forward: {ratio:.2f}x wall clock, {cpu_u / cpu_b:.2f}x CPU time "
          f"(target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")

if __name__ == "__main__":
    main()
