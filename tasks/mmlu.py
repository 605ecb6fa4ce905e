"""
MMLU: 57 subjects of four-choice exam questions. https://arxiv.org/abs/2009.03300
Subset "all" (splits dev/validation/test) for evaluation, "auxiliary_train" (~100k questions from other
exams) for midtraining. Hugging Face `cais/mmlu` schema (question, subject, choices[4], answer 0-3);
mirror at $NANOCHAT_DATA_DIR/mmlu/<subset>/<split>.jsonl.
"""

from __future__ import annotations

from typing import Any

from tasks.common import Task, evaluate_mc, load_rows, mc_conversation, shuffled_indices

LETTERS = ("A", "B", "C", "D")
SUBSETS = ("all", "auxiliary_train")
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, **kwargs: Any):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"MMLU subset must be one of {SUBSETS}, got {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train only has a 'train' split")
        self.subset = subset
        self.rows = load_rows(("mmlu", subset, f"{split}.jsonl"), "cais/mmlu", subset, split)
        self.order = shuffled_indices(len(self.rows))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[self.order[index]]
        if "train" in row and "question" not in row:
            row = row["train"]  # the hub nests each auxiliary_train record under a "train" key
        conversation = mc_conversation(row["question"], LETTERS, row["choices"], LETTERS[row["answer"]])
        conversation["subject"] = row.get("subject", "")
        return conversation

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_mc(conversation, completion)
