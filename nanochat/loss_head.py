"""The GPT's loss head: LM head + tanh softcap + cross-entropy in one pass over row chunks, with its gradients.
Split out of nanochat/gpt.py, which calls it from GPT.forward, to keep the model file short."""

from __future__ import annotations

import torch

from nanochat.kernels import matmul, onednn_ready, tanh_

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
        # a frozen head (LoRA finetuning) needs no weight gradient: its (vocab, n_embd) sum is skipped, not discarded
        needs_x_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_grad = needs_x_grad or needs_weight_grad
        valid = targets != -1
        safe_targets = targets.clamp(min=0)[:, None]
        divisor = valid.sum().clamp(min=1) if reduction == "mean" else torch.ones((), dtype=torch.long)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if needs_x_grad else None
        # on the oneDNN path the head's gradient is summed transposed, (n_embd, vocab): oneDNN copies a transposed left
        # operand, and grad_logits.T (vocab, chunk) is a far bigger copy than xc.T (n_embd, chunk)
        onednn = onednn_ready(x, weight)
        grad_weight = None
        if needs_weight_grad:
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
            if needs_x_grad:
                grad_x[rows] = matmul(grad_logits, weight)
            if not needs_weight_grad:
                continue
            if onednn:
                grad_weight += matmul(xc.T, grad_logits)
            else:
                grad_weight.addmm_(grad_logits.T.to(weight.dtype), xc.to(weight.dtype))  # autocast makes them bf16
        if needs_grad:
            if needs_weight_grad:
                grad_weight = (grad_weight.T.contiguous() if onednn else grad_weight).div_(divisor)
            ctx.save_for_backward(grad_x.div_(divisor) if needs_x_grad else None, grad_weight)
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_loss, None if grad_weight is None else grad_weight * grad_loss,
                None, None, None, None)


def softcapped_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                             reduction: str = "mean", chunk_rows: int = 256) -> torch.Tensor:
    """cross_entropy(softcap * tanh((x @ weight.T) / softcap), targets, ignore_index=-1), chunked; see above."""
    if not 0 < softcap <= 80:
        raise ValueError(f"softcap must be in (0, 80] so exp(logit) fits in fp32 without max-subtraction, got {softcap}")
    return _SoftcappedCrossEntropy.apply(x, weight, targets, softcap, reduction, chunk_rows)
