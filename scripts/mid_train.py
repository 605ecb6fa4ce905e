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

import torch
import torch.distributed as dist

from nanochat.chat_data import ConversationPacker, ConversationStream, merge_stats
from nanochat.checkpoint import gather_rank_states, rng_state, set_rng_state
from nanochat.common import autocast_context, compute_cleanup, compute_init, get_wandb, parse_script_args, print0
from nanochat.gpt import peak_flops
from nanochat.loss_scaling import LossScaler
from nanochat.training import (
    RunError,
    StepTimer,
    add_optimizer_arguments,
    add_run_arguments,
    add_source_arguments,
    apply_schedule,
    check_every_flags,
    check_run_arguments,
    cli,
    compile_policy,
    due,
    evaluate_loss,
    lr_multiplier,
    min_or_none,
    open_chat_run,
    save_run_checkpoint,
    setup_optimizers,
    step_line,
    supervised_step,
)
from report import MIDTRAINING, get_report
from tasks.common import TaskMixture, load_tasks, require_tasks
from tasks.custom import add_conversation_arguments, check_conversation_arguments, custom_tasks
from tasks.gsm8k import GSM8K
from tasks.identity import IdentityConversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import sized_beside

# flags that define the run: --resume with different values would not continue the same run
RUN_DEFINING_FLAGS = dict.fromkeys(["max_seq_len", "device_batch_size", "total_batch_size", "num_iterations",
                                    "warmdown_ratio", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay",
                                    "init_lr_frac"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Midtrain a base model on a mixture of conversation tasks")
    add_run_arguments(parser, "midtraining")
    add_source_arguments(parser)
    add_conversation_arguments(parser)
    add_optimizer_arguments(parser, init_lr_frac=1.0)
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
    args = parse_script_args(parser, argv)
    for flag in ("max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.num_iterations == 0 or args.num_iterations < -1:
        parser.error("--num-iterations must be >= 1, or -1 for one pass over the mixture")
    if not 0.0 <= args.warmdown_ratio <= 1.0:
        parser.error("--warmdown-ratio must be in [0, 1]")
    check_every_flags(parser, args, "eval_every", "save_every")
    check_run_arguments(parser, args)
    check_conversation_arguments(parser, args)
    return args


# -----------------------------------------------------------------------------
# The mixtures


def train_mixture(custom: dict[str, object], mix: str,
                  identity: str | None = None) -> tuple[TaskMixture, dict[str, int], dict[str, str]]:
    """(mixture, sizes of the tasks in it, reasons for the tasks left out)."""
    factories = {
        "SmolTalk": lambda: SmolTalk(split="train"),  # general conversations (460K rows upstream)
        "MMLU auxiliary_train": lambda: MMLU(subset="auxiliary_train", split="train"),  # multiple choice, 100K
        "GSM8K": lambda: GSM8K(subset="main", split="train"),  # math with calculator tool calls, 8K
        "identity": lambda: IdentityConversations(size=1000, identity=identity),  # who the assistant is
    }
    tasks, missing = load_tasks(factories if mix == "default" else {}, "midtraining mixture")
    tasks.update(custom)  # --conversations, already checked line by line
    if mix == "default":  # counting letters with a tool check: 80K beside SmolTalk, MMLU and GSM8K upstream
        tasks["SpellingBee"] = sized_beside(tasks, full_rows=80_000, real_full_rows=460_000 + 100_000 + 7_473)
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


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type or None)
    try:
        return train(args, dist_info)
    finally:
        compute_cleanup()


def train(args: argparse.Namespace, dist_info) -> dict:
    device, rank, world_size, master = dist_info.device, dist_info.rank, dist_info.world_size, dist_info.master
    autocast = autocast_context(dist_info.device_type)
    # a fixed total batch, whatever the number of GPUs and the rows that fit on one; a CPU run takes one micro-batch
    if args.total_batch_size is None:
        on_cuda = dist_info.device_type == "cuda"
        args.total_batch_size = 524288 if on_cuda else args.device_batch_size * args.max_seq_len * world_size
    args.eval_tokens = args.eval_tokens or 20 * args.total_batch_size
    user_config = vars(args).copy()
    wandb_run = get_wandb(args.run, "nanochat-mid", user_config, master)

    custom = custom_tasks(args.conversations)  # a bad line stops the run here, before anything is touched
    run = open_chat_run("mid", "base", args, RUN_DEFINING_FLAGS, dist_info)
    model, tokenizer, resumed = run.model, run.tokenizer, run.resumed
    start_step = resumed.step if resumed else 0
    loop_state = (resumed.meta["loop_state"] if resumed else
                  {"min_val_loss": None, "val_loss": None, "train_loss": None, "training_time": 0.0})
    if args.max_seq_len > model.rotary_len:
        raise RunError(f"--max-seq-len={args.max_seq_len} is longer than the model's rotary table "
                       f"({model.rotary_len}); use a shorter --max-seq-len")
    train_model = compile_policy(model, args.compile, dist_info.device_type)
    scaler = LossScaler.in_loop_state(dist_info.device_type, loop_state)  # fp16: dynamic loss scaling

    tokens_per_micro_batch = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro_batch != 0:
        raise RunError(f"--total-batch-size={args.total_batch_size} must be a multiple of --device-batch-size x "
                       f"--max-seq-len x ranks = {tokens_per_micro_batch}")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_batch
    print0(f"{args.device_batch_size} rows x {args.max_seq_len} tokens x {world_size} ranks x {grad_accum_steps} "
           f"accumulation steps = {args.total_batch_size:,} tokens per step")
    optimizers = setup_optimizers(model, args, resumed.optimizer_states if resumed else None)

    # data
    train_task, train_sizes, train_missing = train_mixture(custom, args.mix, args.identity)
    val_task, val_sizes, val_missing = val_mixture()
    print0(f"training mixture: {len(train_task):,} conversations ({train_sizes}); validation: {len(val_task):,}")
    packer = ConversationPacker(ConversationStream(train_task, rank, world_size), tokenizer, args.max_seq_len,
                                state=resumed.rank_state["data"] if resumed else None)
    if resumed is not None:
        set_rng_state(resumed.rank_state["rng"], device)
    eval_steps = max(1, args.eval_tokens // tokens_per_micro_batch)

    def validation_loss(step: int) -> None:
        val_packer = ConversationPacker(ConversationStream(val_task, rank, world_size), tokenizer, args.max_seq_len)
        batches = (val_packer.next_batch(args.device_batch_size, device) for _ in range(eval_steps))
        val_loss = val_losses[step] = evaluate_loss(train_model, batches, autocast)
        loop_state["val_loss"], loop_state["min_val_loss"] = val_loss, min_or_none(val_loss, loop_state["min_val_loss"])
        print0(f"step {step:05d} | validation loss {val_loss:.4f}")
        get_report().log_metrics("mid_train", {"step": step, "total_flops": flops_per_step * step,
                                               "val_loss": val_loss})
        wandb_run.log({"step": step, "val/loss": val_loss})

    def save(step: int) -> None:
        save_run_checkpoint("mid", run.directory, step, model, optimizers, tokenizer,
                            {"data": packer.state_dict(), "rng": rng_state(device)},
                            {"source": run.source, "loop_state": loop_state, "user_config": user_config}, rank,
                            keep=args.keep_checkpoints)

    def data_progress() -> float:
        """Passes over the training mixture, the furthest rank's (every rank must agree on when to stop)."""
        progress = torch.tensor(packer.stream.epochs, device=device)
        if dist.is_initialized():
            dist.all_reduce(progress, op=dist.ReduceOp.MAX)
        return float(progress)

    flops_per_token = model.estimate_flops()
    flops_per_step = flops_per_token * args.total_batch_size
    peak = peak_flops(dist_info.device)  # None off CUDA or on an unlisted GPU: MFU is then not shown
    train_losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    timer = StepTimer(dist_info.device_type, skip_first=1)  # the first step includes compilation
    step = start_step
    while True:
        progress = step / args.num_iterations if args.num_iterations > 0 else data_progress()
        last_step = progress >= 1.0
        if last_step:  # on disk before the final evaluation, whatever happens in it
            save(step)
        if last_step or due(args.eval_every, step):
            validation_loss(step)
        if not last_step and step > start_step and due(args.save_every, step):
            save(step)
        if last_step:
            break

        # one optimizer step
        timer.begin()
        micro_batches = [packer.next_batch(args.device_batch_size, device) for _ in range(grad_accum_steps)]
        lrm = lr_multiplier(progress, 1.0, warmdown_ratio=args.warmdown_ratio)
        apply_schedule(optimizers, lrm, step)
        train_loss = supervised_step(train_model, micro_batches, autocast, scaler)
        scaler.step(optimizers, model)
        model.zero_grad(set_to_none=True)
        step += 1
        dt, counts = timer.end(step - start_step)
        train_losses[step] = loop_state["train_loss"] = train_loss
        loop_state["training_time"] += dt if counts else 0.0
        print0(step_line(step, args.num_iterations if args.num_iterations > 0 else None, train_loss, lrm, dt,
                         args.total_batch_size, flops_per_token, peak, world_size, loop_state["training_time"],
                         f"data {100 * min(progress, 1):.1f}%"))
        get_report().log_metrics("mid_train", {"step": step, "total_flops": flops_per_step * step,
                                               "train_loss": train_loss})
        wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm,
                       "train/tok_per_sec": args.total_batch_size / dt})

    # the report: what was trained on, what happened to it on the way into rows, where the losses ended
    packing = merge_stats(state["stats"] for state in gather_rank_states(packer.state_dict()))
    get_report().log(MIDTRAINING, [
        user_config,
        {"source model": f"base {run.source['tag']} step {run.source['step']}",
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
    return {"train_losses": train_losses, "val_losses": val_losses, "packing": packing, "tag": run.tag,
            "train_sizes": train_sizes, "train_missing": train_missing}


if __name__ == "__main__":
    cli(main)
