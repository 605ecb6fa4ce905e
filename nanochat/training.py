"""The machinery every training stage shares. base_train, mid_train, chat_sft and chat_rl keep what is their own
(their data, their loss, their evaluations, their report section); the rest lives here, in the order a stage uses it:

- flags: the ones every stage takes (wandb run, device, resume, compile, checkpoint pruning, the optimizers' learning
  rates and variants) and torchrun's `--` pass-through;
- schedules: the learning rate and Muon's momentum, one function each, applied to the optimizers in one place;
- the run: its checkpoint directory; a fresh run sets an earlier run's checkpoints aside, a resumed run is checked
  against the run it continues (same tokenizer, same run-defining flags, same number of ranks); the optimizers;
  the compile policy;
- the loop: when to evaluate and to save (the last step saves *before* its final evaluations, so an evaluation that
  crashes or runs out of memory cannot cost the run), the step's log line, pruning old checkpoints, the supervised
  step and validation loss of the chat stages;
- `cli`: the entry point that turns errors at the boundary (a bad checkpoint, a missing input, flags that do not fit
  the run) into one-line exit messages.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint import (
    CHECKPOINT_DIRS,
    PRODUCERS,
    CheckpointError,
    build_model,
    check_tokenizer,
    find_largest_tag,
    find_last_step,
    gather_rank_states,
    load_checkpoint,
    load_model,
    meta_path,
    model_meta,
    pick_rank_state,
    prune_checkpoints,
    save_checkpoint,
)
from nanochat.common import all_reduce_sum, get_base_dir, print0
from nanochat.loading import ExportError
from nanochat.loss_scaling import LossScaler
from nanochat.optim import NS_COEFFICIENTS
from nanochat.tokenizer import Tokenizer, get_tokenizer
from tasks.common import MalformedDataError


class RunError(ValueError):
    """The run cannot go on as asked: flags that do not fit the data, the checkpoint or each other. The message
    names the fix."""


BOUNDARY_ERRORS = (RunError, CheckpointError, ExportError, FileNotFoundError, MalformedDataError)

# -----------------------------------------------------------------------------
# Flags


def add_run_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """The flags every training stage takes, besides its own."""
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' turns wandb off)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--resume", action="store_true", help=f"continue the {stage} run of this tag from its last "
                                                              "checkpoint, exactly")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model for training (default: see compile_policy)")
    parser.add_argument("--keep-checkpoints", type=int, default=-1,
                        help="keep only the newest N checkpoints of this run (-1: keep all; a depth-20 "
                             "pretraining otherwise writes ~100 GB of them)")


def add_optimizer_arguments(parser: argparse.ArgumentParser, init_lr_frac: float | None = None) -> None:
    """The optimizers' learning rates (pretraining's; a chat stage scales them all by --init-lr-frac) and the
    optimizer variants, each off by default (nanochat/optim.py). --momentum-warmdown is pretraining's only (no
    init_lr_frac): the chat stages' schedules do not take it."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    group.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the LM head")
    group.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the hidden matrices")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    if init_lr_frac is not None:
        group.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                           help="learning rates as a fraction of the above")
    group.add_argument("--embedding-betas", type=beta_pair, default=None, metavar="BETA1,BETA2",
                       help="AdamW betas of the embeddings (default: the LM head's, 0.8,0.95)")
    group.add_argument("--muon-ns", choices=NS_COEFFICIENTS, default="quintic",
                       help="Muon's Newton-Schulz coefficients: one fixed quintic, or Polar Express's per step")
    group.add_argument("--normuon", type=beta, nargs="?", const=0.95, default=None, metavar="BETA2",
                       help="NorMuon: normalize each row of Muon's update by an EMA (BETA2, default 0.95) of its "
                            "mean square")
    group.add_argument("--muon-weight-decay", type=non_negative_float, default=0.0,
                       help="Muon's decoupled weight decay, scaled with the lr schedule")
    group.add_argument("--muon-cautious-weight-decay", action=argparse.BooleanOptionalAction, default=True,
                       help="decay a weight only where Muon's update has its sign (with --muon-weight-decay)")
    if init_lr_frac is None:
        group.add_argument("--momentum-warmdown", action="store_true",
                           help="bring Muon's momentum back down to 0.85 across the lr warmdown")


