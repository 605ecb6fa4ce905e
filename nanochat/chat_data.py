"""Chat training data: conversations from tasks -> token rows whose targets supervise only what the assistant wrote.

Shared by the three chat stages:
  mid_train  packs several whole conversations into each fixed-length row (ConversationPacker)
  chat_sft   puts one conversation per row and pads (PaddedBatcher)
  chat_rl    pads its sampled rollouts the same way (collate_padded)
Every source of rows is resumable: its state is a few integers that go into the checkpoint meta, one entry per
rank, so a resumed run sees exactly the rows the interrupted one would have seen next. The training machinery around
the rows (the supervised step, validation loss, checkpoints, resume) is nanochat/training.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import torch

from nanochat.tokenizer import Tokenizer

# What padded rows are filled with: any token does (padding is never a target), this one is already in every
# vocabulary and ends a reply, so a padded row reads as a finished conversation.
PAD_TOKEN = "<|assistant_end|>"

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
        self.pad_id = tokenizer.encode_special(PAD_TOKEN)
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
