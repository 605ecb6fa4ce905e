"""fp16 training without bf16 (T4, V100: GPUs before Ampere): dynamic loss scaling.

fp16 has 5 exponent bits, so small gradients underflow to zero. The loss is multiplied by a large scale before
backward, and the gradients divided by it before the optimizers step. A step whose gradients overflowed (inf/nan
anywhere, on any rank) is skipped and the scale halved; after `growth_interval` good steps in a row it doubles.
The weights stay fp32 (autocast casts them for each forward), so the optimizers update fp32 master weights.

Our optimizers average gradients across ranks inside their step (no DDP wrapper), so the overflow check is
all-reduced first: every rank skips, or none does. With bf16 or fp32 the scaler is off and `step` just steps.
"""

from __future__ import annotations

import torch

from nanochat.common import all_reduce_sum, get_compute_dtype


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0

    loop_state: dict | None = None  # where step() keeps the state, so that every checkpoint of the loop saves it

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> LossScaler:
        return cls(enabled=dtype == torch.float16)

    @classmethod
    def in_loop_state(cls, device_type: str, loop_state: dict) -> LossScaler:
        """The scaler of a training loop on `device_type`: on only in fp16, continuing from the state a resumed
        checkpoint's loop state holds, and keeping its state there (under "loss_scaler") after every step."""
        scaler = cls.for_dtype(get_compute_dtype(device_type))
        scaler.load_state_dict(loop_state.get("loss_scaler"))
        scaler.loop_state = loop_state
        return scaler

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def step(self, optimizers: list[torch.optim.Optimizer], model: torch.nn.Module) -> bool:
        """Unscale the gradients and step every optimizer, or skip the step on overflow. True if it stepped."""
        if self.enabled:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads:
                raise RuntimeError("LossScaler.step found no gradients: call backward on scale_loss(loss) first")
            overflow = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float()
            if all_reduce_sum(overflow).item() > 0:
                model.zero_grad(set_to_none=True)
                self.scale /= 2
                self.good_steps = 0
                self.skipped_steps += 1
                self._keep_state()
                return False
            inverse = 1.0 / self.scale
            for g in grads:
                g.mul_(inverse)
        for optimizer in optimizers:
            optimizer.step()
        if self.enabled:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2
        self._keep_state()
        return True

    def _keep_state(self) -> None:
        if self.enabled and self.loop_state is not None:
            self.loop_state["loss_scaler"] = self.state_dict()

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint from before loss scaling (or from a bf16/fp32 run) has no state: keep the fresh one."""
        if state:
            self.scale, self.good_steps, self.skipped_steps = state["scale"], state["good_steps"], state["skipped_steps"]
