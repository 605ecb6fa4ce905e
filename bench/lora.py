"""Full SFT next to LoRA (chat_sft --lora-rank) on the same base model and the same conversations: trainable
parameters, peak memory, training tokens/s and the validation loss each reaches after the same number of steps.

    python -m bench.lora                                  # depth 8, LoRA rank 8, 20 steps of 4 conversations
    python -m bench.lora --depths 8,12
    python -m bench.lora --lora-lrs 5e-4,1e-3,2e-3,4e-3   # LoRA at several learning rates, side by side

The base model is a random init (init_weights), given --base-steps of full pretraining on the mirror's text first:
at init the LM head is ~0 (std 0.001) and every block the identity, so no adapter could change the logits, which
would say nothing about finetuning (--base-steps 0 keeps the pure random init). Both finetunes then start from that
base, on SmolTalk's mirrored conversations (one padded row each, as chat_sft), with chat_sft's step: its schedule
(linear decay to zero), supervised_step, and its optimizers: full SFT = Muon + AdamW at chat_sft's learning rates
(--init-lr-frac 0.02), LoRA = AdamW over the adapters at --lora-lr. The model's vocabulary is --vocab-size (default
65536, nanochat's, so the LM head costs and weighs what it does in a real run); the conversations are tokenized by a
4096-token BPE trained here on the mirror, so their ids use the first 4096.

Measured:
- trainable parameters and their share of all parameters (adapters included);
- peak memory: the peak bytes of live torch tensors (the profiler's record of every CPU allocation and free) while a
  copy of the base model is made ready (its own weights, adapters) and trained for 3 steps: weights, gradients,
  optimizer state, activations and the loss head's chunks. Not RSS: on this CPU the first matmuls fault in ~200-400
  MiB of the math libraries' code whatever the model, and glibc keeps freed blocks (keep_freed_memory), which would
  blur a difference of tens of MiB. Measured in its own pass, untimed (the profiler slows each op);
- tokens/s: padded tokens of a step (as chat_sft's log line counts them) over its wall time (forward, backward,
  optimizer), the median over the steps after the first 2; the variants' steps alternate in one process;
- validation loss on held-out SmolTalk conversations after the steps, next to the base model's.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from nanochat import lora
from nanochat.chat_data import ConversationStream, PaddedBatcher
from nanochat.common import keep_freed_memory
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.kernels import describe_machine
from nanochat.tokenizer import Tokenizer
from nanochat.training import (
    add_optimizer_arguments,
    apply_schedule,
    evaluate_loss,
    lr_multiplier,
    setup_optimizers,
    supervised_step,
)
from tasks.smoltalk import SmolTalk

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_VOCAB = 4096
SFT_INIT_LR_FRAC = 0.02  # chat_sft's default --init-lr-frac
NO_AUTOCAST = nullcontext()  # fp32 on CPU, as chat_sft there
MEMORY_PROBE_STEPS = 3

# -----------------------------------------------------------------------------
# Data and the base model


def use_mirror() -> Path:
    """The data mirror (../shared/data unless NANOCHAT_DATA_DIR says otherwise), for the text and the tasks alike."""
    os.environ.setdefault("NANOCHAT_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))
    return Path(os.environ["NANOCHAT_DATA_DIR"])


def mirror_texts() -> list[str]:
    return pq.read_table(use_mirror() / "fineweb" / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()


def pretraining_rows(tokenizer: Tokenizer, texts: list[str], batch_size: int, seq_len: int, steps: int):
    """`steps` (inputs, targets) batches of the texts' tokens, packed end to end."""
    bos = tokenizer.get_bos_token_id()
    tokens = [token for text in texts for token in [bos, *tokenizer.encode(text)]]
    per_batch = batch_size * (seq_len + 1)
    if len(tokens) < steps * per_batch:
        raise SystemExit(f"the mirror's first shard has {len(tokens):,} tokens, fewer than --base-steps x batch")
    rows = torch.tensor(tokens[:steps * per_batch]).view(steps, batch_size, seq_len + 1)
    return [(row[:, :-1].contiguous(), row[:, 1:].contiguous()) for row in rows]


