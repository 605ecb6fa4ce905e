"""The report card: every stage logs what it measured here, and `python -m report generate` turns it into report.md.

Stages write one JSON file per section (`log`) and a JSONL time series per training stage (`log_metrics`) under
$NANOCHAT_BASE_DIR/report/. Only rank 0 writes, so a stage calls the same API unchanged under torchrun.

    from report import get_report
    get_report().log("Base model training", [{"depth": 20, "final val bpb": 0.81}])
    get_report().log_metrics("base_train", {"step": 100, "total_flops": 3.1e15, "train_loss": 4.2})
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_text, get_base_dir, get_dist_info

# The section each stage logs, named once here. A full run logs them all; report.md shows them in pipeline order
# (SECTIONS) and flags the missing ones.
TOKENIZER_TRAINING = "Tokenizer training"
TOKENIZER_EVALUATION = "Tokenizer evaluation"
BASE_TRAINING = "Base model training"
BASE_LOSS = "Base model loss"
BASE_EVALUATION = "Base model evaluation"
MIDTRAINING = "Midtraining"
CHAT_SFT = "Chat SFT"
CHAT_RL = "Chat RL"


def chat_evaluation(source: str) -> str:
    """The section of scripts.chat_eval on the model of one stage ("mid", "sft", "rl")."""
    return f"Chat evaluation {source}"


SECTIONS = [TOKENIZER_TRAINING, TOKENIZER_EVALUATION, BASE_TRAINING, BASE_LOSS, BASE_EVALUATION, MIDTRAINING,
            chat_evaluation("mid"), CHAT_SFT, chat_evaluation("sft"), CHAT_RL, chat_evaluation("rl")]

HEADER_FILE = "header.json"
PLAN_FILE = "plan.json"  # speedrun.sh's estimate (nanochat/plan.py --json), written after `report reset`


def section_slug(section: str) -> str:
    """File stem of a section: "Chat evaluation sft" -> "chat-evaluation-sft"."""
    slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
    if not slug:
        raise ValueError(f"section name {section!r} has no letters or digits to name its file by")
    return slug


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    """json.dumps fallback: stages hand in numpy/torch scalars and paths as readily as plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Report:
    """Reads and writes the report directory. `enabled=False` (ranks != 0) turns every write into a no-op."""

    def __init__(self, report_dir: Path, enabled: bool = True):
        self.report_dir = Path(report_dir)
        self.enabled = enabled

    # -------------------------------------------------------------------------
    # Writing: what the stages call

    def log(self, section: str, data: list[dict | str]) -> Path:
        """Write (or replace) one section; a re-run stage overwrites its previous section instead of duplicating it."""
        path = self.report_dir / f"{section_slug(section)}.json"
        if not self.enabled:
            return path
        if isinstance(data, (dict, str)):
            data = [data]
        record = {"section": section, "timestamp": now_iso(), "data": list(data)}
        atomic_write_text(path, json.dumps(record, indent=2, default=to_jsonable) + "\n")
        return path

    def log_metrics(self, stage: str, row: dict) -> None:
        """Append one row of a training stage's time series. A single write of one line, so a kill leaves at most a
        torn last line, which the reader skips; a resumed stage re-logs its steps and the later row wins."""
        if not self.enabled:
            return
        path = self.metrics_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, default=to_jsonable) + "\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)

    def metrics_path(self, stage: str) -> Path:
        return self.report_dir / f"metrics_{section_slug(stage).replace('-', '_')}.jsonl"

    def reset(self, header: dict) -> Path:
        """Start a new run: forget the previous run's sections and metrics, write the header with the start time."""
        if not self.enabled:
            return self.report_dir / HEADER_FILE
        self.report_dir.mkdir(parents=True, exist_ok=True)
        for old in [*self.report_dir.glob("*.json"), *self.report_dir.glob("metrics_*.jsonl")]:
            old.unlink()
        path = self.report_dir / HEADER_FILE
        atomic_write_text(path, json.dumps({"timestamp": now_iso(), **header}, indent=2, default=to_jsonable) + "\n")
        return path

    # -------------------------------------------------------------------------
    # Reading: what `generate` uses

    def read_header(self) -> dict | None:
        path = self.report_dir / HEADER_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def read_sections(self) -> dict[str, dict]:
        """Every logged section by name: {"section", "timestamp", "data"}."""
        sections = {}
        for path in sorted(self.report_dir.glob("*.json")):
            if path.name in (HEADER_FILE, PLAN_FILE):
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"report section {path} is not valid JSON ({e}); delete it and re-run its stage") from e
            sections[record["section"]] = record
        return sections

    def read_metrics(self) -> dict[str, list[dict]]:
        """Each stage's rows sorted by step, rows of the same step merged (later values win, e.g. after a resume)."""
        metrics = {}
        for path in sorted(self.report_dir.glob("metrics_*.jsonl")):
            stage = path.stem.removeprefix("metrics_")
            by_step: dict[Any, dict] = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed process
                if isinstance(row, dict) and "step" in row:
                    by_step.setdefault(row["step"], {}).update(row)
            metrics[stage] = [by_step[step] for step in sorted(by_step)]
        return metrics


def get_report() -> Report:
    """The report of the current run, under $NANOCHAT_BASE_DIR/report; writes only on rank 0."""
    rank = get_dist_info().rank
    return Report(get_base_dir() / "report", enabled=rank == 0)
