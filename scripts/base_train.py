"""Pretrain the base model: a GPT of --depth layers on FineWeb-Edu shards, compute-optimally.

    python -m scripts.base_train --depth=4                                     # one process (CPU, MPS or a GPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20   # 8 GPUs

--depth is the one dial: the width (64 * depth), the heads and, through the Chinchilla ratio (--target-param-data-ratio
tokens per parameter), the number of steps follow from it. Each step consumes --total-batch-size tokens, reached by
gradient accumulation over --device-batch-size x --max-seq-len tokens on each of the world's processes.

Checkpoints (every --save-every steps and at the end) go to $NANOCHAT_BASE_DIR/base_checkpoints/<--model-tag>/;
`--resume` continues from the last one exactly: model, optimizers, data position, step, RNG and logging state, so the
losses are those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint import (
    CheckpointError,
    build_model,
    check_tokenizer,
    find_last_step,
    gather_rank_states,
    load_checkpoint,
    meta_path,
    model_meta,
    pick_rank_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nanochat.common import (
    autocast_context,
    autodetect_device_type,
    compute_cleanup,
    compute_init,
    get_base_dir,
    get_compute_dtype,
    get_wandb,
    print0,
)
from nanochat.dataloader import DistributedTokenLoader
from nanochat.gpt import model_config_from_depth, peak_flops
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:"]

# flags that define the run: --resume with different values would not continue the same run
RUN_DEFINING_FLAGS = ["depth", "max_seq_len", "device_batch_size", "total_batch_size", "num_iterations", "target_flops",
                      "target_param_data_ratio", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay",
                      "warmup_ratio", "warmdown_ratio", "final_lr_frac"]


# -----------------------------------------------------------------------------
# Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    # the model
    parser.add_argument("--depth", type=int, default=20, help="number of layers; width and heads follow")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context length (default: 2048 on CUDA, 512 else)")
    # the token budget, by precedence
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (overrides the two below)")
    parser.add_argument("--target-flops", type=float, default=-1, help="training FLOPs budget (overrides the ratio)")
    parser.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla)")
    # the batch
    parser.add_argument("--device-batch-size", type=int, default=None,
                        help="sequences per process per micro-step (default: 32 on CUDA, 4 else)")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step (default: 524288 on CUDA, 8 micro-steps of every process "
                             "else)")
    # the optimizers
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the LM head")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the hidden matrices")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps warming the lr up")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps decaying the lr at the end")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end, as a fraction of the peak")
    # evaluation, sampling, checkpoints
    parser.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evaluations (-1: end only)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="val tokens per evaluation (default: 20 steps' "
                                                                      "worth on CUDA, 4 else)")
    parser.add_argument("--core-metric-every", type=int, default=None,
                        help="steps between CORE evaluations (-1: never; default 2000 on CUDA, -1 else)")
    parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE items per task")
    parser.add_argument("--sample-every", type=int, default=2000, help="steps between printed samples (-1: never)")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (-1: end only)")
    parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint of --model-tag (starts fresh if there is none)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA)")
    if argv and argv[0] == "--":  # `torchrun ... -m scripts.base_train -- --depth=20`
        argv = argv[1:]
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {"--depth": args.depth, "--max-seq-len": args.max_seq_len, "--device-batch-size": args.device_batch_size,
                "--total-batch-size": args.total_batch_size, "--eval-tokens": args.eval_tokens}
    for flag, value in positive.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer, got {value}")
    for flag, value in {"--warmup-ratio": args.warmup_ratio, "--warmdown-ratio": args.warmdown_ratio,
                        "--final-lr-frac": args.final_lr_frac}.items():
        if not 0.0 <= value <= 1.0:
            parser.error(f"{flag} must be in [0, 1], got {value}")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        parser.error(f"--warmup-ratio + --warmdown-ratio must be <= 1, got {args.warmup_ratio + args.warmdown_ratio}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        parser.error(f"--num-iterations must be a positive number of steps (or -1 to derive it), got "
                     f"{args.num_iterations}")
    if args.num_iterations == -1 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        parser.error("no token budget: give --num-iterations, --target-flops or a positive --target-param-data-ratio")
    for flag, value in {"--eval-every": args.eval_every, "--sample-every": args.sample_every,
                        "--save-every": args.save_every, "--core-metric-every": args.core_metric_every}.items():
        if value is not None and (value == 0 or value < -1):
            parser.error(f"{flag} must be a positive number of steps or -1 (never / end only), got {value}")


def resolve_device_defaults(args: argparse.Namespace, device_type: str, world_size: int) -> None:
    """GPU defaults are nanochat's speedrun settings; elsewhere, sizes a laptop can run."""
    on_cuda = device_type == "cuda"
    if args.max_seq_len is None:
        args.max_seq_len = 2048 if on_cuda else 512
    if args.device_batch_size is None:
        args.device_batch_size = 32 if on_cuda else 4
    if args.total_batch_size is None:
        # elsewhere 8 micro-steps per step: Muon's Newton-Schulz cost is per step, and at one micro-step (2048 tokens
        # at depth 4) it is ~20% of the step on a CPU; at 8 it is ~3%
        args.total_batch_size = 524288 if on_cuda else 8 * args.device_batch_size * args.max_seq_len * world_size
    if args.eval_tokens is None:
        args.eval_tokens = 20 * args.total_batch_size if on_cuda else 4 * args.total_batch_size
    if args.core_metric_every is None:
        args.core_metric_every = 2000 if on_cuda else -1
    if args.compile is None:
        args.compile = on_cuda
    if args.model_tag is None:
        args.model_tag = f"d{args.depth}"