def conversation_batches(tokenizer: Tokenizer, split: str, batch_size: int, seq_len: int, count: int):
    batcher = PaddedBatcher(ConversationStream(SmolTalk(split=split)), tokenizer, seq_len)
    return [batcher.next_batch(batch_size) for _ in range(count)]


def pretrained_base(config, tokenizer: Tokenizer, texts: list[str], args) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    if args.base_steps == 0:
        return model
    optimizers = model.setup_optimizers()  # pretraining's learning rates
    rows = pretraining_rows(tokenizer, texts, args.batch_size, args.seq_len, args.base_steps)
    for step, (inputs, targets) in enumerate(rows):
        apply_schedule(optimizers, 1.0, step)
        loss = supervised_step(model, [(inputs, targets)], NO_AUTOCAST)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            print(f"  base: pretraining step {step + 1}/{args.base_steps}, loss {loss:.3f}", flush=True)
    print(f"  base: {args.base_steps} pretraining steps, last loss {loss:.3f}")
    return model


# -----------------------------------------------------------------------------
# The two ways to finetune


def finetune_setup(model: GPT, variant: dict) -> list[torch.optim.Optimizer]:
    """The model made ready for `variant` (full, or LoRA at a rank and lr), and its optimizers."""
    if variant["kind"] == "full":
        parser = argparse.ArgumentParser()
        add_optimizer_arguments(parser, init_lr_frac=SFT_INIT_LR_FRAC)
        return setup_optimizers(model, parser.parse_args([]))
    lora.apply_lora(model, lora.LoRASettings(variant["rank"], float(variant["rank"]), ("attn", "mlp")))
    return lora.setup_optimizers(model, variant["lr"], weight_decay=0.0)


def train_step(model, optimizers, batch, step: int, num_steps: int) -> tuple[float, float]:
    """(loss, seconds) of one chat_sft step: schedule, forward + backward, optimizer."""
    start = time.perf_counter()
    apply_schedule(optimizers, lr_multiplier(step, num_steps, warmdown_ratio=1.0), step)
    loss = supervised_step(model, [batch], NO_AUTOCAST)
    for optimizer in optimizers:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss, time.perf_counter() - start


def peak_tensor_memory(base: GPT, variant: dict, batches) -> int:
    """Peak bytes of live torch tensors, over what was live before, while a copy of the base is made ready for
    `variant` and trained MEMORY_PROBE_STEPS steps: the profiler's record of every CPU allocation and free."""
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model = copy.deepcopy(base)
        optimizers = finetune_setup(model, variant)
        for step, batch in enumerate(batches[:MEMORY_PROBE_STEPS]):
            train_step(model, optimizers, batch, step, MEMORY_PROBE_STEPS)
        del model, optimizers
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:  # an allocation is positive, a free negative
        live += nbytes
        peak = max(peak, live)
    return peak


# -----------------------------------------------------------------------------


