"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices. https://allenai.org/data/arc
Subsets "ARC-Easy" and "ARC-Challenge"; Hugging Face `allenai/ai2_arc` schema
(id, question, choices{text,label}, answerKey), mirror at $NANOCHAT_DATA_DIR/arc/<subset>/<split>.jsonl.
"""

from __future__ import annotations

from typing import Any

from tasks.common import Task, evaluate_mc, load_rows, mc_conversation, shuffled_indices

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, **kwargs: Any):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.rows = load_rows(("arc", subset, f"{split}.jsonl"), "allenai/ai2_arc", subset, split,
                              required_keys=("question", "choices", "answerKey"))
        self.order = shuffled_indices(len(self.rows))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[self.order[index]]
        choices = row["choices"]
        return mc_conversation(row["question"], choices["label"], choices["text"], row["answerKey"])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_mc(conversation, completion)