def number_flag(text: str, low: float, high: float, bounds: str) -> float:
    """A flag's number in [low, high); anything else is a parser error that names the range."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value < high:
        raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}")
    return value


def beta(text: str) -> float:
    return number_flag(text, 0.0, 1.0, "in [0, 1)")


def non_negative_float(text: str) -> float:
    return number_flag(text, 0.0, math.inf, ">= 0")


def beta_pair(text: str) -> list[float]:
    """BETA1,BETA2, each in [0, 1). A list, as a run's saved flags read back from its JSON meta."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1) as BETA1,BETA2 (e.g. 0.8,0.95), got {text!r}")
    return [beta(part) for part in parts]


# the variant flags define a run in every stage that takes them (a resume is checked against them), with the value a
# run saved before they existed ran with: all off
OPTIMIZER_VARIANT_FLAGS = {"embedding_betas": None, "muon_ns": "quintic", "normuon": None, "muon_weight_decay": 0.0,
                           "muon_cautious_weight_decay": True, "momentum_warmdown": False}


def muon_options(args: argparse.Namespace) -> dict:
    """Muon's keyword arguments for the variant flags."""
    return {"ns_coefficients": args.muon_ns, "normuon": args.normuon is not None,
            "normuon_beta2": args.normuon if args.normuon is not None else 0.95,
            "weight_decay": args.muon_weight_decay, "cautious_weight_decay": args.muon_cautious_weight_decay}


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.keep_checkpoints == 0 or args.keep_checkpoints < -1:
        parser.error(f"--keep-checkpoints must be a positive number or -1 (keep all), got {args.keep_checkpoints}")


def check_every_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """`--X-every` flags: a positive number of steps, or -1 (never / at the end only)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and (value == 0 or value < -1):
            parser.error(f"--{flag.replace('_', '-')} must be a positive number of steps or -1 (never / end only), "
                         f"got {value}")


# -----------------------------------------------------------------------------
# Schedules: the learning rate and Muon's momentum as functions of the step


def lr_multiplier(step: float, num_steps: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.0,
                  final_lr_frac: float = 0.0) -> float:
    """Linear warmup from ~0 over the first warmup_ratio of training, constant, then a linear warmdown to
    final_lr_frac over the last warmdown_ratio. `step` may be fractional progress with num_steps=1 (midtraining
    measures its progress in passes over the data). Pretraining: warmup 0, warmdown 0.2; SFT and RL: warmdown 1,
    i.e. 1 - step / num_steps."""
    warmup_steps = warmup_ratio * num_steps
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = warmdown_remaining(step, num_steps, warmdown_ratio)
    return remaining + (1 - remaining) * final_lr_frac  # exactly 1.0 before the warmdown


def warmdown_remaining(step: float, num_steps: float, warmdown_ratio: float) -> float:
    """How much of the warmdown over the last warmdown_ratio of training is still ahead: 1 until it starts, then
    linearly down to 0 at num_steps (never below)."""
    warmdown_steps = warmdown_ratio * num_steps
    if step <= num_steps - warmdown_steps or warmdown_steps == 0:
        return 1.0
    return max(0.0, (num_steps - step) / warmdown_steps)


def muon_momentum(step: int, warmdown_left: float = 1.0) -> float:
    """0.85 -> 0.95 over the first 300 steps: a short memory while a fresh optimizer's gradients change fast.
    warmdown_left < 1 (--momentum-warmdown: warmdown_remaining of the lr's warmdown) brings it linearly back to 0.85
    as the lr decays, so the annealing steps follow fresher gradients (an ablation decides whether that helps)."""
    frac = min(step / 300, 1.0)
    momentum = (1 - frac) * 0.85 + frac * 0.95
    if warmdown_left >= 1.0:
        return momentum  # untouched: (m - 0.85) + 0.85 need not round back to m
    return 0.85 + (momentum - 0.85) * warmdown_left


def momentum_warmdown_left(args: argparse.Namespace, step: int, num_steps: int) -> float:
    """muon_momentum's warmdown_left for a pretraining step: the lr warmdown's with --momentum-warmdown, else 1."""
    return warmdown_remaining(step, num_steps, args.warmdown_ratio) if args.momentum_warmdown else 1.0


def apply_schedule(optimizers: list[torch.optim.Optimizer], multiplier: float, step: int,
                   warmdown_left: float = 1.0) -> None:
    """This step's learning rates (each group's initial_lr x multiplier) and Muon's momentum (see muon_momentum)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if "momentum" in group:  # Muon's groups
                group["momentum"] = muon_momentum(step, warmdown_left)


# -----------------------------------------------------------------------------
# The run: where its checkpoints go, fresh or resumed, its optimizers, compiled or not


def checkpoint_dir(stage: str, tag: str) -> Path:
    return get_base_dir() / CHECKPOINT_DIRS[stage] / tag


