"""Your own conversations: a jsonl file, one conversation a line in the chat format of ARCHITECTURE.md:
{"messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}]}, an assistant part being
{"type": "text"|"python"|"python_output", "text": str}. Every line is checked when the task is built, so a bad line
stops a run before it starts, naming the file, the line and what is wrong.

On the command line (`chat_sft`, `mid_train`): `--conversations FILE.jsonl[:WEIGHT]`, repeatable; WEIGHT (a whole
number, default 1) is how many times the file's conversations appear in the mixture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nanochat.tokenizer import validate_conversation
from tasks.common import MalformedDataError, Task
from tasks.identity import load_identity


def read_conversations(path: Path) -> list[dict]:
    """The conversations of a jsonl file, each checked; raises MalformedDataError at the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--conversations: no file {path}")
    conversations = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                conversation = json.loads(line)
            except json.JSONDecodeError as e:
                raise MalformedDataError(f"{where}: not valid JSON ({e.msg})") from None
            try:
                messages = validate_conversation(conversation)
            except ValueError as e:
                raise MalformedDataError(f"{where}: {e}") from None
            if not any(message["role"] == "assistant" for message in messages):
                raise MalformedDataError(f"{where}: no assistant message, so nothing to learn from; add the reply")
            conversations.append({"messages": conversation["messages"]})
    if not conversations:
        raise MalformedDataError(f"{path}: holds no conversations")
    return conversations


def conversation_file(value: str) -> tuple[str, int]:
    """argparse type of --conversations: FILE.jsonl[:WEIGHT] -> (path, weight) (a str: flags go into JSON metas)."""
    path, _, weight = value.rpartition(":") if ":" in value else (value, "", "1")
    if not weight.isdigit() or int(weight) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: the weight after ':' must be a whole number >= 1 "
                                         "(FILE.jsonl or FILE.jsonl:3)")
    return path, int(weight)


def add_conversation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=conversation_file, action="append", default=[],
                        metavar="FILE.jsonl[:WEIGHT]",
                        help="your own conversations (repeatable), WEIGHT times in the mixture (default 1)")
    parser.add_argument("--mix", choices=["default", "none"], default="default",
                        help="keep the built-in mixture beside your conversations (default) or train on yours alone")
    parser.add_argument("--identity", default=None, metavar="FILE.json",
                        help="who the model says it is: identity templates of tasks/identity.json's shape (default: "
                             "that file, nanochat's own)")


def check_conversation_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.mix == "none" and not args.conversations:
        parser.error("--mix none trains on your conversations alone: give at least one --conversations FILE.jsonl")
    if args.identity is not None:
        try:
            load_identity(Path(args.identity))
        except (MalformedDataError, FileNotFoundError) as e:
            parser.error(str(e))


def custom_tasks(files: list[tuple[str, int]]) -> dict[str, CustomConversations]:
    """The tasks of the --conversations files, every line checked now (before any model or checkpoint is touched)."""
    return {Path(path).name + (f" x{weight}" if weight > 1 else ""): CustomConversations(Path(path), weight)
            for path, weight in files}


class CustomConversations(Task):
    """The conversations of one file, `weight` times over."""

    def __init__(self, path: Path, weight: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.path, self.weight = Path(path), weight
        self.conversations = read_conversations(self.path)

    def num_examples(self) -> int:
        return len(self.conversations) * self.weight

    def get_example(self, index: int) -> dict:
        return self.conversations[index % len(self.conversations)]
