"""FP8 matmuls for the large linear layers of training (`base_train --fp8`): y = x @ W.T with x and W in
float8_e4m3fn, its gradient in float8_e5m2, each multiplication one `torch._scaled_mm` on FP8 tensor cores.

Scaling. Every tensor is cast with one fp32 scale of its own (FP8_MAX / amax), computed from the tensor itself at
every call ("current scaling"). Delayed scaling (a scale from the amax history of earlier steps, as in Transformer
Engine) saves that one reduction per tensor, which torch.compile fuses into the cast anyway, and costs three things
here: state beside the weights (the checkpoints, and an exact --resume, would have to carry it), a scale that lags a
spike in the activations (the cast saturates until the history catches up), and a first step with no history.

Formats: e4m3 (3 mantissa bits, range +-448) for the activations and weights of the forward; e5m2 (2 mantissa bits,
range +-57344) for the gradients, whose range is wider and whose precision matters less. The backward reuses the
forward's FP8 copies of x and W (saved at 1 byte per element instead of x's 2 or 4). Against fp32 (CPU, 256 x 128
-> 192, random normal data) the relative errors are 3.8% in the output and 5.9% in each gradient
(tests/test_fp8.py); a depth-2 model's loss over 20 steps stays within 1% of fp32's.

`_scaled_mm`'s rules on CUDA: the first operand row-major, the second column-major, both dimensions of the second
and the inner dimension multiples of 16; FP8 tensor cores from capability 8.9 (Ada, Hopper). A matmul that does not
fit (rows, in_features and out_features each a multiple of 16, on a device with FP8) takes the plain path, so a
decode step of a few rows, or a model moved to an older GPU, still runs.

The LM head stays out by default: training reaches its weight through the fused loss head (nanochat/loss_head.py),
not through its forward, so the swap would change only the eval/sampling logits; and the last layer is the one
that FP8 recipes keep in high precision, its logits being sensitive to rounding.

`enable_fp8` swaps layers in place (their class becomes FP8Linear): the weights, their dtype, the state_dict and
so the checkpoints are unchanged, and a model saved with --fp8 loads without it. On CPU the matmuls run (slowly,
as an emulation) so that tests and a laptop dry run can use --fp8; speed on Hopper is unmeasured so far.
"""

from __future__ import annotations

import torch
from torch import nn

from nanochat.kernels import Linear
from nanochat.training import RunError

# Layers narrower than this on either side keep bf16: a small matmul is memory-bound, and the extra passes that
# find the amax and cast cost more than FP8 tensor cores save (a choice, unmeasured). At depth 20 (width 1280)
# every projection of every block is at least 1280 wide.
DEFAULT_MIN_FEATURES = 1024
MATMUL_ALIGNMENT = 16  # _scaled_mm's CUDA kernels need the dimensions in multiples of 16
FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first CUDA GPUs with FP8 tensor cores


def _cast_to_fp8(tensor: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor in fp8_dtype, row-major; the fp32 scale that undoes the cast): the tensor's amax lands on the
    format's largest value, so nothing saturates and the small values keep as many bits as the format has."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = tensor.detach().abs().amax().float()
    scale = fp8_max / amax.clamp(min=1e-12)  # an all-zero tensor (a zero-init projection) casts to zeros
    cast = (tensor.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return cast.contiguous(), scale.reciprocal()


def _column_major(tensor: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major, as _scaled_mm wants its second operand (a copy unless it already is)."""
    return tensor.t().contiguous().t()


class _FP8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K).T in FP8; grad_x = grad @ W and grad_W = grad.T @ x in FP8 too, each returned in
    its input's dtype (the fp32 master weight gets an fp32 gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x_fp8, x_scale = _cast_to_fp8(x, torch.float8_e4m3fn)
        weight_fp8, weight_scale = _cast_to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x_fp8, x_scale, weight_fp8, weight_scale)
        ctx.grad_dtypes = (x.dtype, weight.dtype)
        # fast accumulation (Hopper's reduced-precision FP8 accumulator) in the forward only, as FP8 recipes do:
        # the gradients' sums over thousands of tokens are the ones it would hurt
        return torch._scaled_mm(x_fp8, weight_fp8.t(), x_scale, weight_scale, out_dtype=out_dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_fp8, x_scale, weight_fp8, weight_scale = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.grad_dtypes
        grad_fp8, grad_scale = _cast_to_fp8(grad_y, torch.float8_e5m2)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            grad_x = torch._scaled_mm(grad_fp8, _column_major(weight_fp8), grad_scale, weight_scale,
                                      out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K): a sum over the tokens
            grad_weight = torch._scaled_mm(grad_fp8.t().contiguous(), _column_major(x_fp8), grad_scale, x_scale,
                                           out_dtype=weight_dtype)
        return grad_x, grad_weight, None


def device_has_fp8(device: torch.device) -> bool:
    """Whether _scaled_mm runs here: CUDA from capability 8.9, or the CPU (an emulation: for tests, not speed).
    ROCm is left out: its FP8 formats are the fnuz variants on most of its GPUs, not e4m3fn/e5m2."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    properties = torch.cuda.get_device_properties(device)  # constant-folded under torch.compile
    return (properties.major, properties.minor) >= FP8_CAPABILITY


def fp8_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T can run in FP8: every dimension a multiple of 16, on a device with FP8."""
    rows = x.numel() // max(1, x.size(-1))
    dims_fit = all(dim % MATMUL_ALIGNMENT == 0 and dim > 0 for dim in (rows, *weight.shape))
    return dims_fit and x.dtype.is_floating_point and device_has_fp8(x.device)


class FP8Linear(Linear):
    """kernels.Linear (same parameter, same checkpoints) whose matmul runs in FP8 where it fits (fp8_fits), the
    plain Linear's elsewhere. The output has the dtype the plain layer's would: autocast's, or the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fp8_fits(x, self.weight):
            return super().forward(x)
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        y = _FP8Matmul.apply(x.reshape(-1, self.in_features), self.weight, out_dtype)
        return y.view(*x.shape[:-1], self.out_features)


def _refusal(device: torch.device) -> str | None:
    """Why FP8 cannot run on `device`, as a one-line message naming the fix; None where it can."""
    if device_has_fp8(device):
        return None
    if device.type == "cuda" and torch.version.hip is None:
        properties = torch.cuda.get_device_properties(device)
        return (f"--fp8 needs a CUDA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, "
                f"Hopper, Blackwell: FP8 tensor cores); {properties.name} is {properties.major}.{properties.minor}. "
                "Train without --fp8")
    return (f"--fp8 runs on CUDA GPUs of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+ (or, slowly, on "
            f"the CPU); this model is on {device.type}{' (ROCm)' if torch.version.hip else ''}. Train without --fp8")


def enable_fp8(model: nn.Module, min_features: int | None = None, include_lm_head: bool = False) -> int:
    """Make the transformer blocks' Linear layers with both sides >= min_features (default DEFAULT_MIN_FEATURES)
    multiply in FP8, in place, and with include_lm_head the LM head too (off by default: see the module's
    docstring). Returns how many layers were swapped. Raises RunError where the model's device has no FP8."""
    device = next(model.parameters()).device
    refusal = _refusal(device)
    if refusal is not None:
        raise RunError(refusal)
    min_features = DEFAULT_MIN_FEATURES if min_features is None else min_features
    candidates = [layer for layer in model.transformer.h.modules() if isinstance(layer, Linear)]
    if include_lm_head:
        candidates.append(model.lm_head)
    swapped = 0
    for layer in candidates:
        if min(layer.in_features, layer.out_features) >= min_features and not isinstance(layer, FP8Linear):
            layer.__class__ = FP8Linear  # a subclass with no state of its own: only forward changes
            swapped += 1
    return swapped

