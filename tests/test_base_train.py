"""scripts.base_train end to end on a tiny model: a run killed mid-way and resumed matches an uninterrupted run;
bad flags and misuse fail with the fix; scripts.base_loss evaluates the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import training
from nanochat.checkpoint import find_last_step, load_checkpoint, meta_path
from report import Report
from scripts import base_loss, base_train

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
# depth 2, 2 sequences of 64 tokens per micro-step, 2 micro-steps per step (gradient accumulation), 8 steps
FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=256", "--num-iterations=8",
         "--eval-every=4", "--eval-tokens=256", "--sample-every=8", "--save-every=3"]


def save_tokenizer(tokenizer, base_dir: Path) -> None:
    tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.tensor(tokenizer.token_byte_lengths()), base_dir / "tokenizer" / "token_bytes.pt")


def train_command(base_dir: Path, *extra: str) -> tuple[list[str], dict]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(DATA_DIR),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return [sys.executable, "-m", "scripts.base_train", *FLAGS, *extra], env


def run_to_completion(base_dir: Path, *extra: str) -> str:
    command, env = train_command(base_dir, *extra)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def run_and_kill_after_checkpoint(base_dir: Path, step: int) -> None:
    """SIGKILL the run as soon as it reports the checkpoint of `step`: no end-of-run save, no cleanup."""
    command, env = train_command(base_dir)
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith(f"saved checkpoint step {step} "):
            process.kill()
            break
    process.wait()
    assert process.returncode != 0, "".join(output)  # killed, not finished
    checkpoint_dir = base_dir / "base_checkpoints" / "d2"
    for later in checkpoint_dir.glob("meta_*.json"):  # the kill may land a step late: make it "after step k"
        if int(later.stem.split("_")[1]) > step:
            later.unlink()


def metrics(base_dir: Path) -> list[dict]:
    return Report(base_dir / "report").read_metrics()["base_train"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_tokenizer) -> Path:
    base_dir = tmp_path_factory.mktemp("uninterrupted")
    save_tokenizer(tiny_tokenizer, base_dir)
    stdout = run_to_completion(base_dir)
    assert "step 00008/00008" in stdout and "val bpb" in stdout and "sample: " in stdout
    return base_dir


def test_a_killed_and_resumed_run_matches_the_uninterrupted_run(uninterrupted_run, tmp_path, tiny_tokenizer):
    save_tokenizer(tiny_tokenizer, tmp_path)
    run_and_kill_after_checkpoint(tmp_path, step=3)
    stdout = run_to_completion(tmp_path, "--resume")
    assert "resumed from" in stdout and "at step 3" in stdout

    expected, resumed = metrics(uninterrupted_run), metrics(tmp_path)
    assert [row["step"] for row in resumed] == [row["step"] for row in expected] == list(range(9))
    for a, b in zip(expected, resumed, strict=True):
        for key in ("train_loss", "val_bpb"):
            assert (key in a) == (key in b), (a, b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (key, a["step"])
    assert expected[-1]["train_loss"] < expected[1]["train_loss"]  # it trained

    final = {name: load_checkpoint(base / "base_checkpoints" / "d2", 8, "cpu")[0] for name, base in
             (("expected", uninterrupted_run), ("resumed", tmp_path))}
    for name, value in final["expected"].items():
        torch.testing.assert_close(final["resumed"][name], value, atol=1e-6, rtol=1e-5)
    meta = json.loads(meta_path(tmp_path / "base_checkpoints" / "d2", 8).read_text())
    assert meta["step"] == 8 and meta["tokenizer_fingerprint"] == tiny_tokenizer.fingerprint()
    assert meta["dataloader_state"]["split"] == "train" and len(meta["rank_states"]) == 1


def test_resume_with_other_settings_fails_and_resume_of_a_finished_run_does_nothing(uninterrupted_run, monkeypatch,
                                                                                     capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(uninterrupted_run))
    with pytest.raises(SystemExit, match=r"--matrix-lr: saved 0.02, now 0.05.*pass the original flags"):
        base_train.main([*FLAGS, "--resume", "--matrix-lr=0.05"])
    assert base_train.main([*FLAGS, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_fresh_run_sets_the_previous_checkpoints_aside(uninterrupted_run, base_dir, tiny_tokenizer):
    save_tokenizer(tiny_tokenizer, base_dir)
    shutil.copytree(uninterrupted_run / "base_checkpoints", base_dir / "base_checkpoints")
    assert base_train.main([*FLAGS, "--num-iterations=1", "--eval-every=-1", "--sample-every=-1"]) == 0
    previous = list((base_dir / "base_checkpoints").glob("d2.replaced-*"))
    assert len(previous) == 1 and find_last_step(previous[0]) == 8  # nothing lost
    assert find_last_step(base_dir / "base_checkpoints" / "d2") == 1  # ...and nothing mixed in


@pytest.mark.parametrize(("flags", "message"), [
    (["--depth=0"], "--depth must be a positive integer"),
    (["--warmup-ratio=0.9", "--warmdown-ratio=0.2"], "must be <= 1"),
    (["--num-iterations=-5"], "--num-iterations must be a positive number"),
    (["--eval-every=0"], "--eval-every must be a positive number of steps or -1"),
])
def test_bad_flags_give_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        base_train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_a_batch_that_does_not_divide_fails_before_any_work(capsys):
    with pytest.raises(SystemExit, match=r"--total-batch-size=1000 must be a multiple of .* = 192"):
        base_train.main(["--depth=2", "--max-seq-len=64", "--device-batch-size=3", "--total-batch-size=1000"])


def test_lr_schedule_warms_up_holds_and_warms_down():
    def lrm(step):
        return training.lr_multiplier(step, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)

    assert [lrm(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lrm(10) == lrm(50) == lrm(80) == 1.0
    assert lrm(90) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lrm(100) == pytest.approx(0.1)
    assert training.muon_momentum(0) == 0.85 and training.muon_momentum(300) == training.muon_momentum(900)


def test_base_loss_reports_train_and_val_bpb(uninterrupted_run, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(uninterrupted_run))
    assert base_loss.main(["--split-tokens=256", "--device-batch-size=2", "--max-new-tokens=4"]) == 0
    section = Report(uninterrupted_run / "report").read_sections()["Base model loss"]
    bpb = section["data"][1]
    assert 0 < bpb["train bpb"] < 10 and 0 < bpb["val bpb"] < 10
    assert len(section["data"][2]["samples"]) == len(base_loss.PROMPTS)
    training = Report(uninterrupted_run / "report").read_sections()["Base model training"]
    assert training["data"][1]["Calculated number of iterations"] == 8


def test_base_loss_with_int8_weights_stays_within_one_percent(uninterrupted_run, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(uninterrupted_run))
    report = Report(uninterrupted_run / "report")
    flags = ["--split-tokens=1024", "--device-batch-size=2", "--max-new-tokens=1"]
    val_bpb = {}
    for quantize in ("none", "int8"):
        assert base_loss.main([*flags, f"--quantize={quantize}"]) == 0
        section = report.read_sections()["Base model loss"]
        val_bpb[quantize] = section["data"][1]["val bpb"]
        assert section["data"][0].get("weights", "none") == quantize
    assert val_bpb["int8"] != val_bpb["none"]  # the weights really were rounded
    assert abs(val_bpb["int8"] - val_bpb["none"]) / val_bpb["none"] < 0.01
