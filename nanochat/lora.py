"""LoRA: finetune a frozen model through low-rank adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

Each chosen linear layer y = W x becomes y = W x + (alpha / r) * B A x, with A (r x in) and B (out x r) the only
trainable weights. B starts at zero, so step 0 is exactly the base model; A starts like the model's own input
projections, N(0, 1/in), so A x has unit-scale components and B's first gradients have a useful size. The base
weights, the embedding and the LM head stay frozen: no gradients, no optimizer state, and a checkpoint holds only
the adapters plus a reference to the base checkpoint they were trained on (nanochat/checkpoint.py resolves it, and
folds the adapters in, W + (alpha / r) B A, so that every script loads a LoRA checkpoint as an ordinary GPT).

In order: the settings and their flags, the adapter layer, applying and merging adapters, the optimizer, the
checkpoint meta.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nanochat.common import get_dist_info
from nanochat.kernels import Linear
from nanochat.optim import DistAdamW

# --lora-targets names -> the linear layers of each block they wrap (attribute paths inside nanochat.gpt.Block)
TARGETS = {"attn": ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
DEFAULT_TARGETS = "attn,mlp"
# AdamW's peak lr for the adapters (decayed linearly to zero like the rest of SFT), at the default scale of 1. LoRA
# wants a larger lr than full finetuning (B starts at zero, the update has r directions). bench/lora.py, depth 8, 20
# steps, rank 8, validation loss by lr: 5e-4 7.001, 1e-3 6.867, 2e-3 6.796, 4e-3 6.725, 8e-3 6.755 (full SFT 7.035):
# flat from 2e-3 to 8e-3 on that barely pretrained base, which wants larger steps than a trained one; 2e-3 is the
# low end of the flat part, and near the LoRA paper's GPT-2 recipe at a scale of 1 (lr 2e-4 x alpha/r = 32/4).
DEFAULT_LR = 2e-3

# -----------------------------------------------------------------------------
# Settings: what defines the adapters, from the command line and back from a checkpoint's meta


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # keys of TARGETS, in TARGETS' order

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_paths(self) -> list[str]:
        return [path for target in self.targets for path in TARGETS[target]]

    def as_meta(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_meta(cls, meta: dict) -> LoRASettings:
        return cls(int(meta["rank"]), float(meta["alpha"]), parse_targets(",".join(meta["targets"])))


def parse_targets(text: str) -> tuple[str, ...]:
    """'mlp,attn' -> ('attn', 'mlp'); a ValueError naming the valid targets for anything else."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-targets {text!r}: expected a comma-separated list of {', '.join(TARGETS)} "
                         f"({'; '.join(f'{k} = {v}' for k, v in TARGETS.items())})")
    return tuple(target for target in TARGETS if target in names)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA (train low-rank adapters; the base model stays frozen)")
    group.add_argument("--lora-rank", type=int, default=None,
                       help="train rank-R adapters instead of every weight (default: full finetuning)")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="adapters are scaled by alpha / rank (default: alpha = rank, a scale of 1)")
    group.add_argument("--lora-targets", default=None,
                       help=f"the layers that get adapters, comma-separated: {', '.join(TARGETS)} "
                            f"(default: {DEFAULT_TARGETS})")
    group.add_argument("--lora-lr", type=float, default=None,
                       help=f"AdamW lr of the adapters, not scaled by --init-lr-frac (default: {DEFAULT_LR})")


def check_lora_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad LoRA flags; fill in the defaults (so that they are saved, and checked on --resume, as values)."""
    if args.lora_rank is None:
        given = [flag for flag in ("lora_alpha", "lora_targets", "lora_lr") if getattr(args, flag) is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} needs --lora-rank (LoRA is off without it)")
        return
    if args.lora_rank < 1:
        parser.error(f"--lora-rank must be >= 1, got {args.lora_rank} (leave it out for full finetuning)")
    # alpha = rank, a scale of 1: B @ A is the weight update as it stands, and the lr is the one step-size knob (with
    # Adam, alpha and lr are interchangeable: the update to W scales with alpha / r x lr). The LoRA paper also sets
    # alpha to the first rank it tries; to keep a tuned lr while changing the rank, pass that --lora-alpha on.
    args.lora_alpha = float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank)
    if args.lora_alpha <= 0:
        parser.error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    try:
        args.lora_targets = ",".join(parse_targets(args.lora_targets or DEFAULT_TARGETS))
    except ValueError as e:
        parser.error(str(e))
    args.lora_lr = args.lora_lr if args.lora_lr is not None else DEFAULT_LR
    if args.lora_lr <= 0:
        parser.error(f"--lora-lr must be > 0, got {args.lora_lr}")


def settings_from_args(args: argparse.Namespace) -> LoRASettings | None:
    if args.lora_rank is None:
        return None
    return LoRASettings(args.lora_rank, args.lora_alpha, parse_targets(args.lora_targets))


# -----------------------------------------------------------------------------
# The adapter layer


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(x)): the frozen base layer's own forward (with its CPU fast path), plus the low-rank
    update. A and B are nanochat Linears too, so their matmuls take the same fast path, gradients included."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, scale
        weight = base.weight
        with torch.device(weight.device):
            self.lora_A = Linear(base.in_features, rank).to(weight.dtype)
            self.lora_B = Linear(rank, base.out_features).to(weight.dtype)
        with torch.no_grad():
            init = torch.randn(rank, base.in_features, generator=generator) * base.in_features ** -0.5
            self.lora_A.weight.copy_(init)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaling the r-wide bottleneck rather than the out-wide result: the same product, fewer multiplications
        return self.base(x) + self.lora_B(self.lora_A(x) * self.scale)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, in fp32: what merging adds to the base weight."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


# -----------------------------------------------------------------------------
# Applying and merging adapters


def _parent_and_name(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_name, name = path.split(".")
    return getattr(block, parent_name), name


def apply_lora(model: nn.Module, settings: LoRASettings, seed: int = 0) -> nn.Module:
    """Freeze every weight of the GPT and wrap the target layers of every block in adapters, in place. The adapters'
    init draws from its own generator: the same seed gives the same adapters whatever the global RNG did before."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.transformer.h:
        for path in settings.layer_paths():
            parent, name = _parent_and_name(block, path)
            layer = getattr(parent, name)
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"LoRA wraps linear layers; {path} is a {type(layer).__name__} (adapters twice?)")
            setattr(parent, name, LoRALinear(layer, settings.rank, settings.scale, generator))
    return model


def lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    """(parent, attribute, adapter layer) of every adapter in the model."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, LoRALinear)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under their state_dict names: all that a LoRA checkpoint stores of the model."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's adapter weights; a ValueError when they are not exactly this model's adapters."""
    state = {name.removeprefix("_orig_mod."): tensor for name, tensor in state.items()}
    expected = adapter_state(model)
    if state.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(f"the adapter weights do not fit the LoRA settings in the meta (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    mismatched = [name for name, tensor in state.items() if tensor.shape != expected[name].shape]
    if mismatched:
        raise ValueError(f"adapter weights of the wrong shape: {mismatched[:3]}")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scale * B @ A, computed in fp32), put the base layers back and
    unfreeze: an ordinary GPT, changed in place."""
    for parent, name, layer in lora_layers(model):
        base = layer.base
        base.weight.copy_((base.weight.float() + layer.delta_weight()).to(base.weight.dtype))
        setattr(parent, name, base)
    model.requires_grad_(True)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the model, adapters included in both."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: nn.Module, settings: LoRASettings) -> str:
    trainable, total = parameter_counts(model)
    return (f"LoRA rank {settings.rank}, alpha {settings.alpha:g} (scale {settings.scale:g}) on "
            f"{','.join(settings.targets)}: {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / total:.2f}%)")


def estimate_flops(model) -> float:
    """Training FLOPs per token that a step with frozen base weights needs (the MFU numerator): the model's estimate
    less the weight gradients of the frozen matmul weights, 2 FLOPs per weight and token (the embedding is no matmul
    and not in the estimate). The chunked loss head still computes the frozen LM head's gradient and drops it:
    work done, but not needed, so not counted."""
    embedding = model.transformer.wte.weight
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and p is not embedding)
    return model.estimate_flops() - 2 * frozen


# -----------------------------------------------------------------------------
# The optimizer


def setup_optimizers(model: nn.Module, lr: float, weight_decay: float,
                     states: list[dict] | None = None) -> list[torch.optim.Optimizer]:
    """[AdamW over the adapters] (DistAdamW under torchrun, which also averages their gradients over ranks).
    AdamW, not Muon: Muon orthogonalizes each matrix's update, and on an r x in or out x r matrix that means
    Newton-Schulz on an 8-wide matrix whose r singular directions all get the same step, with a shape-based lr rule
    tuned for square-ish hidden matrices; AdamW's per-entry step is the optimizer LoRA was designed and tuned with.
    betas and eps are the model's own AdamW settings. `states`: a resumed run's."""
    params = adapter_parameters(model)
    kwargs = {"lr": lr, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": weight_decay}
    if get_dist_info().ddp:
        optimizer = DistAdamW(params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, fused=params[0].device.type in ("cuda", "cpu"), **kwargs)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    if states is not None:
        [state] = states  # a LoRA run has one optimizer: check_same_run already refused a run of another kind
        optimizer.load_state_dict(state)
    return [optimizer]


# -----------------------------------------------------------------------------
# The checkpoint meta: the settings and the base checkpoint the adapters belong to


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes: a LoRA checkpoint names its base weights by it, so a base that was retrained or
    replaced under the same tag and step is refused instead of silently adapted."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lora_meta(settings: LoRASettings, base: dict) -> dict:
    """meta["lora"] of a LoRA checkpoint. base: {"stage", "tag", "step", "model_sha256"} of the base checkpoint."""
    return {**settings.as_meta(), "base": base}
