"""fp16 training (GPUs without bf16): the loss scaler skips overflowed steps and backs off, grows after good
steps, hands the optimizers the true gradients, and a fp16 run of base_train on CPU trains and resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nanochat.checkpoint import meta_path
from nanochat.loss_scaling import LossScaler
from tests.test_base_train import metrics, run_to_completion, save_tokenizer


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4, bias=False)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_optimizer_sees_the_unscaled_gradient():
    x = torch.randn(3, 8)
    reference, reference_opt = model_and_optimizer()
    reference(x).square().sum().backward()
    reference_opt.step()

    model, optimizer = model_and_optimizer()
    scaler = LossScaler(enabled=True, init_scale=2.0 ** 10)
    scaler.scale_loss(model(x).square().sum()).backward()
    assert scaler.step([optimizer], model)
    torch.testing.assert_close(model.weight, reference.weight)


def test_an_overflowed_step_is_skipped_and_the_scale_backs_off_then_grows():
    model, optimizer = model_and_optimizer()
    before = model.weight.detach().clone()
    scaler = LossScaler(enabled=True, init_scale=2.0 ** 16, growth_interval=2)
    (model(torch.full((1, 8), float("inf"))).sum()).backward()
    assert not scaler.step([optimizer], model)
    assert torch.equal(model.weight, before) and model.weight.grad is None
    assert scaler.scale == 2.0 ** 15 and scaler.skipped_steps == 1
    for _ in range(2):
        scaler.scale_loss(model(torch.ones(1, 8)).sum()).backward()
        assert scaler.step([optimizer], model)
        model.zero_grad()
    assert scaler.scale == 2.0 ** 16  # two good steps in a row: doubled
    restored = LossScaler(enabled=True)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_off_unless_fp16():
    assert LossScaler.for_dtype(torch.float16).enabled
    assert not LossScaler.for_dtype(torch.bfloat16).enabled and not LossScaler.for_dtype(torch.float32).enabled
    loss = torch.tensor(2.0)
    assert LossScaler.for_dtype(torch.float32).scale_loss(loss) is loss


def test_fp16_base_training_on_cpu_trains_and_resumes_exactly(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    full = tmp_path / "full"
    save_tokenizer(tiny_tokenizer, full)
    stdout = run_to_completion(full)
    assert "torch.float16" in stdout
    rows = metrics(full)
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    meta = json.loads(meta_path(full / "base_checkpoints" / "d2", 6).read_text())
    assert meta["loop_state"]["loss_scaler"]["scale"] > 0

    resumed = tmp_path / "resumed"  # the same run, cut after its step-6 checkpoint, then resumed
    shutil.copytree(full, resumed)
    for path in (resumed / "base_checkpoints" / "d2").glob("*_000008*"):
        path.unlink()
    (resumed / "report" / "metrics_base_train.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= 6 and "train_loss" in row))
    assert "resumed from" in run_to_completion(resumed, "--resume")
    final = [row for row in metrics(resumed) if row["step"] == 8 and "train_loss" in row]
    expected = [row for row in rows if row["step"] == 8 and "train_loss" in row]
    assert final[0]["train_loss"] == pytest.approx(expected[0]["train_loss"], rel=1e-6)
