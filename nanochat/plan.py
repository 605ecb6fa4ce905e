"""Know before you start: the recipe speedrun.sh would run on some hardware, and what it will cost.

    python -m nanochat.plan                                  # this machine
    NANOCHAT_PLAN_HARDWARE=1x4090 python -m nanochat.plan    # or 8xH100, 1xA100, 2xL40S, cpu, cpu:16 ...
    python -m nanochat.plan --shell                          # the recipe as shell variables (speedrun.sh reads them)

Standard library only, so it runs before anything is installed (`bash speedrun.sh --plan`), touches nothing, and
takes well under a second. The recipe is derived from depth (width, heads, parameters, tokens) and from the
hardware (the depth that fits the time budget on one GPU, the device batch that fits its memory). Every estimate
comes from THROUGHPUT and MEMORY below, each number labeled with where it was measured or that it is assumed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

# -----------------------------------------------------------------------------
# What is known about each GPU kind: datasheet peak (dense bf16, the denominator of MFU), memory, native bf16, and
# the MFU base_train reaches there (the one number throughput estimates scale).


@dataclass(frozen=True)
class GPUKind:
    peak_flops: float  # dense bf16 (fp16 where there is no bf16), from the vendor's datasheet
    memory_gib: float
    bf16: bool
    mfu: float
    mfu_source: str


MEASURED_H200 = "measured: base_train depth 20, 32 x 2048 tokens, compiled, bf16, 1 H200"
ASSUMED = "assumed, not measured"
GPU_KINDS = {
    "H100": GPUKind(989e12, 80, True, 0.52, MEASURED_H200 + " (52.6%); H100 assumed the same"),
    "H200": GPUKind(989e12, 141, True, 0.52, MEASURED_H200 + " (52.6%)"),
    "B200": GPUKind(2250e12, 180, True, 0.40, ASSUMED),
    "A100": GPUKind(312e12, 80, True, 0.45, ASSUMED),
    "L40S": GPUKind(362e12, 48, True, 0.35, ASSUMED),
    "A10G": GPUKind(70e12, 24, True, 0.35, ASSUMED),
    "A10": GPUKind(125e12, 24, True, 0.35, ASSUMED),
    "RTX 4090": GPUKind(165e12, 24, True, 0.35, ASSUMED),
    "RTX 4080": GPUKind(97e12, 16, True, 0.35, ASSUMED),
    "RTX 3090": GPUKind(71e12, 24, True, 0.35, ASSUMED),
    "RTX 4060": GPUKind(44e12, 8, True, 0.30, ASSUMED),
    "V100": GPUKind(125e12, 32, False, 0.25, ASSUMED + " (fp16 with a gradient scaler)"),
    "T4": GPUKind(65e12, 16, False, 0.20, ASSUMED + " (fp16 with a gradient scaler)"),
}
PEAK_FLOPS = {name: kind.peak_flops for name, kind in GPU_KINDS.items()}  # what gpt.peak_flops looks names up in
HARDWARE_ALIASES = {"4090": "RTX 4090", "4080": "RTX 4080", "3090": "RTX 3090", "4060": "RTX 4060"}

# Memory of a training step on one GPU: fixed bytes per parameter (fp32 weights and gradients; AdamW's two moments
# for the embedding and head, Muon's momentum for the matrices) plus activation bytes per token per layer-channel,
# fitted to the one measurement: depth 20, 32 x 2048 tokens per GPU, compiled, bf16, chunked loss head: peak 76.1 GiB
# (1 H200). Other depths scale by n_layer x n_embd (an assumption: attention's share grows with the context).
MEASURED_PEAK = {"depth": 20, "tokens": 32 * 2048, "peak_gib": 76.1, "vocab": 65536}
LOSS_HEAD_GIB = 1.0  # a chunk of logits (4096 rows x 65k vocab) and its gradient
MEMORY_SOURCE = "fitted to one measurement (depth 20, 32 x 2048 tokens, 1 H200, peak 76.1 GiB); scaled by depth"

# The tiny CPU run (speedrun.sh tiny): measured stage times, scaled by core count elsewhere (an assumption).
CPU_TINY_SECONDS = {"base_train": 420, "every other stage": 313}
CPU_TINY_CORES = 2
CPU_TINY_SOURCE = "measured: the tiny run on 2 AMD EPYC Zen 3 cores, 12 min 13 s in all (7 min base training)"

SEQ_LEN, VOCAB_SIZE, TOTAL_BATCH, TOKENS_PER_PARAM = 2048, 65536, 524288, 20
MID_TOKENS = 0.25e9  # assumed: the default mixture's ~850k conversations x ~300 tokens; not measured
SFT_TOKENS = 0.02e9  # assumed: ~23k conversations, padded rows
EVAL_GPU_SECONDS = 8 * 1800  # assumed: CORE + chat evals + RL ~ 30 min on 8 GPUs of the H100 class; scales with peak
SHARD_CHARS, CHARS_PER_TOKEN, SHARD_MB = 250e6, 4.8, 100  # FineWeb-Edu shards (nanochat/dataset.py: ~100MB each)


# -----------------------------------------------------------------------------
# The batch from the token budget (base_train --batch-from-depth). Public scaling results, unmeasured here: the
# loss-optimal batch grows as the training tokens^0.383 (Power Lines, Bergsma et al. 2025, arXiv:2505.13738), anchored
# as nanochat's 2026 recipe anchors it, at 2^19 tokens for the depth-12 model at the same tokens per parameter; the
# learning rates follow as sqrt(batch / 2^19) (AdamW's square-root rule, assumed to hold for Muon too).
BATCH_REFERENCE_DEPTH, BATCH_REFERENCE_TOKENS, BATCH_EXPONENT = 12, 2 ** 19, 0.383


def scaled_batch_size(tokens: float, reference_tokens: float, micro_step_tokens: int) -> int:
    """The batch (tokens per optimizer step) for a run of `tokens` training tokens, when a run of reference_tokens
    wants BATCH_REFERENCE_TOKENS: rounded to the nearest power of two, and to a whole number of micro-steps."""
    if tokens <= 0 or reference_tokens <= 0 or micro_step_tokens < 1:
        raise ValueError(f"tokens, reference_tokens and micro_step_tokens must be positive, got {tokens}, "
                         f"{reference_tokens}, {micro_step_tokens}")
    ideal = BATCH_REFERENCE_TOKENS * (tokens / reference_tokens) ** BATCH_EXPONENT
    power_of_two = 2 ** round(math.log2(ideal))
    return max(1, round(power_of_two / micro_step_tokens)) * micro_step_tokens


def batch_lr_scale(batch_tokens: int) -> float:
    """The learning rates' factor at this batch: sqrt(batch / BATCH_REFERENCE_TOKENS)."""
    return (batch_tokens / BATCH_REFERENCE_TOKENS) ** 0.5


