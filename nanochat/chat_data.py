"""Chat training data: conversations from tasks -> token rows whose targets supervise only what the assistant wrote.

Shared by the three chat stages:
  mid_train  packs several whole conversations into each fixed-length row (ConversationPacker)
  chat_sft   puts one conversation per row and pads (PaddedBatcher)
  chat_rl    pads its sampled rollouts the same way (collate_padded)
Every source of rows is resumable: its state is a few integers that go into the checkpoint meta, one entry per
rank, so a resumed run sees exactly the rows the interrupted one would have seen next. The last sections hold
the other pieces the stages share: a supervised training step under gradient accumulation, the validation loss,
the per-rank state (data position, RNG) a checkpoint carries, and the plumbing around a stage: the model it starts
from, its optimizers, and its own checkpoints, which resume exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint import (
    CHECKPOINT_DIRS,
    PRODUCERS,
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
    save_checkpoint,
)
from nanochat.common import get_base_dir, print0
from nanochat.tokenizer import Tokenizer, get_tokenizer
from tasks.common import TASK_LOAD_ERRORS

# -----------------------------------------------------------------------------
# Loading the tasks of a mixture: a dataset that is not available is left out, loudly


def load_tasks(factories: dict[str, Callable[[], object]], purpose: str) -> tuple[dict[str, object], dict[str, str]]:
    """Build each named task. One that cannot be loaded is left out with a warning naming it and why; the caller
    decides whether what is left is enough. Returns (loaded tasks by name, reasons for the missing ones)."""
    loaded: dict[str, object] = {}
    missing: dict[str, str] = {}
    for name, factory in factories.items():
        try:
            task = factory()
        except TASK_LOAD_ERRORS as e:
            missing[name] = f"{type(e).__name__}: {e}"
            print0(f"WARNING: {purpose}: leaving out {name}, it could not be loaded ({missing[name]})")
            continue
        if len(task) == 0:
            missing[name] = "it holds no conversations"
            print0(f"WARNING: {purpose}: leaving out {name}, {missing[name]}")
            continue
        loaded[name] = task
    return loaded, missing


def require_tasks(loaded: dict[str, object], missing: dict[str, str], purpose: str) -> None:
    if not loaded:
        reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
        raise RuntimeError(f"{purpose}: none of its datasets could be loaded ({reasons}). Point NANOCHAT_DATA_DIR "
                           "at a data mirror that holds them, or run with network access to download them.")


# -----------------------------------------------------------------------------
# A resumable walk over a task: rank r of w takes conversations r, r + w, r + 2w, ... and wraps into new epochs


class ConversationStream:
    """Conversations of `task` for one rank, forever. The state is one integer: how many this rank has taken."""

    def __init__(self, task, rank: int = 0, world_size: int = 1, position: int = 0):
        if len(task) == 0:
            raise ValueError("a conversation stream needs a task with at least one conversation")
        self.task = task
        self.rank = rank
        self.world_size = world_size
        self.position = position

    def index(self, position: int) -> int:
        """The global (epoch-spanning) index of this rank's `position`-th conversation."""
        return self.rank + position * self.world_size

    def conversation(self, position: int) -> dict:
        return self.task[self.index(position) % len(self.task)]

    def take(self) -> tuple[int, dict]:
        """(position, conversation) of the next conversation, and advance."""
        position = self.position
        self.position += 1
        return position, self.conversation(position)

    @property
    def epochs(self) -> float:
        """How many passes over the task this rank's stream has made (0.5 = half way through the first)."""
        return self.index(self.position) / len(self.task)


# -----------------------------------------------------------------------------
# Rendering: ids + supervision mask -> (inputs, targets), with long conversations truncated and counted


@dataclass
class PackingStats:
    """What happened to the conversations on their way into rows (per rank; `merge_stats` adds ranks up)."""
    conversations: int = 0  # conversations placed in rows
    truncated: int = 0  # of those, longer than a row: the row holds their beginning, the rest is cut off
    truncated_tokens: int = 0  # tokens cut off the truncated conversations
    dropped: int = 0  # not placed: nothing left to supervise after truncation (e.g. a very long user turn)
    tokens: int = 0  # tokens placed in rows
    supervised_tokens: int = 0  # targets that count in the loss
    padding_tokens: int = 0  # row positions no conversation filled

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def count_placed(self, rendered: RenderedConversation) -> None:
        self.conversations += 1
        self.tokens += len(rendered.ids)
        self.supervised_tokens += sum(rendered.mask[1:])
        if rendered.full_length > len(rendered.ids):
            self.truncated += 1
            self.truncated_tokens += rendered.full_length - len(rendered.ids)


