"""Hardware fast paths, each chosen by probing what this machine does, with plain torch as the fallback.

- `Linear` / `matmul`: fp32 CPU matmuls through oneDNN's linear primitive instead of MKL, where oneDNN is faster here.
  torch's fp32 matmul on CPU is MKL's, which runs an AVX2 code path on AMD CPUs and repacks its right-hand operand on
  every call; oneDNN (also inside torch) uses AVX-512 where the CPU has it. 2 Zen 5 cores, 2048 x 1024 x 1024:
  190 GFLOP/s with MKL, 450 with oneDNN. On 2 Zen 3 cores (AVX2 only) MKL is the faster at training shapes (184 vs
  171 GFLOP/s at 2048 x 256 x 1024), so the choice is a timing, made once per process, with a margin wide enough
  that every process of a run makes the same one (`onednn_training_matmuls`).
- `PackedLinear`: a weight reordered once into oneDNN's blocked layout, for serving. Whether a dtype can be packed
  is probed by packing a tiny weight: bf16 packing needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, and where it raises
  the plain layer stays (`packable`).
- `tanh_`: on CPU 2 sigmoid(2x) - 1, the same function to 2e-7 and 7-10x faster than torch's CPU tanh.
- `newtonschulz_dtype`: Muon's iteration in bf16 where this device multiplies bf16 faster than fp32 (CUDA; a CPU
  with native bf16), timed once per process on CPUs.

Under autocast (bf16) torch already calls oneDNN, and on GPUs cuBLAS, so the oneDNN paths step aside there.
Every probe is cached per process, and a choice that a timing makes is also kept per machine (`_timed_once`), so
that every process computes with the same kernels; `describe()` prints what was chosen, for benchmarks and logs.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanochat.common import atomic_write_text, describe_cpu

try:
    import fcntl
except ImportError:  # not POSIX: each process keeps its own timing
    fcntl = None


def _has_onednn_ops() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _clearly_faster(candidate, baseline, margin: float, repeats: int = 7) -> bool:
    """Whether `candidate` runs at least `margin` times as fast as `baseline` (medians of alternating runs). The
    gaps worth taking are wide (oneDNN vs MKL on Zen 5: 2.4x; native vs emulated bf16: ~5x); a close call keeps
    the plain op. A timing can still land either side of the margin (one thread of Zen 3: oneDNN 1.09-1.32x), so
    callers go through `_timed_once`."""
    candidate(), baseline()  # warm-up: first calls allocate and pick kernels
    times: dict[str, list[float]] = {"candidate": [], "baseline": []}
    for _ in range(repeats):
        for name, fn in (("candidate", candidate), ("baseline", baseline)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: sorted(values)[repeats // 2] for name, values in times.items()}
    return median["candidate"] * margin < median["baseline"]


def _kernel_cache() -> Path:
    return Path(os.environ.get("NANOCHAT_KERNEL_CACHE") or Path.home() / ".cache" / "nanochat" / "kernels.json")


def _timed_once(name: str, probe: Callable[[], bool]) -> bool:
    """A choice that a timing makes, made once per machine: every process that computes with these kernels (the
    ranks of a run, a resumed run, the next run) must make the same one, or a resumed run would round differently
    from the run it continues. Kept in $NANOCHAT_KERNEL_CACHE (default ~/.cache/nanochat/kernels.json) under the
    CPU, the torch version and the thread count; the first process to write a choice wins."""
    key = f"{name} | {describe_cpu()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = _kernel_cache()
    try:
        known = json.loads(path.read_text())
        if key in known:
            return bool(known[key])
    except (OSError, ValueError):
        pass
    choice = probe()
    if fcntl is None:
        return choice
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-write by one process at a time
            try:
                known = json.loads(path.read_text())
            except (OSError, ValueError):
                known = {}
            choice = bool(known.setdefault(key, choice))
            atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home: this process keeps its own timing
    return choice


@functools.cache
def onednn_training_matmuls() -> bool:
    """Whether fp32 CPU matmuls should go through oneDNN: its op runs and agrees with F.linear here, and at a
    training shape (1024 x 256 x 1024) it is at least 1.25x as fast as MKL's (anything closer keeps the plain op)."""
    if not _has_onednn_ops():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 256, generator=gen), torch.randn(1024, 256, generator=gen)
    try:
        ours = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except RuntimeError:
        return False
    if not torch.allclose(ours, F.linear(x, w), rtol=1e-4, atol=1e-3):
        return False
    return _timed_once("onednn fp32 matmuls", lambda: _clearly_faster(
        lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), lambda: F.linear(x, w), margin=1.25))