# -----------------------------------------------------------------------------
# Schedules: the learning rate and Muon's momentum as functions of the step


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup from ~0, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio of steps."""
    warmup_steps = round(warmup_ratio * num_iterations)
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps  # 1 -> 0 across the warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 over the first 300 steps: a short memory while the early gradients change fast."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# -----------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    dist_info = compute_init(args.device_type or autodetect_device_type())
    try:
        train(args, dist_info)
    except CheckpointError as e:  # a bad checkpoint on disk: the message names the file and the fix
        raise SystemExit(f"error: {e}") from None
    finally:
        compute_cleanup()
    return 0


def train(args: argparse.Namespace, dist_info) -> None:
    from report import get_report

    device, device_type, master = dist_info.device, dist_info.device_type, dist_info.master
    rank, world_size = dist_info.rank, dist_info.world_size
    resolve_device_defaults(args, device_type, world_size)
    compute_dtype = get_compute_dtype(device_type)
    autocast = autocast_context(device_type)
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step != 0:
        raise SystemExit(f"--total-batch-size={args.total_batch_size} must be a multiple of --device-batch-size x "
                         f"--max-seq-len x world size = {args.device_batch_size} x {args.max_seq_len} x {world_size} "
                         f"= {tokens_per_micro_step}")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_step
    if args.core_metric_every > 0:
        try:
            from nanochat.core_eval import evaluate_core, get_eval_bundle
        except ImportError as e:
            raise SystemExit(f"--core-metric-every needs nanochat.core_eval ({e}); pass --core-metric-every=-1") from e

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    vocab_size = tokenizer.get_vocab_size()

    # the model: fresh, or the last checkpoint of this tag when resuming
    checkpoint_dir = get_base_dir() / "base_checkpoints" / args.model_tag
    if not args.resume:
        set_aside_previous_run(checkpoint_dir, master)
    resume_step = last_checkpoint_step(checkpoint_dir) if args.resume else None
    if args.resume and resume_step is None:
        print0(f"--resume: no checkpoint in {checkpoint_dir} yet, starting a fresh run")
    if resume_step is not None:
        model_state, optimizer_states, meta = load_checkpoint(checkpoint_dir, resume_step, device,
                                                              load_optimizer=True, rank=rank)
        check_tokenizer(meta, tokenizer, meta_path(checkpoint_dir, resume_step))
        check_same_run(args, meta, meta_path(checkpoint_dir, resume_step))
        model = build_model(meta, device, "train", model_state, source=str(checkpoint_dir))
        del model_state
        try:
            rank_state = pick_rank_state(meta["rank_states"], rank, world_size, f"{checkpoint_dir} step {resume_step}")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    else:
        config = model_config_from_depth(args.depth, vocab_size, args.max_seq_len)
        model = build_model({"model_config": asdict(config)}, device, "train")
        meta, optimizer_states, rank_state = None, None, None
    config = model.config
    orig_model = model  # sampling, CORE and checkpoints use the uncompiled module
    if args.compile:
        model = torch.compile(model, dynamic=False)

    counts = orig_model.param_counts()
    flops_per_token = orig_model.estimate_flops()
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
    else:
        num_iterations = round(args.target_param_data_ratio * counts["total"] / args.total_batch_size)
    num_iterations = max(num_iterations, 1)
    total_tokens = args.total_batch_size * num_iterations
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size}, "
           f"context {config.sequence_len}")
    print0("parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    print0(f"FLOPs per token {flops_per_token:.3e}; {num_iterations:,} steps x {args.total_batch_size:,} tokens = "
           f"{total_tokens:,} tokens ({total_tokens / counts['total']:.1f} per parameter), "
           f"{flops_per_token * total_tokens:.3e} FLOPs")
    print0(f"batch: {args.device_batch_size} x {args.max_seq_len} tokens x {world_size} processes x "
           f"{grad_accum_steps} accumulation steps; {device_type}, {compute_dtype}, compile={args.compile}")

    optimizers = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                             matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    muon = optimizers[1]
    loop = {"step": 0, "smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0,
            "min_val_bpb": float("inf"), "val_bpb": None}
    if resume_step is not None:
        for optimizer, state in zip(optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(state)
        del optimizer_states
        loop.update(meta["loop_state"])
        set_rng_state(rank_state["rng"], device)
        print0(f"resumed from {checkpoint_dir} at step {resume_step}")
    if loop["step"] >= num_iterations:
        print0(f"{checkpoint_dir} is already trained to step {loop['step']} of {num_iterations}: nothing to do")
        return

    train_loader = DistributedTokenLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                                          resume_state=rank_state["dataloader"] if rank_state else None)
    loader_state = train_loader.state_dict()  # the position of the batch fetched next: what a checkpoint saves
    inputs, targets = next(train_loader)

    report = get_report()
    wandb_run = get_wandb(args.run, "nanochat", {**vars(args), "num_iterations": num_iterations}, master)
    peak = peak_flops(device)
    ema_beta = 0.9

    def evaluate_val_bpb() -> float:
        steps = max(1, args.eval_tokens // tokens_per_micro_step)
        val_loader = DistributedTokenLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device)
        model.eval()
        with autocast:
            bpb = evaluate_bpb(model, val_loader, steps, token_bytes)
        model.train()
        val_loader.close()
        return bpb

    def save(step: int) -> None:
        rank_states = gather_rank_states({"dataloader": loader_state, "rng": rng_state(device)})
        step_meta = model_meta(config, tokenizer, step, stage="base", user_config=vars(args),
                               num_iterations=num_iterations, loop_state={**loop, "step": step},
                               dataloader_state=loader_state, rank_states=rank_states)
        save_checkpoint(checkpoint_dir, step, orig_model.state_dict() if master else None,
                        [optimizer.state_dict() for optimizer in optimizers], step_meta, rank=rank)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    start_step = loop["step"]
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        resumed_here = resume_step is not None and step == start_step  # evaluated and saved before the interruption
        flops_so_far = flops_per_token * args.total_batch_size * step

        if (last_step or (args.eval_every > 0 and step % args.eval_every == 0)) and not resumed_here:
            val_bpb = evaluate_val_bpb()
            loop["val_bpb"], loop["min_val_bpb"] = val_bpb, min(loop["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            report.log_metrics("base_train", {"step": step, "total_flops": flops_so_far, "val_bpb": val_bpb})
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "val/bpb": val_bpb})

        if args.core_metric_every > 0 and (last_step or step % args.core_metric_every == 0) and not resumed_here:
            model.eval()
            with autocast:
                core = evaluate_core(orig_model, tokenizer, device, get_eval_bundle(),
                                     max_per_task=args.core_metric_max_per_task, log=print0).core
            model.train()
            loop["core_metric"] = core
            print0(f"step {step:05d} | CORE {core:.4f}")
            report.log_metrics("base_train", {"step": step, "total_flops": flops_so_far, "core_metric": core})
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core})

        if master and args.sample_every > 0 and (last_step or step % args.sample_every == 0) and not resumed_here:
            print_samples(orig_model, tokenizer, autocast)

        if (last_step or (args.save_every > 0 and step % args.save_every == 0 and step > 0)) and not resumed_here:
            save(step)

        if last_step:
            break

        # one optimizer step: gradient accumulation over micro-batches
        synchronize()
        step_start = time.time()
        train_loss = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(inputs, targets)
            train_loss += loss.detach() / grad_accum_steps
            (loss / grad_accum_steps).backward()
            loader_state = train_loader.state_dict()
            inputs, targets = next(train_loader)  # fetched while the GPU still works on the backward pass
        multiplier = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if dist.is_initialized():
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
            train_loss /= world_size
        train_loss_value = train_loss.item()  # also waits for the step to finish, so the timing is honest
        synchronize()
        step_time = time.time() - step_start

        # logging
        done = step + 1
        if step - start_step >= 10 or num_iterations - start_step <= 20:  # the first steps include compilation
            loop["total_training_time"] += step_time
            loop["timed_steps"] += 1
        loop["smooth_train_loss"] = ema_beta * loop["smooth_train_loss"] + (1 - ema_beta) * train_loss_value
        smooth_loss = loop["smooth_train_loss"] / (1 - ema_beta ** done)  # debiased EMA
        tokens_per_second = args.total_batch_size / step_time
        mfu = f"{100 * flops_per_token * tokens_per_second / (peak * world_size):.1f}%" if peak else "n/a"
        mean_step_time = loop["total_training_time"] / max(1, loop["timed_steps"])
        eta_minutes = mean_step_time * (num_iterations - done) / 60
        print0(f"step {done:05d}/{num_iterations:05d} ({100 * done / num_iterations:.1f}%) | "
               f"loss {smooth_loss:.6f} | lrm {multiplier:.2f} | dt {step_time * 1000:.0f}ms | "
               f"tok/s {tokens_per_second:,.0f} | mfu {mfu} | elapsed {loop['total_training_time'] / 60:.2f}m | "
               f"eta {eta_minutes:.1f}m")
        total_flops = flops_per_token * args.total_batch_size * done
        report.log_metrics("base_train", {"step": done, "total_flops": total_flops, "train_loss": train_loss_value,
                                    "lrm": multiplier})
        wandb_run.log({"step": done, "total_training_flops": total_flops, "train/loss": smooth_loss,
                       "train/lrm": multiplier, "train/dt": step_time, "train/tok_per_sec": tokens_per_second})
        loop["step"] = done

    train_loader.close()
    peak_memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f}GiB ({torch.cuda.max_memory_reserved() / 2**30:.2f}"
                   f"GiB reserved)" if device_type == "cuda" else "n/a")
    print0(f"done: min val bpb {loop['min_val_bpb']:.4f}, training time {loop['total_training_time'] / 60:.2f}m, "
           f"peak memory {peak_memory}")
    report.log("Base model training", [
        {key: value for key, value in vars(args).items() if key != "run"},
        {"Number of parameters": counts["total"], "Number of FLOPs per token": f"{flops_per_token:e}",
         "Calculated number of iterations": num_iterations, "Number of training tokens": total_tokens,
         "Tokens : Params ratio": total_tokens / counts["total"], "DDP world size": world_size,
         "Gradient accumulation steps": grad_accum_steps},
        {"Minimum validation bpb": loop["min_val_bpb"], "Final validation bpb": loop["val_bpb"],
         "CORE metric estimate": loop.get("core_metric"),
         "Total training flops": f"{flops_per_token * total_tokens:e}",
         "Total training time": f"{loop['total_training_time'] / 60:.2f}m", "Peak memory usage": peak_memory},
    ])
    wandb_run.finish()


def set_aside_previous_run(checkpoint_dir: Path, master: bool) -> None:
    """A fresh run must not share a directory with an older run's checkpoints (a later --resume could pick up the
    old run's higher step), and must not delete them either: they move to <tag>.replaced-<time>."""
    if master and checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        aside = checkpoint_dir.with_name(f"{checkpoint_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpoint_dir.rename(aside)
        print0(f"starting a fresh run: the previous checkpoints of this tag moved to {aside} (use --resume to "
               "continue a run instead)")
    if dist.is_initialized():
        dist.barrier()


def last_checkpoint_step(checkpoint_dir: Path) -> int | None:
    try:
        return find_last_step(checkpoint_dir)
    except CheckpointError:
        return None


def check_same_run(args: argparse.Namespace, meta: dict, where) -> None:
    saved = meta.get("user_config", {})
    if "rank_states" not in meta or "loop_state" not in meta:
        raise SystemExit(f"{where} holds no training state to resume from: start a fresh run under another "
                         "--model-tag")
    changed = [f"--{flag.replace('_', '-')}: saved {saved.get(flag)!r}, now {getattr(args, flag)!r}"
               for flag in RUN_DEFINING_FLAGS if saved.get(flag) != getattr(args, flag)]
    if changed:
        raise SystemExit(f"--resume with settings that differ from the run in {where} ({'; '.join(changed)}): "
                         "pass the original flags to continue it exactly")


def print_samples(model, tokenizer, autocast) -> None:
    model.eval()
    bos = tokenizer.get_bos_token_id()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=bos)
        with autocast:
            completion = list(model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"sample: {tokenizer.decode(tokens[1:] + completion)!r}")
    model.train()


if __name__ == "__main__":
    sys.exit(main())
