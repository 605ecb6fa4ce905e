"""The GPT: KV-cache decoding equals the full forward, the fused loss head equals the plain expression, it learns."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanochat import kernels
from nanochat.gpt import GPT, GPTConfig, model_config_from_depth, softcapped_cross_entropy
from nanochat.kernels import Linear, matmul, tanh_
from nanochat.optim import Muon

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(n_kv_head: int = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=301, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections; perturb them so every block does something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_residual_stream_runs_in_the_autocast_dtype():
    """Under bf16 autocast (CUDA training) the activations are bf16 from the embedding on, halving the memory saved
    for backward; without autocast (CPU) they stay fp32."""
    model = tiny_model()
    idx = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(1))
    assert model.hidden_states(idx).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(idx)
        loss = model(idx, targets=idx)
    assert hidden.dtype == torch.bfloat16
    assert torch.isfinite(loss)


@pytest.mark.parametrize("n_kv_head", [4, 2])  # plain multi-head and grouped-query attention
def test_kv_cache_decoding_gives_the_full_forward_logits(n_kv_head):
    model = tiny_model(n_kv_head)
    idx = torch.randint(0, 301, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(3, 48)
        steps = [model(idx[:, :9], kv_cache=cache)]  # prefill, a chunk after it, then one token at a time
        steps += [model(idx[:, 9:14], kv_cache=cache)]
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(14, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [24, 24, 24]


def test_ragged_rows_copied_from_prefills_decode_like_full_forwards():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 301, (1, 5), generator=gen), torch.randint(0, 301, (1, 13), generator=gen)
    continuation = torch.randint(0, 301, (2, 6), generator=gen)
    with torch.no_grad():
        batch_cache = model.new_kv_cache(2, 48)
        for row, prompt in enumerate((short, long)):  # prefill each prompt alone, then copy it into a shared row
            prefill_cache = model.new_kv_cache(1, 48)
            model(prompt, kv_cache=prefill_cache)
            batch_cache.copy_row(prefill_cache, 0, row)
        assert batch_cache.pos.tolist() == [5, 13]
        decoded = torch.cat([model(continuation[:, t:t + 1], kv_cache=batch_cache) for t in range(6)], dim=1)
        for row, prompt in enumerate((short, long)):
            full = model(torch.cat([prompt, continuation[row:row + 1]], dim=1))[0, prompt.size(1):]
            torch.testing.assert_close(decoded[row], full, atol=1e-5, rtol=1e-5)


def test_reset_row_starts_the_row_over():
    model = tiny_model()
    idx = torch.randint(0, 301, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_kv_cache(2, 48)
        model(torch.randint(0, 301, (2, 10)), kv_cache=cache)
        cache.reset_row(0)
        cache.reset_row(1)
        torch.testing.assert_close(model(idx, kv_cache=cache), model(idx), atol=1e-5, rtol=1e-5)


def test_decoding_past_the_cache_raises_a_clear_error():
    model = tiny_model()
    cache = model.new_kv_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache holds 8 positions"), torch.no_grad():
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("chunk_rows", [100, 256, 4096])  # several chunks with a ragged last one; one chunk
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_head_matches_the_plain_expression(reduction, chunk_rows, matmul_path):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(600, 32, generator=gen, requires_grad=True)  # > one chunk of rows
    weight = (0.5 * torch.randn(301, 32, generator=gen)).requires_grad_()
    targets = torch.randint(0, 301, (600,), generator=gen)
    targets[::7] = -1  # ignored positions
    plain = F.cross_entropy(15 * torch.tanh(x @ weight.T / 15), targets, ignore_index=-1, reduction=reduction)
    fused = softcapped_cross_entropy(x, weight, targets, 15.0, reduction, chunk_rows)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(2 * plain, (x, weight)), torch.autograd.grad(2 * fused, (x, weight)),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_the_same_one(matmul_path):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 32, generator=gen, requires_grad=True)
    weight = 0.5 * torch.randn(301, 32, generator=gen)
    targets = torch.randint(0, 301, (300,), generator=gen)
    (frozen,) = torch.autograd.grad(softcapped_cross_entropy(x, weight, targets, 15.0, "mean", 128), (x,))
    trained = softcapped_cross_entropy(x, weight.clone().requires_grad_(), targets, 15.0, "mean", 128)
    torch.testing.assert_close(frozen, torch.autograd.grad(trained, (x,))[0])
    fixed_x = x.detach().requires_grad_(False)
    head = weight.clone().requires_grad_()
    softcapped_cross_entropy(fixed_x, head, targets, 15.0, "sum", 128).backward()  # the head alone
    plain_head = weight.clone().requires_grad_()
    F.cross_entropy(15 * torch.tanh(fixed_x @ plain_head.T / 15), targets, reduction="sum").backward()
    torch.testing.assert_close(head.grad, plain_head.grad, atol=1e-4, rtol=1e-4)


@pytest.fixture(params=["plain", "onednn"])
def matmul_path(request, monkeypatch):
    """Runs a test on both fp32 CPU matmul paths, whichever one this CPU's timing picked (oneDNN where torch has it)."""
    if request.param == "onednn" and not kernels._has_onednn_ops():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(kernels, "onednn_training_matmuls", lambda: request.param == "onednn")
    return request.param