def has_checkpoint(directory: Path) -> bool:
    """Whether directory (a stage root or one tag) holds a complete checkpoint (its meta file is written last)."""
    return directory.is_dir() and any(directory.glob("**/meta_*.json"))


def source_tag(stage: str, tag: str | None) -> str:
    """The tag a chat stage reads from and writes under: the one asked for, else the deepest of its source stage."""
    root = get_base_dir() / CHECKPOINT_DIRS[stage]
    if tag is None:
        if not has_checkpoint(root):
            raise FileNotFoundError(f"no {stage} checkpoint in {root}: run {PRODUCERS[stage]} first")
        return find_largest_tag(root)
    if not has_checkpoint(root / tag):
        tags = sorted(p.name for p in root.iterdir() if has_checkpoint(p)) if root.is_dir() else []
        raise FileNotFoundError(f"no {stage} checkpoint in {root / tag}: run {PRODUCERS[stage]} first"
                                + (f", or pick one of the tags {tags}" if tags else ""))
    return tag


def load_source_model(stage: str, device: torch.device, tag: str, step: int | None = None):
    """(model, tokenizer, meta) of the checkpoint a chat stage starts from, for training. load_model refuses a model
    whose tokenizer fingerprint differs from the tokenizer on disk, naming both and the fix."""
    return load_model(stage, device, phase="train", tag=tag, step=step)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint a chat stage starts from (its tag is also the one it writes under)."""
    parser.add_argument("--model-tag", "--tag", dest="model_tag", default=None,
                        help="model tag to start from (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="model step to start from (default: the last)")


@dataclass
class ChatRun:
    """Where a chat stage starts: the model and tokenizer it trains, the checkpoint it came from, where it saves."""
    model: torch.nn.Module
    tokenizer: Tokenizer
    tag: str
    directory: Path
    source: dict  # {"stage", "tag", "step"} of the model the stage started from
    resumed: Resumed | None


def open_chat_run(stage: str, source_stage: str, args: argparse.Namespace, run_defining_flags: list[str],
                  dist_info) -> ChatRun:
    """A chat stage's run: resumed from its own last checkpoint (--resume; an error when there is none), or fresh
    from the source stage's checkpoint, with an earlier run of this tag set aside."""
    tag = source_tag(source_stage, args.model_tag)
    directory = checkpoint_dir(stage, tag)
    if args.resume:
        resumed = resume_run(stage, directory, args, run_defining_flags, dist_info.device, dist_info.rank,
                             dist_info.world_size)
        if resumed is None:
            raise FileNotFoundError(f"--resume: no {stage} checkpoint in {directory} to resume from; "
                                    f"run {PRODUCERS[stage]} without --resume to start the stage")
        return ChatRun(resumed.model, resumed.tokenizer, tag, directory, resumed.meta["source"], resumed)
    set_aside_previous_run(directory, dist_info.master)
    model, tokenizer, meta = load_source_model(source_stage, dist_info.device, tag=tag, step=args.step)
    print0(f"{stage}: starting from the {source_stage} model {tag} step {meta['step']}")
    return ChatRun(model, tokenizer, tag, directory, {"stage": source_stage, "tag": tag, "step": meta["step"]}, None)


def set_aside_previous_run(directory: Path, master: bool) -> None:
    """A fresh run must not share a directory with an older run's checkpoints (a later --resume could pick up the
    old run's higher step), and must not delete them either: they move to <tag>.replaced-<time>."""
    if master and directory.is_dir() and any(directory.iterdir()):
        aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        directory.rename(aside)
        print0(f"starting a fresh run: the previous checkpoints of this tag moved to {aside} (use --resume to "
               "continue a run instead)")
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Resumed:
    """What a resumed run continues from: its own last checkpoint."""
    step: int
    model: torch.nn.Module
    tokenizer: Tokenizer
    meta: dict
    optimizer_states: list[dict]
    rank_state: dict  # this rank's data position and RNG


def check_same_run(args: argparse.Namespace, meta: dict, run_defining_flags: dict[str, object], where) -> None:
    """A resume with other values of the flags that define the run would not continue the same run.
    run_defining_flags: flag -> the value a run saved before the flag existed ran with."""
    saved = meta.get("user_config", {})
    changed = [f"--{flag.replace('_', '-')}: saved {saved.get(flag, before)!r}, now {getattr(args, flag)!r}"
               for flag, before in run_defining_flags.items() if saved.get(flag, before) != getattr(args, flag)]
    if changed:
        raise RunError(f"--resume with settings that differ from the run in {where} ({'; '.join(changed)}): "
                       "pass the original flags to continue it exactly")


