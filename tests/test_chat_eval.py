"""Chat evaluation: letter choice from logits, pass@k over sampled completions, ChatCORE, and a whole run of
scripts.chat_eval on a tiny checkpoint with a dataset that is not available offline."""

from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from nanochat.gpt import GPT, model_config_from_depth
from scripts import chat_eval
from tasks.arc import ARC
from tasks.gsm8k import GSM8K


def test_chatcore_centers_each_task_against_random_guessing():
    assert chat_eval.chatcore({"ARC-Easy": 0.625, "GSM8K": 0.1}) == pytest.approx((0.5 + 0.1) / 2)
    assert chat_eval.chatcore({"MMLU": 0.25, "HumanEval": 0.0}) == 0.0
    assert math.isnan(chat_eval.chatcore({}))


class LetterOracle(nn.Module):
    """Puts a high logit on a chosen letter right after each known prompt (and nowhere else)."""

    def __init__(self, tokenizer, prompts: list[list[int]], letters: list[str]):
        super().__init__()
        self.vocab_size = tokenizer.get_vocab_size()
        self.answer_after = {tuple(p): tokenizer.encode(letter)[0] for p, letter in zip(prompts, letters)}

    def get_device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                letter = self.answer_after.get(tuple(row[:t + 1]))
                if letter is not None:
                    logits[b, t, letter] = 20.0
        return logits


def test_categorical_eval_takes_the_offered_letter_with_the_highest_logit(tiny_tokenizer):
    task = ARC("ARC-Easy", "test", stop=10)
    conversations = [task[i] for i in range(len(task))]
    prompts = [tiny_tokenizer.render_for_completion(c) for c in conversations]
    gold = [c["messages"][1]["content"] for c in conversations]
    wrong = [next(x for x in c["letters"] if x != g) for c, g in zip(conversations, gold)]
    # answer right on the first 7 questions and wrong on the last 3; batches of 3 pad prompts of unequal length
    chosen = gold[:7] + wrong[7:]
    model = LetterOracle(tiny_tokenizer, prompts, chosen)
    accuracy = chat_eval.run_categorical_eval(task, tiny_tokenizer, model, 3, len(task), nullcontext())
    assert accuracy == pytest.approx(0.7)
    # a letter that is not on offer never wins, however high its logit
    not_offered = LetterOracle(tiny_tokenizer, prompts, ["Z"] * len(prompts))
    first_letter = sum(g == c["letters"][0] for c, g in zip(conversations, gold)) / len(conversations)
    assert chat_eval.run_categorical_eval(task, tiny_tokenizer, not_offered, 4, len(task), nullcontext()) \
        == pytest.approx(first_letter)  # all offered letters tie: the first one is taken


class ScriptedEngine:
    """Engine.generate_batch stand-in that answers every prompt with the given completions (one per sample)."""

    def __init__(self, tokenizer, completions: list[str]):
        self.tokenizer, self.completions = tokenizer, completions
        self.model = argparse.Namespace(get_device=lambda: torch.device("cpu"))
        self.calls = []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append((num_samples, kwargs))
        return [list(tokens) + self.tokenizer.encode(c) for c in self.completions[:num_samples]], None


def test_generative_eval_is_pass_at_k(tiny_tokenizer):
    task = GSM8K("main", "test", stop=4)
    answers = [task[i]["messages"][1]["content"][-1]["text"].split("#### ")[-1] for i in range(len(task))]
    assert len(set(answers)) == 4  # distinct answers, so a fixed completion solves one problem only
    args = argparse.Namespace(num_samples=2, max_new_tokens=16, temperature=0.8, top_k=5)
    one_right = ScriptedEngine(tiny_tokenizer, ["#### -1", f"#### {answers[2]}"])
    assert chat_eval.run_generative_eval(task, tiny_tokenizer, one_right, len(task), args, nullcontext()) == 0.25
    assert one_right.calls[0] == (2, {"max_tokens": 16, "temperature": 0.8, "top_k": 5, "seed": 42})
    args.num_samples = 1  # pass@1 sees only the first, wrong, sample
    assert chat_eval.run_generative_eval(task, tiny_tokenizer, one_right, len(task), args, nullcontext()) == 0.0


def test_the_task_list_flag_is_checked():
    assert chat_eval.parse_args(["-a", "GSM8K|ARC-Easy"]).task_names == ["GSM8K", "ARC-Easy"]
    assert chat_eval.parse_args([]).task_names == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
    with pytest.raises(SystemExit):
        chat_eval.parse_args(["-a", "ARC-Easy|Jeopardy"])


def write_checkpoint(base_dir: Path, stage_dir: str, tokenizer) -> None:
    """A tiny random GPT saved as a stage's checkpoint, with the tokenizer, as the training scripts leave them."""
    from nanochat.checkpoint import save_checkpoint

    tokenizer.save(base_dir / "tokenizer")
    config = model_config_from_depth(2, tokenizer.get_vocab_size(), sequence_len=256)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    meta = {"model_config": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(), "step": 3}
    save_checkpoint(base_dir / stage_dir / "d2", 3, model.state_dict(), None, meta)


def test_chat_eval_runs_end_to_end_and_reports_missing_tasks_with_their_reason(tiny_tokenizer, base_dir, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # MMLU is not in the mirror: make its download fail at once instead of retrying for half a minute
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_checkpoint(base_dir, "chatsft_checkpoints", tiny_tokenizer)
    assert chat_eval.main(["-i", "sft", "-a", "ARC-Easy|MMLU|GSM8K|HumanEval|SpellingBee", "--max-problems", "3",
                           "--max-new-tokens", "4", "--device-type", "cpu"]) == 0
    section = json.loads((base_dir / "report" / "chat-evaluation-sft.json").read_text())
    assert section["section"] == "Chat evaluation sft"
    values = {k: v for item in section["data"] if isinstance(item, dict) for k, v in item.items()}
    for name in ("ARC-Easy", "GSM8K", "HumanEval", "SpellingBee"):
        assert 0.0 <= values[name] <= 1.0
    assert "MMLU" not in values  # missing, not a zero
    assert "cais/mmlu" in values["Missing tasks"]["MMLU"]
    assert values["ChatCORE tasks evaluated"] == "4/5"
    assert math.isfinite(values["ChatCORE metric"])
    assert values["step"] == 3


def test_chat_eval_raises_a_bug_in_a_task_instead_of_reporting_it_missing(tiny_tokenizer, base_dir, monkeypatch):
    def buggy():
        raise ValueError("a bug, not a missing dataset")

    monkeypatch.setitem(chat_eval.TASKS, "GSM8K", buggy)
    write_checkpoint(base_dir, "chatsft_checkpoints", tiny_tokenizer)
    with pytest.raises(ValueError, match="a bug, not a missing dataset"):
        chat_eval.main(["-i", "sft", "-a", "GSM8K", "--device-type", "cpu"])
