#!/usr/bin/env bash
# Every stage on a GPU, in one command for a machine lent for a few minutes; the most valuable part first:
#   1. the micro speedrun through every stage (torchrun --nproc_per_node=1 on a GPU), offline from the mirror;
#   2. chat_web on the resulting model: concurrent OpenAI-client streams, a client that drops its stream, the
#      python tool on this host (bench/serve_check.py);
#   3. depth-20 base_train for a few compiled bf16 steps: tok/s, MFU, peak allocated and reserved memory, uncapped
#      and under an 80,000 MiB cap (what an 80 GB H100 leaves a process, checked on a bigger card);
#   4. bench/engine.py at depth 20 in bf16, batch 1/16/64, against transformers' generate() (eager decode: the
#      engine has no compiled decode yet).
# Each part prints its figures in one line and PASS/FAIL (SKIP where a peer is missing) into OUT/summary.txt, its
# full output into OUT/<part>.log; a failing part does not stop the others. About 6-8 minutes on an H200.
#
#   NANOCHAT_DATA_DIR=shared/data bash bench/gpu_check.sh OUT            # on the GPU machine
#   NANOCHAT_DATA_DIR=../shared/data bash bench/gpu_check.sh --cpu-dry-run OUT   # the same parts at toy sizes, CPU
#
# Everything it writes goes under OUT (artifacts in OUT/base). Needs transformers for part 4.
set -uo pipefail  # no -e: one failing part must not hide the others' numbers

source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh" "$@"

if [ "$DRY_RUN" = 1 ]; then
    DEPTH=2; TRAIN_FLAGS=(--depth 2 --max-seq-len 64 --device-batch-size 2 --total-batch-size 256 --eval-tokens 512)
    STREAMS=4; CAP_MIB=0
    ENGINE_ARGS=(--depth 2 --vocab-size 512 --new-tokens 8 --batch-sizes 1 4 --rounds 1)
else
    DEPTH=20; TRAIN_FLAGS=(--depth 20 --eval-tokens 524288)
    STREAMS=16; CAP_MIB=80000
    ENGINE_ARGS=(--depth 20 --vocab-size 65536 --new-tokens 128 --batch-sizes 1 16 64 --dtype bfloat16)
fi
TRAIN_FLAGS+=(--num-iterations 8 --eval-every -1 --core-metric-every -1 --sample-every -1 --save-every -1
              --model-tag gpu-check)


# 1. every stage of the micro speedrun
start=$SECONDS
# (from OUT, where the speedrun writes its report.md)
if (cd "$OUT" && NANOCHAT_SPEEDRUN_SCALE=micro NANOCHAT_SPEEDRUN_FRESH=1 bash "$REPO/speedrun.sh") > "$OUT/speedrun.log" 2>&1
then
    stages=$(grep -c ": done in" "$OUT/speedrun.log")
    record speedrun PASS "micro scale, $stages stages in $((SECONDS - start)) s; $(grep -m1 'recipe:' "$OUT/speedrun.log" | sed 's/.*recipe: //')"
else
    record speedrun FAIL "stopped in: $(grep -o 'stopped in stage [a-z_]*' "$OUT/speedrun.log" | tail -1) (see speedrun.log)"
fi

# 2. serving the model it left
port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$PY" -m scripts.chat_web --source rl --port "$port" --max-tokens 64 > "$OUT/chat_web.log" 2>&1 &
server=$!
if "$PY" -m bench.serve_check --url "http://127.0.0.1:$port" --streams "$STREAMS" > "$OUT/serve.log" 2>&1; then
    record serve PASS "$(tail -1 "$OUT/serve.log")"
else
    record serve FAIL "$(tail -1 "$OUT/serve.log") (see serve.log, chat_web.log)"
fi
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null

# 3. depth-20 base training: uncapped, then under the memory cap
train_line() {  # the figures of a base_train log: its last step line and the peak memory
    local step; step=$(grep '^step .*tok/s' "$1" | tail -1 | sed 's/ | eta.*//')
    echo "$step; $(grep -o 'peak memory .*' "$1" | tail -1)"
}
if "$PY" -m scripts.base_train "${TRAIN_FLAGS[@]}" > "$OUT/base_train.log" 2>&1; then
    record base_train PASS "depth $DEPTH: $(train_line "$OUT/base_train.log")"
else
    record base_train FAIL "depth $DEPTH: $(tail -1 "$OUT/base_train.log")"
fi
if [ "$CAP_MIB" -gt 0 ]; then
    if "$PY" - "$CAP_MIB" "${TRAIN_FLAGS[@]}" > "$OUT/base_train_capped.log" 2>&1 <<'PYTHON'
import os, runpy, sys
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what compute_init sets, set first
import torch
cap_bytes = int(sys.argv[1]) * 2**20
torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / torch.cuda.get_device_properties(0).total_memory))
sys.argv = ["base_train", *sys.argv[2:]]
runpy.run_module("scripts.base_train", run_name="__main__")
PYTHON
    then
        record base_train_capped PASS "depth $DEPTH under $CAP_MIB MiB: $(train_line "$OUT/base_train_capped.log")"
    else
        record base_train_capped FAIL "depth $DEPTH under $CAP_MIB MiB: $(tail -1 "$OUT/base_train_capped.log")"
    fi
fi

# 4. decode against transformers' generate()
if ! "$PY" -c "import transformers" 2>/dev/null; then
    record engine SKIP "transformers is not installed (pip install transformers)"
elif "$PY" -m bench.engine "${ENGINE_ARGS[@]}" > "$OUT/engine.log" 2>&1; then
    record engine PASS "$(grep '^batch' "$OUT/engine.log" | sed 's/ *|.*//; s/  */ /g' | paste -sd ';' -)"
else
    record engine FAIL "$(tail -1 "$OUT/engine.log")"
fi

! grep -q ': FAIL |' "$SUMMARY"
