"""Tasks: slicing and mixing, each dataset's rendering and scoring on real examples from the mirror, and clear
errors for data that is missing or malformed."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat.execution import execute_code
from tasks.arc import ARC
from tasks.common import DatasetUnavailableError, MalformedDataError, Task, TaskMixture, TaskSequence, render_mc
from tasks.gsm8k import GSM8K, extract_answer, normalize_number, solution_to_parts
from tasks.humaneval import HumanEval, build_program
from tasks.identity import IdentityConversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee

# -----------------------------------------------------------------------------
# Task, TaskMixture, TaskSequence


class Numbers(Task):
    def __init__(self, n: int, name: str = "n", **kwargs):
        super().__init__(**kwargs)
        self.n, self.name = n, name

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [], "id": f"{self.name}{index}"}


def ids(task: Task) -> list[str]:
    return [task[i]["id"] for i in range(len(task))]


def test_a_task_is_a_sliceable_view():
    assert ids(Numbers(10)) == [f"n{i}" for i in range(10)]
    assert ids(Numbers(10, start=2, stop=8, step=2)) == ["n2", "n4", "n6"]
    assert ids(Numbers(10, start=5)) == ["n5", "n6", "n7", "n8", "n9"]
    assert len(Numbers(10, stop=100)) == 10
    assert Numbers(10)[-1]["id"] == "n9"
    with pytest.raises(IndexError):
        Numbers(10, stop=3)[3]
    with pytest.raises(ValueError):
        Numbers(10, start=5, stop=2)


def test_task_mixture_shuffles_deterministically_and_keeps_every_example():
    first = ids(TaskMixture([Numbers(5, "a"), Numbers(7, "b")]))
    second = ids(TaskMixture([Numbers(5, "a"), Numbers(7, "b")]))
    assert first == second
    assert sorted(first) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(7)])
    assert first != [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(7)]  # actually mixed
    oversampled = ids(TaskMixture([Numbers(3, "a"), Numbers(3, "a")]))
    assert sorted(oversampled) == sorted(["a0", "a1", "a2"] * 2)


def test_task_sequence_keeps_order():
    assert ids(TaskSequence([Numbers(2, "a"), Numbers(3, "b")])) == ["a0", "a1", "b0", "b1", "b2"]
    assert ids(TaskSequence([Numbers(2, "a"), Numbers(3, "b")], start=1, step=2)) == ["a1", "b1"]


# -----------------------------------------------------------------------------
# Multiple choice: ARC (mirror) and MMLU (not mirrored)


def test_render_mc_puts_the_letters_in_the_prompt():
    prompt = render_mc("What is 1+1?", ["A", "B"], ["2", "3"])
    assert prompt == ("Multiple Choice question: What is 1+1?\n- 2=A\n- 3=B\n\n"
                      "Respond only with the letter of the correct answer.")


def test_arc_conversations_have_letters_and_a_one_letter_answer(tiny_tokenizer):
    task = ARC("ARC-Easy", "test")
    assert task.eval_type == "categorical" and len(task) == 200
    conversation = task[0]
    question, answer = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
    assert conversation["letters"] == ["A", "B", "C", "D"]
    assert answer in conversation["letters"]
    assert all(f"={letter}\n" in question for letter in conversation["letters"])
    assert task.evaluate(conversation, answer)
    assert not task.evaluate(conversation, next(x for x in conversation["letters"] if x != answer))
    assert len(tiny_tokenizer.encode(answer)) == 1  # the answer is one token
    ids_ = tiny_tokenizer.render_for_completion(conversation)
    assert ids_[-1] == tiny_tokenizer.encode_special("<|assistant_start|>")


def test_arc_renders_a_real_item_exactly(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "arc" / "ARC-Challenge").mkdir(parents=True)
    record = {"id": "arc_challenge-0", "question": "An astronomer observes that a planet rotates faster after a "
              "meteorite impact. Which is the most likely effect of this increase in rotation?",
              "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                                   "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                          "label": ["A", "B", "C", "D"]}, "answerKey": "C"}
    (mirror / "arc" / "ARC-Challenge" / "test.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(mirror))
    conversation = ARC("ARC-Challenge", "test")[0]
    assert conversation["messages"][0]["content"] == (
        "Multiple Choice question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\n"
        "- Planetary density will decrease.=A\n- Planetary years will become longer.=B\n"
        "- Planetary days will become shorter.=C\n- Planetary gravity will become stronger.=D\n\n"
        "Respond only with the letter of the correct answer."
    )
    assert conversation["messages"][1] == {"role": "assistant", "content": "C"}


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hugging Face hub unreachable, failing at once instead of after minutes of retries."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_dataset_absent_from_mirror_and_hub_raises_a_clear_error(hub_offline):
    with pytest.raises(DatasetUnavailableError) as excinfo:
        MMLU("all", "test")
    message = str(excinfo.value)
    assert "cais/mmlu" in message and "'test'" in message  # what is missing
    assert "mmlu/all/test.jsonl" in message and "shared/data" in message  # where it looked
    assert "NANOCHAT_DATA_DIR" in message and "HF_ENDPOINT" in message  # how to provide it


def test_a_hub_error_that_is_not_about_availability_propagates_unchanged(monkeypatch):
    import datasets

    def no_such_config(*args, **kwargs):
        raise ValueError("BuilderConfig 'al' not found")  # what the hub says to a misspelt config: a bug here

    monkeypatch.setattr(datasets, "load_dataset", no_such_config)
    with pytest.raises(ValueError, match="BuilderConfig 'al' not found"):
        MMLU("all", "test")


def test_mmlu_reads_the_upstream_schema_from_a_mirror(tmp_path, monkeypatch):
    (tmp_path / "mmlu" / "all").mkdir(parents=True)
    record = {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}
    (tmp_path / "mmlu" / "all" / "test.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    conversation = MMLU("all", "test")[0]
    assert conversation["letters"] == ["A", "B", "C", "D"]
    assert conversation["messages"][1]["content"] == "B"
    assert "- 4=B" in conversation["messages"][0]["content"]


def test_a_malformed_mirror_file_names_the_file_and_line(tmp_path, monkeypatch):
    path = tmp_path / "arc" / "ARC-Easy" / "test.jsonl"
    path.parent.mkdir(parents=True)
    good = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    path.write_text(json.dumps(good) + "\n" + '{"question": "q", "choices": \n')
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(MalformedDataError, match=rf"{path}:2: not valid JSON"):
        ARC("ARC-Easy", "test")
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"question": "q", "answerKey": "A"}) + "\n")
    with pytest.raises(MalformedDataError, match=rf"{path}:3: missing key\(s\) \['choices'\]"):
        ARC("ARC-Easy", "test")


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_calculator_annotations_become_tool_calls():
    task = GSM8K("main", "test")
    assert task.rows[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert solution_to_parts(task.rows[0]["answer"]) == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"},
        {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18 every day at the farmer’s market.\n#### 18"},
    ]


def test_gsm8k_conversations_render_with_supervised_tool_calls_and_unsupervised_outputs(tiny_tokenizer):
    conversation = GSM8K("main", "test")[0]
    ids_, mask = tiny_tokenizer.render_conversation(conversation)
    python_start = tiny_tokenizer.encode_special("<|python_start|>")
    output_start = tiny_tokenizer.encode_special("<|output_start|>")
    parts = conversation["messages"][1]["content"]
    assert ids_.count(python_start) == sum(part["type"] == "python" for part in parts) > 0
    assert all(mask[i] == 1 for i, t in enumerate(ids_) if t == python_start)
    assert all(mask[i] == 0 for i, t in enumerate(ids_) if t == output_start)


def test_gsm8k_answers_are_extracted_and_normalised():
    assert extract_answer("so the answer is\n#### 18") == "18"
    assert extract_answer("#### 1,000") == "1000"
    assert extract_answer("#### 70000.00") == "70000"
    assert extract_answer("#### $5.") == "5"
    assert extract_answer("#### -3.50 dollars") == "-3.5"
    assert extract_answer("#### 0.25") == "0.25"
    assert extract_answer("The answer is 18") is None
    assert normalize_number("12,345.0") == "12345"


def test_gsm8k_scores_completions_against_the_reference():
    task = GSM8K("main", "test")
    josh = next(i for i in range(len(task)) if "flipping a house" in task[i]["messages"][0]["content"])
    conversation = task[josh]
    assert extract_answer(conversation["messages"][1]["content"][-1]["text"]) == "70000"
    assert task.evaluate(conversation, "He made 200,000-130,000 = 70,000.\n#### 70,000")
    assert task.evaluate(conversation, "#### 70000.0")
    assert not task.evaluate(conversation, "#### 7000")
    assert not task.evaluate(conversation, "the profit is 70000")  # no final answer marker


# -----------------------------------------------------------------------------
# HumanEval


def test_every_humaneval_canonical_solution_passes_in_the_sandbox():
    task = HumanEval()
    assert len(task) == 164
    conversations = [task[i] for i in range(len(task))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda c: task.evaluate(c, c["messages"][1]["content"]), conversations))
    failed = [c["task_id"] for c, ok in zip(conversations, outcomes) if not ok]
    assert failed == []


def test_a_humaneval_prompt_without_a_body_fails():
    task = HumanEval()
    conversation = task[0]
    assert not task.evaluate(conversation, conversation["prompt"])
    assert not task.evaluate(conversation, "")


def test_humaneval_accepts_a_body_or_a_fenced_function():
    task = HumanEval()
    conversation = next(task[i] for i in range(len(task)) if task[i]["task_id"] == "HumanEval/0")
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    assert task.evaluate(conversation, body)
    fenced = f"Here you go:\n```python\n{conversation['prompt']}{body}```\nDone."
    assert task.evaluate(conversation, fenced)
    program = build_program(conversation, body)
    assert program.startswith(conversation["prompt"]) and program.rstrip().endswith("check(has_close_elements)")


# -----------------------------------------------------------------------------
# SmolTalk, identity, spelling


def test_smoltalk_reads_the_mirror():
    task = SmolTalk("train")
    assert len(task) == 135
    roles = [m["role"] for m in task[0]["messages"]]
    assert roles[0] in ("system", "user") and "assistant" in roles


def test_identity_conversations_are_deterministic_and_say_nanochat(tiny_tokenizer):
    task = IdentityConversations(size=50)
    assert [task[i] for i in range(50)] == [IdentityConversations(size=50)[i] for i in range(50)]
    assert all("nanochat" in task[i]["messages"][1]["content"] for i in range(50))
    assert len({task[i]["messages"][0]["content"] for i in range(50)}) > 10  # varied
    tiny_tokenizer.render_conversation(task[0])  # valid chat format


def test_spelling_bee_answers_with_a_tool_call_and_the_right_count():
    task = SpellingBee(size=40, split="test")
    assert [task[i] for i in range(40)] == [SpellingBee(size=40, split="test")[i] for i in range(40)]
    assert task[0] != SpellingBee(size=40, split="train")[0]
    for i in range(40):
        conversation = task[i]
        parts = conversation["messages"][1]["content"]
        python = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", python).groups()
        assert output == str(word.count(letter))
        assert parts[-1]["text"].endswith(f"#### {word.count(letter)}")
        assert task.evaluate(conversation, f"#### {word.count(letter)}")
        assert not task.evaluate(conversation, f"#### {word.count(letter) + 1}")
    assert execute_code(f"print({python})").stdout.strip() == output  # the tool call computes the answer
