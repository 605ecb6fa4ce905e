"""nanochat/fp8.py on CPU (torch's _scaled_mm emulates FP8 there): the FP8 linear's output and both gradients stay
within FP8's rounding of the fp32 ones, its operands meet CUDA's layout rules, shapes that do not fit take the plain
path, a depth-2 model trains with it, and a device without FP8 is refused with the fix; base_train --fp8 runs."""

from __future__ import annotations

import types

import pytest
import torch
import torch._dynamo  # before any test patches torch._scaled_mm: see checked_scaled_mm
import torch.nn.functional as F

from nanochat import fp8
from nanochat.fp8 import FP8Linear, enable_fp8
from nanochat.gpt import GPT, GPTConfig
from nanochat.kernels import Linear
from nanochat.training import RunError

pytestmark = pytest.mark.usefixtures("one_thread")

# e4m3 keeps 3 mantissa bits (a rounding of up to 1/16, ~3.6% rms per element), e5m2 2 bits (up to 1/8): measured
# relative errors (Frobenius) at 256 x 128 -> 192, random normal data: forward 3.8%, grad_x and grad_W 5.9%
FORWARD_TOLERANCE, GRADIENT_TOLERANCE = 0.06, 0.09


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().float(), reference.detach().float()
    return float((ours - reference).norm() / reference.norm())


def fp8_layer(in_features: int, out_features: int) -> FP8Linear:
    torch.manual_seed(0)
    layer = Linear(in_features, out_features)
    layer.__class__ = FP8Linear
    return layer


