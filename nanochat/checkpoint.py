"""Checkpoints: save and load a model, its per-rank training state and a JSON meta, for every stage.

Layout: $NANOCHAT_BASE_DIR/{base,mid,chatsft,chatrl}_checkpoints/<tag>/
    model_<step:06d>.pt             the model's state_dict (rank 0)
    optim_<step:06d>_rank<r>.pt     what rank r needs to resume: its optimizer states (the distributed optimizers
                                    shard their state across ranks), plus whatever else the stage puts there
    meta_<step:06d>.json            model config, tokenizer fingerprint, step, loop and dataloader state

A LoRA checkpoint (chat_sft --lora-rank) stores only the adapters in model_<step>.pt; its meta's "lora" entry holds
the settings and the base checkpoint they adapt (stage, tag, step, sha256 of its weights file). build_model rebuilds
the base with the adapters on top (what a resumed LoRA run trains), and load_model folds them in: every script that
loads a model gets an ordinary GPT either way.

Every file is written atomically (temp name, fsync, rename) and the meta file last, after all ranks finished their
files: a step whose meta exists is complete, and find_last_step only ever returns complete steps.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import atomic_torch_save, atomic_write_text, get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora import LoRASettings, apply_lora, file_fingerprint, load_adapter_state, merge_lora

CHECKPOINT_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                   "rl": "chatrl_checkpoints"}
PRODUCERS = {"base": "python -m scripts.base_train", "mid": "python -m scripts.mid_train",
             "sft": "python -m scripts.chat_sft", "rl": "python -m scripts.chat_rl"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the code/tokenizer that loads it."""


def model_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir: Path, step: int, rank: int) -> Path:
    return Path(checkpoint_dir) / f"optim_{step:06d}_rank{rank}.pt"


# -----------------------------------------------------------------------------
# Saving


def model_meta(config: GPTConfig, tokenizer, step: int, **extra) -> dict:
    """The meta every stage writes: what it takes to rebuild the model and check its tokenizer, plus stage state."""
    return {"model_config": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(), "step": step, **extra}


def save_checkpoint(checkpoint_dir: Path, step: int, model_state: dict | None, optimizer_states, meta: dict,
                    rank: int = 0) -> None:
    """Every rank calls this (under torchrun it synchronizes the ranks): each writes its own optim file (skipped when
    optimizer_states is None), rank 0 writes the model and, once every rank is done, the meta."""
    checkpoint_dir = Path(checkpoint_dir)
    if optimizer_states is not None:
        atomic_torch_save(optimizer_states, optim_path(checkpoint_dir, step, rank))
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass the model state to save_checkpoint")
        atomic_torch_save(model_state, model_path(checkpoint_dir, step))
    if dist.is_initialized():
        dist.barrier()  # the meta marks the step complete: only after every rank's optim file is on disk
    if rank == 0:
        atomic_write_text(meta_path(checkpoint_dir, step), json.dumps(meta, indent=2) + "\n")


# -----------------------------------------------------------------------------
# Finding checkpoints


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """The steps with a complete checkpoint (its meta file, written last, exists), in order."""
    return sorted(int(m.group(1)) for p in Path(checkpoint_dir).glob("meta_*.json")
                  if (m := re.fullmatch(r"meta_(\d+)\.json", p.name)))


def find_last_step(checkpoint_dir: Path) -> int:
    """The largest step with a complete checkpoint (its meta file exists)."""
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint (meta_<step>.json) in {checkpoint_dir}: train one first, "
                              "or pass the directory of an existing run")
    return max(steps)


def find_largest_tag(checkpoints_root: Path) -> str:
    """The tag of the deepest model (d20 beats d12); tags not named d<depth> fall back to the newest directory."""
    checkpoints_root = Path(checkpoints_root)
    tags = [p for p in checkpoints_root.iterdir() if p.is_dir()] if checkpoints_root.is_dir() else []
    if not tags:
        raise CheckpointError(f"no checkpoints in {checkpoints_root}: run the stage that writes them first")
    depths = [(int(m.group(1)), p.name) for p in tags if (m := re.fullmatch(r"d(\d+)", p.name))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda p: p.stat().st_mtime).name


# -----------------------------------------------------------------------------
# Loading


