"""
SpellingBee: "How many r are in strawberry?" Small models see tokens, not letters, so they are taught to spell
the word out, count, check with a python tool call, and end with '#### <count>'. Generated deterministically;
words come from /usr/share/dict/words when the system has it, else from the small list below.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.common import Task
from tasks.gsm8k import extract_answer
from tasks.identity import IdentityConversations

SYSTEM_WORDS = Path("/usr/share/dict/words")
EMBEDDED_WORDS = tuple(word for line in (
    "strawberry banana apple orange grape cherry lemon mango papaya pineapple raspberry blueberry coconut",
    "mississippi committee bookkeeper balloon success necessary accommodate embarrass occasion parallel",
    "tomorrow address assessment possession millennium questionnaire referral recommend separate vacuum",
    "elephant giraffe kangaroo hippopotamus crocodile alligator butterfly caterpillar dragonfly mosquito",
    "computer keyboard monitor printer internet software hardware algorithm compiler function variable",
    "language sentence paragraph alphabet vocabulary grammar spelling pronunciation dictionary letter",
    "mountain river ocean forest desert island valley volcano glacier canyon meadow prairie waterfall",
    "teacher student library pencil notebook classroom homework science history geography mathematics",
    "kitchen bedroom bathroom window doorbell ceiling staircase basement chimney garden fence mailbox",
    "happiness sadness excitement curiosity patience kindness courage honesty loyalty wisdom freedom",
    "bicycle airplane helicopter submarine locomotive motorcycle skateboard sailboat rocket scooter",
    "chocolate cinnamon vanilla caramel marshmallow pepperoni spaghetti lasagna broccoli cucumber zucchini",
    "umbrella sunglasses necklace bracelet earring backpack suitcase wallet blanket pillow mattress",
    "programming transformer tokenizer attention embedding gradient parameter optimizer training inference",
) for word in line.split())
TEMPLATES = (
    "How many {letter} are in {word}?",
    "How many {letter}s are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter} in {word}.",
    "How many '{letter}' are there in '{word}'?",
    'In the word "{word}", how many {letter} are there?',
    "how many {letter} in {word}",
)


@functools.cache
def word_list() -> tuple[str, ...]:
    words = SYSTEM_WORDS.read_text(errors="ignore").split() if SYSTEM_WORDS.exists() else []
    words = [w for w in words if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12]
    return tuple(sorted(set(words))) if len(words) >= 1000 else tuple(EMBEDDED_WORDS)


def spelling_conversation(word: str, letter: str, question: str) -> dict:
    count = word.count(letter)
    lines, running = [], 0
    for position, char in enumerate(word, start=1):
        running += char == letter
        lines.append(f"{position}:{char} hit! count={running}" if char == letter else f"{position}:{char}")
    reasoning = (
        f"We are asked to count the letter '{letter}' in the word '{word}'. Let me spell the word out first:\n"
        f"{','.join(word)}\n\nThen count the '{letter}':\n" + "\n".join(lines) +
        f"\n\nThis gives {count}.\n\nLet me double check with Python:\n\n"
    )
    parts = [
        {"type": "text", "text": reasoning},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives {count} as well.\n\nMy final answer is:\n\n#### {count}"},
    ]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


class SpellingBee(Task):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", **kwargs: Any):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be 'train' or 'test', got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.seed_offset = 0 if split == "train" else 10_000_000  # disjoint random streams per split

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(self.seed_offset + index)
        word = rng.choice(word_list())
        # mostly letters that occur in the word; sometimes one that does not, so 0 is a possible answer
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        question = rng.choice(TEMPLATES).format(letter=letter, word=word)
        return spelling_conversation(word, letter, question)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference


def sized_beside(tasks: Mapping[str, Task], full_rows: int, real_full_rows: int) -> SpellingBee:
    """SpellingBee's training rows for a mixture of `tasks`. Generated, so its size is a choice: the share the full
    mixture gives it (`full_rows` beside `real_full_rows` rows of real conversations), at most `full_rows`. A fixed
    size drowned a small mirror's data: midtraining's 80K rows were 98% of the sample mirror's mixture, and the tiny
    run's midtraining made the model worse on held-out conversations (validation loss 5.54 -> 6.59 over 150 steps;
    5.54 -> 3.87 at this share)."""
    real_rows = sum(len(task) for task in tasks.values() if not isinstance(task, IdentityConversations))
    return SpellingBee(size=max(1, min(full_rows, round(real_rows * full_rows / real_full_rows))), split="train")
