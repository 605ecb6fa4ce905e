"""How much pretraining a run does: its optimizer steps (from --num-iterations, a FLOPs target or tokens per
parameter) and, with --batch-from-depth, its batch and learning-rate factor from that token budget
(nanochat/plan.py holds the scaling rule, which `speedrun.sh --plan` shares).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.plan import BATCH_REFERENCE_DEPTH, batch_lr_scale, scaled_batch_size, shape_from_depth

RATIO_PARAMS = ("total", "matrices_and_head")


def budget_parameters(counts: dict[str, int], ratio_params: str) -> int:
    """The parameters a tokens-per-parameter ratio counts: all of them, or (matrices_and_head, the 2026 recipe's)
    the matmul weights that grow with depth, without the embeddings' lookups and the scalars."""
    if ratio_params not in RATIO_PARAMS:
        raise ValueError(f"ratio_params must be one of {', '.join(RATIO_PARAMS)}, got {ratio_params!r}")
    return counts["total"] if ratio_params == "total" else counts["hidden_matrices"] + counts["lm_head"]


def training_steps(args: argparse.Namespace, counts: dict[str, int], flops_per_token: float) -> int:
    """The token budget as optimizer steps, by precedence: --num-iterations, --target-flops, the ratio."""
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size)))
    budget = args.target_param_data_ratio * budget_parameters(counts, args.ratio_params)
    return max(1, round(budget / args.total_batch_size))


def batch_from_depth(config: GPTConfig, ratio: float, ratio_params: str, micro_step_tokens: int) -> tuple[int, float]:
    """(tokens per step, learning-rate factor) for `config` trained at `ratio` tokens per parameter: the batch
    the depth-12 model of the same kind (vocab, context, recipe changes) wants, scaled by the two budgets. Counted on
    the meta device: nothing is allocated, and a resumed run computes the same batch from the same flags."""
    n_embd, n_head = shape_from_depth(BATCH_REFERENCE_DEPTH)
    reference = replace(config, n_layer=BATCH_REFERENCE_DEPTH, n_embd=n_embd, n_head=n_head, n_kv_head=n_head)

    def tokens(model_config: GPTConfig) -> float:
        with torch.device("meta"):
            counts = GPT(model_config).param_counts()
        return ratio * budget_parameters(counts, ratio_params)

    batch = scaled_batch_size(tokens(config), tokens(reference), micro_step_tokens)
    return batch, batch_lr_scale(batch)