def resume_run(stage: str, directory: Path, args: argparse.Namespace, run_defining_flags: dict[str, object],
               device: torch.device, rank: int, world_size: int) -> Resumed | None:
    """The run in `directory` to continue, checked; None when there is none yet (the caller decides whether that
    starts a fresh run or is an error)."""
    try:
        step = find_last_step(directory)
    except CheckpointError:
        return None
    where = meta_path(directory, step)
    model_state, optimizer_states, meta = load_checkpoint(directory, step, device, load_optimizer=True, rank=rank)
    if "rank_states" not in meta or "loop_state" not in meta:
        raise RunError(f"{where} holds no training state to resume from (written by another tool?): run "
                       f"{PRODUCERS[stage]} without --resume, or under another tag")
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, where)
    variant_flags = {flag: off for flag, off in OPTIMIZER_VARIANT_FLAGS.items() if hasattr(args, flag)}
    check_same_run(args, meta, {**variant_flags, **run_defining_flags}, where)
    try:
        rank_state = pick_rank_state(meta["rank_states"], rank, world_size, f"{directory} step {step}")
    except ValueError as e:
        raise RunError(str(e)) from None
    model = build_model(meta, device, "train", model_state, source=str(directory))
    print0(f"resumed from {directory} at step {step}")
    return Resumed(step, model, tokenizer, meta, optimizer_states, rank_state)


def setup_optimizers(model, args: argparse.Namespace, states: list[dict] | None = None) -> list[torch.optim.Optimizer]:
    """The pretraining optimizers (AdamW + Muon) at the flags' learning rates, scaled by --init-lr-frac where the
    stage has it (finetuning starts from a trained model, which a pretraining-sized step would knock off its
    minimum); `initial_lr` is what the schedule multiplies. The variant flags: Muon's options (muon_options) and
    the embeddings' AdamW betas. `states`: a resumed run's (whose saved group settings load_state_dict restores)."""
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                        muon_options=muon_options(args))
    if args.embedding_betas is not None:
        embedding_group(optimizers[0], model)["betas"] = tuple(args.embedding_betas)
    # a chat stage's --init-lr-frac; base_train --batch-from-depth's sqrt(batch / 2^19)
    scale = getattr(args, "init_lr_frac", 1.0) * getattr(args, "batch_lr_scale", 1.0)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * scale
    if states is not None:
        for optimizer, state in zip(optimizers, states, strict=True):
            optimizer.load_state_dict(state)
    return optimizers


def embedding_group(adamw: torch.optim.Optimizer, model) -> dict:
    """The AdamW group that holds the token embedding (and any value embeddings); every group reads its own betas."""
    token_embedding = model.transformer.wte.weight
    return next(group for group in adamw.param_groups if any(p is token_embedding for p in group["params"]))


def compile_policy(model, requested: bool | None, device_type: str, default_on_cuda: bool = True):
    """The model to train with: torch.compile'd when asked (--compile), by default on CUDA for stages whose rows
    have one fixed shape (pretraining, midtraining: one graph); stages with rows of varying length (SFT, RL) would
    recompile for every new shape, so they default to eager."""
    use = requested if requested is not None else (device_type == "cuda" and default_on_cuda)
    return torch.compile(model, dynamic=False) if use else model


# -----------------------------------------------------------------------------
# The loop


def due(every: int, step: int) -> bool:
    """Whether a periodic `--X-every` task runs at this step."""
    return every > 0 and step % every == 0


def save_run_checkpoint(stage: str, directory: Path, step: int, model, optimizers: list[torch.optim.Optimizer],
                        tokenizer: Tokenizer, rank_state: dict, meta_fields: dict, rank: int,
                        keep: int = -1, model_state: Callable[[], dict] | None = None) -> None:
    """Every rank calls this: the per-rank data position and RNG are gathered into the meta, rank 0 writes the model
    and the meta, every rank its own optimizer shard; then rank 0 prunes all but the newest `keep` checkpoints.
    model_state: what of the model to save (default: its whole state_dict; a LoRA run saves only its adapters)."""
    rank_states = gather_rank_states(rank_state)
    meta = model_meta(model.config, tokenizer, step, stage=stage, rank_states=rank_states, **meta_fields)
    model_state = model_state or model.state_dict
    save_checkpoint(directory, step, model_state() if rank == 0 else None,
                    [optimizer.state_dict() for optimizer in optimizers], meta, rank=rank)
    print0(f"saved checkpoint step {step} to {directory}")
    if keep > 0 and rank == 0:
        for pruned in prune_checkpoints(directory, keep):
            print0(f"removed checkpoint step {pruned} (--keep-checkpoints {keep})")


class StepTimer:
    """Wall time of one optimizer step (waiting for the GPU), and whether it counts towards the training time: the
    first `skip_first` steps of a process include compilation and warm-up."""

    def __init__(self, device_type: str, skip_first: int = 0):
        self.synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
        self.skip_first = skip_first
        self.start = 0.0

    def begin(self) -> None:
        self.synchronize()
        self.start = time.time()

    def end(self, steps_this_process: int) -> tuple[float, bool]:
        """(seconds of the step, whether it counts)."""
        self.synchronize()
        return time.time() - self.start, steps_this_process > self.skip_first


def step_line(step: int, num_steps: int | None, loss: float, multiplier: float, seconds: float, tokens: int | None,
              flops_per_token: float | None, peak_flops: float | None, world_size: int, elapsed_seconds: float,
              extra: str = "") -> str:
    """The log line of one optimizer step, the same in every stage: step, loss, lr multiplier, step time, tok/s,
    MFU (where the GPU's peak is known), elapsed training time."""
    progress = f"{step:05d}/{num_steps:05d} ({100 * step / num_steps:.1f}%)" if num_steps else f"{step:05d}"
    parts = [f"step {progress}", f"loss {loss:.6f}", f"lrm {multiplier:.3f}", f"dt {seconds * 1000:.0f}ms"]
    if tokens is not None:
        tokens_per_second = tokens / seconds
        parts.append(f"tok/s {tokens_per_second:,.0f}")
        if flops_per_token is not None:
            mfu = 100 * flops_per_token * tokens_per_second / (peak_flops * world_size) if peak_flops else None
            parts.append(f"mfu {mfu:.1f}%" if mfu is not None else "mfu n/a")
    parts.append(f"elapsed {elapsed_seconds / 60:.2f}m")
    return " | ".join(parts) + (f" | {extra}" if extra else "")


def supervised_step(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], autocast,
                    scaler: LossScaler | None = None) -> float:
    """Forward + backward over the micro-batches of one optimizer step (gradient accumulation) and return the
    step's loss. The loss is the mean over every supervised target of the step on all ranks, not a mean of
    per-micro-batch means: rows hold different numbers of supervised tokens, and this way the gradient does not
    depend on how the total batch is split into micro-batches and ranks. In fp16 the scaler scales what is
    backpropagated (nanochat/loss_scaling.py); its step() then unscales and steps."""
    device = micro_batches[0][1].device
    num_targets = all_reduce_sum(sum((targets >= 0).sum() for _, targets in micro_batches).to(device).float())
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with autocast:  # a sum, not per-token losses: the chunked loss head never holds the whole batch's logits
            target_loss_sum = model(inputs, targets, loss_reduction="sum")
        # the optimizers average gradients over ranks, so scale by world_size to get a sum over ranks
        loss = target_loss_sum * world_size / num_targets
        (scaler.scale_loss(loss) if scaler else loss).backward()
        loss_sum += target_loss_sum.detach()
    return float(all_reduce_sum(loss_sum) / num_targets)


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast) -> float:
    """Mean loss per supervised target over the batches of every rank."""
    loss_sum, count = None, None
    for inputs, targets in batches:
        with autocast:
            batch_sum = model(inputs, targets, loss_reduction="sum").float()
        batch_count = (targets >= 0).sum().float()
        loss_sum = batch_sum if loss_sum is None else loss_sum + batch_sum
        count = batch_count if count is None else count + batch_count
    if loss_sum is None:
        raise ValueError("evaluate_loss got no batches")
    totals = all_reduce_sum(torch.stack([loss_sum, count]))
    return float(totals[0] / totals[1].clamp(min=1))


def min_or_none(value: float, best: float | None) -> float:
    return min(value, best if best is not None else math.inf)


# -----------------------------------------------------------------------------
# The entry point


@contextlib.contextmanager
def boundary_errors_exit():
    """Errors at the boundary become a one-line `error: ...` exit message instead of a traceback."""
    try:
        yield
    except BOUNDARY_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


def cli(main: Callable[[list[str]], object]) -> None:
    """`python -m scripts.X` / torchrun: run main on the command line's arguments, boundary errors as messages."""
    with boundary_errors_exit():
        result = main(sys.argv[1:])
    sys.exit(result if isinstance(result, int) else 0)