def _load_torch(path: Path, device, what: str):
    fallback = (f"delete {path.parent}/meta_{path.name.split('_')[1].split('.')[0]}.json to fall back to the "
                "previous checkpoint, or retrain")
    if not path.is_file():
        raise CheckpointError(f"{path} ({what}) is missing: the checkpoint is incomplete; {fallback}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle...: torch raises several types
        raise CheckpointError(f"{path} ({what}) is corrupt or truncated ({type(e).__name__}: {e}); {fallback}") from e


def load_meta(checkpoint_dir: Path, step: int) -> dict:
    path = meta_path(checkpoint_dir, step)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: step {step} has no complete checkpoint in {checkpoint_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        GPTConfig(**meta["model_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}): delete this step's files to fall back "
                              "to an earlier checkpoint") from e
    return meta


def load_checkpoint(checkpoint_dir: Path, step: int, device, load_optimizer: bool = False, rank: int = 0):
    """(model_state, optimizer_states or None, meta) of one step; clear CheckpointErrors for missing/corrupt files."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = load_meta(checkpoint_dir, step)
    model_state = _load_torch(model_path(checkpoint_dir, step), device, "model weights")
    optimizer_states = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        optimizer_states = _load_torch(path, device, f"optimizer state of rank {rank}; resuming needs the same "
                                                     "number of processes as the run that saved it")
    return model_state, optimizer_states, meta


def build_model(meta: dict, device, phase: str, model_state: dict | None = None, source: str = "",
                init_scheme: str = "normal") -> GPT:
    """The GPT described by meta["model_config"] on `device`, with `model_state` loaded (fresh
    init_weights(init_scheme) when it is None), in train or eval mode. A state that does not fit the config raises a CheckpointError. A LoRA meta
    gives its base model, frozen, with the adapters of `model_state` on top (see build_lora_model)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    if "lora" in meta and model_state is not None:
        return build_lora_model(meta, device, phase, model_state, source)
    config = GPTConfig(**meta["model_config"])
    device = torch.device(device)
    with torch.device(device):
        model = GPT(config)
    if model_state is None:
        model.init_weights(init_scheme)
    else:
        # torch.compile prefixes parameter names; CPU/MPS compute in fp32 even if a GPU run saved bf16 weights
        state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
        if device.type != "cuda":
            state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            where = source or "the checkpoint"
            raise CheckpointError(f"the weights in {where} do not match the model config in its meta file "
                                  f"({config}): {e}. The files come from different runs; delete this step or "
                                  "retrain") from e
    model.train(phase == "train")
    return model


def load_model(source: str, device, phase: str, tag: str | None = None, step: int | None = None):
    """(model, tokenizer, meta) of a stage's checkpoint: source in base|mid|sft|rl; the deepest tag and the last
    step unless given. The tokenizer is the current one ($NANOCHAT_BASE_DIR/tokenizer) and must be the one the model
    was trained with."""
    from nanochat.tokenizer import get_tokenizer

    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"source must be one of {sorted(CHECKPOINT_DIRS)}, got {source!r}")
    root = get_base_dir() / CHECKPOINT_DIRS[source]
    if tag is None:
        try:
            tag = find_largest_tag(root)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (`{PRODUCERS[source]}`)") from None
    checkpoint_dir = root / tag
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, meta_path(checkpoint_dir, step))
    model = build_model(meta, device, phase, model_state, source=str(model_path(checkpoint_dir, step)))
    if "lora" in meta:
        merge_lora(model).train(phase == "train")
    return model, tokenizer, meta


# -----------------------------------------------------------------------------
# LoRA checkpoints: adapters over a base checkpoint named by its weights' hash


def stage_checkpoint_dir(stage: str, tag: str) -> Path:
    return get_base_dir() / CHECKPOINT_DIRS[stage] / tag


def base_reference(source: dict) -> dict:
    """What a LoRA checkpoint keeps of the checkpoint it adapts (source: {"stage", "tag", "step"}): that, and the
    sha256 of its weights file."""
    path = model_path(stage_checkpoint_dir(source["stage"], source["tag"]), source["step"])
    return {"stage": source["stage"], "tag": source["tag"], "step": source["step"],
            "model_sha256": file_fingerprint(path)}


def build_lora_model(meta: dict, device, phase: str, adapter_state: dict, source: str) -> GPT:
    """The base checkpoint that meta["lora"] names, checked against its sha256, frozen, with the adapters on top."""
    where = source or "the LoRA checkpoint"
    try:
        settings, base = LoRASettings.from_meta(meta["lora"]), meta["lora"]["base"]
        base_dir = stage_checkpoint_dir(base["stage"], base["tag"])
        base_file, saved_sha256 = model_path(base_dir, base["step"]), base["model_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the LoRA settings in the meta of {where} are corrupt ({type(e).__name__}: {e})") from e
    what = f"{where} holds LoRA adapters over the {base['stage']} checkpoint {base['tag']} step {base['step']}"
    fix = (f"restore that checkpoint (a fresh run of a stage sets the previous one aside as {base['tag']}.replaced-*), "
           "or finetune anew on the current one; `chat_sft --merge` folds adapters into a standalone checkpoint "
           "while their base is still there")
    if not base_file.is_file():
        raise CheckpointError(f"{what}, but {base_file} is missing: {fix}")
    current_sha256 = file_fingerprint(base_file)
    if current_sha256 != saved_sha256:
        raise CheckpointError(f"{what}, but {base_file} has changed since (sha256 {saved_sha256[:12]}... then, "
                              f"{current_sha256[:12]}... now): {fix}")
    base_state, _, base_meta = load_checkpoint(base_dir, base["step"], device)
    if GPTConfig(**base_meta["model_config"]) != GPTConfig(**meta["model_config"]):
        raise CheckpointError(f"{what}, whose model config differs from the one in its meta: {fix}")
    model = apply_lora(build_model(base_meta, device, phase, base_state, source=str(base_file)), settings)
    try:
        load_adapter_state(model, adapter_state)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}. The files come from different runs; delete this step or retrain") from e
    return model


