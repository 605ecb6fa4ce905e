#!/usr/bin/env bash
# The test command: installs what the project needs (idempotently), runs the linters, then the Rust and Python suites.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PY=.venv/bin/python

# The chat page is tested in a real headless browser (Debian's Chromium and its driver); the python tool's
# sandbox runs under bubblewrap, and its tests attack it for real; the C runner (runc/) needs a C compiler and make.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v "${CC:-cc}" >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# pip skips the install when the project and its dependencies are already up to date;
# the Rust extension is rebuilt only when rustbpe/ changed (maturin/cargo are incremental).
stamp=.venv/.nanochat-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml rustbpe/src rustbpe/Cargo.toml -newer "$stamp" 2>/dev/null | head -1)" ]; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi

# cargo's linter and formatter are rustup components that a minimal toolchain may lack.
components=()
cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
if [ ${#components[@]} -gt 0 ]; then
    if command -v rustup >/dev/null; then
        rustup component add "${components[@]}"
    else
        echo "tests/run.sh: cargo lacks ${components[*]} and there is no rustup to add them; install them with your" \
             "Rust toolchain (e.g. your distribution's rust-clippy and rustfmt packages)" >&2
        exit 1
    fi
fi

# The linters come first: a lint failure fails the run before the suites start.
"$PY" -m ruff check nanochat scripts tasks report bench tests
(cd rustbpe && cargo fmt --check && cargo clippy --quiet --all-targets -- -D warnings)

# The C runner: runc/run, the portable build (tests/test_runc.py builds its own copy the same way).
make -s -C runc

(cd rustbpe && cargo test --quiet)
"$PY" -m pytest -q "$@"
