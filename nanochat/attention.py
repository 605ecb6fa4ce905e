"""Causal self-attention and its KV cache: rotary positions, QK-norm, grouped-query heads, and three optional pieces
of the 2026 recipe: the value-embedding gate, sliding-window layers, a sharper query/key scale (nanochat/gpt.py
assembles the model from these).

Sliding windows over a whole training chunk go through flex_attention on CUDA, with a block mask that skips the
blocks a window cannot reach (a boolean SDPA mask would cost SDPA its flash kernel); everywhere else (CPU, MPS,
eager inference, and the KV-cache's decode shapes) through SDPA with a boolean mask. flex_attention's backward does
not run on CPU, so its path is tested here forward-only against the SDPA one; its speed on a GPU is unmeasured.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nanochat.kernels import Linear

try:  # torch >= 2.5; without it windows use SDPA masks on every device
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    flex_attention = None

if TYPE_CHECKING:
    from nanochat.gpt import GPTConfig

# The gates (value embeddings' per head, smear's) read only the first few channels of their input: enough to tell
# tokens and contexts apart, at a cost that does not grow with width.
GATE_CHANNELS = 32


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings sit on every other layer, counted from the last one (which always has one)."""
    return (n_layer - 1 - layer_idx) % 2 == 0


def attention_window(config: GPTConfig, layer_idx: int) -> int | None:
    """How many positions a layer's queries see (their own included), or None for the whole context.
    config.window_pattern's letters repeat over the layers: S is a quarter of the training context, L all of it;
    the last layer is always L, so the final hidden states see everything."""
    letter = config.window_pattern[layer_idx % len(config.window_pattern)]
    if letter == "L" or layer_idx == config.n_layer - 1:
        return None
    return max(1, config.sequence_len // 4)


def sees(offset: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether a query sees the key `offset` positions back: causal, and within its window. The one rule behind
    both the SDPA mask and flex_attention's block mask."""
    mask = offset >= 0
    return mask if window is None else mask & (offset < window)


def visible_keys(query_positions: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
    """(..., T) query positions -> (..., T, key_len) bool: the keys each query attends to."""
    key_positions = torch.arange(key_len, device=query_positions.device)
    return sees(query_positions[..., :, None] - key_positions, window)


def flex_windows(device: torch.device) -> bool:
    """Whether windowed layers go through flex_attention here: on CUDA (its backward has no CPU kernel), when
    training or compiled. Eager and without gradients (the Engine's prefill) flex_attention would materialize the
    scores just as a masked SDPA does, which then keeps its fused mask-aware kernel."""
    if flex_attention is None or device.type != "cuda":
        return False
    return torch.is_grad_enabled() or torch.compiler.is_compiling()


@functools.lru_cache(maxsize=16)
def window_block_mask(seq_len: int, window: int, device: torch.device):
    """flex_attention's block mask for causal attention within a window, one per (length, window, device): building
    it evaluates the mask at every position, so it is built once, not every step."""
    def within_window(batch, head, query, key):
        return sees(query - key, window)
    return create_block_mask(within_window, None, None, seq_len, seq_len, device=device)


# -----------------------------------------------------------------------------
# KV cache: preallocated once, one position counter per row so rows of different lengths decode together


class KVCache:
    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached so far, per row
        # The token ids at each cached position, for smear: a chunk's first position mixes in the embedding of the
        # token before it. Kept per position rather than as "the last embedding seen" so that it stays right where a
        # row's position is set back: a right-padded batched prefill (batching, CORE), a row rolled back while it
        # waits for a tool. The embedding is one lookup away. (B x seq_len ids: small next to k and v.)
        self.tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
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
        self.tokens[dst_row, :length] = src.tokens[src_row, :length]
        self.pos[dst_row] = length

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a KVCache sharing this one's memory, so a forward touches only those rows."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.pos, view.tokens = self.pos[start:stop], self.tokens[start:stop]
        return view


# -----------------------------------------------------------------------------
# Attention


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
        # value embeddings: one gate per key/value head, read from the input's first channels (a plain parameter,
        # not a Linear: quantization and packing, which swap every Linear, must leave it alone)
        gated = config.value_embeddings and has_value_embedding(layer_idx, config.n_layer)
        gate = nn.Parameter(torch.zeros(self.n_kv_head, min(GATE_CHANNELS, config.n_embd))) if gated else None
        self.register_parameter("ve_gate", gate)
        self.window = attention_window(config, layer_idx)
        # SDPA's softmax scale, 1/sqrt(head_dim) times qk_gain (None: SDPA's default, today's model): after QK-norm
        # q.k is bounded by head_dim, and a gain above 1 lets the attention sharpen without the norms' help
        self.scale = None if config.qk_gain == 1.0 else config.qk_gain * self.head_dim ** -0.5

    def _within_chunk(self, q, k, v, gqa: bool):
        """Attention of a chunk over itself: the causal (flash) kernel unless a window is shorter than the chunk."""
        T = q.size(-2)
        if self.window is None or self.window >= T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale)
        if flex_windows(q.device):
            block_mask = window_block_mask(T, self.window, q.device)
            return flex_attention(q, k, v, block_mask=block_mask, scale=self.scale, enable_gqa=gqa)
        mask = visible_keys(torch.arange(T, device=q.device), T, self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale)

    def forward(self, x, value_embedding, cos, sin, kv_cache: KVCache | None, positions, cache_len: int,
                start: int | None):
        """value_embedding: (B, T, kv width) rows of this layer's table, or None; positions: (B, T) cache positions
        of this chunk; start: their first one when all rows share it."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embedding is not None:
            # gate in (0, 2): 1 while the gate's weights are zero (at init), so the row starts as a plain addend
            gate = 2 * torch.sigmoid(x[..., :self.ve_gate.size(1)] @ self.ve_gate.T)  # (B, T, n_kv_head)
            v = v + gate[..., None] * value_embedding.view(B, T, self.n_kv_head, self.head_dim)
        v = v.transpose(1, 2)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        gqa = self.n_head != self.n_kv_head

        if kv_cache is None:
            y = self._within_chunk(q, k, v, gqa)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

        k_cache, v_cache = kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx]
        if start is not None:  # every row is at the same position: a plain slice write
            k_cache[:, :, start:start + T] = k.to(k_cache.dtype)
            v_cache[:, :, start:start + T] = v.to(v_cache.dtype)
        else:  # write this chunk at each row's own positions
            rows = torch.arange(B, device=x.device)[:, None]
            k_cache[rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        if start == 0:  # a prefill into an empty cache attends only within the chunk
            y = self._within_chunk(q, k, v, gqa)
        else:
            keys = k_cache[:, :, :cache_len].to(q.dtype)
            values = v_cache[:, :, :cache_len].to(q.dtype)
            mask = None
            # rows at different positions, a chunk after a prefix, or a window the cache has outgrown: mask explicitly
            if start is None or T > 1 or (self.window is not None and cache_len > self.window):
                mask = visible_keys(positions, cache_len, self.window)[:, None]  # (B, 1, T, cache_len)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa, scale=self.scale)

        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)
