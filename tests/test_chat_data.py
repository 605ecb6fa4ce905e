"""nanochat.chat_data: what the chat stages train on. Masks supervise only what the assistant wrote, packing never
splits a conversation silently, and every batch source resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nanochat.chat_data import (
    ConversationPacker,
    ConversationStream,
    PackingStats,
    PaddedBatcher,
    collate_padded,
    merge_stats,
    render_for_training,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import evaluate_loss, supervised_step
from tasks.arc import ARC
from tasks.common import DatasetUnavailableError, MalformedDataError, TaskMixture, load_tasks, require_tasks
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk

pytestmark = pytest.mark.usefixtures("one_thread")


class ListTask:
    """The smallest thing with the Task interface (len + int indexing) for hand-made conversations."""

    def __init__(self, conversations: list[dict]):
        self.conversations = conversations

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        return self.conversations[index]


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": role, "content": text} for role, text in zip(roles, turns)]}


def supervised_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The text of the supervised targets, as collate_padded builds them."""
    _, targets = collate_padded([(ids, mask)], pad_id=0)
    return tokenizer.decode([t for t in targets[0].tolist() if t >= 0])


def expected_assistant_text(conversation: dict) -> str:
    """Everything the assistant wrote, in order: text, python calls with their delimiters, the end token; never
    the user's text or the tool's output."""
    pieces = []
    for message in conversation["messages"]:
        if message["role"] != "assistant":
            continue
        parts = message["content"]
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
        for part in parts:
            if part["type"] == "text":
                pieces.append(part["text"])
            elif part["type"] == "python":
                pieces.append(f"<|python_start|>{part['text']}<|python_end|>")
        pieces.append("<|assistant_end|>")
    return "".join(pieces)


# -----------------------------------------------------------------------------
# Masks


def test_targets_supervise_exactly_the_assistant_text_and_tool_calls_not_user_text_or_tool_output(tiny_tokenizer):
    conversation = GSM8K(split="train")[0]  # a real problem whose solution calls the calculator tool
    assert any(part["type"] == "python_output" for part in conversation["messages"][1]["content"])
    ids, mask = tiny_tokenizer.render_conversation(conversation)
    assert supervised_text(tiny_tokenizer, ids, mask) == expected_assistant_text(conversation)


def test_multi_turn_targets_skip_every_user_turn(tiny_tokenizer):
    conversation = chat("What is 2+2?", "It is 4.", "And 3+3? Explain.", "It is 6, because 3 and 3 make 6.")
    ids, mask = tiny_tokenizer.render_conversation(conversation)
    text = supervised_text(tiny_tokenizer, ids, mask)
    assert text == "It is 4.<|assistant_end|>It is 6, because 3 and 3 make 6.<|assistant_end|>"


def test_padding_is_never_a_target(tiny_tokenizer):
    short, long = chat("hi", "hello"), chat("tell me a story", "once upon a time there was a tiny model")
    sequences = [tiny_tokenizer.render_conversation(c) for c in (short, long)]
    inputs, targets = collate_padded(sequences, pad_id=7)
    short_len = len(sequences[0][0]) - 1
    assert inputs.shape == targets.shape == (2, len(sequences[1][0]) - 1)
    assert (inputs[0, short_len:] == 7).all() and (targets[0, short_len:] == -1).all()
    assert (targets[0, :short_len] >= 0).sum() == sum(sequences[0][1][1:])


# -----------------------------------------------------------------------------
# Packing (midtraining)


def split_row(ids: list[int], bos: int) -> list[list[int]]:
    """A packed row cut at each <|bos|>, trailing padding (lone <|bos|> tokens) removed."""
    segments: list[list[int]] = []
    for token in ids:
        if token == bos:
            segments.append([])
        segments[-1].append(token)
    return [segment for segment in segments if segment != [bos]]


def test_packing_places_whole_conversations_and_counts_the_truncated_ones(tiny_tokenizer):
    task = TaskMixture([SmolTalk(split="train"), GSM8K(split="train")])
    max_seq_len = 96
    packer = ConversationPacker(ConversationStream(task), tiny_tokenizer, max_seq_len, buffer_size=8)
    rows = [packer.next_row() for _ in range(40)]
    bos = tiny_tokenizer.get_bos_token_id()
    renders = {}
    for position in range(packer.stream.position):
        ids, _ = tiny_tokenizer.render_conversation(task[position], max_tokens=1 << 30)
        renders[tuple(ids[:max_seq_len + 1])] = len(ids)

    placed, truncated = 0, 0
    for ids, mask in rows:
        assert len(ids) == len(mask) == max_seq_len + 1
        for segment in split_row(ids, bos):
            full_length = renders.get(tuple(segment))
            assert full_length is not None, "a row holds something that is not a whole (or truncated) conversation"
            placed += 1
            truncated += full_length > len(segment)
    stats = packer.stats
    # every conversation taken from the stream is in a row, waiting in the buffer, or counted as dropped
    assert placed == stats.conversations
    assert stats.conversations + len(packer.buffer) + stats.dropped == packer.stream.position
    assert truncated > 0 and truncated == stats.truncated
    assert stats.padding_tokens == sum(len(ids) - sum(map(len, split_row(ids, bos))) for ids, _ in rows)


def test_a_conversation_longer_than_a_row_is_truncated_and_counted(tiny_tokenizer):
    long_answer = "word " * 200
    stream = ConversationStream(ListTask([chat("short question", long_answer)]))
    packer = ConversationPacker(stream, tiny_tokenizer, max_seq_len=32, buffer_size=1)
    ids, mask = packer.next_row()
    full, _ = tiny_tokenizer.render_conversation(chat("short question", long_answer), max_tokens=1 << 30)
    assert ids == full[:33] and sum(mask) > 0
    assert packer.stats.truncated == 1
    assert packer.stats.truncated_tokens == len(full) - 33


