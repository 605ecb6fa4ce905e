"""The GPT: a decoder-only transformer, told in order: config, KV cache, building blocks, the loss head, the model.
Its linear layers and the CPU fast paths they take live in nanochat/kernels.py.

Choices, each a small departure from GPT-2 that modern models agree on:
- rotary position embeddings (no learned positions), QK-norm for stable attention logits
- parameter-free RMSNorm, ReLU² MLP, no biases anywhere
- untied token embedding and LM head, logits soft-capped with tanh
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanochat.common import get_dist_info
from nanochat.kernels import Linear, matmul, onednn_ready, tanh_
from nanochat.optim import DistAdamW, DistMuon, Muon
from nanochat.plan import PEAK_FLOPS, shape_from_depth
from nanochat.sampling import draw_uniforms, sample_generators, sample_next_tokens, sampling_tensors


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    rope_base: float = 10000.0  # rotary base frequency; metas written before this field load with the default

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("the head dimension must be even for rotary embeddings")


def model_config_from_depth(depth: int, vocab_size: int, sequence_len: int) -> GPTConfig:
    """The one dial: width grows with depth (64 channels per layer), heads are ~128 wide (nanochat/plan.py)."""
    n_embd, n_head = shape_from_depth(depth)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


def parameter_count(config: GPTConfig) -> int:
    """The model's exact number of parameters, counted on the meta device (no memory is allocated): what a token
    budget in tokens per parameter is sized from, before any model exists."""
    with torch.device("meta"):
        return GPT(config).num_params()


def peak_flops(device: torch.device) -> float | None:
    """bf16 peak of a CUDA device for MFU; None on CPU/MPS or an unlisted GPU (MFU is then reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# -----------------------------------------------------------------------------
# KV cache: preallocated once, one position counter per row so rows of different lengths decode together


class KVCache:
    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached so far, per row
        self.max_seq_len = seq_len

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def reset_row(self, row: int) -> None:
        self.pos[row] = 0

    def copy_row(self, src: KVCache, src_row: int, dst_row: int) -> None:
        """Copy one row of `src` (e.g. a prefilled batch-1 cache) into row `dst_row` of this cache."""
        length = int(src.pos[src_row])
        self.k[:, dst_row, :, :length] = src.k[:, src_row, :, :length]
        self.v[:, dst_row, :, :length] = src.v[:, src_row, :, :length]
        self.pos[dst_row] = length


# -----------------------------------------------------------------------------
# Building blocks


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))  # parameter-free


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D/2). Rotates the two halves of each head as complex pairs."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under bf16 autocast, fp32 tables would upcast q and k
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, cos, sin, kv_cache: KVCache | None, positions, cache_len: int, start: int | None):
        """positions: (B, T) cache positions of this chunk; start: their first one when all rows share it."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        gqa = self.n_head != self.n_kv_head

        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

        k_cache, v_cache = kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx]
        if start is not None:  # every row is at the same position: a plain slice write
            k_cache[:, :, start:start + T] = k.to(k_cache.dtype)
            v_cache[:, :, start:start + T] = v.to(v_cache.dtype)
        else:  # write this chunk at each row's own positions
            rows = torch.arange(B, device=x.device)[:, None]
            k_cache[rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        if start == 0:  # a prefill into an empty cache attends only within the chunk: the causal (flash) kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            keys = k_cache[:, :, :cache_len].to(q.dtype)
            values = v_cache[:, :, :cache_len].to(q.dtype)
            mask = None
            if start is None or T > 1:  # rows at different positions, or a chunk after a prefix: mask explicitly
                key_pos = torch.arange(cache_len, device=x.device)
                mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, cache_len)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, positions, cache_len, start):
        x = x + self.attn(norm(x), cos, sin, kv_cache, positions, cache_len, start)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The loss head: LM head + softcap + cross-entropy in one pass over row chunks
#
# Eager PyTorch materializes (B*T, vocab) fp32 logits several times (tanh, log_softmax, their backwards, a zero-filled
# gradient) and walks them again in backward. Here each chunk of rows computes its logits, loss and the gradient of the
# loss with respect to its logits in one go (d/dz of CE is softmax - onehot; the softcap's derivative is 1 - tanh²),
# turns that into the gradients of the hidden states and the LM head at once, and is freed; backward only scales them.
# Measured (1 CPU thread, process CPU time, depth 4, batch 8x256): forward+backward 1070 -> 800 ms at vocab 8192
# (1.33x), 2820 -> 2000 ms at vocab 32768 (1.41x), against the plain expression in GPT.forward.
# On CUDA, torch.compile traces through it (the chunk loop unrolls) and the point is memory: the full logits of
# 32 x 2048 tokens at a 65k vocab are 7.5 GiB in bf16. Depth 20 base_train on an H200 capped at 80,000 MiB (what an
# 80 GB H100 leaves a process): the plain expression ran out of memory at its logits, this form peaked at 77.1 GiB.
# Uncapped, base_train ran at 52.5-52.9% MFU with it (forward+backward alone: 1% slower than the plain expression).


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, reduction: str,
                chunk_rows: int = 256):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != -1
        safe_targets = targets.clamp(min=0)[:, None]
        divisor = valid.sum().clamp(min=1) if reduction == "mean" else torch.ones((), dtype=torch.long)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if needs_grad else None
        # on the oneDNN path the head's gradient is summed transposed, (n_embd, vocab): oneDNN copies a transposed left
        # operand, and grad_logits.T (vocab, chunk) is a far bigger copy than xc.T (n_embd, chunk)
        onednn = onednn_ready(x, weight)
        grad_weight = None
        if needs_grad:
            grad_weight = weight.new_zeros(weight.T.shape) if onednn else torch.zeros_like(weight)
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            xc, row_valid = x[rows], valid[rows, None]
            t = tanh_(matmul(xc, weight.T).float().div_(softcap))  # logits = softcap * t, bounded by +-softcap
            probs = (t * softcap).exp_()  # |logits| <= softcap = 15: exp cannot overflow, no max-subtraction needed
            sum_exp = probs.sum(dim=-1, keepdim=True)
            target_logit = t.gather(1, safe_targets[rows]) * softcap
            loss += ((sum_exp.log() - target_logit) * row_valid).sum()
            if not needs_grad:
                continue
            probs.div_(sum_exp).scatter_add_(1, safe_targets[rows], -torch.ones_like(target_logit))
            grad_logits = probs.mul_(t.square_().neg_().add_(1)).mul_(row_valid).to(x.dtype)
            grad_x[rows] = matmul(grad_logits, weight)
            if onednn:
                grad_weight += matmul(xc.T, grad_logits)
            else:
                grad_weight.addmm_(grad_logits.T.to(weight.dtype), xc.to(weight.dtype))  # autocast makes them bf16
        if needs_grad:
            grad_weight = grad_weight.T.contiguous() if onednn else grad_weight
            ctx.save_for_backward(grad_x.div_(divisor), grad_weight.div_(divisor))
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None, None


def softcapped_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                             reduction: str = "mean", chunk_rows: int = 256) -> torch.Tensor:
    """cross_entropy(softcap * tanh((x @ weight.T) / softcap), targets, ignore_index=-1), chunked; see above."""
    if not 0 < softcap <= 80:
        raise ValueError(f"softcap must be in (0, 80] so exp(logit) fits in fp32 without max-subtraction, got {softcap}")
    return _SoftcappedCrossEntropy.apply(x, weight, targets, softcap, reduction, chunk_rows)


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    SOFTCAP = 15.0  # logits pass through SOFTCAP * tanh(logits / SOFTCAP): bounded logits, steadier early training

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # rotary tables cover 10x the training context so the KV cache can decode past it
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(length: int, head_dim: int, base: float):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Init scheme: embeddings N(0, 1); input projections (q, k, v, fc) N(0, 1/sqrt(fan_in)) so activations
        keep unit scale; output projections (attn and MLP c_proj) zero so every block starts as the identity;
        LM head N(0, 0.001) so the first loss is ~ln(vocab)."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features ** -0.5)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.rotary_len, self.config.n_embd // self.config.n_head,
                                       self.config.rope_base)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def new_kv_cache(self, batch_size: int, seq_len: int) -> KVCache:
        """An empty KV cache shaped for this model, on its device and in the dtype of its weights. (The embedding is
        the reference: a model prepared for serving may have swapped its linear layers for packed ones.)"""
        c, weight = self.config, self.transformer.wte.weight
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, weight.device, weight.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_counts(self) -> dict[str, int]:
        """Parameters by role: the embedding is a lookup (no FLOPs), the LM head and the hidden matrices are matmuls."""
        embedding = self.transformer.wte.weight.numel()
        lm_head = self.lm_head.weight.numel()
        hidden = sum(p.numel() for p in self.transformer.h.parameters())
        return {"embedding": embedding, "lm_head": lm_head, "hidden_matrices": hidden,
                "total": embedding + lm_head + hidden}

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention's score/value matmuls.
        The embedding is a lookup, not a matmul, so it is left out."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        head_dim = c.n_embd // c.n_head
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * head_dim * c.sequence_len

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
        """[AdamW for the embedding and LM head, Muon for the hidden matrices]; their distributed forms under torchrun
        (which also average the gradients across ranks: there is no DDP wrapper).

        The AdamW learning rates were tuned at width 768 and scale as 1/sqrt(width) (the logits' sensitivity to each
        embedding/unembedding entry grows with width). Muon's update is orthogonal, so its lr needs no width scaling.
        Every group records its "initial_lr" for the schedule."""
        ddp = get_dist_info().ddp
        width_scale = (self.config.n_embd / 768) ** -0.5
        adamw_groups = [
            {"params": list(self.lm_head.parameters()), "lr": unembedding_lr * width_scale},
            {"params": list(self.transformer.wte.parameters()), "lr": embedding_lr * width_scale},
        ]
        # betas (0.8, 0.95) and a tiny eps are nanochat's settings: faster-moving moments suit the short runs here
        adamw_kwargs = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": weight_decay}
        if ddp:
            adamw = DistAdamW(adamw_groups, **adamw_kwargs)
        else:
            adamw = torch.optim.AdamW(adamw_groups, fused=self.get_device().type in ("cuda", "cpu"), **adamw_kwargs)
        muon_class = DistMuon if ddp else Muon
        muon = muon_class(self.transformer.h.parameters(), lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", logits_to_keep: int = 0):
        B, T = idx.shape
        x = self.hidden_states(idx, kv_cache)
        if targets is not None and loss_reduction in ("mean", "sum"):
            chunk_rows = 256 if x.device.type == "cpu" else 4096  # a chunk's logits: cache-sized on CPU, ~1 GiB on GPU
            return softcapped_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                            self.SOFTCAP, loss_reduction, chunk_rows)
        if targets is None and logits_to_keep:  # a prefill needs only the last positions' logits: skip the LM
            x = x[:, -logits_to_keep:]          # head elsewhere (at a 65k vocab it is most of a small model's work)
        logits = self.logits(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., n_embd) -> soft-capped fp32 logits (..., vocab)."""
        logits = self.lm_head(x).float()
        if torch.is_grad_enabled():
            return self.SOFTCAP * torch.tanh(logits / self.SOFTCAP)
        return tanh_(logits.div_(self.SOFTCAP)).mul_(self.SOFTCAP)  # decoding: no temporaries of (B, vocab)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, n_embd) final normed hidden states, before the LM head. With a cache the
        chunk continues each row's cached prefix, and the cache advances by T."""
        T = idx.size(1)
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens is longer than the rotary table ({self.rotary_len})")
            positions, start = None, None
            cache_len = T
            cos, sin = self.cos[None, None, :T], self.sin[None, None, :T]
        else:
            positions = kv_cache.pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            first, last = torch.stack([kv_cache.pos.min(), kv_cache.pos.max()]).tolist()  # one device sync
            start = first if first == last else None
            cache_len = last + T
            if cache_len > min(kv_cache.max_seq_len, self.rotary_len):
                raise ValueError(f"KV cache holds {kv_cache.max_seq_len} positions; {cache_len} needed")
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, T, D/2)

        x = self.transformer.wte(idx)
        if torch.is_autocast_enabled(x.device.type):
            # The residual stream in the compute dtype (bf16 on CUDA), not the embedding's fp32: the activations
            # saved for backward halve. Depth 20 at 32 x 2048 tokens per GPU (H200, compiled), with the chunked loss
            # head: peak memory 88.9 -> 76.1 GiB, MFU 52.2% -> 52.6%, the same losses to 4 digits.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, positions, cache_len, start)
        if kv_cache is not None:
            kv_cache.pos += T
        return norm(x)

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Sample a continuation of one prompt, one token at a time, with a KV cache. The serving Engine does
        batching and tools; this is the plain loop training scripts use to print samples. It draws from the
        Engine's sampler (nanochat/sampling.py): for the same seed, temperature (0 = greedy) and top_k it picks the
        tokens a one-sample Engine request picks, up to where the Engine would stop or force tool output."""
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with the <|bos|> token)")
        device = self.get_device()
        settings = sampling_tensors([(temperature, top_k, None)], device)
        generator = sample_generators(seed, 1)[0] if temperature > 0 else None
        cache = self.new_kv_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=cache)[:, -1, :]
            ids = sample_next_tokens(logits, *settings, draw_uniforms([generator]))[:, None]
            yield int(ids.item())
