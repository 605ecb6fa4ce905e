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

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.kernels import newtonschulz_dtype

# -----------------------------------------------------------------------------
# Newton-Schulz orthogonalization


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately U @ V.T for G = U S V.T, via a quintic Newton-Schulz iteration.

    The coefficients (a, b, c) maximize the slope at zero, so small singular values grow fast; the iteration does not
    converge to exactly 1 but to roughly U S' V.T with S' in [0.7, 1.2], which does not hurt training; the same
    tolerance makes it stable in bf16, which it uses where bf16 is fast (newtonschulz_dtype). G may be a batch of
    matrices (..., rows, cols), each orthogonalized on its own. dtype: the iteration's (default newtonschulz_dtype)."""
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype or newtonschulz_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # one batch dimension, for baddbmm
    for _ in range(steps):
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


def orthogonalize(G: Tensor, steps: int) -> Tensor:
    """Newton-Schulz, compiled on CUDA (it is a chain of small matmuls and elementwise ops, a good fusion target)."""
    global _compiled_newtonschulz
    dtype = newtonschulz_dtype(G.device)  # chosen outside the compiled graph: a constant for it
    if not G.is_cuda:
        return zeropower_via_newtonschulz5(G, steps, dtype)
    if _compiled_newtonschulz is None:
        _compiled_newtonschulz = torch.compile(zeropower_via_newtonschulz5)
    return _compiled_newtonschulz(G, steps, dtype)


def momentum_direction(grad: Tensor, momentum_buffer: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """The (Nesterov) momentum step for one matrix, before orthogonalization; updates momentum_buffer in place."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def muon_update(grad: Tensor, momentum_buffer: Tensor, momentum: float, nesterov: bool, ns_steps: int) -> Tensor:
    """The orthogonalized (Nesterov) momentum step for one matrix; updates momentum_buffer in place."""
    return orthogonalize(momentum_direction(grad, momentum_buffer, momentum, nesterov), ns_steps)


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


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden-layer weights. lr is in units of the update's spectral norm (the update is orthogonal)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        super().__init__(_group_by_shape(list(params)), defaults)

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
            updates = orthogonalize(torch.stack(directions), group["ns_steps"])
            for p, update in zip(params, updates):
                p.add_(update.to(p.dtype), alpha=-group["lr"] * muon_lr_scale(p))


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
    (its momentum buffer lives only there), and one all_gather brings every rank the updated block."""

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
                update = muon_update(my_grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                     group["ns_steps"])
                mine.copy_(owned).add_(update.to(mine.dtype), alpha=-group["lr"] * muon_lr_scale(owned))
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
