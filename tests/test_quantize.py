"""int8 weights (nanochat/quantize.py): the rounding's error bound, the layer that serves it, and the engine on it."""

from __future__ import annotations

import copy

import pytest
import torch

from nanochat.engine import Engine, prepare_for_serving
from nanochat.quantize import (
    GROUP_SIZE,
    Int8Linear,
    dequantize_groupwise,
    quantize_groupwise,
    quantize_model,
    weight_bytes,
)


def test_groupwise_rounding_is_within_half_a_step_of_each_group():
    weight = torch.randn(48, 4 * GROUP_SIZE, generator=torch.Generator().manual_seed(0)) * 3
    weight[5, :GROUP_SIZE] = 0.0  # an all-zero group
    values, scales = quantize_groupwise(weight)
    assert values.dtype == torch.int8 and values.shape == weight.shape
    assert scales.dtype == torch.float32 and scales.shape == (48, 4)
    assert values.abs().max() == 127  # each group's largest value uses the whole range
    error = (dequantize_groupwise(values, scales) - weight).abs()
    step = scales.repeat_interleave(GROUP_SIZE, dim=1)
    assert (error <= step / 2 + 1e-6).all()
    assert (values[5, :GROUP_SIZE] == 0).all() and scales[5, 0] == 1.0


def test_a_width_that_is_not_a_multiple_of_the_group_is_refused():
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_groupwise(torch.randn(8, 100))


def test_int8_linear_is_close_to_the_layer_it_rounds():
    linear = torch.nn.Linear(128, 32, bias=False)
    x = torch.randn(5, 128)
    layer = Int8Linear(linear)
    relative = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < relative < 0.01
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear(torch.nn.Linear(64, 8, bias=True))


def test_an_int8_model_is_four_times_smaller_in_its_linear_layers_and_decodes_like_the_original(tiny_gpt,
                                                                                                 tiny_tokenizer):
    original = copy.deepcopy(tiny_gpt)
    quantized = prepare_for_serving(copy.deepcopy(tiny_gpt), torch.float32, quantization="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 6 * 2 + 1
    linear_fp32 = sum(p.numel() * 4 for name, p in original.named_parameters() if "wte" not in name)
    linear_int8 = weight_bytes(quantized) - (weight_bytes(original) - linear_fp32)
    assert linear_int8 < linear_fp32 / 3.5  # int8 values plus one fp32 scale per 64 values
    ids = torch.tensor([tiny_tokenizer.encode("The quick brown fox", prepend="<|bos|>")])
    with torch.no_grad():
        reference, rounded = original(ids), quantized(ids)
    assert (rounded - reference).abs().max() < 0.05 * reference.abs().max()
    tokens = ids[0].tolist()
    reply = next(Engine(quantized, tiny_tokenizer).generate(tokens, max_tokens=1, temperature=0.0))[0]
    assert 0 <= reply[0] < tiny_tokenizer.get_vocab_size()


def test_unknown_quantization_is_refused(tiny_gpt):
    with pytest.raises(ValueError, match="int8"):
        quantize_model(copy.deepcopy(tiny_gpt), "int4")
