"""int8 weights: each group of GROUP_SIZE consecutive values of a weight row shares one fp32 scale, max|w| / 127.

The same rounding serves two readers: the PyTorch engine (`quantize_model` swaps the linear layers for
`Int8Linear`, weight-only: activations stay in the compute dtype) and the C runner's `model.bin`
(nanochat/export_c.py writes what `quantize_groupwise` returns). Groups run along the input dimension, so a
dot product of one output row with an input is a sum over groups of scale * (int8 row chunk . input chunk).

Only the hidden matrices and the LM head are rounded; the token embedding stays as it is (a lookup reads one row per
token, so its size costs memory, not decode time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 64
QUANTIZATIONS = ("none", "int8")


def quantize_groupwise(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 values (out, in), fp32 scales (out, in // group_size)).
    Round to nearest; an all-zero group gets scale 1 (its values are 0 either way)."""
    out_features, in_features = weight.shape
    if in_features % group_size != 0:
        raise ValueError(f"int8 groups of {group_size} need an input width divisible by {group_size}, got "
                         f"{in_features}; use a model width that is a multiple of {group_size}")
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    scales = groups.abs().amax(dim=-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(groups / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return values.reshape(out_features, in_features), scales


def dequantize_groupwise(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_features, in_features = values.shape
    groups = values.reshape(out_features, scales.size(1), in_features // scales.size(1)).to(dtype)
    return (groups * scales[..., None].to(dtype)).reshape(out_features, in_features)


class Int8Linear(nn.Module):
    """A bias-free linear layer for inference whose weight is held as int8 groups (4x smaller than fp32). Each call
    dequantizes the weight into the activations' dtype and multiplies: memory is saved; whether decoding gets faster
    depends on the device (measured in bench/engine.py --quantize int8)."""

    def __init__(self, linear: nn.Module, group_size: int = GROUP_SIZE):
        super().__init__()
        if getattr(linear, "bias", None) is not None:
            raise ValueError("Int8Linear rounds bias-free linear layers; the GPT has no biases")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scales = quantize_groupwise(linear.weight, group_size)
        self.register_buffer("values", values)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_groupwise(self.values, self.scales, x.dtype))


def quantize_model(model: nn.Module, quantization: str) -> nn.Module:
    """The model, changed in place: with "int8", every linear layer (the hidden matrices and the LM head) becomes an
    Int8Linear; "none" leaves it as it is. For inference only."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return model
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (rotary tables included): the memory a quantization saves."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
