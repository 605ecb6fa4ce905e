"""Midtraining: teach a base model to converse.

The base model completes documents; here it sees conversations: general chat (SmolTalk), multiple choice (MMLU
auxiliary_train), math with calculator tool calls (GSM8K), who it is (identity) and spelling. Each conversation is
rendered in the chat format and whole conversations are packed into full rows; the loss covers only what the
assistant says. Same optimizers as pretraining, their own schedule: constant, then a linear warmdown to zero.

    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device-batch-size=16

Reads the latest base checkpoint (or --model-tag/--step), writes $NANOCHAT_BASE_DIR/mid_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist

from nanochat.chat_data import (
    ConversationPacker,
    ConversationStream,
    add_stage_arguments,
    evaluate_loss,
    load_stage_model,
    load_tasks,
    merge_stats,
    require_tasks,
    resume_stage,
    save_stage_checkpoint,
    set_lr_multiplier,
    setup_optimizers,
    source_tag,
    supervised_step,
)
from nanochat.checkpoint import gather_rank_states, rng_state, set_rng_state
from nanochat.common import autocast_context, compute_cleanup, compute_init, get_wandb, print0
from nanochat.gpt import peak_flops
from report import get_report
from tasks.common import TaskMixture
from tasks.gsm8k import GSM8K
from tasks.identity import IdentityConversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Midtrain a base model on a mixture of conversation tasks")
    add_stage_arguments(parser, "mid", init_lr_frac=1.0)
    # batch
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per GPU")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step over all ranks, made up by gradient accumulation (default: "
                             "524288 on CUDA as in pretraining; elsewhere one micro-batch per rank)")
    # schedule
    parser.add_argument("--num-iterations", type=int, default=-1,
                        help="optimizer steps (-1: one pass over the training mixture)")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2,
                        help="fraction of training at the end over which the LR decays linearly to zero")
    # evaluation and checkpoints
    parser.add_argument("--eval-every", type=int, default=150, help="steps between validation losses (-1: end only)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="validation tokens per evaluation (default: 20 total batches)")
    parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: end only)")
    args = parser.parse_args(argv)
    for flag in ("max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.num_iterations == 0 or args.num_iterations < -1:
        parser.error("--num-iterations must be >= 1, or -1 for one pass over the mixture")
    if not 0.0 <= args.warmdown_ratio <= 1.0:
        parser.error("--warmdown-ratio must be in [0, 1]")
    return args


# -----------------------------------------------------------------------------
# The mixtures


def train_mixture() -> tuple[TaskMixture, dict[str, int], dict[str, str]]:
    """(mixture, sizes of the tasks in it, reasons for the tasks left out)."""
    factories = {
        "SmolTalk": lambda: SmolTalk(split="train"),  # general conversations (460K rows upstream)
        "MMLU auxiliary_train": lambda: MMLU(subset="auxiliary_train", split="train"),  # multiple choice, 100K
        "GSM8K": lambda: GSM8K(subset="main", split="train"),  # math with calculator tool calls, 8K
        "identity": lambda: IdentityConversations(size=1000),  # who the assistant is
        "SpellingBee": lambda: SpellingBee(size=80000, split="train"),  # counting letters with a tool check
    }
    tasks, missing = load_tasks(factories, "midtraining mixture")
    require_tasks(tasks, missing, "midtraining mixture")
    return TaskMixture(list(tasks.values())), {name: len(task) for name, task in tasks.items()}, missing


def val_mixture() -> tuple[TaskMixture, dict[str, int], dict[str, str]]:
    """Held-out conversations (test splits) in about the proportions of the training mixture."""
    factories = {
        "SmolTalk test": lambda: SmolTalk(split="test"),
        "MMLU test": lambda: MMLU(subset="all", split="test", stop=5200),
        "GSM8K test": lambda: GSM8K(subset="main", split="test", stop=420),
    }
    tasks, missing = load_tasks(factories, "midtraining validation mixture")
    require_tasks(tasks, missing, "midtraining validation mixture")
    return TaskMixture(list(tasks.values())), {name: len(task) for name, task in tasks.items()}, missing


def lr_multiplier(progress: float, warmdown_ratio: float) -> float:
    """Constant, then linear to zero over the last `warmdown_ratio` of training (progress in [0, 1])."""
    if warmdown_ratio == 0 or progress < 1 - warmdown_ratio:
        return 1.0
    return max(0.0, (1 - progress) / warmdown_ratio)


def muon_momentum(step: int) -> float:
    """Muon's momentum warms up from 0.85 to 0.95 over 300 steps: the fresh optimizer has no momentum history."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    user_config = vars(args).copy()
    dist_info = compute_init(args.device_type or None)
    device, rank, world_size, master = dist_info.device, dist_info.rank, dist_info.world_size, dist_info.master
    autocast = autocast_context(dist_info.device_type)
    # a fixed total batch, whatever the number of GPUs and the rows that fit on one; a CPU run takes one micro-batch
    if args.total_batch_size is None:
        on_cuda = dist_info.device_type == "cuda"
        args.total_batch_size = 524288 if on_cuda else args.device_batch_size * args.max_seq_len * world_size
    args.eval_tokens = args.eval_tokens or 20 * args.total_batch_size
    user_config.update(total_batch_size=args.total_batch_size, eval_tokens=args.eval_tokens)
    wandb_run = get_wandb(args.run, "nanochat-mid", user_config, master)

    # the model: a base checkpoint, or our own when resuming
    tag = source_tag("base", args.model_tag)
    rank_state = None
    if args.resume:
        model, tokenizer, meta, optimizer_states, rank_state = resume_stage("mid", tag, device, rank, world_size)
        start_step, loop_state, source = meta["step"], meta["loop_state"], meta["source"]
        print0(f"resuming midtraining of {tag} from step {start_step}")
    else:
        model, tokenizer, meta = load_stage_model("base", device, tag=tag, step=args.step)
        start_step, optimizer_states = 0, None
        loop_state = {"min_val_loss": None, "val_loss": None, "train_loss": None, "training_time": 0.0}
        source = {"stage": "base", "tag": tag, "step": meta["step"]}
        print0(f"midtraining base model {tag} step {meta['step']}")
    if args.max_seq_len > model.rotary_len:
        raise ValueError(f"--max-seq-len={args.max_seq_len} is longer than the model's rotary table "
                         f"({model.rotary_len}); use a shorter --max-seq-len")
    train_model = torch.compile(model, dynamic=False) if dist_info.device_type == "cuda" else model

    tokens_per_micro_batch = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro_batch != 0:
        raise ValueError(f"--total-batch-size={args.total_batch_size} must be a multiple of --device-batch-size x "
                         f"--max-seq-len x ranks = {tokens_per_micro_batch}")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_batch
    print0(f"{args.device_batch_size} rows x {args.max_seq_len} tokens x {world_size} ranks x {grad_accum_steps} "
           f"accumulation steps = {args.total_batch_size:,} tokens per step")

    optimizers = setup_optimizers(model, args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay,
                                  args.init_lr_frac)
    if optimizer_states is not None:
        for optimizer, state in zip(optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(state)

    # data
    train_task, train_sizes, train_missing = train_mixture()
    val_task, val_sizes, val_missing = val_mixture()
    print0(f"training mixture: {len(train_task):,} conversations ({train_sizes}); validation: {len(val_task):,}")
    packer = ConversationPacker(ConversationStream(train_task, rank, world_size), tokenizer, args.max_seq_len,
                                state=rank_state["data"] if rank_state else None)
    if rank_state is not None:
        set_rng_state(rank_state["rng"], device)
    eval_steps = max(1, args.eval_tokens // tokens_per_micro_batch)

    def validation_loss() -> float:
        val_packer = ConversationPacker(ConversationStream(val_task, rank, world_size), tokenizer, args.max_seq_len)
        batches = (val_packer.next_batch(args.device_batch_size, device) for _ in range(eval_steps))
        return evaluate_loss(train_model, batches, autocast)

    def data_progress() -> float:
        """Passes over the training mixture, the furthest rank's (every rank must agree on when to stop)."""
        progress = torch.tensor(packer.stream.epochs, device=device)
        if dist.is_initialized():
            dist.all_reduce(progress, op=dist.ReduceOp.MAX)
        return float(progress)

    flops_per_step = model.estimate_flops() * args.total_batch_size
    peak = peak_flops(dist_info.device)  # None off CUDA or on an unlisted GPU: MFU is then not shown
    train_losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    step = start_step
    while True:
        progress = step / args.num_iterations if args.num_iterations > 0 else data_progress()
        last_step = progress >= 1.0

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_loss = validation_loss()
            val_losses[step] = val_loss
            loop_state["val_loss"] = val_loss
            loop_state["min_val_loss"] = min(val_loss, loop_state["min_val_loss"] or math.inf)
            print0(f"step {step:05d} | validation loss {val_loss:.4f}")
            get_report().log_metrics("mid_train", {"step": step, "total_flops": flops_per_step * step,
                                                   "val_loss": val_loss})
            wandb_run.log({"step": step, "val/loss": val_loss})

        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            save_stage_checkpoint("mid", tag, step, model, optimizers, tokenizer,
                                  {"data": packer.state_dict(), "rng": rng_state(device)},
                                  {"source": source, "loop_state": loop_state, "user_config": user_config},
                                  rank)
        if last_step:
            break

        # one optimizer step
        t0 = time.time()
        micro_batches = [packer.next_batch(args.device_batch_size, device) for _ in range(grad_accum_steps)]
        lrm = lr_multiplier(progress, args.warmdown_ratio)
        set_lr_multiplier(optimizers, lrm)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                if "momentum" in group:  # Muon's groups
                    group["momentum"] = muon_momentum(step)
        train_loss = supervised_step(train_model, micro_batches, autocast)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if dist_info.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1

        train_losses[step] = train_loss
        loop_state["train_loss"] = train_loss
        if step - start_step > 1:  # the first step includes compilation
            loop_state["training_time"] += dt
        tokens_per_second = args.total_batch_size / dt
        mfu = 100 * flops_per_step / dt / (peak * world_size) if peak else None
        mfu_text = f" | mfu {mfu:.1f}%" if mfu is not None else ""
        print0(f"step {step:05d} ({100 * min(progress, 1):.1f}%) | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tokens_per_second:,.0f}{mfu_text} | "
               f"time {loop_state['training_time'] / 60:.2f}m")
        get_report().log_metrics("mid_train", {"step": step, "total_flops": flops_per_step * step,
                                               "train_loss": train_loss})
        wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tokens_per_second,
                       "train/mfu": mfu})

    # the report: what was trained on, what happened to it on the way into rows, where the losses ended
    packing = merge_stats(state["stats"] for state in gather_rank_states(packer.state_dict()))
    get_report().log("Midtraining", [
        user_config,
        {"source model": f"base {source['tag']} step {source['step']}",
         "training mixture": {**train_sizes, "total": len(train_task)},
         "tasks left out": ", ".join(train_missing) or "none",
         "validation mixture": {**val_sizes, "total": len(val_task)},
         "validation tasks left out": ", ".join(val_missing) or "none"},
        {"conversations packed": packing.conversations, "conversations truncated": packing.truncated,
         "tokens cut by truncation": packing.truncated_tokens, "conversations dropped": packing.dropped,
         "supervised tokens": packing.supervised_tokens,
         "padding fraction": packing.padding_tokens / max(1, packing.tokens + packing.padding_tokens)},
        {"steps": step, "final train loss": loop_state["train_loss"], "final validation loss": loop_state["val_loss"],
         "minimum validation loss": loop_state["min_val_loss"],
         "training time (min)": loop_state["training_time"] / 60},
    ])
    wandb_run.finish()
    compute_cleanup()
    return {"train_losses": train_losses, "val_losses": val_losses, "packing": packing, "tag": tag,
            "train_sizes": train_sizes, "train_missing": train_missing}


if __name__ == "__main__":
    main()
