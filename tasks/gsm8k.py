"""
GSM8K: grade-school math word problems with worked solutions. https://arxiv.org/abs/2110.14168
Hugging Face `openai/gsm8k` schema (question, answer); the answer's calculator annotations `<<48/2=24>>`
become a python tool call ("48/2") and its output ("24"), and it ends with `#### <number>`.
Mirror at $NANOCHAT_DATA_DIR/gsm8k/<subset>/<split>.jsonl.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from tasks.common import Task, load_rows, shuffled_indices

SUBSETS = ("main", "socratic")
ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]*)?|-?\.[0-9]+)")
CALCULATOR_RE = re.compile(r"(<<[^>]*>>)")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number so that "1,000", "1000.00" and "1000." all compare equal."""
    text = text.replace(",", "").rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalised number after the first '#### ', or None when there is none."""
    match = ANSWER_RE.search(text)
    return normalize_number(match.group(1)) if match else None


def solution_to_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into assistant parts: text, and a python call + its output per <<expr=result>>."""
    parts = []
    for piece in CALCULATOR_RE.split(answer):
        if not piece:
            continue
        if piece.startswith("<<") and piece.endswith(">>"):
            expression, _, result = piece[2:-2].rpartition("=")
            if not expression:  # an annotation without '=' is all expression
                expression, result = result, ""
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", **kwargs: Any):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.rows = load_rows(("gsm8k", subset, f"{split}.jsonl"), "openai/gsm8k", subset, split,
                              required_keys=("question", "answer"))
        self.order = shuffled_indices(len(self.rows))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[self.order[index]]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference
