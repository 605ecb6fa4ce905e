#!/usr/bin/env bash
# The 2026 pretraining recipe on a GPU, in one command for a machine lent for a few minutes (issue 15's GPU part):
#   1. throughput at depth 24, the public record's depth: a few compiled base_train steps in bf16, then with --fp8:
#      tok/s, MFU and peak memory of each, and fp8's speedup;
#   2. a race at depth 12 on the same data and token budget: the October-2025 defaults against the 2026 pieces
#      together (RECIPE_2026 below): val bpb and training time of each, the difference, and whether it also holds at
#      equal time (it does when the new recipe was no slower: more time could only lower its bpb further).
# Each part prints one line of figures and PASS/FAIL into OUT/summary.txt, its full output into OUT/<part>.log; a
# failing part does not stop the other. Estimated at about 8 minutes on an H200, most of it compiling (not yet run
# on one).
#
#   NANOCHAT_DATA_DIR=shared/data bash bench/gpu_recipe.sh OUT                    # on the GPU machine
#   NANOCHAT_DATA_DIR=../shared/data bash bench/gpu_recipe.sh --cpu-dry-run OUT   # the same parts at toy sizes, CPU
#
# The race reads the pretraining mirror ($NANOCHAT_DATA_DIR/fineweb, ~3M tokens): at depth 12 it repeats the mirror
# several times, so its bpb compares the two recipes on one small corpus, not at FineWeb scale.
set -uo pipefail  # no -e: one failing part must not hide the other's numbers

source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh" "$@"

RECIPE_2026=(--value-embeddings --layer-scalars --smear --backout --window-pattern SSSL --rope-base 100000
             --muon-ns polar_express --normuon --momentum-warmdown --warmdown-ratio 0.65 --final-lr-frac 0.05
             --packing best_fit)
COMMON=(--eval-every -1 --core-metric-every -1 --sample-every -1 --save-every -1)
if [ "$DRY_RUN" = 1 ]; then
    SPEED_FLAGS=(--depth 2 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128 --num-iterations 3
                 --eval-tokens 256)
    RACE_FLAGS=(--depth 2 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128 --num-iterations 6
                --eval-tokens 1024)
    SPEED_DEPTH=2; RACE_DEPTH=2; VOCAB=512
else
    SPEED_FLAGS=(--depth 24 --device-batch-size 16 --num-iterations 10 --eval-tokens 524288)
    RACE_FLAGS=(--depth 12 --device-batch-size 32 --total-batch-size 262144 --num-iterations 150
                --eval-tokens 2097152)
    SPEED_DEPTH=24; RACE_DEPTH=12; VOCAB=32768  # what the mirror's ~12M characters can train
fi

# the figures of a base_train log: its last step line's tok/s and MFU, the peak memory, the final val bpb
tok_per_s() { grep -o 'tok/s [0-9,]*' "$1" | tail -1 | tr -dc '0-9'; }
step_figures() { grep '^step .*tok/s' "$1" | tail -1 | sed 's/ | eta.*//; s/^step [0-9/]* | //'; }
peak() { grep -o 'peak memory [^|]*' "$1" | tail -1; }
val_bpb() { grep -o 'val bpb [0-9.]*' "$1" | tail -1 | tr -dc '0-9.'; }
training_time() { grep -o 'training time [0-9.]*s' "$1" | tail -1; }
train_seconds() { training_time "$1" | tr -dc '0-9.'; }

# 0. a tokenizer on the mirror (both parts need one)
if ! "$PY" -m scripts.tok_train --vocab-size "$VOCAB" --max-chars 20000000 > "$OUT/tok_train.log" 2>&1; then
    record tok_train FAIL "$(tail -1 "$OUT/tok_train.log")"
    exit 1
fi

# 1. throughput in bf16 and fp8 (fp8 needs compute capability 8.9+; elsewhere it is refused and recorded as FAIL)
for precision in bf16 fp8; do
    extra=(); [ "$precision" = fp8 ] && extra=(--fp8)
    log="$OUT/speed_$precision.log"
    if "$PY" -m scripts.base_train "${SPEED_FLAGS[@]}" "${COMMON[@]}" "${extra[@]}" --model-tag "speed-$precision" \
        > "$log" 2>&1; then
        layers=$(grep -m1 '^fp8:' "$log")
        record "speed_$precision" PASS "depth $SPEED_DEPTH${layers:+ ($layers)}: $(step_figures "$log"); $(peak "$log")"
    else
        record "speed_$precision" FAIL "depth $SPEED_DEPTH: $(tail -1 "$log")"
    fi
done
bf16=$(tok_per_s "$OUT/speed_bf16.log"); fp8=$(tok_per_s "$OUT/speed_fp8.log")
if [ -n "$bf16" ] && [ -n "$fp8" ]; then
    record speed_ratio PASS "fp8 / bf16 tok/s = $("$PY" -c "print(f'{$fp8 / $bf16:.3f}')")"
fi

# 2. the race: the same steps and tokens, the defaults against the 2026 pieces
for recipe in old new; do
    extra=(); [ "$recipe" = new ] && extra=("${RECIPE_2026[@]}")
    log="$OUT/race_$recipe.log"
    if "$PY" -m scripts.base_train "${RACE_FLAGS[@]}" "${COMMON[@]}" "${extra[@]}" --model-tag "race-$recipe" \
        > "$log" 2>&1; then
        record "race_$recipe" PASS "depth $RACE_DEPTH: val bpb $(val_bpb "$log"), $(training_time "$log"); $(step_figures "$log")"
    else
        record "race_$recipe" FAIL "depth $RACE_DEPTH: $(tail -1 "$log")"
    fi
done
old=$(val_bpb "$OUT/race_old.log"); new=$(val_bpb "$OUT/race_new.log")
t_old=$(train_seconds "$OUT/race_old.log"); t_new=$(train_seconds "$OUT/race_new.log")
if [ -n "$old" ] && [ -n "$new" ] && [ -n "$t_old" ] && [ -n "$t_new" ]; then
    record race_difference PASS "$("$PY" - "$old" "$new" "$t_old" "$t_new" <<'VERDICT'
import sys
old, new, t_old, t_new = map(float, sys.argv[1:])
ratio = t_new / max(t_old, 1e-9)
equal_time = ("also at equal time: the new recipe was no slower" if ratio <= 1 else
              "not by itself an equal-time result: the new recipe had more time")
print(f"new - old val bpb = {new - old:+.4f} at equal tokens; training time new / old = {ratio:.3f}, {equal_time}")
VERDICT
)"
fi

! grep -q ': FAIL |' "$SUMMARY"
