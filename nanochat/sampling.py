"""The sampler shared by every decode loop (GPT.generate, the Engine, the continuous-batching Scheduler): one next
token per row of a batch of logits, each row with its own temperature / top-k / top-p.

The guarantee: a row consumes exactly one uniform per token it samples, drawn from its own sample's generator, and
turns it into a token by inverse-CDF sampling over its own distribution. So a seeded request samples the same
tokens whether it runs alone or beside others in a batch, and in whichever of the three loops it runs.
"""

from __future__ import annotations

import torch


def sample_next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       uniforms: torch.Tensor) -> torch.Tensor:
    """Next token per row of `logits` (B, V), by inverse-CDF sampling with the given uniforms (B,) in [0, 1).

    temperature (B,) float: 0 = greedy (argmax); top_k (B,) long: 0 = off; top_p (B,) float: 1 = off (applied
    after top-k, to the renormalized top-k distribution, as Hugging Face does).
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return greedy  # fast path: an all-greedy batch skips the softmax
    scaled = logits / torch.where(sampled_rows, temperature, 1.0)[:, None]
    tokens = greedy.clone()
    vocab_size = logits.size(-1)
    # Three kinds of rows, each sampled over as few candidates as it needs: top-k rows over the k best (a topk,
    # not a sort of the whole vocabulary: at 65k tokens that is the difference between 0.1 and 3 ms a row),
    # top-p-only rows over the sorted vocabulary, unfiltered rows straight from the softmax.
    kinds = (sampled_rows & (top_k > 0), sampled_rows & (top_k <= 0) & (top_p < 1.0),
             sampled_rows & (top_k <= 0) & (top_p >= 1.0))
    for kind, rows in enumerate(kinds):
        if not bool(rows.any()):
            continue
        rows = rows.nonzero().squeeze(1)
        if kind == 2:
            tokens[rows] = _inverse_cdf(torch.softmax(scaled[rows], dim=-1), uniforms[rows], None)
            continue
        k = min(int(top_k[rows].max()), vocab_size) if kind == 0 else vocab_size
        values, ids = scaled[rows].topk(k, dim=-1)  # sorted, best first
        if kind == 0:
            ranks = torch.arange(k, device=logits.device)
            values = values.masked_fill(ranks[None, :] >= top_k[rows, None], float("-inf"))
        probs = torch.softmax(values, dim=-1)
        keep = (probs.cumsum(dim=-1) - probs) < top_p[rows, None]  # the nucleus; rank 0 always stays
        probs = probs * keep
        tokens[rows] = ids.gather(-1, _inverse_cdf(probs, uniforms[rows], keep.sum(dim=-1))[:, None]).squeeze(-1)
    return tokens


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Index per row where the CDF of `probs` (unnormalized) crosses uniform * total. The clamp to the last kept
    candidate guards against float rounding putting the target at the very top of the CDF."""
    cdf = probs.cumsum(dim=-1)
    targets = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return index.clamp(max=probs.size(-1) - 1) if kept is None else torch.minimum(index, kept - 1)


def sampling_tensors(settings: list[tuple[float, int | None, float | None]], device: torch.device):
    """(temperature, top_k, top_p) tensors for a batch from per-row (temperature, top_k, top_p) settings."""
    temperature = torch.tensor([s[0] for s in settings], dtype=torch.float32, device=device)
    top_k = torch.tensor([s[1] or 0 for s in settings], dtype=torch.long, device=device)
    top_p = torch.tensor([1.0 if s[2] is None else s[2] for s in settings], dtype=torch.float32, device=device)
    return temperature, top_k, top_p


def sample_generators(seed: int | None, num_samples: int) -> list[torch.Generator]:
    """One CPU generator per sample (seed None = random): sample i's randomness depends only on (seed, i), not on
    how many samples were asked for or what else shares the batch. A sample draws one uniform per token it
    samples, so drawing on the CPU costs nothing and gives the same results on every device."""
    root = torch.Generator(device="cpu")
    if seed is None:
        root.seed()
    else:
        root.manual_seed(seed)
    seeds = torch.randint(0, 2**62, (num_samples,), generator=root).tolist()
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def draw_uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """One uniform per row; None for a row whose token is not sampled this step (greedy, forced, waiting,
    finished), so it draws nothing."""
    return torch.tensor([0.0 if g is None else torch.rand(1, generator=g).item() for g in generators])
