"""The whole pipeline end to end at micro scale, through the real speedrun.sh.

One run serves every test here: speedrun.sh is started, killed (SIGKILL, the whole process group) as soon as base
training has written its first checkpoint, and started again; the second attempt must skip the finished stages,
resume base training from its checkpoint, finish every stage, write report.md, and leave a model that chats.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from report import SECTIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"  # the offline data mirror, as in conftest.py

RUN_TIMEOUT_S = 900  # the micro run takes a few minutes on 2 cores; this only bounds a hang


@dataclass
class SpeedrunResult:
    work_dir: Path
    base_dir: Path
    first_log: str
    second_log: str
    metrics_lines_before_resume: int


def speedrun_env(base_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("WANDB_RUN", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_SPEEDRUN_FRESH")}
    env.update(NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA_DIR=str(DATA_DIR), NANOCHAT_SPEEDRUN_SCALE="micro",
               NANOCHAT_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return env


def base_checkpoints(base_dir: Path) -> list[Path]:
    return sorted((base_dir / "base_checkpoints").glob("*/meta_*.json"))  # the meta completes a checkpoint


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory) -> SpeedrunResult:
    work_dir = tmp_path_factory.mktemp("speedrun")
    base_dir = work_dir / "nanochat_base"
    env = speedrun_env(base_dir)

    # First attempt: read its output line by line and kill it once base training has saved a checkpoint.
    first = subprocess.Popen(["bash", str(REPO_ROOT / "speedrun.sh")], cwd=work_dir, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    first_log = []
    in_base_train = False
    for line in first.stdout:
        first_log.append(line)
        in_base_train = in_base_train or "base_train:" in line
        if in_base_train and base_checkpoints(base_dir):
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.stdout.close()
    first.wait(timeout=RUN_TIMEOUT_S)
    first_log = "".join(first_log)
    assert base_checkpoints(base_dir), f"base training never wrote a checkpoint:\n{first_log[-3000:]}"
    assert first.returncode == -signal.SIGKILL, f"speedrun finished before it could be killed:\n{first_log[-3000:]}"
    metrics_path = base_dir / "report" / "metrics_base_train.jsonl"
    lines_before = len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0

    # Second attempt: the same command, which has to pick up where the first one stopped.
    second = subprocess.run(["bash", str(REPO_ROOT / "speedrun.sh")], cwd=work_dir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=False)
    assert second.returncode == 0, f"the resumed speedrun failed:\n{second.stdout[-5000:]}"
    return SpeedrunResult(work_dir, base_dir, first_log, second.stdout, lines_before)


def test_resumed_run_skips_the_stages_that_finished_before_the_kill(speedrun):
    for stage in ("tok_train", "tok_eval"):
        assert f"{stage}: done in" in speedrun.first_log
        assert f"{stage}: finished in an earlier attempt, skipping" in speedrun.second_log
        assert f"{stage}: {sys.executable}" not in speedrun.second_log
    assert "starting a fresh run" in speedrun.first_log
    assert "resuming the run" in speedrun.second_log


def test_base_training_continues_from_its_checkpoint_instead_of_starting_over(speedrun):
    launch = next(line for line in speedrun.second_log.splitlines() if "base_train: " in line and "scripts." in line)
    assert launch.rstrip().endswith("--resume")
    rows = (speedrun.base_dir / "report" / "metrics_base_train.jsonl").read_text().splitlines()
    resumed_steps = [json.loads(line)["step"] for line in rows[speedrun.metrics_lines_before_resume:]]
    assert resumed_steps and min(resumed_steps) > 0


def test_report_has_every_stage_section_in_pipeline_order(speedrun):
    markdown = (speedrun.work_dir / "report.md").read_text()
    positions = [markdown.index(f"## {section}\n") for section in SECTIONS]
    assert positions == sorted(positions)
    for section in SECTIONS:
        body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert "missing" not in body, f"section {section!r} was not logged"
    assert "no GPU cost" in markdown


def test_summary_table_has_a_number_for_every_evaluation_the_micro_recipe_runs(speedrun):
    markdown = (speedrun.work_dir / "report.md").read_text()
    table = markdown.split("## Summary", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "Metric":
            rows[cells[0]] = cells[1:]
    number = re.compile(r"^-?\d+\.\d{4}$")  # centered metrics can be negative
    assert number.match(rows["CORE"][0])
    # MMLU is not in the offline data mirror, so the offline run does not evaluate it
    for metric in ("ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval", "ChatCORE"):
        assert all(number.match(cell) for cell in rows[metric][1:]), f"{metric}: {rows[metric]}"


def test_report_links_training_plots(speedrun):
    markdown = (speedrun.work_dir / "report.md").read_text()
    for name in ("report_train_loss.png", "report_val_bpb.png"):
        assert f"]({name})" in markdown
        assert (speedrun.work_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_the_trained_model_answers_through_chat_cli(speedrun):
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hello"], cwd=REPO_ROOT,
                            env=speedrun_env(speedrun.base_dir), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


# -----------------------------------------------------------------------------
# speedrun.sh's guards (fast: they stop before any stage runs)


def test_speedrun_without_a_rust_toolchain_and_no_bootstrap_stops_and_says_how_to_install_one(tmp_path):
    """(The bootstrap that installs the tools is tested against fakes in tests/test_bootstrap.py.)"""
    tools = ("cargo", "uv")
    path_without_tools = os.pathsep.join(entry for entry in os.environ["PATH"].split(os.pathsep)
                                         if not any((Path(entry) / tool).exists() for tool in tools))
    home = tmp_path / "home"  # no ~/.cargo/bin or ~/.local/bin for speedrun.sh to find them in
    home.mkdir()
    env = {**speedrun_env(tmp_path / "base"), "PATH": path_without_tools, "HOME": str(home),
           "NANOCHAT_NO_BOOTSTRAP": "1"}
    del env["NANOCHAT_PYTHON"]  # asks speedrun.sh to set up the environment itself
    result = subprocess.run(["bash", str(REPO_ROOT / "speedrun.sh")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "NANOCHAT_NO_BOOTSTRAP=1 installs nothing" in result.stderr, result.stderr
    assert "cargo" in result.stderr and "rustup" in result.stderr
    assert not (tmp_path / "base" / "speedrun").exists()  # stopped before touching the run
    assert list(home.iterdir()) == []  # and installed nothing


def test_speedrun_refuses_to_resume_a_run_of_another_scale(tmp_path):
    markers = tmp_path / "base" / "speedrun"
    markers.mkdir(parents=True)
    (markers / "scale").write_text("tiny\n")
    (markers / "tok_train.done").touch()
    result = subprocess.run(["bash", str(REPO_ROOT / "speedrun.sh")], cwd=tmp_path,
                            env=speedrun_env(tmp_path / "base"), capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode != 0
    assert "unfinished tiny run" in result.stderr and "NANOCHAT_SPEEDRUN_FRESH=1" in result.stderr
    assert not (tmp_path / "base" / "tokenizer").exists()
