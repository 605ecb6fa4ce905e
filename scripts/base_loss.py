"""Bits per byte of a base checkpoint on the train and validation splits, plus greedy completions of a few prompts.

    python -m scripts.base_loss                          # the deepest base model, its last step
    python -m scripts.base_loss --quantize int8          # the same with int8 weights
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --split-tokens=20971520
"""

from __future__ import annotations

import argparse
import sys

from nanochat.checkpoint import load_model
from nanochat.common import (
    autocast_context,
    autodetect_device_type,
    compute_cleanup,
    compute_init,
    parse_script_args,
    print0,
)
from nanochat.dataloader import DistributedTokenLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.quantize import QUANTIZATIONS, quantize_model
from nanochat.tokenizer import get_token_bytes

PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
           "If 5*x + 3 = 13, then x is"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--model-tag", default=None, help="checkpoint tag (default: the deepest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--device-batch-size", type=int, default=None,
                        help="sequences per process per batch (default: the training run's)")
    parser.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per sample completion")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="evaluate the model with int8 weights (groups of 64), as chat_cli --quantize serves it")
    args = parse_script_args(parser, argv)
    if args.split_tokens < 1 or (args.device_batch_size is not None and args.device_batch_size < 1):
        parser.error("--split-tokens and --device-batch-size must be positive")

    dist_info = compute_init(args.device_type or autodetect_device_type())
    try:
        evaluate(args, dist_info)
    finally:
        compute_cleanup()
    return 0


def evaluate(args: argparse.Namespace, dist_info) -> None:
    from report import BASE_LOSS, get_report

    device = dist_info.device
    autocast = autocast_context(dist_info.device_type)
    model, tokenizer, meta = load_model("base", device, phase="eval", tag=args.model_tag, step=args.step)
    model = quantize_model(model, args.quantize)
    token_bytes = get_token_bytes(device)
    seq_len = model.config.sequence_len
    batch_size = args.device_batch_size or meta.get("user_config", {}).get("device_batch_size", 32)
    tokens_per_step = batch_size * seq_len * dist_info.world_size
    steps = max(1, args.split_tokens // tokens_per_step)
    print0(f"base model step {meta['step']}: {steps} batches of {batch_size} x {seq_len} tokens x "
           f"{dist_info.world_size} processes per split")

    bpb = {}
    for split in ("train", "val"):
        loader = DistributedTokenLoader(tokenizer, batch_size, seq_len, split, device)
        with autocast:
            bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()
        print0(f"{split} bpb: {bpb[split]:.4f}")

    samples = []
    if dist_info.master:
        bos = tokenizer.get_bos_token_id()
        for prompt in PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=bos)
            with autocast:
                completion = list(model.generate(tokens, max_tokens=args.max_new_tokens, temperature=0))
            samples.append(tokenizer.decode(tokens[1:] + completion))
            print0(f"sample: {samples[-1]!r}")

    get_report().log(BASE_LOSS, [
        {"model step": meta["step"], "tokens per split": steps * tokens_per_step,
         **({"weights": args.quantize} if args.quantize != "none" else {})},
        {"train bpb": bpb["train"], "val bpb": bpb["val"]},
        {"samples": samples},
    ])


if __name__ == "__main__":
    sys.exit(main())
