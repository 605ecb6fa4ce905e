"""The pretraining data loader: documents -> BOS-delimited rows of tokens -> (inputs, targets) batches of shape (B, T).
Two packings: "stream" (the default, below) and "best_fit" (BestFitPacker: every row starts at a document's BOS).

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

from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import RowGroupPosition, iter_row_groups, read_row_group, split_shards

PACKINGS = ("stream", "best_fit")
# Documents best_fit chooses among. More choice fills rows with fewer cut tokens; the cost is memory (~1000 docs of
# ~1k tokens is ~8MB per rank) and a resume that re-reads the row groups those documents came from.
BEST_FIT_BUFFER_DOCS = 1000


class ResumeStateError(ValueError):
    """A well-formed resume state that belongs to another run (packing, ranks, shard set, row length)."""


class DistributedTokenLoader:
    """Iterator of (inputs, targets), int64 tensors of shape (batch_size, seq_len) on `device`, forever (the data
    repeats in new epochs). Under torchrun every rank reads different documents."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str, device: torch.device | str = "cpu",
                 resume_state: dict | None = None, tokenizer_threads: int = 4, data_dir: Path | None = None,
                 rank: int | None = None, world_size: int | None = None, packing: str = "stream"):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        ranks = get_dist_info()
        self.rank = ranks.rank if rank is None else rank
        self.world_size = ranks.world_size if world_size is None else world_size
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len = batch_size, seq_len
        self.split = split
        self.device = torch.device(device)
        self.tokenizer_threads = tokenizer_threads
        self.shard_paths = split_shards(split, data_dir)
        self.shard_names = [path.name for path in self.shard_paths]
        self.packing = packing
        if packing == "best_fit":
            self._start_best_fit(resume_state, data_dir)
            return

        resume_from, skip = parse_resume_state(self._check_resume_state, resume_state)
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
        self._check_state_owner(state)
        return self._saved_position(state), int(state["offset"])

    def _check_state_owner(self, state: dict) -> None:
        """Raise unless `state` came from a loader like this one (same packing, split, rank and world size)."""
        saved_packing = state.get("packing", "stream")  # a stream state has no "packing" key (as before best_fit)
        if saved_packing != self.packing:
            raise ResumeStateError(f"the dataloader state is for packing {saved_packing!r} but this loader packs "
                                   f"{self.packing!r}: resume with --packing {saved_packing}")
        saved_split, saved_rank, saved_world = state["split"], int(state["rank"]), int(state["world_size"])
        if (saved_split, saved_rank, saved_world) != (self.split, self.rank, self.world_size):
            raise ResumeStateError(f"the dataloader state is for split {saved_split!r}, rank {saved_rank} of "
                                   f"{saved_world}, but this loader is split {self.split!r}, rank {self.rank} of "
                                   f"{self.world_size}: resume with the same number of processes the run was started "
                                   "with")

    def _saved_position(self, saved: dict) -> RowGroupPosition:
        """The row group a state names ({epoch, shard, shard_name, row_group}), checked against the shard list."""
        position = RowGroupPosition(int(saved["epoch"]), int(saved["shard"]), int(saved["row_group"]))
        shard_name = saved["shard_name"]
        if position.shard >= len(self.shard_names) or self.shard_names[position.shard] != shard_name:
            raise ResumeStateError(f"the dataloader state points at {shard_name} (shard #{position.shard} of the "
                                   f"{self.split} split), but the shard directory now lists it differently: resume "
                                   "with the shard set the run started with")
        return position

    def _position_state(self, position: RowGroupPosition) -> dict:
        return {"epoch": position.epoch, "shard": position.shard, "shard_name": self.shard_names[position.shard],
                "row_group": position.row_group}

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
    # best_fit: the loader reads and tokenizes row groups, BestFitPacker makes the rows

    def _start_best_fit(self, state: dict | None, data_dir: Path | None) -> None:
        buffered, read_through = parse_resume_state(self._check_best_fit_state, state)
        # the row group after the last one the packer took: a position sorts before every later row group
        resume_from = (None if read_through is None else
                       RowGroupPosition(read_through.epoch, read_through.shard, read_through.row_group + 1))
        self._row_groups = iter_row_groups(self.split, self.rank, self.world_size, data_dir, resume_from, loop=True)
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._next_row_group = self._prefetcher.submit(self._read_and_tokenize_documents)
        self._packer = BestFitPacker(self.seq_len + 1, self._take_row_group, BEST_FIT_BUFFER_DOCS)
        for position, indices in buffered:  # the buffer as it was: its documents, in the order they arrived
            texts = read_row_group(self.shard_paths[position.shard], position.row_group)
            if max(indices) >= len(texts):
                raise ResumeStateError(f"the dataloader state names document {max(indices)} of row group "
                                       f"{position.row_group} in {self.shard_names[position.shard]}, which has "
                                       f"{len(texts)}: resume with the shard set the run started with")
            self._packer.add_row_group(position, self._tokenize([texts[i] for i in indices]), indices)
        self._packer.read_through = read_through

    def _check_best_fit_state(self, state: dict | None) -> tuple[list[tuple[RowGroupPosition, list[int]]],
                                                                  RowGroupPosition | None]:
        if state is None:
            return [], None
        self._check_state_owner(state)
        if int(state["seq_len"]) != self.seq_len:
            raise ResumeStateError(f"the dataloader state packed rows for seq_len {state['seq_len']}, this loader's "
                                   f"is {self.seq_len}: resume with --max-seq-len {state['seq_len']}")
        if int(state["buffer_docs"]) != BEST_FIT_BUFFER_DOCS:  # another buffer would choose other documents
            raise ResumeStateError(f"the dataloader state is from a best_fit buffer of {state['buffer_docs']} "
                                   f"documents, this version's is {BEST_FIT_BUFFER_DOCS}: resume with the version of "
                                   "nanochat the run started with")
        read_through = state["read_through"] and self._saved_position(state["read_through"])
        buffered = [(self._saved_position(group), [int(i) for i in group["docs"]]) for group in state["buffered"]]
        if any(not indices for _, indices in buffered):
            raise ValueError("a buffered row group without documents")
        return buffered, read_through

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)

    def _read_and_tokenize_documents(self) -> tuple[RowGroupPosition, list[list[int]]]:
        position, texts = next(self._row_groups)
        return position, self._tokenize(texts)

    def _take_row_group(self) -> tuple[RowGroupPosition, list[list[int]]]:
        position, docs = self._next_row_group.result()
        self._next_row_group = self._prefetcher.submit(self._read_and_tokenize_documents)
        return position, docs

    # -------------------------------------------------------------------------
    # Iteration and state

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        if self.packing == "best_fit":
            rows = self._packer.next_rows(B)  # (B, T + 1): each row's inputs and targets, shifted by one
            pair = self._to_device(np.stack([rows[:, :-1], rows[:, 1:]]).reshape(-1)).view(2, B, T)
            return pair[0], pair[1]
        self._fill(B * T + 1)
        window = self._tokens[self._read:self._read + B * T + 1]
        self._consume(B * T)  # the last token stays: it is the next batch's first input
        batch = self._to_device(window)
        return batch[:-1].view(B, T), batch[1:].view(B, T)

    def _to_device(self, tokens: np.ndarray) -> torch.Tensor:
        if self.device.type == "cuda":
            # pinned host memory lets the copy run asynchronously with the GPU's work on the previous batch
            staging = torch.empty(len(tokens), dtype=torch.int64, pin_memory=True)
            staging.copy_(torch.from_numpy(tokens))
            return staging.to(self.device, non_blocking=True)
        return torch.from_numpy(tokens.copy()).to(self.device)

    def state_dict(self) -> dict:
        """JSON-serializable position of the next batch (see the module docstring)."""
        if self.packing == "best_fit":
            packer = self._packer
            return {"packing": "best_fit", "split": self.split, "rank": self.rank, "world_size": self.world_size,
                    "seq_len": self.seq_len, "buffer_docs": packer.buffer_docs,
                    "read_through": packer.read_through and self._position_state(packer.read_through),
                    "buffered": [{**self._position_state(position), "docs": indices}
                                 for position, indices in packer.buffered_documents()]}
        if not self._segments:
            return self._initial_state or {
                "split": self.split, "rank": self.rank, "world_size": self.world_size, "epoch": 0, "shard": 0,
                "shard_name": self.shard_names[0], "row_group": 0, "offset": 0,
            }
        position, _ = self._segments[0]
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size, "epoch": position.epoch,
                "shard": position.shard, "shard_name": self.shard_names[position.shard],
                "row_group": position.row_group, "offset": self._consumed_in_first}

    @property
    def discarded_fraction(self) -> float:
        """Share of the tokens this loader took in that no row holds (best_fit cuts; stream discards nothing)."""
        return self._packer.discarded_fraction if self.packing == "best_fit" else 0.0

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)