def merge_stats(per_rank: Iterable[dict]) -> PackingStats:
    total = PackingStats()
    for stats in per_rank:
        for field in fields(PackingStats):
            setattr(total, field.name, getattr(total, field.name) + stats[field.name])
    return total


@dataclass
class RenderedConversation:
    ids: list[int]
    mask: list[int]  # 1 = supervised
    full_length: int  # tokens before truncation


def render_for_training(tokenizer: Tokenizer, conversation: dict, max_tokens: int,
                        stats: PackingStats) -> RenderedConversation | None:
    """Render a conversation, truncated to max_tokens. Returns None (and counts it as dropped) when no supervised
    token would be left to predict: a row without targets teaches nothing and makes a mean loss NaN."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=1 << 30)
    rendered = RenderedConversation(ids[:max_tokens], mask[:max_tokens], len(ids))
    if not any(rendered.mask[1:]):  # token 0 (<|bos|>) is never a target
        stats.dropped += 1
        return None
    return rendered


def targets_from_mask(ids: list[int], mask: list[int]) -> list[int]:
    """Next-token targets of ids[:-1]: ids[j + 1] where that token is supervised, else -1 (ignored by the loss)."""
    return [token if supervised else -1 for token, supervised in zip(ids[1:], mask[1:])]


def collate_padded(sequences: list[tuple[list[int], list[int]]], pad_id: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (B, longest - 1) from (ids, mask) pairs; padding is `pad_id` in the inputs and
    -1 in the targets, so it never counts."""
    length = max(len(ids) for ids, _ in sequences) - 1
    inputs = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), length), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        targets[row, :n] = torch.tensor(targets_from_mask(ids, mask), dtype=torch.long)
    return inputs.to(device), targets.to(device)


# -----------------------------------------------------------------------------
# Midtraining rows: whole conversations packed best-fit into fixed-length rows