def merged_lora_checkpoint(checkpoint_dir: Path, step: int | None, device="cpu") -> tuple[dict, dict]:
    """(model_state, meta) of a full checkpoint equal to a LoRA checkpoint with its adapters folded in: the meta is
    an ordinary one (no training state to resume; "merged_from" says where it came from). A CheckpointError for a
    checkpoint that is not a LoRA one."""
    step = find_last_step(checkpoint_dir) if step is None else step
    meta = load_meta(checkpoint_dir, step)
    if "lora" not in meta:
        raise CheckpointError(f"{meta_path(checkpoint_dir, step)} is a full checkpoint, not a LoRA one: there is "
                              "nothing to merge, load it as it is (or pass the tag and step of a LoRA run)")
    adapters = _load_torch(model_path(checkpoint_dir, step), device, "LoRA adapter weights")
    model = merge_lora(build_lora_model(meta, device, "eval", adapters, str(model_path(checkpoint_dir, step))))
    merged_meta = {key: value for key, value in meta.items() if key not in ("lora", "rank_states", "loop_state")}
    merged_meta["merged_from"] = {"tag": Path(checkpoint_dir).name, "step": step, "lora": meta["lora"]}
    return model.state_dict(), merged_meta


def check_tokenizer(meta: dict, tokenizer, where: Path) -> None:
    saved = meta.get("tokenizer_fingerprint")
    if saved != tokenizer.fingerprint():
        raise CheckpointError(
            f"{where} was trained with tokenizer {saved}, but {get_base_dir() / 'tokenizer'} holds tokenizer "
            f"{tokenizer.fingerprint()}: restore the tokenizer this model was trained with, or retrain the model "
            "with the current one")
    vocab_size = meta["model_config"]["vocab_size"]
    if vocab_size < tokenizer.get_vocab_size():
        raise CheckpointError(f"{where}: the model has {vocab_size} token embeddings but the tokenizer has "
                              f"{tokenizer.get_vocab_size()} tokens")


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (every rank's optimizer shards with them); returns the
    steps removed. The meta file goes first, so a step is never left looking complete with its weights gone."""
    removed = complete_steps(checkpoint_dir)[:-keep]
    for step in removed:
        meta_path(checkpoint_dir, step).unlink()
        for path in Path(checkpoint_dir).glob(f"*_{step:06d}*"):
            path.unlink()
    return removed


# -----------------------------------------------------------------------------
# Per-rank state a checkpoint carries: data position and RNG, gathered into the meta by rank 0


def gather_rank_states(state: dict) -> list[dict]:
    """Every rank's `state` (JSON-able), in rank order, on every rank."""
    if not dist.is_initialized():
        return [state]
    states: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def pick_rank_state(rank_states: list[dict], rank: int, world_size: int, checkpoint: str) -> dict:
    """This rank's entry of a checkpoint's per-rank states; the data order depends on the number of ranks, so
    an exact resume needs the same number."""
    if len(rank_states) != world_size:
        raise ValueError(f"{checkpoint} was written by {len(rank_states)} ranks but this run has {world_size}: "
                         f"resume with the same number of processes (torchrun --nproc_per_node={len(rank_states)})")
    return rank_states[rank]


def rng_state(device: torch.device) -> dict:
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(decode(state["cuda"]), device)
