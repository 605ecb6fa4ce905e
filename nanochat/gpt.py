"""The GPT: a decoder-only transformer, told in order: config, building blocks, the model.
Its attention and KV cache live in nanochat/attention.py, its linear layers and the CPU fast paths they take in
nanochat/kernels.py, its loss head in nanochat/loss_head.py.

Choices, each a small departure from GPT-2 that modern models agree on:
- rotary position embeddings (no learned positions), QK-norm for stable attention logits
- parameter-free RMSNorm, ReLU² MLP, no biases anywhere
- untied token embedding and LM head, logits soft-capped with tanh
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads

Four optional changes from the 2026 speedrun recipes, each behind a GPTConfig field that is off by default (off, the
model has today's parameters, state_dict and outputs): value embeddings, per-layer scalars, smear and backout. Each
new parameter starts where the change is a no-op or a plain copy (see GPT.init_weights), so a fresh model trains like
the plain one from step 0; they are unmeasured at scale (bench/recipe.py ablates them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanochat.attention import GATE_CHANNELS, CausalSelfAttention, KVCache, has_value_embedding, norm
from nanochat.common import get_dist_info
from nanochat.kernels import Linear, tanh_
from nanochat.loss_head import softcapped_cross_entropy
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
    # the 2026-recipe changes (metas written before these fields load with them off, today's model)
    value_embeddings: bool = False  # alternating layers (the last included) add a 2nd token embedding to the values
    layer_scalars: bool = False  # per layer: a learned scale of the residual entering it, and a share of x0 added
    smear: bool = False  # every position adds a gated share of the previous token's embedding
    backout: bool = False  # a learned share of the mid-depth residual is subtracted before the final norm
    window_pattern: str = "L"  # per layer, repeated: S a sliding window of a quarter context, L full (last layer: L)
    qk_gain: float = 1.0  # the attention's softmax scale is qk_gain / sqrt(head_dim)
    vocab_multiple: int = 1  # the embedding and LM head rows are padded to a multiple of this (logits are not)

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("the head dimension must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern={self.window_pattern!r} must be letters S (short window) and L (full "
                             "context), e.g. SSSL")
        if not self.qk_gain > 0:
            raise ValueError(f"qk_gain={self.qk_gain} must be positive")
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple={self.vocab_multiple} must be a positive integer")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size rounded up to vocab_multiple (matmul-friendly sizes)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


INIT_SCHEMES = ("normal", "uniform")  # GPT.init_weights
EMBEDDING_STD_UNIFORM = 0.5
# AdamW's lr for the gates and scalars, not width-scaled (each one's effect does not grow with the width): it moves a
# scalar by up to ~0.02 a step, so a lambda can travel O(1) over a few hundred steps without jumping there at once.
SCALAR_LR = 0.02


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
# Building blocks (attention and its KV cache: nanochat/attention.py)


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

    def forward(self, x, value_embedding, cos, sin, kv_cache, positions, cache_len, start):
        x = x + self.attn(norm(x), value_embedding, cos, sin, kv_cache, positions, cache_len, start)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    SOFTCAP = 15.0  # logits pass through SOFTCAP * tanh(logits / SOFTCAP): bounded logits, steadier early training

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size)
        self._add_recipe_parameters(config)
        # rotary tables cover 10x the training context so the KV cache can decode past it
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _add_recipe_parameters(self, c: GPTConfig) -> None:
        """The parameters of the 2026-recipe changes that are on (none by default). Every scalar reaches the activations
        as a 0-d tensor (a per-layer one indexed): times a bf16 activation it stays bf16, where a 1-d one would
        promote the product to fp32."""
        kv_width = c.n_kv_head * (c.n_embd // c.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(c.vocab_size, kv_width) for i in range(c.n_layer)
                                           if c.value_embeddings and has_value_embedding(i, c.n_layer)})
        if c.layer_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(c.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(c.n_layer))
        if c.smear:
            self.smear_gate = nn.Parameter(torch.zeros(min(GATE_CHANNELS, c.n_embd)))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        if c.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(()))

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates' weights: small matmuls over a few input channels."""
        gates = [block.attn.ve_gate for block in self.transformer.h if block.attn.ve_gate is not None]
        return gates + ([self.smear_gate] if self.config.smear else [])

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The learned scalars: elementwise scales, no matmul."""
        names = ["resid_lambdas", "x0_lambdas"] if self.config.layer_scalars else []
        names += ["smear_lambda"] if self.config.smear else []
        names += ["backout_lambda"] if self.config.backout else []
        return [getattr(self, name) for name in names]

    @staticmethod
    def _rotary_tables(length: int, head_dim: int, base: float):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self, scheme: str = "normal") -> None:
        """Init scheme "normal": embeddings N(0, 1); input projections (q, k, v, fc) N(0, 1/sqrt(fan_in)) so
        activations keep unit scale; output projections (attn and MLP c_proj) zero so every block starts as the
        identity; LM head N(0, 0.001) so the first loss is ~ln(vocab).
        Scheme "uniform" (the 2026 recipe's): the input projections uniform with the same std (no long tails),
        the MLP's input at half of it (ReLU² squares it: a smaller start keeps the MLP's first outputs in range), and
        the embeddings at std EMBEDDING_STD_UNIFORM (they are normed after the lookup, so this only makes AdamW's
        steps larger relative to them).
        The 2026-recipe parameters start where their change is a no-op or a plain copy: value-embedding tables
        like the token embedding (as large as the values they join: c_proj is zero, so a fresh model's output
        is the plain one's and gradients reach the tables at once) behind gates at 1; resid_lambdas 1, x0_lambdas 0;
        smear's and backout's lambdas 0 (off until they learn otherwise)."""
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
        uniform = scheme == "uniform"
        embedding_std = EMBEDDING_STD_UNIFORM if uniform else 1.0
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=embedding_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                std = linear.in_features ** -0.5
                if not uniform:
                    nn.init.normal_(linear.weight, mean=0.0, std=std)
                    continue
                std *= 0.5 if linear is block.mlp.c_fc else 1.0
                nn.init.uniform_(linear.weight, -3 ** 0.5 * std, 3 ** 0.5 * std)  # U(-a, a) has std a / sqrt(3)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for table in self.value_embeds.values():  # after the weights above: their random draws stay today's
            nn.init.normal_(table.weight, mean=0.0, std=embedding_std)
        for parameter in self.gate_parameters() + self.scalar_parameters():
            nn.init.zeros_(parameter)  # value gates at 1; smear's gate weights at 0 behind its lambda of 0
        if self.config.layer_scalars:
            nn.init.ones_(self.resid_lambdas)
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
        """Parameters by role: the embeddings (the token one and any value-embedding tables) are lookups (no FLOPs),
        the LM head and the hidden matrices are matmuls; "gates_and_scalars" appears when a 2026-recipe change is on."""
        embedding = sum(p.numel() for p in [self.transformer.wte.weight, *self.value_embeds.parameters()])
        lm_head = self.lm_head.weight.numel()
        small = self.gate_parameters() + self.scalar_parameters()
        small_ids = {id(p) for p in small}
        hidden = sum(p.numel() for p in self.transformer.h.parameters() if id(p) not in small_ids)
        counts = {"embedding": embedding, "lm_head": lm_head, "hidden_matrices": hidden}
        if small:
            counts["gates_and_scalars"] = sum(p.numel() for p in small)
        return {**counts, "total": sum(counts.values())}

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention's score/value matmuls.
        The embeddings are lookups, not matmuls, so they are left out, and so are the scalars (elementwise)."""
        c = self.config
        counts = self.param_counts()
        matmul_params = counts["lm_head"] + counts["hidden_matrices"] + sum(p.numel() for p in self.gate_parameters())
        head_dim = c.n_embd // c.n_head
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * head_dim * c.sequence_len

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, muon_options: dict | None = None) -> list[torch.optim.Optimizer]:
        """[AdamW for the embeddings, the LM head and any gates and scalars, Muon for the hidden matrices]; their
        distributed forms under torchrun (which also average the gradients across ranks: there is no DDP wrapper).

        The AdamW learning rates were tuned at width 768 and scale as 1/sqrt(width) (the logits' sensitivity to each
        embedding/unembedding entry grows with width). Muon's update is orthogonal, so its lr needs no width scaling.
        Value-embedding tables are embeddings and train with the token embedding. The gates and scalars (not
        matrices Muon could orthogonalize) get a group of their own, only when there are any (so today's optimizer
        state keeps its groups), at SCALAR_LR and without weight decay, which would pull resid_lambdas to 0, not 1.
        muon_options: further keyword arguments of Muon (the optimizer variants of nanochat/optim.py).
        Every group records its "initial_lr" for the schedule."""
        ddp = get_dist_info().ddp
        width_scale = (self.config.n_embd / 768) ** -0.5
        embeddings = [*self.transformer.wte.parameters(), *self.value_embeds.parameters()]
        adamw_groups = [
            {"params": list(self.lm_head.parameters()), "lr": unembedding_lr * width_scale},
            {"params": embeddings, "lr": embedding_lr * width_scale},
        ]
        small = self.gate_parameters() + self.scalar_parameters()
        if small:
            adamw_groups.append({"params": small, "lr": SCALAR_LR, "weight_decay": 0.0})
        # betas (0.8, 0.95) and a tiny eps are nanochat's settings: faster-moving moments suit the short runs here
        adamw_kwargs = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": weight_decay}
        if ddp:
            adamw = DistAdamW(adamw_groups, **adamw_kwargs)
        else:
            adamw = torch.optim.AdamW(adamw_groups, fused=self.get_device().type in ("cuda", "cpu"), **adamw_kwargs)
        muon_class = DistMuon if ddp else Muon
        small_ids = {id(p) for p in small}
        matrices = [p for p in self.transformer.h.parameters() if id(p) not in small_ids]
        muon = muon_class(matrices, lr=matrix_lr, momentum=0.95, **(muon_options or {}))
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
            head = self.lm_head.weight[:self.config.vocab_size]  # padding rows have no token: no logit, no gradient
            return softcapped_cross_entropy(x.view(B * T, -1), head, targets.reshape(-1),
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
        """Final hidden states (..., n_embd) -> soft-capped fp32 logits (..., vocab), the padding rows left out."""
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        logits = logits.float()
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

        x = self._embed(idx)
        if self.config.smear:
            x = self._smear(x, idx, kv_cache, positions)
        x0, mid_residual = x, None
        for i, block in enumerate(self.transformer.h):
            if i == self.config.n_layer // 2:
                mid_residual = x  # after the first half of the layers: what backout subtracts a share of
            if self.config.layer_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embedding = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, value_embedding, cos, sin, kv_cache, positions, cache_len, start)
        if self.config.backout:
            x = x - self.backout_lambda * mid_residual
        if kv_cache is not None:
            kv_cache.pos += T
        return norm(x)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids -> their normed embeddings, the start of the residual stream."""
        x = self.transformer.wte(idx)
        if torch.is_autocast_enabled(x.device.type):
            # The residual stream in the compute dtype (bf16 on CUDA), not the embedding's fp32: the activations
            # saved for backward halve. Depth 20 at 32 x 2048 tokens per GPU (H200, compiled), with the chunked loss
            # head: peak memory 88.9 -> 76.1 GiB, MFU 52.2% -> 52.6%, the same losses to 4 digits.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return norm(x)

    def _smear(self, x: torch.Tensor, idx: torch.Tensor, kv_cache: KVCache | None, positions) -> torch.Tensor:
        """x_t + smear_lambda * sigmoid(smear_gate . x_t[:32]) * x_(t-1): a share of the previous token's normed
        embedding, gated by the current one's. A sequence's first position has no previous token. With a cache, a
        chunk's first position takes it from the row's cached tokens, and the chunk's tokens are cached, so a decode
        continues exactly where the forward over the whole sequence would be."""
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        if kv_cache is not None:
            rows = torch.arange(idx.size(0), device=idx.device)
            last_token = kv_cache.tokens[rows, (kv_cache.pos - 1).clamp(min=0)]
            previous[:, 0] = self._embed(last_token) * (kv_cache.pos > 0)[:, None].to(x.dtype)  # none at position 0
            kv_cache.tokens[rows[:, None], positions] = idx
        gate = self.smear_lambda * torch.sigmoid(x[..., :self.smear_gate.numel()] @ self.smear_gate)  # (B, T)
        return x + gate[..., None] * previous

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