def forward_and_backward(layer: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(grad_y)
    return y, x.grad, layer.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_both_gradients_are_within_fp8_rounding_of_fp32(dtype):
    layer = fp8_layer(128, 192)
    x, grad_y = torch.randn(2, 128, 128, dtype=dtype), torch.randn(2, 128, 192, dtype=dtype)
    y, grad_x, grad_weight = forward_and_backward(layer, x, grad_y)
    plain = Linear(128, 192)
    plain.load_state_dict(layer.state_dict())
    y_ref, grad_x_ref, grad_weight_ref = forward_and_backward(plain, x.float(), grad_y.float())
    assert relative_error(y, y_ref) < FORWARD_TOLERANCE
    assert relative_error(grad_x, grad_x_ref) < GRADIENT_TOLERANCE
    assert relative_error(grad_weight, grad_weight_ref) < GRADIENT_TOLERANCE
    # the dtypes the plain layer gives: output and grad_x in the input's, the fp32 weight's gradient in fp32
    assert (y.dtype, grad_x.dtype, grad_weight.dtype, y.shape) == (dtype, dtype, torch.float32, (2, 128, 192))


def test_under_autocast_the_output_has_the_autocast_dtype():
    layer = fp8_layer(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(16, 64))
    assert y.dtype == torch.bfloat16


def checked_scaled_mm(calls: list):
    """torch._scaled_mm that first enforces what CUDA's kernels require (the CPU's accepts any layout). Dynamo
    lists torch's functions when it is first imported (an optimizer's constructor imports it): imported under this
    patch, it would never trace the real _scaled_mm, hence its import at the top of this file."""
    scaled_mm = torch._scaled_mm

    def check(a, b, scale_a, scale_b, **kwargs):
        assert a.stride(1) == 1 and a.stride(0) >= a.size(1), f"first operand not row-major: {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) >= b.size(0), f"second operand not column-major: {b.stride()}"
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0, (a.shape, b.shape)
        assert (a.dtype, b.dtype) != (torch.float8_e5m2, torch.float8_e5m2)  # cuBLAS has no e5m2 x e5m2
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        calls.append((a.dtype, b.dtype, kwargs["out_dtype"]))
        return scaled_mm(a, b, scale_a, scale_b, **kwargs)

    return check


def test_every_scaled_mm_gets_the_layout_cuda_requires(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    forward_and_backward(fp8_layer(64, 48), torch.randn(32, 64, dtype=torch.bfloat16),
                         torch.randn(32, 48, dtype=torch.bfloat16))
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    assert calls == [(e4m3, e4m3, torch.bfloat16),  # y = x @ W.T
                     (e5m2, e4m3, torch.bfloat16),  # grad_x = grad @ W
                     (e5m2, e4m3, torch.float32)]  # grad_W = grad.T @ x


@pytest.mark.parametrize("in_features, out_features, rows", [(24, 32, 32), (32, 40, 32), (32, 32, 5)])
def test_shapes_scaled_mm_cannot_take_use_the_plain_matmul(monkeypatch, in_features, out_features, rows):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    layer = fp8_layer(in_features, out_features)
    x = torch.randn(rows, in_features)
    assert torch.equal(layer(x), F.linear(x, layer.weight)) and calls == []


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def test_enable_fp8_swaps_the_blocks_wide_layers_and_leaves_the_weights_alone():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert enable_fp8(model, min_features=65) == 0  # both sides must be that wide: every layer has a 64-wide side
    assert enable_fp8(model, min_features=64) == 12  # per block q, k, v, proj and the MLP's two
    assert sorted(name for name, layer in model.named_modules() if isinstance(layer, FP8Linear))[:6] == [
        f"transformer.h.0.{name}" for name in ("attn.c_k", "attn.c_proj", "attn.c_q", "attn.c_v", "mlp.c_fc",
                                               "mlp.c_proj")]
    assert enable_fp8(model, min_features=64) == 0  # already swapped: not counted twice
    assert type(model.lm_head) is Linear  # the head stays out unless asked for
    assert enable_fp8(model, min_features=16, include_lm_head=True) == 1
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def train_on_a_fixed_batch(model: GPT, steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    inputs, targets = (torch.randint(0, 256, (4, 32), generator=gen) for _ in range(2))
    optimizers = model.setup_optimizers()
    losses = []
    for _ in range(steps):
        loss = model(inputs, targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_a_depth_2_model_trains_in_fp8_like_in_fp32(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    plain_losses = train_on_a_fixed_batch(tiny_model(), steps=20)
    model = tiny_model()
    assert enable_fp8(model, min_features=16) == 12
    fp8_losses = train_on_a_fixed_batch(model, steps=20)
    assert len(calls) == 20 * 12 * 3  # every step, every block linear, all three matmuls in FP8
    assert all(torch.isfinite(torch.tensor(fp8_losses)))
    # it learns the batch as fp32 does: 5.54 -> 0.12, 1% apart at step 20. Not "every step lower": near the end the
    # loss is small enough for FP8 rounding (and the matmul kernel a machine picks) to make one step tick up
    assert fp8_losses[-1] < 0.1 * fp8_losses[0] and fp8_losses[9] < 0.5 * fp8_losses[0]
    assert abs(fp8_losses[-1] - plain_losses[-1]) < 0.05 * plain_losses[-1]


def test_a_device_without_fp8_is_refused_with_the_fix(monkeypatch):
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    with pytest.raises(RunError, match=r"runs on CUDA GPUs of compute capability 8\.9\+.*on meta.*without --fp8"):
        enable_fp8(model)
    a100 = types.SimpleNamespace(name="NVIDIA A100-SXM4-80GB", major=8, minor=0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: a100)
    message = fp8._refusal(torch.device("cuda", 0))
    assert message == ("--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell: FP8 tensor "
                       "cores); NVIDIA A100-SXM4-80GB is 8.0. Train without --fp8")
    assert "\n" not in message
    h100 = types.SimpleNamespace(name="NVIDIA H100", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    assert fp8._refusal(torch.device("cuda", 0)) is None


def test_base_train_with_fp8_trains_the_swapped_layers(base_dir, tiny_tokenizer, monkeypatch, capsys):
    from scripts import base_train

    tiny_tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.tensor(tiny_tokenizer.token_byte_lengths()), base_dir / "tokenizer" / "token_bytes.pt")
    monkeypatch.setattr(fp8, "DEFAULT_MIN_FEATURES", 128)  # depth 2 is 128 wide: every block linear
    flags = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128",
             "--num-iterations=2", "--eval-every=-1", "--eval-tokens=128", "--sample-every=-1", "--fp8"]
    assert base_train.main(flags) == 0
    stdout = capsys.readouterr().out
    assert "fp8: 12 linear layers multiply in FP8" in stdout and "step 00002/00002" in stdout


def test_torch_compile_traces_the_fp8_layer_whole():
    layer = fp8_layer(64, 48)
    x, grad_y = torch.randn(32, 64), torch.randn(32, 48)
    expected = forward_and_backward(layer, x, grad_y)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    for ours, theirs in zip(forward_and_backward(compiled, x, grad_y), expected, strict=True):
        assert torch.equal(ours, theirs)
