"""The report card: stages log sections and metrics, `python -m report` resets a run and writes report.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from report import SECTIONS, get_report
from report.header import collect_header
from report.markdown import generate

REPO_ROOT = Path(__file__).resolve().parents[1]


def summary_rows(markdown: str) -> dict[str, list[str]]:
    """The summary table as {metric: [BASE, MID, SFT, RL]}."""
    table = markdown.split("## Summary", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "Metric":
            rows[cells[0]] = cells[1:]
    return rows


def fake_header(gpu_count: int, timestamp: str) -> dict:
    """A header as reset writes it, with chosen GPUs and start time (the hardware we run on has no GPU)."""
    header = collect_header()
    header["hardware"]["gpus"] = {"count": gpu_count,
                                  "devices": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1}] * gpu_count}
    return {"timestamp": timestamp, **header}


def write_header(base_dir: Path, header: dict) -> None:
    (base_dir / "report").mkdir(parents=True, exist_ok=True)
    (base_dir / "report" / "header.json").write_text(json.dumps(header))


def set_section_time(base_dir: Path, section: str, timestamp: str) -> None:
    path = get_report().log(section, [])
    record = json.loads(path.read_text())
    record["timestamp"] = timestamp
    path.write_text(json.dumps(record))


# -----------------------------------------------------------------------------
# Reset


def test_reset_writes_header_with_date_git_hardware_software_and_code_size(base_dir):
    path = get_report().reset(collect_header())
    header = json.loads(path.read_text())
    assert path == base_dir / "report" / "header.json"
    assert re.match(r"\d{4}-\d{2}-\d{2}T", header["timestamp"])
    assert isinstance(header["git"]["dirty"], bool)
    assert header["hardware"]["cpu_cores"] == os.cpu_count()
    assert header["hardware"]["memory_gib"] > 0
    assert header["hardware"]["gpus"]["count"] == 0  # the test machines have no GPU
    assert header["software"]["python"] == sys.version.split()[0]
    assert header["software"]["torch"]
    code = header["code"]
    assert code["files"] > 5 and code["lines"] > 100 and code["characters"] > code["lines"]
    assert code["dependencies"] >= 5


def test_code_size_counts_this_test_file(base_dir):
    from report.header import source_files

    assert Path("tests/test_report.py") in source_files(REPO_ROOT)
    assert Path(".venv/bin/python") not in source_files(REPO_ROOT)


def test_reset_forgets_the_previous_runs_sections_and_metrics(base_dir):
    report = get_report()
    report.log("Chat SFT", [{"steps": 10}])
    report.log_metrics("chat_sft", {"step": 1, "train_loss": 2.0})
    report.reset(collect_header())
    assert report.read_sections() == {}
    assert report.read_metrics() == {}
    assert report.read_header() is not None


# -----------------------------------------------------------------------------
# Logging


def test_log_writes_one_json_file_per_section_and_rerun_replaces_it(base_dir):
    report = get_report()
    path = report.log("Chat evaluation sft", [{"ARC-Easy": 0.25}, "a note"])
    assert path == base_dir / "report" / "chat-evaluation-sft.json"
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.5}])
    sections = report.read_sections()
    assert list(sections) == ["Chat evaluation sft"]
    assert sections["Chat evaluation sft"]["data"] == [{"ARC-Easy": 0.5}]


def test_log_accepts_tensor_and_numpy_scalars(base_dir):
    import numpy as np
    import torch

    path = get_report().log("Base model loss", [{"val bpb": torch.tensor(0.75), "tokens": np.int64(7)}])
    assert json.loads(path.read_text())["data"] == [{"val bpb": 0.75, "tokens": 7}]


def test_failed_log_write_keeps_the_previous_section_and_leaves_no_temp_file(base_dir, monkeypatch):
    report = get_report()
    path = report.log("Midtraining", [{"steps": 1}])
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.log("Midtraining", [{"steps": 2}])
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_non_zero_rank_writes_nothing(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    report.reset(collect_header())
    report.log("Base model training", [{"steps": 5}])
    report.log_metrics("base_train", {"step": 0, "train_loss": 9.0})
    assert not (base_dir / "report").exists() or not any((base_dir / "report").iterdir())


def test_metrics_rows_of_a_resumed_stage_merge_by_step_and_a_torn_line_is_skipped(base_dir):
    report = get_report()
    for step in range(4):
        report.log_metrics("base_train", {"step": step, "total_flops": step * 1e9, "train_loss": 5.0 - step})
    report.log_metrics("base_train", {"step": 2, "val_bpb": 3.0})
    # killed after step 2's checkpoint: step 3 was logged, then re-run with another loss after the resume
    report.log_metrics("base_train", {"step": 3, "total_flops": 3e9, "train_loss": 1.5})
    with open(report.metrics_path("base_train"), "a") as f:
        f.write('{"step": 4, "train_lo')
    rows = report.read_metrics()["base_train"]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert rows[2] == {"step": 2, "total_flops": 2e9, "train_loss": 3.0, "val_bpb": 3.0}
    assert rows[3]["train_loss"] == 1.5


# -----------------------------------------------------------------------------
# report.md


def test_sections_appear_in_pipeline_order_and_missing_ones_are_marked(base_dir, tmp_path):
    report = get_report()
    report.reset(collect_header())
    report.log("Chat SFT", [{"num_iterations": 3}])
    report.log("Tokenizer training", [{"vocab_size": 512}, "trained on the mirror"])
    report.log("Base model training", [{"depth": 4, "final val bpb": 2.5}])
    markdown = generate(report, tmp_path / "report.md").read_text()

    positions = [markdown.index(f"## {section}\n") for section in SECTIONS]
    assert positions == sorted(positions)
    assert "- vocab_size: 512" in markdown and "trained on the mirror" in markdown
    assert "- final val bpb: 2.5000" in markdown
    midtraining = markdown.split("## Midtraining\n", 1)[1].split("## ", 1)[0]
    assert "— missing" in midtraining
    chat_sft = markdown.split("## Chat SFT\n", 1)[1].split("## ", 1)[0]
    assert "missing" not in chat_sft and "- num_iterations: 3" in chat_sft


def test_summary_table_has_numbers_where_logged_and_dashes_where_missing(base_dir, tmp_path):
    report = get_report()
    report.reset(collect_header())
    report.log("Base model evaluation", [{"CORE metric": 0.1234, "hellaswag": 0.3}])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.3, "ARC-Challenge": 0.25}, {"GSM8K": 0.0, "HumanEval": 0.0625},
                                       {"ChatCORE metric": 0.05}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.35, "MMLU": 0.31}])
    markdown = generate(report, tmp_path / "report.md").read_text()

    rows = summary_rows(markdown)
    assert list(rows) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
    assert rows["CORE"] == ["0.1234", "—", "—", "—"]
    assert rows["ARC-Easy"] == ["—", "0.3000", "0.3500", "—"]
    assert rows["GSM8K"] == ["—", "0.0000", "—", "—"]  # a logged zero is a zero, not a missing value
    assert rows["MMLU"] == ["—", "—", "0.3100", "—"]
    assert rows["ChatCORE"] == ["—", "0.0500", "—", "—"]
    assert "RL (Chat evaluation rl)" in markdown  # the note names the evaluation that never ran


def test_cpu_run_reports_wall_clock_time_and_no_gpu_cost(base_dir, tmp_path):
    report = get_report()
    write_header(base_dir, fake_header(0, "2025-01-01T10:00:00+00:00"))
    set_section_time(base_dir, "Tokenizer training", "2025-01-01T10:05:00+00:00")
    set_section_time(base_dir, "Chat evaluation rl", "2025-01-01T10:21:30+00:00")
    markdown = generate(report, tmp_path / "report.md").read_text()
    assert "Total wall-clock time: 21m 30s" in markdown
    assert "no GPU cost" in markdown


def test_gpu_run_cost_is_gpu_hours_times_the_assumed_price(base_dir, tmp_path):
    report = get_report()
    write_header(base_dir, fake_header(8, "2025-01-01T10:00:00+00:00"))
    set_section_time(base_dir, "Chat evaluation sft", "2025-01-01T14:00:00+00:00")
    markdown = generate(report, tmp_path / "report.md", gpu_hour_cost=2.5).read_text()
    assert "Total wall-clock time: 4h 0m 0s" in markdown
    assert "Estimated cost: $80.00 (8 GPUs × 4.00 h × $2.50 per GPU-hour" in markdown
    assert "8 × NVIDIA H100 80GB HBM3" in markdown


def test_plots_of_loss_and_bpb_are_png_files_linked_from_the_markdown(base_dir, tmp_path):
    report = get_report()
    report.reset(collect_header())
    for step in range(0, 30, 5):
        row = {"step": step, "total_flops": step * 2e12, "train_loss": 6.0 - step / 10}
        if step % 10 == 0:
            row["val_bpb"] = 2.0 - step / 100
        report.log_metrics("base_train", row)
    report.log_metrics("mid_train", {"step": 0, "total_flops": 0.0, "train_loss": 3.0, "val_bpb": 1.5})
    out = generate(report, tmp_path / "out" / "report.md")
    markdown = out.read_text()

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert links == ["report_train_loss.png", "report_val_bpb.png"]
    for link in links:
        assert (out.parent / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_metrics_says_there_is_nothing_to_plot(base_dir, tmp_path):
    markdown = generate(get_report(), tmp_path / "report.md").read_text()
    assert "nothing to plot" in markdown
    assert "No run header" in markdown


def test_command_line_reset_then_generate_writes_report_md_in_the_current_directory(base_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for command in ("reset", "generate"):
        subprocess.run([sys.executable, "-m", "report", command], cwd=tmp_path, env=env, check=True,
                       capture_output=True, text=True)
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# nanochat training report")
    assert "## Environment" in markdown and "## Summary" in markdown


def test_command_line_rejects_a_negative_gpu_price(base_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "report", "generate", "--gpu-hour-cost", "-1"], check=False,
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--gpu-hour-cost must be >= 0" in result.stderr
