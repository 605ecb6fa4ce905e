"""
SmolTalk: general chat conversations for supervised finetuning. https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk
Schema {"messages": [{"role", "content"}, ...]} (optional system message first, then user/assistant turns);
mirror at $NANOCHAT_DATA_DIR/smoltalk/<split>.jsonl. Training data only: there is no answer to score.
"""

from __future__ import annotations

from typing import Any

from tasks.common import Task, load_rows, shuffled_indices


class SmolTalk(Task):
    def __init__(self, split: str = "train", **kwargs: Any):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        self.rows = load_rows(("smoltalk", f"{split}.jsonl"), "HuggingFaceTB/smol-smoltalk", None, split,
                              required_keys=("messages",))
        self.order = shuffled_indices(len(self.rows))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        messages = self.rows[self.order[index]]["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
