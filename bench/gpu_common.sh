# The start bench/gpu_check.sh and bench/gpu_recipe.sh share, sourced by both with their arguments: the optional
# --cpu-dry-run and OUT_DIR (OUT, made absolute), the repository (the working directory from here on), the python
# (PY), NANOCHAT_BASE_DIR under OUT, the summary file OUT/summary.txt with `record PART STATUS LINE`, and the
# machine as the summary's first line.
DRY_RUN=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash bench/$(basename "$0") [--cpu-dry-run] OUT_DIR" >&2; exit 2; }
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${NANOCHAT_PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 NANOCHAT_BASE_DIR="$OUT/base" NANOCHAT_PYTHON="$PY"
[ "$DRY_RUN" = 1 ] && export CUDA_VISIBLE_DEVICES=""  # the CPU path, even on a GPU machine
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

record() { echo "$1: $2 | $3" | tee -a "$SUMMARY"; }
machine=$("$PY" -c "from nanochat.kernels import describe_machine; import torch
print(describe_machine('cuda' if torch.cuda.is_available() else 'cpu'))" 2>&1 | tail -1)
[ "$DRY_RUN" = 1 ] && machine="$machine (CPU dry run at toy sizes)"
echo "$machine" | tee -a "$SUMMARY"