@pytest.mark.parametrize("in_features,out_features", [(24, 80), (80, 24)])  # both orientations of the weight grad
def test_linear_matches_f_linear_with_both_gradients(in_features, out_features, matmul_path):
    gen = torch.Generator().manual_seed(5)
    linear = Linear(in_features, out_features)
    x = torch.randn(3, 7, in_features, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 7, out_features, generator=gen)
    y = linear(x)
    expected = F.linear(x, linear.weight)
    torch.testing.assert_close(y, expected)
    for ours, plain in zip(torch.autograd.grad(y, (x, linear.weight), upstream),
                           torch.autograd.grad(expected, (x, linear.weight), upstream), strict=True):
        assert ours.shape == plain.shape
        torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)


def test_matmul_takes_transposed_operands_and_tanh_matches_torch(matmul_path):
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(40, 16, generator=gen), torch.randn(40, 24, generator=gen)
    torch.testing.assert_close(matmul(a.T, b), a.T @ b)
    torch.testing.assert_close(matmul(b.T.contiguous(), a), b.T @ a)
    x = torch.linspace(-20, 20, 4001)
    assert (tanh_(x.clone()) - torch.tanh(x)).abs().max() < 1e-6


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, None])
def test_compiled_training_step_matches_eager(autocast_dtype):
    """What base_train runs on CUDA: torch.compile over forward + loss (the chunked loss head's autograd.Function
    included, in one graph) under bf16 autocast. Inductor on CPU stands in for the GPU CI does not have. In fp32
    (`--compile` on CPU) the eager model's oneDNN matmuls step aside for inductor's."""
    model = tiny_model()
    idx, targets = torch.randint(0, 301, (2, 2, 32), generator=torch.Generator().manual_seed(6))
    gradients = []
    for forward in (torch.compile(model, fullgraph=True, dynamic=False), model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            loss = forward(idx, targets)
        loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    tolerance = 5e-2 if autocast_dtype else 1e-5  # equal up to rounding done in another order
    for compiled, eager in zip(*gradients, strict=True):
        assert (compiled - eager).norm() <= tolerance * eager.norm()


def test_loss_reductions_agree():
    model = tiny_model()
    idx = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(5))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    with torch.no_grad():
        per_token = model(idx, targets, loss_reduction="none")
        mean = model(idx, targets)
    assert per_token.shape == (2, 16)
    assert (per_token[:, -1] == 0).all()
    torch.testing.assert_close(per_token.sum() / 30, mean)


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(model_config_from_depth(2, vocab_size=301, sequence_len=32))
    model.init_weights()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, 301, (4, 33), generator=torch.Generator().manual_seed(6))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(30):
        loss = model(inputs, targets)
        first = first if first is not None else loss.item()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    assert first > 5.0  # ~ln(301): the LM head starts near zero
    assert loss.item() < 0.1


def test_setup_optimizers_covers_every_parameter_once_with_width_scaled_adamw_lrs():
    model = GPT(model_config_from_depth(2, vocab_size=301, sequence_len=32))  # width 128
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    scale = (128 / 768) ** -0.5
    lm_head, embedding = adamw.param_groups
    assert lm_head["params"] == [model.lm_head.weight] and lm_head["lr"] == pytest.approx(0.004 * scale)
    assert embedding["params"] == [model.transformer.wte.weight] and embedding["lr"] == pytest.approx(0.2 * scale)
    assert lm_head["weight_decay"] == 0.1
    muon_params = [p for group in muon.param_groups for p in group["params"]]
    assert all(p.ndim == 2 for p in muon_params) and all(g["lr"] == 0.02 for g in muon.param_groups)
    covered = [id(p) for p in muon_params] + [id(model.lm_head.weight), id(model.transformer.wte.weight)]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)


def test_param_counts_and_flops():
    model = GPT(model_config_from_depth(2, vocab_size=301, sequence_len=32))
    counts = model.param_counts()
    assert counts["total"] == model.num_params() == counts["embedding"] + counts["lm_head"] + counts["hidden_matrices"]
    assert counts["hidden_matrices"] == 2 * 12 * 128 * 128  # per layer: q, k, v, proj (4 d²) + MLP (8 d²)
    attention = 12 * 2 * 128 * 32  # 12 * layers * (heads * head_dim) * context: scores and weighted values
    assert model.estimate_flops() == 6 * (counts["total"] - counts["embedding"]) + attention


def test_model_config_from_depth_is_the_one_dial():
    config = model_config_from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_embd // config.n_head) == (20, 1280, 10, 128)
    with pytest.raises(ValueError, match="--depth"):
        model_config_from_depth(0, 512, 64)


def test_greedy_generate_follows_the_argmax_of_the_full_forward():
    model = tiny_model()
    prompt = [5, 17, 42]
    generated = list(model.generate(prompt, max_tokens=6, temperature=0))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert generated == tokens[3:]