# -----------------------------------------------------------------------------
# The model from its depth (nanochat/gpt.py's model_config_from_depth uses the same arithmetic)


def shape_from_depth(depth: int) -> tuple[int, int]:
    """(n_embd, n_head) of the one-dial model: 64 channels per layer, heads ~128 wide, even head dimension."""
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    n_embd = depth * 64
    n_head = max(1, round(n_embd / 128))
    while n_embd % n_head != 0 or (n_embd // n_head) % 2 != 0:
        n_head -= 1
    return n_embd, n_head


def parameter_counts(depth: int, vocab_size: int = VOCAB_SIZE) -> dict[str, int]:
    n_embd, _ = shape_from_depth(depth)
    embeddings = 2 * vocab_size * n_embd  # untied token embedding and LM head
    matrices = depth * 12 * n_embd * n_embd  # q, k, v, proj (4 n^2) + MLP (8 n^2), no GQA in the one-dial model
    return {"embeddings": embeddings, "matrices": matrices, "total": embeddings + matrices}


def flops_per_token(depth: int, vocab_size: int = VOCAB_SIZE, seq_len: int = SEQ_LEN) -> float:
    """Training FLOPs per token, as GPT.estimate_flops counts them (the embedding lookup is no matmul)."""
    counts = parameter_counts(depth, vocab_size)
    n_embd, _ = shape_from_depth(depth)
    return 6 * (counts["total"] - vocab_size * n_embd) + 12 * depth * n_embd * seq_len


def peak_memory_gib(depth: int, tokens_per_gpu: int, vocab_size: int = VOCAB_SIZE) -> float:
    return fixed_gib(depth, vocab_size) + LOSS_HEAD_GIB + tokens_per_gpu * depth * shape_from_depth(depth)[0] \
        * activation_bytes_per_token_channel() / 2**30


def fixed_gib(depth: int, vocab_size: int = VOCAB_SIZE) -> float:
    counts = parameter_counts(depth, vocab_size)
    return (counts["embeddings"] * 16 + counts["matrices"] * 12) / 2**30


def activation_bytes_per_token_channel() -> float:
    m = MEASURED_PEAK
    activations = (m["peak_gib"] - fixed_gib(m["depth"], m["vocab"]) - LOSS_HEAD_GIB) * 2**30
    return activations / (m["tokens"] * m["depth"] * shape_from_depth(m["depth"])[0])


# -----------------------------------------------------------------------------
# Hardware: named, or found on this machine (nvidia-smi; no torch needed)


@dataclass(frozen=True)
class Hardware:
    kind: str  # a GPU_KINDS key, or "cpu"
    count: int  # GPUs, or CPU cores
    memory_gib: float  # per GPU (0 on CPU)

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU, {self.count} cores"
        return f"{self.count}x {self.kind} ({self.memory_gib:.0f} GiB each)"


def parse_hardware(text: str) -> Hardware:
    """'8xH100', '1x4090', '2xA100', 'cpu' or 'cpu:16' (cores)."""
    text = text.strip()
    cpu = re.fullmatch(r"cpu(?::(\d+))?", text, re.IGNORECASE)
    if cpu:
        return Hardware("cpu", int(cpu.group(1) or CPU_TINY_CORES), 0)
    match = re.fullmatch(r"(\d+)\s*[xX]\s*(.+)", text)
    name = match and HARDWARE_ALIASES.get(match.group(2).strip(), match.group(2).strip().upper())
    kind = next((k for k in GPU_KINDS if name and k.upper() == name.upper()), None)
    if not match or kind is None or int(match.group(1)) < 1:
        raise ValueError(f"NANOCHAT_PLAN_HARDWARE={text!r} is not hardware this plan knows: write COUNTxKIND with "
                         f"KIND one of {', '.join(list(GPU_KINDS) + list(HARDWARE_ALIASES))}, or cpu[:CORES]")
    return Hardware(kind, int(match.group(1)), GPU_KINDS[kind].memory_gib)


def detect_hardware() -> Hardware:
    """This machine's GPUs as nvidia-smi lists them; the CPU when there are none."""
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
            gpus = [line.rsplit(",", 1) for line in out.strip().splitlines() if "," in line]
        except (OSError, subprocess.SubprocessError):
            gpus = []
    if not gpus:
        return Hardware("cpu", os.cpu_count() or 1, 0)
    name, memory_mib = gpus[0]
    kind = next((k for k in GPU_KINDS if k in name), None)
    if kind is None:  # an unlisted GPU: plan with its memory and the most modest known throughput
        kind = min(GPU_KINDS, key=lambda k: GPU_KINDS[k].peak_flops)
    return Hardware(kind, len(gpus), float(memory_mib) / 1024)


# -----------------------------------------------------------------------------
# The recipe and its estimate


@dataclass
class Plan:
    hardware: str
    scale: str  # speedrun.sh's recipe: gpu or tiny
    depth: int
    parameters: int
    train_tokens: int
    device_batch_size: int
    grad_accum_steps: int
    base_steps: int
    num_shards: int
    stage_seconds: dict[str, float]
    peak_memory_gib: float
    disk_gib: float
    gpu_hours: float
    cost: float
    sources: list[str]

    @property
    def total_seconds(self) -> float:
        return sum(self.stage_seconds.values())


def fits(depth: int, rows: int, memory_gib: float) -> bool:
    """Whether `rows` rows of 2048 tokens fit, leaving 2 GiB for the CUDA context and the allocator's slack (the
    measured 76.1 GiB ran under an 80,000 MiB cap)."""
    return peak_memory_gib(depth, rows * SEQ_LEN) <= memory_gib - 2


def device_batch_for(depth: int, memory_gib: float) -> int:
    """The largest power-of-two count of 2048-token rows (<= 32) that fits."""
    batch = 32
    while batch > 1 and not fits(depth, batch, memory_gib):
        batch //= 2
    return batch


def gpu_stage_seconds(depth: int, hardware: Hardware) -> dict[str, float]:
    kind = GPU_KINDS[hardware.kind]
    rate = kind.peak_flops * kind.mfu * hardware.count  # FLOP/s of the whole machine
    per_token = flops_per_token(depth)
    train_tokens = TOKENS_PER_PARAM * parameter_counts(depth)["total"]
    # evals and RL: their depth-20 time on 8 H100-class GPUs, scaled by parameters and by the machine's speed
    size = parameter_counts(depth)["total"] / parameter_counts(20)["total"]
    evals = EVAL_GPU_SECONDS * size * GPU_KINDS["H100"].peak_flops / (kind.peak_flops * hardware.count)
    return {"tokenizer": 120, "base_train": per_token * train_tokens / rate,
            "base evals": 0.3 * evals, "mid_train": per_token * MID_TOKENS / rate,
            "chat_sft": per_token * SFT_TOKENS / rate, "chat_rl + chat evals": 0.7 * evals}


def choose_depth(hardware: Hardware, budget_hours: float | None) -> int:
    """8 large GPUs: the measured depth-20 recipe. Fewer: the deepest even depth (4-20) whose estimate fits the
    budget (default 4 hours) and whose device batch of at least one row fits memory."""
    if budget_hours is None and hardware.count >= 8 and hardware.memory_gib >= 70:
        return 20
    budget = (budget_hours or 4.0) * 3600
    best = 4
    for depth in range(4, 21, 2):
        if fits(depth, 1, hardware.memory_gib) and sum(gpu_stage_seconds(depth, hardware).values()) <= budget:
            best = depth
    return best


def make_plan(hardware: Hardware, depth: int | None = None, budget_hours: float | None = None,
              gpu_hour_cost: float = 3.0) -> Plan:
    if hardware.kind == "cpu":
        return cpu_plan(hardware)
    depth = depth or choose_depth(hardware, budget_hours)
    counts = parameter_counts(depth)
    train_tokens = TOKENS_PER_PARAM * counts["total"]
    device_batch = device_batch_for(depth, hardware.memory_gib)
    rows_per_step = TOTAL_BATCH // SEQ_LEN
    accum = max(1, rows_per_step // (device_batch * hardware.count))
    stages = gpu_stage_seconds(depth, hardware)
    shards = int(train_tokens * CHARS_PER_TOKEN / SHARD_CHARS * 1.1) + 1
    checkpoint_gib = counts["total"] * 12 / 2**30 * 2 * 4  # weights + optimizer, 2 kept per stage, 4 stages
    gpu_hours = sum(stages.values()) / 3600 * hardware.count
    kind = GPU_KINDS[hardware.kind]
    return Plan(hardware.describe(), "gpu", depth, counts["total"], train_tokens, device_batch, accum,
                math.ceil(train_tokens / TOTAL_BATCH), shards, stages,
                peak_memory_gib(depth, device_batch * SEQ_LEN), shards * SHARD_MB / 1024 + checkpoint_gib + 5,
                gpu_hours, gpu_hours * gpu_hour_cost,
                [f"MFU {kind.mfu:.0%} on {hardware.kind}: {kind.mfu_source}", f"memory: {MEMORY_SOURCE}",
                 "mid/SFT tokens, evals and RL time: assumed, not measured"])


def cpu_plan(hardware: Hardware) -> Plan:
    counts = parameter_counts(4, 4096)
    factor = CPU_TINY_CORES / max(1, hardware.count)
    stages = {name: seconds * factor for name, seconds in CPU_TINY_SECONDS.items()}
    return Plan(hardware.describe(), "tiny", 4, counts["total"], 600 * 2048, 8, 1, 600, 3, stages,
                0.0, 1.0, 0.0, 0.0, [CPU_TINY_SOURCE + (f"; scaled to {hardware.count} cores (assumed linear)"
                                                       if hardware.count != CPU_TINY_CORES else "")])


# -----------------------------------------------------------------------------
# Output


def hms(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(1, minutes)} min"


def render(plan: Plan) -> str:
    lines = [(f"speedrun plan for {plan.hardware}: recipe {plan.scale}, depth {plan.depth}, "
              f"{plan.parameters / 1e6:,.0f}M parameters, {plan.train_tokens / 1e6:,.0f}M pretraining tokens "
              f"({plan.base_steps} steps; device batch {plan.device_batch_size} x {plan.grad_accum_steps} "
              "accumulation)")]
    lines += [f"  {name:<22} ~{hms(seconds)}" for name, seconds in plan.stage_seconds.items()]
    lines.append(f"  {'total':<22} ~{hms(plan.total_seconds)}")
    if plan.gpu_hours:
        lines.append(f"  cost ~${plan.cost:,.0f} ({plan.gpu_hours:.1f} GPU-hours at "
                     f"${os.environ.get('NANOCHAT_GPU_HOUR_COST', '3')}/GPU-hour, NANOCHAT_GPU_HOUR_COST)")
        lines.append(f"  peak memory ~{plan.peak_memory_gib:.0f} GiB per GPU; disk ~{plan.disk_gib:.0f} GiB "
                     f"({plan.num_shards} data shards + checkpoints)")
    else:
        lines.append(f"  no GPU cost; disk ~{plan.disk_gib:.0f} GiB")
    lines += [f"  where the numbers come from: {source}" for source in plan.sources]
    return "\n".join(lines)


def shell_variables(plan: Plan) -> str:
    return "\n".join([f"PLAN_SCALE={plan.scale}", f"PLAN_DEPTH={plan.depth}",
                      f"PLAN_DEVICE_BATCH_SIZE={plan.device_batch_size}", f"PLAN_NUM_SHARDS={plan.num_shards}",
                      f"PLAN_TOTAL_SECONDS={round(plan.total_seconds)}"])


def plan_from_environment(depth: int | None = None) -> Plan:
    hardware_name = os.environ.get("NANOCHAT_PLAN_HARDWARE")
    hardware = parse_hardware(hardware_name) if hardware_name else detect_hardware()
    budget = os.environ.get("NANOCHAT_TIME_BUDGET_HOURS")
    cost = os.environ.get("NANOCHAT_GPU_HOUR_COST", "3")
    try:
        budget_hours = float(budget) if budget else None
        gpu_hour_cost = float(cost)
    except ValueError:
        raise ValueError(f"NANOCHAT_TIME_BUDGET_HOURS={budget!r} and NANOCHAT_GPU_HOUR_COST={cost!r} must be "
                         "numbers (hours, dollars)") from None
    if budget_hours is not None and budget_hours <= 0:
        raise ValueError(f"NANOCHAT_TIME_BUDGET_HOURS must be positive, got {budget_hours}")
    return make_plan(hardware, depth, budget_hours, gpu_hour_cost)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=None, help="plan this depth instead of the one chosen")
    parser.add_argument("--shell", action="store_true", help="print the recipe as shell variables")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.depth is not None and args.depth < 1:
        parser.error(f"--depth must be >= 1, got {args.depth}")
    try:
        plan = plan_from_environment(args.depth)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.shell:
        print(shell_variables(plan))
    elif args.json:
        print(json.dumps({**asdict(plan), "total_seconds": plan.total_seconds}, indent=1))
    else:
        print(render(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