def test_a_conversation_with_nothing_left_to_supervise_after_truncation_is_dropped_and_counted(tiny_tokenizer):
    stats = PackingStats()
    assert render_for_training(tiny_tokenizer, chat("question " * 100, "answer"), 32, stats) is None
    assert stats.dropped == 1 and stats.conversations == 0


def test_packer_resumes_from_its_state_with_the_same_rows(tiny_tokenizer):
    task = TaskMixture([SmolTalk(split="train"), GSM8K(split="train")])
    packer = ConversationPacker(ConversationStream(task), tiny_tokenizer, max_seq_len=64, buffer_size=6)
    for _ in range(3):
        packer.next_batch(2)
    state = packer.state_dict()
    expected = [packer.next_batch(2) for _ in range(3)]
    resumed = ConversationPacker(ConversationStream(task), tiny_tokenizer, max_seq_len=64, buffer_size=6,
                                 state=state)
    for (inputs, targets), (want_inputs, want_targets) in zip([resumed.next_batch(2) for _ in range(3)], expected):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
    assert resumed.stats == packer.stats


# -----------------------------------------------------------------------------
# One conversation per row (SFT)


def test_padded_batcher_puts_one_conversation_per_row_and_resumes(tiny_tokenizer):
    conversations = [chat(f"question {i}?", "yes " * i) for i in range(1, 9)]
    conversations.insert(2, chat("a user turn far too long for the row " * 10, "ok"))  # dropped, counted
    task = ListTask(conversations)
    batcher = PaddedBatcher(ConversationStream(task), tiny_tokenizer, max_seq_len=40)
    inputs, targets = batcher.next_batch(4)
    assert batcher.stats.dropped == 1 and batcher.stats.conversations == 4
    bos = tiny_tokenizer.get_bos_token_id()
    assert (inputs[:, 0] == bos).all() and ((inputs == bos).sum(dim=1) == 1).all()
    for row, conversation in enumerate(conversations[:2] + conversations[3:5]):
        ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=41)
        assert inputs[row, :len(ids) - 1].tolist() == ids[:-1]
        assert (targets[row] >= 0).sum() == sum(mask[1:])
    state = batcher.state_dict()
    expected = batcher.next_batch(4)
    resumed = PaddedBatcher(ConversationStream(task), tiny_tokenizer, max_seq_len=40, state=state).next_batch(4)
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected))


def test_ranks_take_disjoint_conversations_that_cover_the_task():
    task = ListTask([chat(f"q{i}", f"a{i}") for i in range(10)])
    streams = [ConversationStream(task, rank=r, world_size=3) for r in range(3)]
    seen = [stream.take()[1]["messages"][0]["content"] for _ in range(4) for stream in streams]
    assert sorted(seen[:10], key=lambda q: int(q[1:])) == [f"q{i}" for i in range(10)]
    assert streams[0].epochs == pytest.approx(12 / 10)


def test_merge_stats_adds_up_the_ranks():
    total = merge_stats([PackingStats(conversations=2, dropped=1).as_dict(), PackingStats(conversations=3).as_dict()])
    assert total.conversations == 5 and total.dropped == 1


# -----------------------------------------------------------------------------
# Task loading


def test_a_task_that_cannot_be_loaded_is_left_out_with_a_warning_naming_it(capsys):
    def unavailable():
        raise DatasetUnavailableError("dataset cais/mmlu is not available: not in the local mirror")

    loaded, missing = load_tasks({"GSM8K": lambda: GSM8K(split="train"), "MMLU": unavailable}, "test mixture")
    assert list(loaded) == ["GSM8K"] and list(missing) == ["MMLU"]
    assert "leaving out MMLU" in capsys.readouterr().out
    require_tasks(loaded, missing, "test mixture")
    with pytest.raises(RuntimeError, match="none of its datasets could be loaded.*MMLU"):
        require_tasks({}, missing, "test mixture")


def test_a_bug_while_building_a_task_is_raised_not_left_out():
    def buggy():
        raise ValueError("a bug, not a missing dataset")

    with pytest.raises(ValueError, match="a bug, not a missing dataset"):
        load_tasks({"GSM8K": lambda: GSM8K(split="train"), "Buggy": buggy}, "test mixture")


def test_a_malformed_mirror_file_is_raised_not_left_out(tmp_path, monkeypatch):
    path = tmp_path / "arc" / "ARC-Easy" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"question": "q", "answerKey": "A"}) + "\n")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(MalformedDataError, match=rf"{path}:1: missing key"):
        load_tasks({"ARC-Easy": lambda: ARC("ARC-Easy", "train")}, "test mixture")


# -----------------------------------------------------------------------------
# The supervised step


def test_the_step_loss_is_the_mean_over_supervised_tokens_however_the_batch_is_split(tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                          n_kv_head=1, n_embd=32))
    model.init_weights()
    batcher = PaddedBatcher(ConversationStream(SmolTalk(split="train")), tiny_tokenizer, max_seq_len=40)
    inputs, targets = batcher.next_batch(4)
    autocast = torch.autocast("cpu", enabled=False)

    whole = supervised_step(model, [(inputs, targets)], autocast)
    whole_grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():  # the plain expression: cross-entropy of the soft-capped logits, ignored targets left out
        logits = model.logits(model.hidden_states(inputs))
        reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert whole == pytest.approx(reference.item(), rel=1e-5)
    model.zero_grad(set_to_none=True)
    split = supervised_step(model, [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])], autocast)
    assert split == pytest.approx(whole, rel=1e-5)
    for p, want in zip(model.parameters(), whole_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
    assert evaluate_loss(model, [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])], autocast) == pytest.approx(
        whole, rel=1e-5)
