"""
Identity conversations: who the assistant is ("I am nanochat ..."), generated deterministically from templates
so that midtraining and SFT can teach the model its name without any download.

The templates (its name, who made it, a few facts) are data, not code: tasks/identity.json by default, or your own
file of the same shape through `--identity FILE.json` (mid_train, chat_sft):
  {"greetings": [str], "questions": [str], "introductions": [str], "details": [str], "follow_ups": [[str, str]]}
A conversation is a greeting + a question, answered by an introduction and a detail, and sometimes a follow-up
question with its answer. Every list must be non-empty (a greeting may be "").
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.common import MalformedDataError, Task

DEFAULT_IDENTITY = Path(__file__).with_name("identity.json")
TEMPLATE_KEYS = ("greetings", "questions", "introductions", "details", "follow_ups")


def _entry_ok(key: str, value: object) -> bool:
    if key == "follow_ups":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value)
    return isinstance(value, str) and (bool(value) or key == "greetings")


def load_identity(path: Path = DEFAULT_IDENTITY) -> dict[str, list]:
    """The identity templates of a file, checked; MalformedDataError names the file and what is wrong."""
    path = Path(path)
    try:
        templates = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--identity: no file {path}") from None
    except json.JSONDecodeError as e:
        raise MalformedDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(templates, dict):
        raise MalformedDataError(f"{path}: expected an object with the keys {list(TEMPLATE_KEYS)}")
    for key in TEMPLATE_KEYS:
        values = templates.get(key)
        if not isinstance(values, list) or not values:
            raise MalformedDataError(f"{path}: {key!r} must be a non-empty list")
        for value in values:
            if not _entry_ok(key, value):
                shape = "a [question, answer] pair of non-empty strings" if key == "follow_ups" else "a non-empty string"
                raise MalformedDataError(f"{path}: every entry of {key!r} must be {shape}, got {value!r}")
    return {key: templates[key] for key in TEMPLATE_KEYS}


class IdentityConversations(Task):
    """`size` conversations; conversation i is a pure function of (templates, seed, i)."""

    def __init__(self, size: int = 1000, seed: int = 0, identity: Path | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.seed = size, seed
        self.templates = load_identity(identity or DEFAULT_IDENTITY)

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        t = self.templates
        rng = random.Random(self.seed * 1_000_003 + index)
        question = rng.choice(t["greetings"]) + rng.choice(t["questions"])
        answer = f"{rng.choice(t['introductions'])} {rng.choice(t['details'])}"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            follow_up, reply = rng.choice(t["follow_ups"])
            messages += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": reply}]
        return {"messages": messages}
