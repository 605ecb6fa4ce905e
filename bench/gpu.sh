#!/usr/bin/env bash
# The GPU checks in one run, for a machine lent for a few minutes: depth-20 base training (MFU, step time, peak
# memory), the same under an 80 GB memory cap (what an H100 leaves a process, checked on a bigger card), then
# bench/engine.py and bench/train.py at GPU sizes. About 6 minutes on an H200, most of it torch.compile.
#
#   NANOCHAT_DATA_DIR=... NANOCHAT_BASE_DIR=... bash bench/gpu.sh
#
# Needs pretraining shards (the mirror's fineweb/ or $NANOCHAT_BASE_DIR/base_data) and a tokenizer trained into
# $NANOCHAT_BASE_DIR (python -m scripts.tok_train), and transformers for the two benches. The training runs save
# their checkpoints under the model tag gpu-check, never over a real run's. Knobs: DEPTH (20), STEPS (8),
# CAP_MIB (80000; 0 skips the capped run), ENGINE_ARGS, TRAIN_ARGS (the benches' flags).
set -uo pipefail  # no -e: one failing check must not hide the others' numbers

DEPTH=${DEPTH:-20}
STEPS=${STEPS:-8}
CAP_MIB=${CAP_MIB:-80000}
ENGINE_ARGS=${ENGINE_ARGS:---depth 20 --vocab-size 65536 --new-tokens 128 --batch-sizes 1 16 64 --dtype bfloat16}
TRAIN_ARGS=${TRAIN_ARGS:---depth 20 --batch-size 8 --seq-len 2048 --vocab-size 65536 --steps 3 --rounds 2}
PY=${NANOCHAT_PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TRAIN_FLAGS=(--depth "$DEPTH" --num-iterations "$STEPS" --eval-every -1 --eval-tokens 524288 --core-metric-every -1
             --sample-every -1 --save-every -1 --model-tag gpu-check --run dummy)
status=0
section() { echo; echo "=== $*"; }
check() { "$@" || { echo "(failed with exit code $?)"; status=1; }; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
section "base_train, depth $DEPTH, $STEPS steps"
check "$PY" -m scripts.base_train "${TRAIN_FLAGS[@]}"

if [ "$CAP_MIB" -gt 0 ] && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    section "base_train under a ${CAP_MIB} MiB memory cap"
    check "$PY" - "$CAP_MIB" "${TRAIN_FLAGS[@]}" <<'PYTHON'
import os, runpy, sys
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what compute_init sets, set first
import torch
cap_bytes = int(sys.argv[1]) * 2**20
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
sys.argv = ["base_train", *sys.argv[2:]]
runpy.run_module("scripts.base_train", run_name="__main__")
PYTHON
fi

section "bench/engine.py $ENGINE_ARGS"
# shellcheck disable=SC2086  # the flags split into words on purpose
check "$PY" -m bench.engine $ENGINE_ARGS
section "bench/train.py $TRAIN_ARGS"
# shellcheck disable=SC2086
check "$PY" -m bench.train $TRAIN_ARGS
exit $status
