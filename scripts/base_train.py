"""Pretrain the base model: a GPT of --depth layers on FineWeb-Edu shards (or your text, --data), compute-optimally.

    python -m scripts.base_train --depth=4                                     # one process (CPU, MPS or a GPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20   # 8 GPUs

--depth is the one dial: the width (64 * depth), the heads and, through the Chinchilla ratio (--target-param-data-ratio
tokens per parameter), the number of steps follow from it. Each step consumes --total-batch-size tokens, reached by
gradient accumulation over --device-batch-size x --max-seq-len tokens on each of the world's processes.

Checkpoints (every --save-every steps and at the end) go to $NANOCHAT_BASE_DIR/base_checkpoints/<--model-tag>/;
`--resume` continues from the last one exactly: model, optimizers, data position, step, RNG and logging state, so the
losses are those of an uninterrupted run.

--data PATH trains on your own text instead: a shard directory, .jsonl or .txt files (nanochat/own_data.py), the last
file the validation split unless --val-data names it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nanochat.budget import RATIO_PARAMS, batch_from_depth, training_steps
from nanochat.checkpoint import build_model, rng_state, set_rng_state
from nanochat.common import (
    all_reduce_sum,
    autocast_context,
    autodetect_device_type,
    compute_cleanup,
    compute_init,
    get_compute_dtype,
    get_wandb,
    parse_script_args,
    print0,
)
from nanochat.dataloader import PACKINGS, DistributedTokenLoader
from nanochat.dataset import CORPORA, DEFAULT_CORPUS, default_shard_dir
from nanochat.fp8 import DEFAULT_MIN_FEATURES, enable_fp8
from nanochat.gpt import INIT_SCHEMES, GPTConfig, model_config_from_depth, peak_flops
from nanochat.loss_eval import evaluate_bpb
from nanochat.loss_scaling import LossScaler
from nanochat.own_data import prepare_own_data
from nanochat.plan import BATCH_REFERENCE_DEPTH, BATCH_REFERENCE_TOKENS
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (
    RunError,
    StepTimer,
    add_optimizer_arguments,
    add_run_arguments,
    apply_schedule,
    boundary_errors_exit,
    check_every_flags,
    check_run_arguments,
    checkpoint_dir,
    compile_policy,
    due,
    lr_multiplier,
    momentum_warmdown_left,
    resume_run,
    save_run_checkpoint,
    set_aside_previous_run,
    setup_optimizers,
    step_line,
)
from report import BASE_TRAINING, get_report

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:"]

# flags that define the run: --resume with different values would not continue the same run
# (flag -> the value a run saved before the flag existed ran with)
RUN_DEFINING_FLAGS = {**dict.fromkeys(["depth", "max_seq_len", "device_batch_size", "total_batch_size",
                                       "num_iterations", "target_flops", "target_param_data_ratio", "embedding_lr",
                                       "unembedding_lr", "matrix_lr", "weight_decay", "warmup_ratio", "warmdown_ratio",
                                       "final_lr_frac", "data", "val_data"]),
                      "seed": 42, "rope_base": 10000.0, "corpus": "fineweb", "packing": "stream", "fp8": False, "batch_from_depth": False,
                      "ratio_params": "total",
                      **dict.fromkeys(["value_embeddings", "layer_scalars", "smear", "backout"], False),
                      "window_pattern": "L", "qk_gain": 1.0, "vocab_multiple": 1, "init": "normal"}


# -----------------------------------------------------------------------------
# Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "pretraining")
    parser.add_argument("--fp8", action="store_true",
                        help=f"FP8 matmuls in the blocks' linear layers >= {DEFAULT_MIN_FEATURES} wide (nanochat/fp8.py): "
                             "needs CUDA capability 8.9+ (Ada, Hopper); on CPU an emulation, slow, for dry runs")
    # the text (default: the FineWeb-Edu shards)
    parser.add_argument("--data", default=None, help="your own text: a directory of parquet shards, .jsonl files "
                                                     "({\"text\": ...} per line) or .txt files (one document each)")
    parser.add_argument("--val-data", default=None, help="the validation text, in the same forms (default: the last "
                                                         "file of --data)")
    parser.add_argument("--corpus", choices=list(CORPORA), default=DEFAULT_CORPUS,
                        help="the published corpus to pretrain on when there is no --data (nanochat/dataset.py; get "
                             "it with `python -m nanochat.dataset --corpus NAME -n 8`)")
    parser.add_argument("--packing", choices=PACKINGS, default="stream",
                        help="how training rows are cut from documents: stream (back to back, rows cut anywhere) or "
                             "best_fit (each row starts at a document, best-fit packed; validation always streams)")
    # the model
    parser.add_argument("--depth", type=int, default=20, help="number of layers; width and heads follow")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context length (default: 2048 on CUDA, 512 else)")
    parser.add_argument("--rope-base", type=float, default=10000.0, help="rotary embeddings' base frequency")
    # the 2026-recipe model changes (nanochat/gpt.py), off by default and unmeasured at scale
    parser.add_argument("--value-embeddings", action="store_true",
                        help="every other layer (the last included) adds a gated second token embedding to its values")
    parser.add_argument("--layer-scalars", action="store_true",
                        help="per layer, learned scalars: one scales the residual entering it, one adds back a share "
                             "of the initial embedding")
    parser.add_argument("--smear", action="store_true",
                        help="each position adds a gated share of the previous token's embedding")
    parser.add_argument("--backout", action="store_true",
                        help="subtract a learned share of the mid-depth residual before the final norm")
    parser.add_argument("--window-pattern", default="L",
                        help="attention per layer, repeated over the layers: S a sliding window of a quarter of the "
                             "context, L the full context, e.g. SSSL (the last layer is always L)")
    parser.add_argument("--qk-gain", type=float, default=1.0,
                        help="the attention's softmax scale in units of 1/sqrt(head_dim) (after QK-norm)")
    parser.add_argument("--vocab-multiple", type=int, default=1,
                        help="pad the embedding and LM head rows to a multiple of this (e.g. 64)")
    parser.add_argument("--init", choices=INIT_SCHEMES, default="normal",
                        help="weight init: normal (today's), or uniform matrices with a smaller MLP input and "
                             "embedding std 0.5")
    parser.add_argument("--seed", type=int, default=42, help="seed of the weight init (the data order is fixed)")
    # the token budget, by precedence
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (overrides the two below)")
    parser.add_argument("--target-flops", type=float, default=-1, help="training FLOPs budget (overrides the ratio)")
    parser.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla)")
    parser.add_argument("--ratio-params", choices=RATIO_PARAMS, default="total",
                        help="the parameters the ratio counts: all, or the hidden matrices and LM head (the 2026 "
                             "recipe: ~8 tokens per such parameter)")
    # the batch
    parser.add_argument("--device-batch-size", type=int, default=None,
                        help="sequences per process per micro-step (default: 32 on CUDA, 4 else)")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step (default: 524288 on CUDA, 8 micro-steps of every process "
                             "else)")
    parser.add_argument("--batch-from-depth", action="store_true",
                        help="size the batch from the token budget, 2^19 tokens at depth 12 x (tokens / depth 12's "
                             "tokens)^0.383, learning rates x sqrt(batch / 2^19) (public scaling results, unmeasured "
                             "here; needs the ratio budget)")
    # the optimizers and their schedule
    add_optimizer_arguments(parser)
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps warming the lr up")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps decaying the lr at the end")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end, as a fraction of the peak")
    # evaluation, sampling, checkpoints
    parser.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evaluations (-1: end only)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="val tokens per evaluation (default: 20 steps' "
                                                                      "worth on CUDA, 4 else)")
    parser.add_argument("--core-metric-every", type=int, default=None,
                        help="steps between CORE evaluations (-1: never; default 2000 on CUDA, -1 else); never at "
                             "step 0 unless --core-metric-at-start")
    parser.add_argument("--core-metric-at-start", action="store_true", help="also evaluate CORE before training")
    parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE items per task")
    parser.add_argument("--sample-every", type=int, default=2000, help="steps between printed samples (-1: never)")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (-1: end only)")
    parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    args = parse_script_args(parser, argv)
    validate_args(parser, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {"--depth": args.depth, "--max-seq-len": args.max_seq_len, "--device-batch-size": args.device_batch_size,
                "--total-batch-size": args.total_batch_size, "--eval-tokens": args.eval_tokens,
                "--vocab-multiple": args.vocab_multiple}
    for flag, value in positive.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer, got {value}")
    if not args.window_pattern or set(args.window_pattern) - {"S", "L"}:
        parser.error(f"--window-pattern must be letters S (a short window) and L (the full context), e.g. SSSL; got "
                     f"{args.window_pattern!r}")
    if not args.qk_gain > 0:
        parser.error(f"--qk-gain must be positive, got {args.qk_gain}")
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
    check_every_flags(parser, args, "eval_every", "sample_every", "save_every", "core_metric_every")
    if args.batch_from_depth and (args.total_batch_size is not None or args.num_iterations > 0
                                  or args.target_flops > 0):
        parser.error("--batch-from-depth sizes the batch from --target-param-data-ratio: drop --total-batch-size, "
                     "--num-iterations and --target-flops")
    if args.val_data is not None and args.data is None:
        parser.error("--val-data needs --data: the FineWeb shards bring their own validation shard")
    if args.data is not None and args.corpus != DEFAULT_CORPUS:
        parser.error("--data replaces the published corpus: give --data or --corpus, not both")
    # absolute, so that a resume from another directory names the same data
    args.data, args.val_data = (str(Path(path).expanduser().resolve()) if path is not None else None
                                for path in (args.data, args.val_data))
    check_run_arguments(parser, args)


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
# The run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type or autodetect_device_type(), seed=args.seed)
    try:
        with boundary_errors_exit():  # a bad checkpoint, flags that do not fit: one line that names the fix
            train(args, dist_info)
    finally:
        compute_cleanup()
    return 0


def load_or_resume(args: argparse.Namespace, dist_info, directory, vocab_size: int):
    """(model, resumed or None): the last checkpoint of this tag when resuming, else a fresh model (an earlier run
    of the tag set aside)."""
    resumed = None
    if args.resume:
        resumed = resume_run("base", directory, args, RUN_DEFINING_FLAGS, dist_info.device, dist_info.rank,
                             dist_info.world_size)
        if resumed is None:
            print0(f"--resume: no checkpoint in {directory} yet, starting a fresh run")
    else:
        set_aside_previous_run(directory, dist_info.master)
    if resumed is not None:
        return resumed.model, resumed
    config = model_config(args, vocab_size)
    return build_model({"model_config": asdict(config)}, dist_info.device, "train", init_scheme=args.init), None


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    """The model the flags describe."""
    return replace(model_config_from_depth(args.depth, vocab_size, args.max_seq_len), rope_base=args.rope_base,
                   value_embeddings=args.value_embeddings, layer_scalars=args.layer_scalars, smear=args.smear,
                   backout=args.backout, window_pattern=args.window_pattern, qk_gain=args.qk_gain,
                   vocab_multiple=args.vocab_multiple)


def train(args: argparse.Namespace, dist_info) -> None:
    device, device_type, master = dist_info.device, dist_info.device_type, dist_info.master
    rank, world_size = dist_info.rank, dist_info.world_size
    resolve_device_defaults(args, device_type, world_size)
    compute_dtype = get_compute_dtype(device_type)
    autocast = autocast_context(device_type)

    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    if args.batch_from_depth:  # before any resume check: a resumed run computes the same batch
        args.total_batch_size, args.batch_lr_scale = batch_from_depth(
            model_config(args, get_tokenizer().get_vocab_size()), args.target_param_data_ratio, args.ratio_params,
            tokens_per_micro_step)
        print0(f"batch from depth: {args.total_batch_size:,} tokens a step (depth {BATCH_REFERENCE_DEPTH} at the "
               f"same ratio: {BATCH_REFERENCE_TOKENS:,}), learning rates x {args.batch_lr_scale:.3f}")
    if args.total_batch_size % tokens_per_micro_step != 0:
        raise RunError(f"--total-batch-size={args.total_batch_size} must be a multiple of --device-batch-size x "
                       f"--max-seq-len x world size = {args.device_batch_size} x {args.max_seq_len} x {world_size} "
                       f"= {tokens_per_micro_step}")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_step
    core_bundle = fetch_core_bundle(master) if args.core_metric_every > 0 else None
    data_dir = prepare_data_dir(args, master)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    directory = checkpoint_dir("base", args.model_tag)
    orig_model, resumed = load_or_resume(args, dist_info, directory, tokenizer.get_vocab_size())
    if args.fp8:  # before torch.compile, which then traces the FP8 matmuls
        print0(f"fp8: {enable_fp8(orig_model)} linear layers multiply in FP8")
    config = orig_model.config
    model = compile_policy(orig_model, args.compile, device_type)  # sampling, CORE and checkpoints use orig_model

    counts = orig_model.param_counts()
    flops_per_token = orig_model.estimate_flops()
    num_iterations = training_steps(args, counts, flops_per_token)
    total_tokens = args.total_batch_size * num_iterations
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size}, "
           f"context {config.sequence_len}")
    print0("parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    print0(f"FLOPs per token {flops_per_token:.3e}; {num_iterations:,} steps x {args.total_batch_size:,} tokens = "
           f"{total_tokens:,} tokens ({total_tokens / counts['total']:.1f} per parameter), "
           f"{flops_per_token * total_tokens:.3e} FLOPs")
    print0(f"batch: {args.device_batch_size} x {args.max_seq_len} tokens x {world_size} processes x "
           f"{grad_accum_steps} accumulation steps; {device_type}, {compute_dtype}, compile={args.compile}")

    optimizers = setup_optimizers(orig_model, args, resumed.optimizer_states if resumed else None)
    loop = {"step": 0, "smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0,
            "min_val_bpb": float("inf"), "val_bpb": None}
    if resumed is not None:
        loop.update(resumed.meta["loop_state"])
        set_rng_state(resumed.rank_state["rng"], device)
    scaler = LossScaler.in_loop_state(device_type, loop)  # fp16 (GPUs without bf16): dynamic loss scaling
    if loop["step"] >= num_iterations:
        print0(f"{directory} is already trained to step {loop['step']} of {num_iterations}: nothing to do")
        return

    train_loader = DistributedTokenLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                                          resume_state=resumed.rank_state["dataloader"] if resumed else None,
                                          data_dir=data_dir, packing=args.packing)
    loader_state = train_loader.state_dict()  # the position of the batch fetched next: what a checkpoint saves
    inputs, targets = next(train_loader)

    report = get_report()
    wandb_run = get_wandb(args.run, "nanochat", {**vars(args), "num_iterations": num_iterations}, master)
    peak = peak_flops(device)
    ema_beta = 0.9

    def evaluate(step: int) -> None:
        flops_so_far = flops_per_token * args.total_batch_size * step
        val_loader = DistributedTokenLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device,
                                            data_dir=data_dir)
        model.eval()
        with autocast:
            val_bpb = evaluate_bpb(model, val_loader, max(1, args.eval_tokens // tokens_per_micro_step), token_bytes)
        model.train()
        val_loader.close()
        loop["val_bpb"], loop["min_val_bpb"] = val_bpb, min(loop["min_val_bpb"], val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        report.log_metrics("base_train", {"step": step, "total_flops": flops_so_far, "val_bpb": val_bpb})
        wandb_run.log({"step": step, "total_training_flops": flops_so_far, "val/bpb": val_bpb})

    def evaluate_core_metric(step: int) -> None:
        from nanochat.core_eval import evaluate_core

        flops_so_far = flops_per_token * args.total_batch_size * step
        model.eval()
        with autocast:
            core = evaluate_core(orig_model, tokenizer, device, core_bundle,
                                 max_per_task=args.core_metric_max_per_task, log=print0).core
        model.train()
        loop["core_metric"] = core
        print0(f"step {step:05d} | CORE {core:.4f}")
        report.log_metrics("base_train", {"step": step, "total_flops": flops_so_far, "core_metric": core})
        wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core})

    def save(step: int) -> None:
        step_meta = {"user_config": vars(args), "num_iterations": num_iterations, "loop_state": {**loop, "step": step},
                     "dataloader_state": loader_state}
        save_run_checkpoint("base", directory, step, orig_model, optimizers, tokenizer,
                            {"dataloader": loader_state, "rng": rng_state(device)}, step_meta, rank,
                            keep=args.keep_checkpoints)

    start_step = loop["step"]
    timer = StepTimer(device_type, skip_first=10 if num_iterations - start_step > 20 else 0)  # compilation
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        resumed_here = resumed is not None and step == start_step  # evaluated and saved before the interruption
        if not resumed_here:
            if last_step:  # the finished run is on disk before the final evaluations, whatever happens in them
                save(step)
            if last_step or due(args.eval_every, step):
                evaluate(step)
            core_due = due(args.core_metric_every, step) and (step > 0 or args.core_metric_at_start)
            if args.core_metric_every > 0 and (last_step or core_due):
                evaluate_core_metric(step)
            if master and args.sample_every > 0 and (last_step or step % args.sample_every == 0):
                print_samples(orig_model, tokenizer, autocast)
            if not last_step and step > 0 and due(args.save_every, step):
                save(step)
        if last_step:
            break

        # one optimizer step: gradient accumulation over micro-batches
        timer.begin()
        train_loss = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(inputs, targets)
            train_loss += loss.detach() / grad_accum_steps
            scaler.scale_loss(loss / grad_accum_steps).backward()
            loader_state = train_loader.state_dict()
            inputs, targets = next(train_loader)  # fetched while the GPU still works on the backward pass
        multiplier = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        apply_schedule(optimizers, multiplier, step, momentum_warmdown_left(args, step, num_iterations))
        if not scaler.step(optimizers, model):
            print0(f"step {step + 1:05d} | fp16 gradients overflowed: step skipped, loss scale now {scaler.scale:g}")
        model.zero_grad(set_to_none=True)
        train_loss_value = float(all_reduce_sum(train_loss) / world_size)  # waits for the step: honest timing
        step_time, counts_toward_total = timer.end(step - start_step + 1)

        # logging
        done = step + 1
        if counts_toward_total:
            loop["total_training_time"] += step_time
            loop["timed_steps"] += 1
        loop["smooth_train_loss"] = ema_beta * loop["smooth_train_loss"] + (1 - ema_beta) * train_loss_value
        smooth_loss = loop["smooth_train_loss"] / (1 - ema_beta ** done)  # debiased EMA
        mean_step_time = loop["total_training_time"] / max(1, loop["timed_steps"])
        eta = f"eta {mean_step_time * (num_iterations - done) / 60:.1f}m"
        print0(step_line(done, num_iterations, smooth_loss, multiplier, step_time, args.total_batch_size,
                         flops_per_token, peak, world_size, loop["total_training_time"], eta))
        total_flops = flops_per_token * args.total_batch_size * done
        report.log_metrics("base_train", {"step": done, "total_flops": total_flops, "train_loss": train_loss_value,
                                          "lrm": multiplier})
        wandb_run.log({"step": done, "total_training_flops": total_flops, "train/loss": smooth_loss,
                       "train/lrm": multiplier, "train/dt": step_time,
                       "train/tok_per_sec": args.total_batch_size / step_time})
        loop["step"] = done

    train_loader.close()
    log_report(args, report, loop, counts, flops_per_token, num_iterations, world_size, grad_accum_steps, device_type)
    wandb_run.finish()


def fetch_core_bundle(master: bool):
    """The CORE bundle, fetched once before training, by rank 0 (the others wait, then find it on disk)."""
    try:
        from nanochat.eval_bundle import get_eval_bundle
    except ImportError as e:
        raise RunError(f"--core-metric-every needs nanochat.eval_bundle ({e}); pass --core-metric-every=-1") from e
    bundle = get_eval_bundle() if master else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return bundle or get_eval_bundle()


def prepare_data_dir(args: argparse.Namespace, master: bool) -> Path | None:
    """The shard directory of --data (None: FineWeb's; another --corpus: its shards), converted once by rank 0 (the
    others wait, then find it)."""
    if args.data is None:
        return None if args.corpus == DEFAULT_CORPUS else default_shard_dir(args.corpus)
    val_data = Path(args.val_data) if args.val_data is not None else None
    data_dir = prepare_own_data(Path(args.data), val_data, log=print0) if master else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return data_dir or prepare_own_data(Path(args.data), val_data, log=print0)


def log_report(args, report, loop: dict, counts: dict, flops_per_token: float, num_iterations: int,
               world_size: int, grad_accum_steps: int, device_type: str) -> None:
    total_tokens = args.total_batch_size * num_iterations
    peak_memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f}GiB ({torch.cuda.max_memory_reserved() / 2**30:.2f}"
                   f"GiB reserved)" if device_type == "cuda" else "n/a")
    print0(f"done: min val bpb {loop['min_val_bpb']:.4f}, training time {loop['total_training_time']:.1f}s, "
           f"peak memory {peak_memory}")
    report.log(BASE_TRAINING, [
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