def parse_resume_state(parse: Callable, state: dict | None):
    """parse(state), with a state that is not even well-formed reported as such (a KeyError is no message)."""
    try:
        return parse(state)
    except ResumeStateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"dataloader resume state {state!r} is malformed ({e}): resume from a checkpoint "
                         "written by this version of scripts/base_train.py") from e


# -----------------------------------------------------------------------------
# Best-fit packing


class BestFitPacker:
    """Rows of `row_len` tokens, each starting with a document's BOS, packed from a buffer of tokenized documents.

    Before each document is chosen, the buffer is topped up to `buffer_docs` documents, a whole row group at a time
    (so it holds at most buffer_docs - 1 + one row group). A row is filled by repeatedly taking the longest buffered
    document that fits the space left (ties: the one that arrived first). When none fits, the space left is filled
    with the start of the shortest buffered document and the rest of that document is dropped: every buffered
    document is then longer than the space, and the shortest loses the fewest tokens. So a document is only cut when
    no whole one fits, and every position of a row predicts the next token of its row, as in stream packing.

    A document longer than a row is cut to its first row_len tokens as it enters the buffer, and its rest dropped:
    the rest has no BOS, so it could not start a row, only follow another document with no delimiter between them.
    The head then fills an empty row exactly, so the next row to start takes it.

    The buffer holds whole documents only (a cut one leaves it), so naming them is an exact resume state: each
    buffered document's row group and index, in arrival order, plus the last row group taken in (`read_through`).
    """

    def __init__(self, row_len: int, take_row_group: Callable[[], tuple[RowGroupPosition, list[list[int]]]],
                 buffer_docs: int = BEST_FIT_BUFFER_DOCS):
        self.row_len = row_len
        self.buffer_docs = buffer_docs
        self._take_row_group = take_row_group
        self.read_through: RowGroupPosition | None = None  # the last row group the buffer took in
        self._by_length: list[tuple[int, int]] = []  # (length, -arrival), sorted: ties sort the oldest last
        # arrival -> (tokens, row group slot, doc index, tokens cut off a document longer than a row)
        self._docs: dict[int, tuple[np.ndarray, int, int, int]] = {}
        self._groups: dict[int, list] = {}  # row group slot -> [position, documents still buffered]
        self._arrivals = 0
        self._row_groups_added = 0
        self.tokens_packed = 0
        self.tokens_discarded = 0

    def add_row_group(self, position: RowGroupPosition, docs: list[list[int]], indices: list[int] | None = None):
        """Buffer a row group's documents (or, resuming, those of `indices`, given in `docs`)."""
        slot = self._row_groups_added
        self._row_groups_added += 1
        self._groups[slot] = [position, 0]
        for index, tokens in zip(range(len(docs)) if indices is None else indices, docs):
            dropped = max(0, len(tokens) - self.row_len)  # counted as discarded when the head is used
            tokens = tokens[:self.row_len]
            arrival = self._arrivals
            self._arrivals += 1
            self._docs[arrival] = (np.asarray(tokens, dtype=np.int64), slot, index, dropped)
            self._groups[slot][1] += 1
            insort(self._by_length, (len(tokens), -arrival))
        if not self._groups[slot][1]:
            del self._groups[slot]

    def next_rows(self, count: int) -> np.ndarray:
        rows = np.empty((count, self.row_len), dtype=np.int64)
        for row in rows:
            self._fill_row(row)
        self.tokens_packed += rows.size
        return rows

    def _fill_row(self, row: np.ndarray) -> None:
        filled = 0
        while filled < self.row_len:
            self._top_up()
            space = self.row_len - filled
            longest_fitting = bisect_right(self._by_length, (space, 0)) - 1
            if longest_fitting >= 0:
                tokens = self._pop(longest_fitting)
                row[filled:filled + len(tokens)] = tokens
                filled += len(tokens)
            else:  # nothing fits: the shortest document, cut
                tokens = self._pop(0)
                row[filled:] = tokens[:space]
                self.tokens_discarded += len(tokens) - space
                filled = self.row_len

    def _top_up(self) -> None:
        while len(self._docs) < self.buffer_docs:
            position, docs = self._take_row_group()
            self.add_row_group(position, docs)
            self.read_through = position

    def _pop(self, i: int) -> np.ndarray:
        _, negative_arrival = self._by_length.pop(i)
        tokens, slot, _, dropped = self._docs.pop(-negative_arrival)
        self.tokens_discarded += dropped
        self._groups[slot][1] -= 1
        if not self._groups[slot][1]:
            del self._groups[slot]
        return tokens

    def buffered_documents(self) -> list[tuple[RowGroupPosition, list[int]]]:
        """(row group, indices of its buffered documents) for each row group with some, in arrival order."""
        indices: dict[int, list[int]] = {}
        for arrival in sorted(self._docs):
            _, slot, index, _ = self._docs[arrival]
            indices.setdefault(slot, []).append(index)
        return [(self._groups[slot][0], group_indices) for slot, group_indices in indices.items()]

    @property
    def discarded_fraction(self) -> float:
        """Of the tokens of the documents used so far, the share no row holds."""
        return self.tokens_discarded / max(1, self.tokens_discarded + self.tokens_packed)
