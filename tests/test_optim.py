"""Muon and AdamW, their variants (Polar Express, NorMuon, cautious weight decay), and their distributed forms: two
gloo ranks must train exactly like one process that accumulates the same two micro-batches. Run by pytest; torchrun
runs this same file as the worker (see __main__ below)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import (
    POLAR_EXPRESS_LOWER,
    QUINTIC,
    Muon,
    minimax_odd_quintic,
    muon_lr_scale,
    newton_schulz_coefficients,
    normuon_normalize,
    zeropower_via_newtonschulz5,
)

STEPS = 3
LR_MULTIPLIERS = [1.0, 0.5, 0.25]  # the schedule changes lr between steps, as in training
# every Muon variant at once, for the distributed test (weight decay 0.1: large enough to move the weights visibly)
ALL_VARIANTS = {"ns_coefficients": "polar_express", "normuon": True, "weight_decay": 0.1, "cautious_weight_decay": True}


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


def one_muon_step(p0: torch.Tensor, grad: torch.Tensor, **options) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    p.grad = grad.clone()
    Muon([p], lr=0.1, momentum=0.0, nesterov=False, **options).step()
    return p.detach()


def test_muon_without_variants_is_the_plain_orthogonal_step():
    torch.manual_seed(0)
    p0, grad = torch.randn(16, 48), torch.randn(16, 48)
    expected = p0.clone().add_(zeropower_via_newtonschulz5(grad, steps=5).to(p0.dtype), alpha=-0.1)
    assert torch.equal(one_muon_step(p0, grad), expected)
    assert torch.equal(one_muon_step(p0, grad, weight_decay=0.0, cautious_weight_decay=False), expected)


# -----------------------------------------------------------------------------
# Polar Express: one minimax quintic per Newton-Schulz step


def compose(coefficients, x: np.ndarray) -> np.ndarray:
    for a, b, c in coefficients:
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def test_minimax_quintic_equioscillates_and_no_nearby_quintic_does_better():
    (a, b, c), error = minimax_odd_quintic(0.05, 1.0)
    x = np.linspace(0.05, 1.0, 20_001)
    powers = np.stack([x, x ** 3, x ** 5])
    residual = 1 - np.array([a, b, c]) @ powers
    assert np.abs(residual).max() == pytest.approx(error, rel=1e-6)
    assert residual[0] == pytest.approx(error, rel=1e-6) and residual[-1] == pytest.approx(-error, rel=1e-6)
    nearby = np.array([a, b, c]) * (1 + 1e-3 * np.random.default_rng(0).standard_normal((200, 3)))
    assert (np.abs(1 - nearby @ powers).max(axis=1) >= error * (1 - 1e-9)).all()


@pytest.mark.parametrize("steps", [5, 6])
def test_polar_express_maps_its_interval_closer_to_one_than_the_fixed_quintic(steps):
    x = np.geomspace(POLAR_EXPRESS_LOWER, 1.0, 100_001)
    polar_express = np.abs(1 - compose(newton_schulz_coefficients("polar_express", steps), x)).max()
    fixed = np.abs(1 - compose(newton_schulz_coefficients("quintic", steps), x)).max()
    assert polar_express < 0.5 * fixed
    assert newton_schulz_coefficients("quintic", steps) == (QUINTIC,) * steps


def random_matrices(shape: tuple[int, int], count: int = 4) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))


def largest_distance_from_one(X: torch.Tensor) -> float:
    return float((torch.linalg.svdvals(X.double()) - 1).abs().max())


# not square: a square Gaussian matrix's smallest singular values are ~1e-4 of its Frobenius norm, below the 1e-3
# either iteration is built for; these shapes' smallest are ~2e-2 of it
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 64)])
def test_polar_express_orthogonalizes_random_matrices_nearer_to_one(shape):
    G = random_matrices(shape)
    fixed = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32)
    polar_express = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32,
                                                coefficients=newton_schulz_coefficients("polar_express", 5))
    assert largest_distance_from_one(polar_express) < 0.5 * largest_distance_from_one(fixed)


def test_polar_express_stays_finite_and_near_orthogonal_in_bf16():
    G = random_matrices((96, 32), count=8) * 1e3  # large entries: only the normalization keeps the iteration bounded
    X = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.bfloat16,
                                    coefficients=newton_schulz_coefficients("polar_express", 5))
    assert X.dtype == torch.bfloat16 and torch.isfinite(X).all()
    assert largest_distance_from_one(X) < 0.3


def test_muon_rejects_unknown_newton_schulz_coefficients():
    with pytest.raises(ValueError, match="polar_express"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_coefficients="cubic")


# -----------------------------------------------------------------------------
# NorMuon and cautious weight decay


def test_normuon_evens_out_the_rows_and_keeps_the_updates_frobenius_norm():
    update = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 1, 8)[:, None]
    second_moment = torch.zeros(8, 1)
    normalized = normuon_normalize(update, second_moment, beta2=0.95)
    row_norms = normalized.norm(dim=1)
    assert row_norms.max() / row_norms.min() < 1.01  # 100x apart before
    assert normalized.norm() == pytest.approx(float(update.norm()), rel=1e-5)
    assert torch.allclose(second_moment, 0.05 * update.square().mean(dim=1, keepdim=True))


def test_normuon_state_resumes_exactly():
    torch.manual_seed(0)
    grads = [torch.randn(16, 48) for _ in range(3)]
    p = torch.nn.Parameter(torch.randn(16, 48))
    uninterrupted, resumed = p.detach().clone(), p.detach().clone()

    def steps(weight: torch.Tensor, grads: list[torch.Tensor], state: dict | None = None) -> dict:
        param = torch.nn.Parameter(weight)
        muon = Muon([param], lr=0.1, normuon=True)
        if state is not None:
            muon.load_state_dict(state)
        for grad in grads:
            param.grad = grad
            muon.step()
        weight.copy_(param.detach())
        return muon.state_dict()

    steps(uninterrupted, grads)
    state = steps(resumed, grads[:2])
    assert set(state["state"][0]) == {"momentum_buffer", "second_moment"}
    steps(resumed, grads[2:], state)
    assert torch.equal(resumed, uninterrupted)


def test_cautious_weight_decay_shrinks_only_weights_the_update_pulls_towards_zero():
    torch.manual_seed(0)
    p0, grad = torch.randn(16, 48), torch.randn(16, 48)
    undecayed = one_muon_step(p0, grad)
    update = (p0 - undecayed) / 0.1  # what the step subtracts, before the lr
    agree = update.sign() == p0.sign()
    cautious = one_muon_step(p0, grad, weight_decay=0.5)
    assert 0.3 < agree.float().mean() < 0.7
    torch.testing.assert_close(cautious, undecayed - 0.1 * 0.5 * p0 * agree)
    assert torch.equal(cautious[~agree], undecayed[~agree])
    plain = one_muon_step(p0, grad, weight_decay=0.5, cautious_weight_decay=False)
    torch.testing.assert_close(plain, p0 * (1 - 0.1 * 0.5) - (p0 - undecayed))


def test_a_muon_state_saved_before_the_variants_existed_loads_with_them_off():
    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8)
    state = Muon([p], normuon=True).state_dict()
    for group in state["param_groups"]:
        for key in ("ns_coefficients", "normuon", "normuon_beta2", "weight_decay", "cautious_weight_decay"):
            del group[key]
    muon = Muon([p], normuon=True)
    muon.load_state_dict(state)
    assert muon.param_groups[0]["normuon"] is False
    muon.step()
    assert "second_moment" not in muon.state[p]


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


def train(model: GPT, rank: int | None, muon_options: dict | None = None) -> dict[str, torch.Tensor]:
    optimizers = model.setup_optimizers(weight_decay=0.1, muon_options=muon_options)
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
    expected = {"default": train(make_model(), rank=None), "variants": train(make_model(), None, ALL_VARIANTS)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)],
        check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    initial = {name: p.detach() for name, p in make_model().named_parameters()}
    for variant, options in DISTRIBUTED_RUNS:
        for rank in range(2):
            params = torch.load(tmp_path / f"{variant}_rank{rank}.pt")
            for name, value in expected[options].items():
                assert not torch.equal(value, initial[name]), f"{name} was not trained"
                if variant != "variants":
                    torch.testing.assert_close(params[name], value, atol=2e-5, rtol=1e-4, msg=f"{variant} {name}")
                    continue
                # cautious weight decay is a sign test: where an update entry is ~0, the last-bit difference between
                # averaging across ranks and accumulating in one process can flip it, moving that weight by
                # lr * wd * |w| (~2e-4 here). So: nearly every entry to the bit's tolerance, every entry to 1e-3 (a
                # broken distributed variant is off by O(lr) = 1e-2)
                off = (params[name] - value).abs() > 2e-5 + 1e-4 * value.abs()
                assert off.float().mean() < 0.01, f"{variant} {name}: {off.float().mean():.2%} of entries differ"
                torch.testing.assert_close(params[name], value, atol=1e-3, rtol=0, msg=f"{variant} {name}")
    assert not torch.equal(expected["variants"]["transformer.h.0.attn.c_q.weight"],
                           expected["default"]["transformer.h.0.attn.c_q.weight"])


# (name, optimizer options): both collectives without variants, and every Muon variant with reduce_scatter
DISTRIBUTED_RUNS = [("reduce_scatter", "default"), ("all_reduce_fallback", "default"), ("variants", "variants")]


def _worker(out_dir: Path) -> None:
    """Under torchrun: train with the distributed optimizers, once with reduce_scatter_tensor and once with the
    all_reduce fallback for backends that lack it; every rank saves its parameters."""
    import torch.distributed as dist

    from nanochat.common import compute_cleanup
    from nanochat.optim import DistAdamW, DistMuon, _ReduceScatterMean

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for variant, options in DISTRIBUTED_RUNS:
        _ReduceScatterMean.fallback = variant == "all_reduce_fallback"
        model = make_model()
        assert [type(o) for o in model.setup_optimizers()] == [DistAdamW, DistMuon]
        muon_options = ALL_VARIANTS if options == "variants" else None
        torch.save(train(model, rank, muon_options), out_dir / f"{variant}_rank{rank}.pt")
    compute_cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    fp32_newtonschulz()
    _worker(Path(sys.argv[1]))