class ConversationPacker:
    """Packs whole conversations into rows of `max_seq_len + 1` tokens (a row gives max_seq_len inputs and
    max_seq_len targets). A conversation never continues into the next row: each row takes, from a lookahead
    buffer of rendered conversations, the longest one that still fits, until none does, and pads the rest.
    Best fit keeps the padding low (the first-fit-in-order alternative wastes about half a conversation per row).
    A conversation longer than a row is truncated to the row and counted in `stats`.

    State: the stream position and the positions of the buffered conversations (re-rendered on resume)."""

    def __init__(self, stream: ConversationStream, tokenizer: Tokenizer, max_seq_len: int, buffer_size: int = 64,
                 state: dict | None = None):
        self.stream = stream
        self.tokenizer = tokenizer
        self.row_len = max_seq_len + 1
        self.buffer_size = buffer_size
        self.pad_id = tokenizer.get_bos_token_id()
        self.stats = PackingStats()  # counts conversations when they are placed, not when they enter the buffer
        self.buffer: list[tuple[int, RenderedConversation]] = []  # (stream position, rendered)
        if state is not None:
            self.stream.position = state["position"]
            self.stats = PackingStats(**state["stats"])
            for position in state["buffer"]:
                rendered = render_for_training(tokenizer, stream.conversation(position), self.row_len, PackingStats())
                assert rendered is not None, "only conversations with supervised tokens enter the buffer"
                self.buffer.append((position, rendered))

    def state_dict(self) -> dict:
        return {"position": self.stream.position, "buffer": [position for position, _ in self.buffer],
                "stats": self.stats.as_dict()}

    def _fill_buffer(self) -> None:
        while len(self.buffer) < self.buffer_size:
            position, conversation = self.stream.take()
            rendered = render_for_training(self.tokenizer, conversation, self.row_len, self.stats)
            if rendered is not None:
                self.buffer.append((position, rendered))

    def next_row(self) -> tuple[list[int], list[int]]:
        """(ids, mask) of one row, exactly row_len long."""
        ids: list[int] = []
        mask: list[int] = []
        while True:
            self._fill_buffer()
            space = self.row_len - len(ids)
            fitting = [i for i, (_, rendered) in enumerate(self.buffer) if len(rendered.ids) <= space]
            if not fitting:
                break
            # longest first; among equals the earliest, so the order is deterministic
            best = max(fitting, key=lambda i: (len(self.buffer[i][1].ids), -i))
            _, rendered = self.buffer.pop(best)
            self.stats.count_placed(rendered)
            ids += rendered.ids
            mask += rendered.mask
        self.stats.padding_tokens += self.row_len - len(ids)
        ids += [self.pad_id] * (self.row_len - len(ids))
        mask += [0] * (self.row_len - len(mask))
        return ids, mask

    def next_batch(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return collate_padded([self.next_row() for _ in range(batch_size)], self.pad_id, device)


# -----------------------------------------------------------------------------
# SFT rows: one conversation per row, padded to the longest in the batch


class PaddedBatcher:
    """Batches of single conversations, each truncated to max_seq_len + 1 tokens (counted), padded with
    <|assistant_end|> in the inputs and -1 in the targets. State: the stream position."""

    def __init__(self, stream: ConversationStream, tokenizer: Tokenizer, max_seq_len: int, state: dict | None = None):
        self.stream = stream
        self.tokenizer = tokenizer
        self.max_tokens = max_seq_len + 1
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self.stats = PackingStats()
        if state is not None:
            self.stream.position = state["position"]
            self.stats = PackingStats(**state["stats"])

    def state_dict(self) -> dict:
        return {"position": self.stream.position, "stats": self.stats.as_dict()}

    def next_batch(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        sequences = []
        while len(sequences) < batch_size:
            _, conversation = self.stream.take()
            rendered = render_for_training(self.tokenizer, conversation, self.max_tokens, self.stats)
            if rendered is not None:
                self.stats.count_placed(rendered)
                sequences.append((rendered.ids, rendered.mask))
        inputs, targets = collate_padded(sequences, self.pad_id, device)
        self.stats.padding_tokens += targets.numel() - sum(len(ids) - 1 for ids, _ in sequences)
        return inputs, targets


# -----------------------------------------------------------------------------
# Supervised training step and validation loss (mid_train and chat_sft)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def supervised_step(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], autocast) -> float:
    """Forward + backward over the micro-batches of one optimizer step (gradient accumulation) and return the
    step's loss. The loss is the mean over every supervised target of the step on all ranks, not a mean of
    per-micro-batch means: rows hold different numbers of supervised tokens, and this way the gradient does not
    depend on how the total batch is split into micro-batches and ranks."""
    device = micro_batches[0][1].device
    num_targets = all_reduce_sum(sum((targets >= 0).sum() for _, targets in micro_batches).to(device).float())
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with autocast:  # a sum, not per-token losses: the chunked loss head never holds the whole batch's logits
            target_loss_sum = model(inputs, targets, loss_reduction="sum")
        # the optimizers average gradients over ranks, so scale by world_size to get a sum over ranks
        (target_loss_sum * world_size / num_targets).backward()
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


# -----------------------------------------------------------------------------
# Stage plumbing: the model a stage starts from, its optimizers, and checkpoints that resume exactly


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str, init_lr_frac: float) -> None:
    """The flags every chat stage shares: where its model comes from, resume, device, wandb, and the optimizer's
    learning rates (those of pretraining, scaled by --init-lr-frac)."""
    parser.add_argument("--model-tag", "--tag", dest="model_tag", default=None,
                        help="model tag to start from (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="model step to start from (default: the last)")
    parser.add_argument("--resume", action="store_true", help=f"continue from the last {stage} checkpoint of this tag")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' turns wandb off)")
    optimizer = parser.add_argument_group("optimizer")
    optimizer.add_argument("--unembedding-lr", type=float, default=0.004)
    optimizer.add_argument("--embedding-lr", type=float, default=0.2)
    optimizer.add_argument("--matrix-lr", type=float, default=0.02)
    optimizer.add_argument("--weight-decay", type=float, default=0.0)
    optimizer.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                           help="learning rates as a fraction of the above")


def stage_root(stage: str) -> Path:
    return get_base_dir() / CHECKPOINT_DIRS[stage]


def has_checkpoint(directory: Path) -> bool:
    """Whether directory (a stage root or one tag) holds a complete checkpoint (its meta file is written last)."""
    return directory.is_dir() and any(directory.glob("**/meta_*.json"))


def missing_checkpoint_error(stage: str, directory: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no {stage} checkpoint in {directory}: run {PRODUCERS[stage]} first")


def source_tag(stage: str, tag: str | None) -> str:
    """The tag a stage reads from and writes under: the one asked for, else the deepest one of its source stage."""
    root = stage_root(stage)
    if tag is None:
        if not has_checkpoint(root):
            raise missing_checkpoint_error(stage, root)
        return find_largest_tag(root)
    if not has_checkpoint(root / tag):
        tags = sorted(p.name for p in root.iterdir() if has_checkpoint(p)) if root.is_dir() else []
        raise FileNotFoundError(f"no {stage} checkpoint in {root / tag}: run {PRODUCERS[stage]} first"
                                + (f", or pick one of the tags {tags}" if tags else ""))
    return tag


def load_stage_model(stage: str, device: torch.device, tag: str, step: int | None = None):
    """(model, tokenizer, meta) of a stage's checkpoint, for training. checkpoint.load_model refuses a model whose
    tokenizer fingerprint differs from the tokenizer on disk, naming both and the fix."""
    return load_model(stage, device, phase="train", tag=tag, step=step)


def setup_optimizers(model, unembedding_lr: float, embedding_lr: float, matrix_lr: float, weight_decay: float,
                     init_lr_frac: float) -> list[torch.optim.Optimizer]:
    """The pretraining optimizers (Muon + AdamW), every learning rate scaled by init_lr_frac: finetuning starts from
    a trained model, which a pretraining-sized step would knock off its minimum. `initial_lr` is what the stage's
    schedule multiplies."""
    optimizers = model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                        matrix_lr=matrix_lr, weight_decay=weight_decay)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * init_lr_frac
            group["initial_lr"] = group["lr"]
    return optimizers


def set_lr_multiplier(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def save_stage_checkpoint(stage: str, tag: str, step: int, model, optimizers: list[torch.optim.Optimizer],
                          tokenizer: Tokenizer, rank_state: dict, extra_meta: dict, rank: int) -> Path:
    """Every rank calls this: the per-rank data position and RNG are gathered into the meta, rank 0 writes the model
    and the meta, every rank its own optimizer shard."""
    rank_states = gather_rank_states(rank_state)
    directory = stage_root(stage) / tag
    meta = model_meta(model.config, tokenizer, step, stage=stage, rank_states=rank_states, **extra_meta)
    save_checkpoint(directory, step, model.state_dict() if rank == 0 else None,
                    [optimizer.state_dict() for optimizer in optimizers], meta, rank=rank)
    print0(f"saved {stage} checkpoint step {step} to {directory}")
    return directory


def resume_stage(stage: str, tag: str, device: torch.device, rank: int, world_size: int):
    """(model, tokenizer, meta, this rank's optimizer states, this rank's data/RNG state) of a stage's own last
    checkpoint."""
    directory = stage_root(stage) / tag
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"--resume: no {stage} checkpoint in {directory} to resume from; "
                                f"run {PRODUCERS[stage]} without --resume to start the stage")
    step = find_last_step(directory)
    where = f"{directory} step {step}"
    model_state, optimizer_states, meta = load_checkpoint(directory, step, device, load_optimizer=True, rank=rank)
    if "rank_states" not in meta:
        raise ValueError(f"{where} holds no training state to resume from (written by another tool?): "
                         f"run {PRODUCERS[stage]} without --resume to start over")
    rank_state = pick_rank_state(meta["rank_states"], rank, world_size, where)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, meta_path(directory, step))
    model = build_model(meta, device, "train", model_state, source=str(directory))
    return model, tokenizer, meta, optimizer_states, rank_state
