#!/usr/bin/env bash
# The test command: installs everything the project needs (idempotently) and runs the Rust and Python suites.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PY=.venv/bin/python

# The chat page is tested in a real headless browser (Debian's Chromium and its driver); the python tool's
# sandbox runs under bubblewrap, and its tests attack it for real.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v bwrap >/dev/null || missing+=(bubblewrap)
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

(cd rustbpe && cargo test --quiet)
"$PY" -m pytest -q "$@"
