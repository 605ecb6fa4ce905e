"""Muon and AdamW, and their distributed forms: two gloo ranks must train exactly like one process that accumulates
the same two micro-batches. Run by pytest; torchrun runs this same file as the worker (see __main__ below)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, muon_lr_scale, zeropower_via_newtonschulz5

STEPS = 3
LR_MULTIPLIERS = [1.0, 0.5, 0.25]  # the schedule changes lr between steps, as in training


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# Muon on its own


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_maps_singular_values_near_one(shape):
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen))
    spread = torch.logspace(0, -1.5, min(shape))  # singular values from 1 down to 0.03
    G = U[:, :min(shape)] @ torch.diag(spread) @ V[:, :min(shape)].T
    singular_values = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, steps=5).float())
    # the quintic iteration trades exactness for speed: singular values land in roughly [0.7, 1.2]
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_muon_scales_the_step_of_tall_matrices():
    assert muon_lr_scale(torch.empty(64, 16)) == 2.0
    assert muon_lr_scale(torch.empty(16, 64)) == 1.0


def test_muon_step_is_an_orthogonal_update_of_size_lr():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 32))
    before = p.detach().clone()
    U, _ = torch.linalg.qr(torch.randn(32, 32))
    p.grad = U @ torch.diag(torch.linspace(0.2, 3.0, 32)) @ U.T
    Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    update = (before - p.detach()) / 0.1
    singular_values = torch.linalg.svdvals(update)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_muon_rejects_parameters_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


# -----------------------------------------------------------------------------
# Distributed == accumulated


def make_model() -> GPT:
    # odd vocab (DistAdamW pads the flat tensor) and 3 layers (Muon blocks of 2 with a missing slot)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=301, n_layer=3, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    return model


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step, two micro-batches: the single process accumulates both, rank r of two takes number r."""
    data = torch.randint(0, 301, (STEPS, 2, 4, 17), generator=torch.Generator().manual_seed(1))
    return [(seq[..., :-1], seq[..., 1:]) for seq in data]


def train(model: GPT, rank: int | None) -> dict[str, torch.Tensor]:
    optimizers = model.setup_optimizers(weight_decay=0.1)
    for step, (inputs, targets) in enumerate(micro_batches()):
        micro = range(2) if rank is None else [rank]
        for i in micro:
            (model(inputs[i], targets[i]) / len(micro)).backward()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * LR_MULTIPLIERS[step]
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def fp32_newtonschulz() -> None:
    """bf16 Newton-Schulz (on CUDA and bf16-capable CPUs) would round the tiny difference between averaging
    gradients across ranks and accumulating them in one process up to bf16's precision; in fp32 the comparison
    below is about the collectives alone."""
    import nanochat.optim

    nanochat.optim.newtonschulz_dtype = lambda device: torch.float32


def test_two_gloo_ranks_match_one_process_with_gradient_accumulation(tmp_path, monkeypatch):
    monkeypatch.setattr("nanochat.optim.newtonschulz_dtype", lambda device: torch.float32)  # see fp32_newtonschulz
    expected = train(make_model(), rank=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)],
        check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    initial = {name: p.detach() for name, p in make_model().named_parameters()}
    for variant in ("reduce_scatter", "all_reduce_fallback"):
        for rank in range(2):
            params = torch.load(tmp_path / f"{variant}_rank{rank}.pt")
            for name, value in expected.items():
                assert not torch.equal(value, initial[name]), f"{name} was not trained"
                torch.testing.assert_close(params[name], value, atol=2e-5, rtol=1e-4, msg=f"{variant} {name}")


def _worker(out_dir: Path) -> None:
    """Under torchrun: train with the distributed optimizers, once with reduce_scatter_tensor and once with the
    all_reduce fallback for backends that lack it; every rank saves its parameters."""
    import torch.distributed as dist

    from nanochat.common import compute_cleanup
    from nanochat.optim import DistAdamW, DistMuon, _ReduceScatterMean

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for variant, fallback in (("reduce_scatter", False), ("all_reduce_fallback", True)):
        _ReduceScatterMean.fallback = fallback
        model = make_model()
        assert [type(o) for o in model.setup_optimizers()] == [DistAdamW, DistMuon]
        torch.save(train(model, rank), out_dir / f"{variant}_rank{rank}.pt")
    compute_cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    fp32_newtonschulz()
    _worker(Path(sys.argv[1]))