def bench_depth(depth: int, tokenizer: Tokenizer, texts: list[str], args) -> dict:
    config = model_config_from_depth(depth, args.vocab_size, args.seq_len)
    print(f"\ndepth {depth}: width {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size}; "
          f"{args.steps} steps of {args.batch_size} conversations, rows up to {args.seq_len} tokens")
    base = pretrained_base(config, tokenizer, texts, args)
    batches = conversation_batches(tokenizer, "train", args.batch_size, args.seq_len, args.steps)
    val_batches = conversation_batches(tokenizer, "test", args.batch_size, args.seq_len, args.val_batches)
    base_val_loss = evaluate_loss(base, val_batches, NO_AUTOCAST)
    variants = [{"name": "full SFT", "kind": "full"}] + [
        {"name": f"LoRA r{args.rank} lr {lr:g}", "kind": "lora", "rank": args.rank, "lr": lr} for lr in args.lora_lrs]
    runs = []
    for variant in variants:
        model = copy.deepcopy(base)
        runs.append({"variant": variant, "model": model, "optimizers": finetune_setup(model, variant),
                     "seconds": [], "losses": []})
    for step, batch in enumerate(batches):  # alternating: every variant sees the machine as it is at that step
        for run in runs:
            loss, seconds = train_step(run["model"], run["optimizers"], batch, step, args.steps)
            run["losses"].append(loss)
            run["seconds"].append(seconds)
        print(f"  step {step + 1}/{args.steps}: " + ", ".join(f"{run['variant']['name']} {run['seconds'][-1]:.1f} s "
                                                        f"(loss {run['losses'][-1]:.3f})" for run in runs), flush=True)

    rows = {}
    memory = {kind: peak_tensor_memory(base, next(v for v in variants if v["kind"] == kind), batches)
              for kind in ("full", "lora")}
    print(f"  base model: validation loss {base_val_loss:.4f}")
    for run in runs:
        variant, model = run["variant"], run["model"]
        trainable, total = lora.parameter_counts(model)
        step_tokens = [inputs.numel() for inputs, _ in batches]
        tokens_per_second = statistics.median(t / s for t, s in list(zip(step_tokens, run["seconds"]))[2:])
        val_loss = evaluate_loss(model, val_batches, NO_AUTOCAST)
        rows[variant["name"]] = {"trainable": trainable, "total": total, "memory": memory[variant["kind"]],
                                 "tokens_per_second": tokens_per_second, "val_loss": val_loss,
                                 "train_loss": run["losses"][-1]}
        print(f"  {variant['name']:>20}: trainable {trainable:>12,} of {total:,} ({100 * trainable / total:6.2f}%) "
              f"| peak tensor memory {memory[variant['kind']] / 2**20:7.0f} MiB | {tokens_per_second:7,.0f} tok/s "
              f"| last train loss {run['losses'][-1]:.4f} | validation loss {val_loss:.4f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="8", help="comma-separated model depths")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    parser.add_argument("--lora-lrs", default=str(lora.DEFAULT_LR),
                        help="comma-separated LoRA learning rates (the summary line is the first one's)")
    parser.add_argument("--steps", type=int, default=20, help="finetuning steps per variant")
    parser.add_argument("--base-steps", type=int, default=30, help="pretraining steps that make the base model")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations (rows) per step")
    parser.add_argument("--seq-len", type=int, default=256, help="longest row, in tokens")
    parser.add_argument("--vocab-size", type=int, default=65536, help="the model's vocabulary")
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches of --batch-size")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    args = parser.parse_args(argv)
    try:
        depths = [int(d) for d in args.depths.split(",")]
        args.lora_lrs = [float(lr) for lr in args.lora_lrs.split(",")]
    except ValueError:
        parser.error("--depths and --lora-lrs take comma-separated numbers")
    if args.steps < 3 or args.rank < 1 or args.base_steps < 0:
        parser.error("--steps must be >= 3 (the first 2 are not timed), --rank >= 1, --base-steps >= 0")
    if args.vocab_size < TOKENIZER_VOCAB:
        parser.error(f"--vocab-size must be >= {TOKENIZER_VOCAB}, the tokenizer's")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(describe_machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    texts = mirror_texts()
    tokenizer = Tokenizer.train_from_iterator((text[:4000] for text in texts), vocab_size=TOKENIZER_VOCAB)
    summaries = []
    for depth in depths:
        rows = bench_depth(depth, tokenizer, texts, args)
        full, lora_row = rows["full SFT"], rows[f"LoRA r{args.rank} lr {args.lora_lrs[0]:g}"]
        summaries.append(
            f"depth {depth}: LoRA r{args.rank} trains {100 * lora_row['trainable'] / lora_row['total']:.2f}% of the "
            f"parameters (full {full['trainable']:,}), peak memory {lora_row['memory'] / full['memory']:.2f}x, "
            f"tokens/s {lora_row['tokens_per_second'] / full['tokens_per_second']:.2f}x, validation loss after "
            f"{args.steps} steps {lora_row['val_loss']:.3f} vs {full['val_loss']:.3f}")
        print(f"  {summaries[-1]}", flush=True)
    print("\nsummary (LoRA / full SFT): " + "; ".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
