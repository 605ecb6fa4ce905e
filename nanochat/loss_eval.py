"""Bits per byte: the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token rewards a tokenizer with bigger tokens; dividing the summed loss (in bits) by the number
of UTF-8 bytes the target tokens stand for gives a number comparable across vocabularies. Special tokens (<|bos|>,
...) stand for no bytes: token_bytes maps them to 0 and they are left out of both sums, as are targets of -1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` batches of (inputs, targets); under torchrun the sums are all-reduced, so every
    rank returns the same number for all ranks' batches together."""
    if steps < 1:
        raise ValueError(f"evaluate_bpb needs at least one step, got {steps}")
    device = model.get_device()
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=sum_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)
        targets = targets.reshape(-1)
        num_bytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (loss * (num_bytes > 0)).sum(dtype=sum_dtype)
        total_bytes += num_bytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if total_bytes.item() == 0:
        raise ValueError("the evaluated targets stand for zero bytes (all special tokens?): cannot compute bpb")
    return total_nats.item() / (math.log(2) * total_bytes.item())
