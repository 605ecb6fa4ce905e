"""The pretraining data loader: documents -> BOS-delimited token stream -> (inputs, targets) batches of shape (B, T).

Each rank reads its own row groups (dataset.iter_row_groups deals them round-robin), tokenizes a whole row group at
once on several threads (tiktoken releases the GIL) in a background thread one row group ahead of need, and appends
the tokens to a buffer. A batch is the next B*T + 1 tokens of the buffer: inputs are the first B*T, targets the last
B*T; the final token stays in the buffer and is the first input of the next batch, so no token is skipped.
Documents are packed back to back, each starting with <|bos|>; a row of a batch can span documents.

Exact resume: `state_dict()` names the first row group whose tokens are still in the buffer and how many of its tokens
were consumed. A loader built with that state re-reads that row group, skips those tokens and yields exactly the batch
the uninterrupted loader would have yielded next. The state does not depend on B or T, only on the token stream.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import RowGroupPosition, iter_row_groups, split_shards


class DistributedTokenLoader:
    """Iterator of (inputs, targets), int64 tensors of shape (batch_size, seq_len) on `device`, forever (the data
    repeats in new epochs). Under torchrun every rank reads different documents."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str, device: torch.device | str = "cpu",
                 resume_state: dict | None = None, tokenizer_threads: int = 4, data_dir: Path | None = None,
                 rank: int | None = None, world_size: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        ranks = get_dist_info()
        self.rank = ranks.rank if rank is None else rank
        self.world_size = ranks.world_size if world_size is None else world_size
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len = batch_size, seq_len
        self.split = split
        self.device = torch.device(device)
        self.tokenizer_threads = tokenizer_threads
        self.shard_names = [path.name for path in split_shards(split, data_dir)]

        resume_from, skip = self._check_resume_state(resume_state)
        self._row_groups = iter_row_groups(split, self.rank, self.world_size, data_dir, resume_from, loop=True)
        self._tokens = np.empty(0, dtype=np.int64)  # the buffer; tokens before _read are consumed
        self._read = 0
        # row groups with tokens in the buffer, oldest first: [position, number of tokens]
        self._segments: deque[tuple[RowGroupPosition, int]] = deque()
        self._consumed_in_first = 0  # tokens of _segments[0] already consumed
        self._initial_state = resume_state  # what state_dict() reports before the first batch
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._next_row_group: Future = self._prefetcher.submit(self._read_and_tokenize)
        if skip:
            self._fill(skip)
            self._consume(skip)

    def _check_resume_state(self, state: dict | None) -> tuple[RowGroupPosition | None, int]:
        if state is None:
            return None, 0
        try:
            position = RowGroupPosition(int(state["epoch"]), int(state["shard"]), int(state["row_group"]))
            offset, shard_name = int(state["offset"]), state["shard_name"]
            saved_split, saved_rank, saved_world = state["split"], int(state["rank"]), int(state["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"dataloader resume state {state!r} is malformed ({e}): resume from a checkpoint "
                             "written by this version of scripts/base_train.py") from e
        if (saved_split, saved_rank, saved_world) != (self.split, self.rank, self.world_size):
            raise ValueError(f"the dataloader state is for split {saved_split!r}, rank {saved_rank} of {saved_world}, "
                             f"but this loader is split {self.split!r}, rank {self.rank} of {self.world_size}: "
                             "resume with the same number of processes the run was started with")
        if position.shard >= len(self.shard_names) or self.shard_names[position.shard] != shard_name:
            raise ValueError(f"the dataloader state points at {shard_name} (shard #{position.shard} of the "
                             f"{self.split} split), but the shard directory now lists it differently: resume with "
                             "the shard set the run started with")
        return position, offset

    # -------------------------------------------------------------------------
    # The token buffer

    def _read_and_tokenize(self) -> tuple[RowGroupPosition, np.ndarray]:
        position, texts = next(self._row_groups)
        docs = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        tokens = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=sum(map(len, docs)))
        return position, tokens

    def _fill(self, needed: int) -> None:
        """Read row groups until the buffer holds at least `needed` unconsumed tokens."""
        while len(self._tokens) - self._read < needed:
            position, tokens = self._next_row_group.result()
            self._next_row_group = self._prefetcher.submit(self._read_and_tokenize)
            self._tokens = np.concatenate([self._tokens[self._read:], tokens])
            self._read = 0
            self._segments.append((position, len(tokens)))

    def _consume(self, count: int) -> None:
        self._read += count
        self._consumed_in_first += count
        while self._segments and self._consumed_in_first >= self._segments[0][1]:
            self._consumed_in_first -= self._segments.popleft()[1]

    # -------------------------------------------------------------------------
    # Iteration and state

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        self._fill(B * T + 1)
        window = self._tokens[self._read:self._read + B * T + 1]
        self._consume(B * T)  # the last token stays: it is the next batch's first input
        if self.device.type == "cuda":
            # pinned host memory lets the copy run asynchronously with the GPU's work on the previous batch
            staging = torch.empty(B * T + 1, dtype=torch.int64, pin_memory=True)
            staging.copy_(torch.from_numpy(window))
            batch = staging.to(self.device, non_blocking=True)
        else:
            batch = torch.from_numpy(window.copy()).to(self.device)
        return batch[:-1].view(B, T), batch[1:].view(B, T)

    def state_dict(self) -> dict:
        """JSON-serializable position of the next batch (see the module docstring)."""
        if not self._segments:
            return self._initial_state or {
                "split": self.split, "rank": self.rank, "world_size": self.world_size, "epoch": 0, "shard": 0,
                "shard_name": self.shard_names[0], "row_group": 0, "offset": 0,
            }
        position, _ = self._segments[0]
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size, "epoch": position.epoch,
                "shard": position.shard, "shard_name": self.shard_names[position.shard],
                "row_group": position.row_group, "offset": self._consumed_in_first}

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