def onednn_ready(*tensors: torch.Tensor) -> bool:
    """Whether these tensors' matmul should go through oneDNN: fp32 CPU tensors, outside autocast, in eager mode
    (inductor lowers oneDNN's linear only for constant weights, and picks its own matmuls anyway), on a machine
    where oneDNN won the timing."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and onednn_training_matmuls())


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a and b; through oneDNN for fp32 CPU tensors where that is faster (oneDNN's linear computes
    a @ weight.T, and takes a strided weight: b.t() is a view, not a copy)."""
    if onednn_ready(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T with both gradients, each of the three matmuls through oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y2 = grad_y.reshape(-1, weight.size(0))
        grad_x = matmul(grad_y2, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a sum over tokens: one operand goes in transposed, and oneDNN copies that one
            x2 = x.reshape(-1, weight.size(1))  # so transpose the narrower: (M, 256) rather than (M, 1024)
            narrow_x = x2.size(1) <= grad_y2.size(1)
            grad_weight = matmul(x2.t(), grad_y2).t() if narrow_x else matmul(grad_y2.t(), x2)
        return grad_x, grad_weight


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameter, same checkpoints) whose fp32 CPU matmuls go through oneDNN where
    that is the faster path on this machine."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_ready(x, self.weight):
            return _OneDNNLinear.apply(x, self.weight)
        return F.linear(x, self.weight)


@functools.cache
def packable(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs and multiplies `dtype` weights: tried on a tiny weight, compared with
    F.linear. (bf16 packing raises on AVX2-only CPUs: "bf16 path needs the cpu support avx_ne_convert or avx512bw,
    avx512vl and avx512dq".)"""
    if not (_has_onednn_ops() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(32, 16, generator=gen).to(dtype), torch.randn(4, 16, generator=gen).to(dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PackedLinear.BATCH_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError:
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return torch.allclose(y.float(), F.linear(x, weight).float(), rtol=tolerance, atol=tolerance)


class PackedLinear(nn.Module):
    """A bias-free linear layer for inference on CPU, its weight reordered once into oneDNN's blocked layout, where
    `Linear` hands oneDNN a plain weight to reorder at every call. A decode step multiplies a handful of rows by
    each weight, so that reorder is a large part of its work: the Engine on the depth-4 bench model, fp32, 2 Zen 5
    cores, decoded 677 -> 887 tokens/s at batch 1 and 5,162 -> 6,364 at batch 16 with packed weights.
    Inference only: no gradient flows through it, and it never sees later updates to the weight it was made from.
    """

    BATCH_HINT = 64  # rows oneDNN tunes the layout for: any hint >= 16 measured within 5% at every decode batch size

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free linear layers; the GPT has no biases")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
        """Whether weights of `dtype` on `device` can be packed here (CPU only; probed, see `packable`)."""
        return device.type == "cpu" and packable(dtype)


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place. On CPU computed as 2 sigmoid(2x) - 1, the same function to 2e-7: torch's CPU tanh is 7-10x slower
    than its sigmoid (2 Zen 5 cores, fp32: 155 vs 21 us at 16 x 8192, 2.3 vs 0.24 ms at 256 x 8192)."""
    if x.device.type == "cpu":
        return x.mul_(2).sigmoid_().mul_(2).sub_(1)
    return x.tanh_()


@functools.cache
def _cpu_bf16_matmul_faster() -> bool:
    """Whether this CPU multiplies bf16 faster than fp32, at the shape of Muon's Newton-Schulz products on a small
    model (a batch of 4 x 256 x 1024 by its transpose), by 2x or more: where bf16 is native (AVX512-BF16, AMX) it
    runs ~5x the fp32 rate (900 vs 180 GFLOP/s on 2 Zen 5 cores); where it is emulated it is slower than fp32."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(4, 256, 1024, generator=gen)
    x16 = x32.to(torch.bfloat16)
    try:
        torch.bmm(x16[:1, :8], x16[:1, :8].mT)
    except RuntimeError:
        return False
    return _timed_once("bf16 newton-schulz", lambda: _clearly_faster(
        lambda: torch.bmm(x16, x16.mT), lambda: torch.bmm(x32, x32.mT), margin=2.0, repeats=5))


def newtonschulz_dtype(device: torch.device) -> torch.dtype:
    """Muon's Newton-Schulz dtype: bf16 on CUDA GPUs from Ampere on and on CPUs where bf16 matmuls are clearly
    faster (timed once), fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float32  # no bf16 before Ampere, and fp16's range is too narrow for the iteration
    if device.type == "cuda" or (device.type == "cpu" and _cpu_bf16_matmul_faster()):
        return torch.bfloat16
    return torch.float32


def describe() -> str:
    """One line naming the fast paths this process chose on this CPU."""
    return (f"CPU kernels: fp32 training matmuls via {'oneDNN' if onednn_training_matmuls() else 'MKL/default'}; "
            f"packed serving weights fp32={packable(torch.float32)} bf16={packable(torch.bfloat16)}; "
            f"Newton-Schulz in {str(newtonschulz_dtype(torch.device('cpu'))).removeprefix('torch.')}")


def describe_machine(device: torch.device | str = "cpu") -> str:
    """What every benchmark prints beside its figures: the GPU (if any), the CPU with its relevant ISA flags, and
    the CPU fast paths this process chose."""
    device = torch.device(device)
    gpu = f"GPU {torch.cuda.get_device_name(device)}; " if device.type == "cuda" else ""
    return f"machine: {gpu}CPU {describe_cpu()}; {describe()}"
