"""Optimizers: Muon for the 2-D hidden matrices, AdamW for the embedding and the LM head, and their distributed forms.

There is no DistributedDataParallel wrapper in this codebase: under torchrun the distributed optimizers average the
gradients themselves. Each one reduce-scatters the gradients (every rank receives the averaged gradient of the part it
owns), updates only that part (so optimizer state and compute are split across ranks), then all-gathers the updated
parameters. Only torch.distributed's own collectives go on the wire.

Muon (https://kellerjordan.github.io/posts/muon/): SGD momentum with Nesterov, whose update is replaced by the nearest
semi-orthogonal matrix, computed with a few Newton-Schulz iterations. It only makes sense for 2-D weights of hidden
layers; embeddings and the LM head want AdamW.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.kernels import newtonschulz_dtype

# -----------------------------------------------------------------------------
# Newton-Schulz coefficients: one fixed quintic, or Polar Express's own quintic for every iteration
#
# Each iteration applies an odd quintic p(x) = a x + b x^3 + c x^5 to every singular value at once (X -> a X +
# b (X X^T) X + c (X X^T)^2 X). The fixed triple repeats one p; Polar Express (Amsel et al., 2025,
# arXiv:2505.16932) picks, for iteration k, the p closest to 1 (minimax) on the interval [l_k, u_k] that the singular
# values are known to lie in after k iterations, which is the optimal composition of quintics (their Theorem 4.1).

QUINTIC = (3.4445, -4.7750, 2.0315)
# the smallest singular value (relative to the Frobenius norm the iteration first divides by) the composition is
# designed for, the paper's choice too: smaller ones still grow by the product of the slopes a_k (~1000x over 5
# steps; the fixed quintic's 3.4445^5 ~ 490x). On [1e-3, 1], 5 Polar Express steps leave a max error |1 - p(x)| of
# 0.12, 6 steps 0.0014; the fixed quintic 0.53 and 0.32.
POLAR_EXPRESS_LOWER = 1e-3
# each p is fitted on [l_k, 1.01 u_k]: bf16 rounding can push a singular value a little above u_k, and past the
# interval's end a quintic grows like x^5 (iterated, that diverges). Our form of the paper's safety factor (they
# evaluate p(x / 1.01)); it costs little accuracy: 5 steps' max error is 0.124 instead of 0.113 without it.
POLAR_EXPRESS_MARGIN = 1.01
NS_COEFFICIENTS = ("quintic", "polar_express")


def minimax_odd_quintic(lower: float, upper: float) -> tuple[tuple[float, float, float], float]:
    """((a, b, c), E): the odd quintic p(x) = a x + b x^3 + c x^5 with the least max |1 - p(x)| = E on
    0 < lower <= x <= upper, by Remez exchange in float64.

    A nonzero odd quintic x (a + b x^2 + c x^4) has at most two positive roots, so {x, x^3, x^5} is a Chebyshev
    system on (0, inf) and the best p is the one whose error equioscillates at 4 points: both ends and the two
    critical points of p (the positive roots of p'(x) = a + 3b x^2 + 5c x^4, a quadratic in x^2). Each exchange
    solves p(x_i) + (-1)^i E = 1 on the 4 reference points, then moves the inner two to p's critical points; E only
    ever grows towards the minimax error, and the largest error on the new points bounds it from above."""
    reference = np.linspace(lower, upper, 4)
    alternating = np.array([1.0, -1.0, 1.0, -1.0])
    for _ in range(100):
        system = np.stack([reference, reference ** 3, reference ** 5, alternating], axis=1)
        a, b, c, levelled = np.linalg.solve(system, np.ones(4))
        squares = np.roots([5 * c, 3 * b, a])
        squares = np.sort(squares[np.isreal(squares)].real)
        critical = np.sqrt(squares[squares > 0])
        critical = critical[(critical > lower) & (critical < upper)]
        assert len(critical) == 2, f"Remez on [{lower}, {upper}]: the error does not equioscillate"
        reference = np.array([lower, *critical, upper])
        largest_error = np.abs(1 - (a * reference + b * reference ** 3 + c * reference ** 5)).max()
        if largest_error - abs(levelled) <= 1e-12 * largest_error:
            break
    return (float(a), float(b), float(c)), float(largest_error)


@functools.lru_cache
def polar_express_coefficients(steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of `steps` iterations, computed once per process. The singular values start in
    [POLAR_EXPRESS_LOWER, 1]; a minimax p maps [l, u] onto [1 - E, 1 + E] (its error is +-E at both ends and at its
    critical points), which is the next interval. The fit only depends on u / l, so no rescaling is needed: keeping
    the interval centred on 1 makes the last iteration's output as close to 1 as the composition can get."""
    lower, upper = POLAR_EXPRESS_LOWER, 1.0
    coefficients = []
    for _ in range(steps):
        quintic, error = minimax_odd_quintic(lower, POLAR_EXPRESS_MARGIN * upper)
        coefficients.append(quintic)
        lower, upper = 1 - error, 1 + error
    return tuple(coefficients)


def newton_schulz_coefficients(name: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """Muon's ns_coefficients ("quintic" | "polar_express") as one (a, b, c) per iteration."""
    if name == "quintic":
        return (QUINTIC,) * steps
    if name == "polar_express":
        return polar_express_coefficients(steps)
    raise ValueError(f"unknown Newton-Schulz coefficients {name!r}: use one of {NS_COEFFICIENTS}")


# -----------------------------------------------------------------------------
# Newton-Schulz orthogonalization


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                                coefficients: tuple[tuple[float, float, float], ...] | None = None) -> Tensor:
    """Approximately U @ V.T for G = U S V.T, via a quintic Newton-Schulz iteration.

    The fixed coefficients (QUINTIC) maximize the slope at zero, so small singular values grow fast; the iteration
    does not converge to exactly 1 but to roughly U S' V.T with S' in [0.7, 1.2], which does not hurt training; the
    same tolerance makes it stable in bf16, which it uses where bf16 is fast (newtonschulz_dtype). G may be a batch of
    matrices (..., rows, cols), each orthogonalized on its own. dtype: the iteration's (default newtonschulz_dtype).
    coefficients: one (a, b, c) per iteration (default: QUINTIC each time; see newton_schulz_coefficients)."""
    assert G.ndim >= 2
    coefficients = coefficients or (QUINTIC,) * steps
    assert len(coefficients) == steps
    X = G.to(dtype or newtonschulz_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # one batch dimension, for baddbmm
    for a, b, c in coefficients:
        A = X @ X.mT
        # the scaled sums inside the matmuls (beta * input + alpha * product): no separate elementwise passes, and
        # no bf16 rounding between product and sum. 2 Zen 5 cores, bf16, 16 x 256 x 256: 12.4 -> 10.5 ms, and half
        # the error against fp64 (0.023 -> 0.011)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = torch.baddbmm(X, B, X, beta=a)  # a * X + B @ X
    X = X.reshape(*batch_shape, *X.shape[-2:])
    if transposed:
        X = X.mT
    return X


_compiled_newtonschulz = None


def orthogonalize(G: Tensor, steps: int, ns_coefficients: str = "quintic") -> Tensor:
    """Newton-Schulz, compiled on CUDA (it is a chain of small matmuls and elementwise ops, a good fusion target)."""
    global _compiled_newtonschulz
    dtype = newtonschulz_dtype(G.device)  # chosen outside the compiled graph: constants for it
    coefficients = newton_schulz_coefficients(ns_coefficients, steps)
    if not G.is_cuda:
        return zeropower_via_newtonschulz5(G, steps, dtype, coefficients)
    if _compiled_newtonschulz is None:
        _compiled_newtonschulz = torch.compile(zeropower_via_newtonschulz5)
    return _compiled_newtonschulz(G, steps, dtype, coefficients)


def momentum_direction(grad: Tensor, momentum_buffer: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """The (Nesterov) momentum step for one matrix, before orthogonalization; updates momentum_buffer in place."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def muon_update(grad: Tensor, momentum_buffer: Tensor, group: dict) -> Tensor:
    """The orthogonalized (Nesterov) momentum step for one matrix; updates momentum_buffer in place."""
    direction = momentum_direction(grad, momentum_buffer, group["momentum"], group["nesterov"])
    return orthogonalize(direction, group["ns_steps"], group["ns_coefficients"])


def normuon_normalize(update: Tensor, second_moment: Tensor, beta2: float, eps: float = 1e-8) -> Tensor:
    """NorMuon (Li et al., 2025, arXiv:2510.05491): an orthogonal update gives every output row (neuron) about the
    same size in total, not per entry; dividing each row by the root of an EMA of its mean square evens out the
    neurons' step sizes over time. The result is rescaled to the orthogonal update's Frobenius norm, so lr keeps its
    meaning; that also cancels any common factor, so the zero-initialized EMA needs no bias correction.
    update: (rows, cols); second_moment: (rows, 1) fp32, updated in place."""
    update = update.float()
    second_moment.lerp_(update.square().mean(dim=-1, keepdim=True), 1 - beta2)
    normalized = update / (second_moment.sqrt() + eps)
    return normalized * (update.norm() / normalized.norm().clamp_min(1e-30))  # a zero update stays zero, not NaN


def muon_lr_scale(p: Tensor) -> float:
    """Tall matrices get a larger step: an orthogonal update's RMS shrinks as sqrt(cols/rows)."""
    return max(1.0, p.size(-2) / p.size(-1)) ** 0.5


def _group_by_shape(params: list[Tensor]) -> list[dict]:
    """One param group per shape, in first-seen order (deterministic on every rank), so DistMuon can exchange a
    group's matrices in equally shaped blocks."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for p in params:
        if p.ndim != 2:
            raise ValueError(f"Muon only takes 2-D matrices, got a parameter of shape {tuple(p.shape)}: "
                             "give embeddings, the LM head and any 1-D/0-D parameter to AdamW")
        groups.setdefault(tuple(p.shape), []).append(p)
    return [{"params": group} for group in groups.values()]


# -----------------------------------------------------------------------------
# Muon, one process


# what a group saved before the variants existed ran with: every variant off
VARIANTS_OFF = {"ns_coefficients": "quintic", "normuon": False, "normuon_beta2": 0.95, "weight_decay": 0.0,
                "cautious_weight_decay": True}


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden-layer weights. lr is in units of the update's spectral norm (the update is orthogonal).

    Variants, each off by default: ns_coefficients="polar_express" (one minimax quintic per Newton-Schulz step);
    normuon (each output row's step normalized by an EMA, beta2 normuon_beta2, of its mean square: normuon_normalize);
    weight_decay, decoupled and scaled with the scheduled lr (p -= lr * weight_decay * p), with
    cautious_weight_decay applied only where the update and the weight have the same sign, i.e. where the update
    already pulls the weight towards 0 (Chen et al., 2025, "Cautious Weight Decay", arXiv:2510.12402)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_coefficients: str = "quintic", normuon: bool = False, normuon_beta2: float = 0.95,
                 weight_decay: float = 0.0, cautious_weight_decay: bool = True):
        if ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(f"unknown ns_coefficients {ns_coefficients!r}: use one of {NS_COEFFICIENTS}")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                    "ns_coefficients": ns_coefficients, "normuon": normuon, "normuon_beta2": normuon_beta2,
                    "weight_decay": weight_decay, "cautious_weight_decay": cautious_weight_decay}
        super().__init__(_group_by_shape(list(params)), defaults)

    def __setstate__(self, state: dict) -> None:
        """load_state_dict takes the saved groups' settings: a state saved before the variants existed has none."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in VARIANTS_OFF.items():
                group.setdefault(key, value)

    def apply_update(self, param: Tensor, target: Tensor, update: Tensor, group: dict) -> None:
        """target (param itself, or DistMuon's copy of it) <- one step of param: the orthogonal update, row-normalized
        with NorMuon, weight decay, then the step at lr."""
        if group["normuon"]:
            state = self.state[param]
            if "second_moment" not in state:
                state["second_moment"] = torch.zeros(param.size(0), 1, dtype=torch.float32, device=param.device)
            update = normuon_normalize(update, state["second_moment"], group["normuon_beta2"])
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay and group["cautious_weight_decay"]:
            target.sub_(target * (update.sign() == target.sign()), alpha=lr * weight_decay)
        elif weight_decay:
            target.mul_(1 - lr * weight_decay)
        target.add_(update.to(target.dtype), alpha=-lr * muon_lr_scale(target))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            directions = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                directions.append(momentum_direction(p.grad, state["momentum_buffer"], group["momentum"],
                                                     group["nesterov"]))
            # a group holds matrices of one shape: one batched Newton-Schulz for all of them, not one per matrix
            updates = orthogonalize(torch.stack(directions), group["ns_steps"], group["ns_coefficients"])
            for p, update in zip(params, updates):
                self.apply_update(p, p, update, group)


# -----------------------------------------------------------------------------
# Collectives
#
# Gradients are averaged as SUM then divide: ReduceOp.AVG is NCCL-only in older torch releases. gloo lacked
# reduce_scatter_tensor in some releases (torch 2.15's gloo has it, checked); where it is missing we all_reduce the
# whole buffer and keep this rank's slice: the same result for world_size x the traffic, still only stock collectives.
# Every collective is launched asynchronously so communication overlaps the next block's work.


class _ReduceScatterMean:
    """output (n,) <- mean over ranks of this rank's slice of input (world_size * n,); call wait() before use."""

    fallback = False  # flips to True (once, for the process) if the backend lacks reduce_scatter_tensor

    def __init__(self, output: Tensor, input: Tensor):
        self.output, self.input = output, input.view(-1)  # flat: backends differ in how they split other shapes
        self.world_size = dist.get_world_size()
        self.used_fallback = _ReduceScatterMean.fallback or not hasattr(dist, "reduce_scatter_tensor")
        if not self.used_fallback:
            try:
                self.work = dist.reduce_scatter_tensor(output.view(-1), self.input, op=dist.ReduceOp.SUM,
                                                       async_op=True)
                return
            except (NotImplementedError, RuntimeError) as e:
                if "support" not in str(e).lower() and "implement" not in str(e).lower():
                    raise  # a real error, not a missing collective
                _ReduceScatterMean.fallback = self.used_fallback = True
        self.work = dist.all_reduce(self.input, op=dist.ReduceOp.SUM, async_op=True)

    def wait(self) -> Tensor:
        self.work.wait()
        if self.used_fallback:
            self.output.view(-1).copy_(self.input.view(self.world_size, -1)[dist.get_rank()])
        return self.output.div_(self.world_size)


# -----------------------------------------------------------------------------
# DistMuon: matrices are dealt round-robin to ranks; each rank orthogonalizes only the ones it owns


class DistMuon(Muon):
    """Muon under torch.distributed. A shape group's matrices are processed in blocks of world_size: one
    reduce_scatter averages the block's gradients and hands matrix i of the block to rank i, which runs the Muon update
    (its momentum buffer and NorMuon's second moments live only there), and one all_gather brings every rank the
    updated block."""

    @torch.no_grad()
    def step(self, closure=None):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        blocks = []  # (group, block of params, pending reduce-scatter)
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            for base in range(0, len(params), world_size):
                block = params[base:base + world_size]
                if any(p.grad is None for p in block):
                    raise RuntimeError("DistMuon needs a gradient for every matrix on every rank (a rank that "
                                       "skipped one would deadlock the collective): run backward first")
                # the block's gradients stacked into one buffer; slots past the end of the group stay zero
                grads = torch.zeros((world_size, *block[0].shape), dtype=block[0].grad.dtype, device=block[0].device)
                for i, p in enumerate(block):
                    grads[i].copy_(p.grad)
                blocks.append((group, block, _ReduceScatterMean(torch.empty_like(grads[0]), grads)))

        gathers = []  # (block, gathered values, pending all-gather)
        for group, block, pending in blocks:
            my_grad = pending.wait()
            mine = torch.zeros_like(block[0])
            if rank < len(block):
                owned = block[rank]
                state = self.state[owned]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(my_grad)
                mine.copy_(owned)
                self.apply_update(owned, mine, muon_update(my_grad, state["momentum_buffer"], group), group)
            values = torch.empty((world_size, *block[0].shape), dtype=block[0].dtype, device=block[0].device)
            gathers.append((block, values, dist.all_gather_into_tensor(values.view(-1), mine.view(-1), async_op=True)))

        for block, values, work in gathers:
            work.wait()
            for i, p in enumerate(block):
                p.copy_(values[i])


# -----------------------------------------------------------------------------
# DistAdamW: every tensor is split into world_size flat slices; rank r keeps the Adam moments of slice r only


class DistAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction: the same math as torch.optim.AdamW) under torch.distributed,
    ZeRO-1 style: reduce_scatter the flattened gradient, update this rank's slice, all_gather the parameter.
    Tensors are zero-padded to a multiple of world_size, so any shape (e.g. a vocab not divisible by 8) works."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        pending = []  # (group, param, slice length, pending reduce-scatter)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError("DistAdamW needs a gradient for every parameter on every rank (a rank that "
                                       "skipped one would deadlock the collective): run backward first")
                slice_len = -(-p.numel() // world_size)
                grads = torch.zeros(slice_len * world_size, dtype=p.grad.dtype, device=p.device)
                grads[:p.numel()].copy_(p.grad.reshape(-1))
                grad_slice = torch.empty(slice_len, dtype=p.grad.dtype, device=p.device)
                pending.append((group, p, slice_len, _ReduceScatterMean(grad_slice, grads)))

        gathers = []
        for group, p, slice_len, reduce in pending:
            grad_slice = reduce.wait()
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros(slice_len, dtype=p.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(slice_len, dtype=p.dtype, device=p.device)
            state["step"] += 1
            step = state["step"].item()
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

            start = rank * slice_len
            local = max(0, min(slice_len, p.numel() - start))  # the last rank's slice may be partly padding
            param_slice = torch.zeros(slice_len, dtype=p.dtype, device=p.device)
            param_slice[:local].copy_(p.reshape(-1)[start:start + local])
            param_slice.mul_(1 - lr * wd)
            exp_avg.lerp_(grad_slice, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad_slice, grad_slice, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
            param_slice.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

            gathered = torch.empty(slice_len * world_size, dtype=p.dtype, device=p.device)
            gathers.append((p, gathered, dist.all_gather_into_tensor(gathered, param_slice, async_op=True)))

        for p, gathered, work in gathers:
            work.wait()
            p.copy_(gathered[:p.numel()].view_as(p))
