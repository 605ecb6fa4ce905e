"""nanochat/plan.py and `speedrun.sh --plan`: the recipe for the hardware and its estimate, printed without touching
anything; the arithmetic agrees with the model's own counts; the report card shows estimate against actual."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nanochat import plan
from nanochat.gpt import GPT, model_config_from_depth, parameter_count

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("depth", [2, 4, 12, 20])
def test_parameter_and_flop_counts_match_the_model(depth):
    config = model_config_from_depth(depth, plan.VOCAB_SIZE, plan.SEQ_LEN)
    assert plan.parameter_counts(depth)["total"] == parameter_count(config)
    with torch.device("meta"):
        model = GPT(config)
    assert plan.flops_per_token(depth) == model.estimate_flops()


def test_the_memory_model_reproduces_its_measurement_and_sizes_batches_to_memory():
    measured = plan.MEASURED_PEAK
    assert plan.peak_memory_gib(measured["depth"], measured["tokens"]) == pytest.approx(measured["peak_gib"])
    assert plan.device_batch_for(20, 80) == 32  # speedrun.sh's depth-20 recipe on an 80 GB GPU, as before
    assert plan.device_batch_for(20, 40) < 32 and plan.device_batch_for(20, 24) < plan.device_batch_for(20, 40)
    assert plan.device_batch_for(4, 8) >= plan.device_batch_for(20, 80)  # a small model fits more rows


def test_hardware_names_parse_and_unknown_ones_are_refused():
    assert plan.parse_hardware("8xH100") == plan.Hardware("H100", 8, 80)
    assert plan.parse_hardware("1x4090").kind == "RTX 4090"
    assert plan.parse_hardware("cpu:16") == plan.Hardware("cpu", 16, 0)
    with pytest.raises(ValueError, match="COUNTxKIND"):
        plan.parse_hardware("3xTPU")


def test_recipes_follow_the_hardware_and_the_budget():
    big = plan.make_plan(plan.parse_hardware("8xH100"))
    assert (big.depth, big.device_batch_size, big.grad_accum_steps) == (20, 32, 1)
    one = plan.make_plan(plan.parse_hardware("1xH100"))
    longer = plan.make_plan(plan.parse_hardware("1xH100"), budget_hours=24)
    assert one.depth < 20 and one.total_seconds <= 4 * 3600 and longer.depth > one.depth
    consumer = plan.make_plan(plan.parse_hardware("1x4090"))
    assert consumer.peak_memory_gib <= 24 - 2 and consumer.grad_accum_steps > 1
    assert plan.make_plan(plan.parse_hardware("cpu")).scale == "tiny"


def run_plan(tmp_path: Path, hardware: str | None) -> tuple[str, float]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "untouched")}
    env.pop("NANOCHAT_PLAN_HARDWARE", None)
    if hardware:
        env["NANOCHAT_PLAN_HARDWARE"] = hardware
    start = time.perf_counter()
    result = subprocess.run(["bash", "speedrun.sh", "--plan"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout, time.perf_counter() - start


@pytest.mark.parametrize("hardware", [None, "8xH100", "1x4090"])
def test_speedrun_plan_prints_the_recipe_fast_and_touches_nothing(tmp_path, hardware):
    out, seconds = run_plan(tmp_path, hardware)
    assert seconds < 10
    assert "depth" in out and "total" in out and "where the numbers come from" in out
    if hardware:
        assert "cost ~$" in out and "peak memory" in out and "disk" in out
    assert not (tmp_path / "untouched").exists()


def test_a_bad_plan_setting_is_a_clear_error(tmp_path):
    env = {**os.environ, "NANOCHAT_PLAN_HARDWARE": "8xPotato"}
    result = subprocess.run(["bash", "speedrun.sh", "--plan"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode != 0 and "COUNTxKIND" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(["bash", "speedrun.sh", "--depth", "two"], cwd=REPO, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode != 0 and "positive integer" in result.stderr


def test_the_report_shows_the_estimate_against_the_actual_time(tmp_path):
    from report import Report
    from report.header import collect_header
    from report.markdown import generate

    report = Report(tmp_path / "report")
    report.reset(collect_header())
    report.log("Base model training", [{"x": 1}])
    estimate = plan.make_plan(plan.parse_hardware("cpu"))
    (tmp_path / "report" / "plan.json").write_text(json.dumps({"hardware": estimate.hardware, "depth": 4,
                                                               "total_seconds": estimate.total_seconds}))
    text = generate(report, tmp_path / "report.md").read_text()
    assert "Estimated before the run" in text and "actual / estimate" in text
