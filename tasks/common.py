"""
Datasets as Tasks: a Task is a sliceable, indexable view over a dataset of conversations that also knows how
to score a model's answer. Every loader looks in the local mirror first ($NANOCHAT_DATA_DIR/<name>/..., files
in the upstream schema) and only then asks the Hugging Face hub (datasets.load_dataset).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nanochat.common import get_data_dir, print0


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither in the local mirror nor downloadable; the message says where we looked and the fix."""


class MalformedDataError(ValueError):
    """A data file on disk is not what its schema promises; the message names the file and line."""


# What building a task raises when its data cannot be had, and so what callers catch to leave a task out loudly.
# Only that: a bad task argument (ValueError), a malformed mirror file (MalformedDataError) or any other bug
# propagates, so that it is fixed rather than silently shrinking a mixture or an evaluation.
TASK_LOAD_ERRORS = (DatasetUnavailableError,)


# -----------------------------------------------------------------------------
# Reading data: the local mirror first, then the hub


def read_jsonl(path: Path, required_keys: Sequence[str] = ()) -> list[dict]:
    """All records of a jsonl file, each a dict holding `required_keys`; blank lines are skipped."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MalformedDataError(f"{path}:{line_number}: not valid JSON ({e.msg}); fix or re-download the "
                                         "file") from None
            if not isinstance(row, dict):
                raise MalformedDataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required_keys if key not in row]
            if missing:
                raise MalformedDataError(f"{path}:{line_number}: missing key(s) {missing}; every record needs "
                                         f"{list(required_keys)}")
            rows.append(row)
    return rows


def load_rows(mirror_parts: Sequence[str], hub_path: str, hub_config: str | None, split: str,
              required_keys: Sequence[str] = ()) -> Sequence[dict]:
    """Rows of one dataset split: `$NANOCHAT_DATA_DIR/<mirror_parts>` (jsonl) if present, else the hub.
    Returns something with len() and [int] -> dict (a list, or a datasets.Dataset that stays on disk)."""
    data_dir = get_data_dir()
    mirror_file = data_dir.joinpath(*mirror_parts) if data_dir is not None else None
    if mirror_file is not None and mirror_file.exists():
        return read_jsonl(mirror_file, required_keys)
    from datasets import load_dataset

    # Every way the hub has of not providing a dataset is an OSError: unreachable or offline (ConnectionError), no
    # such dataset or a gated one (DatasetNotFoundError, a FileNotFoundError), an HTTP error (HfHubHTTPError). Anything
    # else (a ValueError for a config name that does not exist, say) is a bug here, and propagates.
    try:
        return load_dataset(hub_path, hub_config, split=split)
    except OSError as e:
        name = hub_path if hub_config is None else f"{hub_path} ({hub_config})"
        looked = mirror_file if mirror_file is not None else "$NANOCHAT_DATA_DIR (not set)"
        relative = "/".join(mirror_parts)
        reason = next(iter(str(e).splitlines()), "")  # the first line; some errors have no message
        raise DatasetUnavailableError(
            f"dataset {name}, split {split!r}, is not available: not in the local mirror (looked for {looked}) "
            f"and the download from the Hugging Face hub failed ({type(e).__name__}: {reason}). "
            f"Fix: connect to the hub (or set HF_ENDPOINT to a reachable mirror), or put the upstream records as "
            f"jsonl at $NANOCHAT_DATA_DIR/{relative} and set NANOCHAT_DATA_DIR."
        ) from e


def shuffled_indices(n: int, seed: int = 42) -> list[int]:
    """A fixed permutation: evaluations on the first N problems then see a representative mix."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# -----------------------------------------------------------------------------
# Task, and ways to combine tasks


class Task:
    """A view over examples [start:stop:step] of a dataset. Subclasses implement num_examples, get_example
    (a conversation dict) and, when evaluated, eval_type and evaluate."""

    eval_type: str = "generative"  # "categorical" (pick one of conversation["letters"]) or "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} is a training-only task")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int):
            raise TypeError(f"task indices are ints, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of {len(self)} examples")
        return self.get_example(self.start + index * self.step)


class TaskMixture(Task):
    """Several tasks as one, their examples shuffled together with a fixed seed (list a task twice to
    oversample it)."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **kwargs: Any):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        task_index, local_index = self.index_map[index]
        return self.tasks[task_index][local_index]


class TaskSequence(Task):
    """Several tasks one after the other, in order (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **kwargs: Any):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(index)


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
# Rendering shared by the multiple-choice tasks


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """A multiple-choice prompt whose answer is a single letter token.
    The letter comes after its choice ("- Paris=A") so that a small model has just read the choice when it
    sees the letter, and '=' before it means the letter is tokenized the same way as the bare answer."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str) -> dict:
    if answer not in letters:
        raise MalformedDataError(f"answer {answer!r} is not one of the letters {list(letters)} for {question[:80]!r}")
    messages = [
        {"role": "user", "content": render_mc(question, letters, choices)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "letters": list(letters)}


def evaluate_mc(conversation: dict, completion: str) -> bool:
    return completion.strip() == conversation["messages"][-1]["content"]
