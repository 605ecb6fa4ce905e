"""bench/recipe.py at toy size: a row per configuration with a finite val bpb, the seed really used, a repeated
seed reproduced; and the configuration it ablates first, GPTConfig.rope_base."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import build_model
from nanochat.gpt import GPT, GPTConfig, model_config_from_depth

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
TOY = ["--depth=2", "--steps=4", "--seq-len=64"]
RUN_LINE = re.compile(r"^run (\S+) seed (\d+): val bpb (\S+),", re.MULTILINE)


def run_recipe(tmp_path: Path, *flags: str) -> str:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "NANOCHAT_DATA_DIR": str(DATA_DIR),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "bench.recipe", *TOY, *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def run_bpbs(output: str) -> dict[tuple[str, int], float]:
    return {(name, int(seed)): float(bpb) for name, seed, bpb in RUN_LINE.findall(output)}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> str:
    return run_recipe(tmp_path_factory.mktemp("recipe"), "--seeds=2", "--compare=baseline,rope100k")


def test_machine_line_comes_first(comparison):
    assert comparison.splitlines()[0].startswith("machine: ")


def test_every_configuration_gets_a_row_with_finite_bpb_and_the_difference(comparison):
    for name in ("baseline", "rope100k"):
        row = re.search(rf"^{name} +(\S+) +(\S+)-(\S+) +", comparison, re.MULTILINE)
        assert row is not None, comparison
        mean, low, high = map(float, row.groups())
        assert all(math.isfinite(value) for value in (mean, low, high)) and low <= mean <= high
    assert re.search(r"^rope100k - baseline: val bpb [+-]\d\.\d{4}, (exceeds|within) the seeds' spread",
                     comparison, re.MULTILINE), comparison


def test_the_seeds_of_one_configuration_differ(comparison):
    bpbs = run_bpbs(comparison)
    assert len(bpbs) == 4, comparison
    assert bpbs[("baseline", 42)] != bpbs[("baseline", 43)]
    assert bpbs[("rope100k", 42)] != bpbs[("rope100k", 43)]


def test_a_repeated_seed_reproduces_its_bpb(comparison, tmp_path):
    again = run_bpbs(run_recipe(tmp_path, "--first-seed=43", "--seeds=1", "--configs=baseline"))
    assert again == {("baseline", 43): run_bpbs(comparison)[("baseline", 43)]}


def test_unknown_configuration_is_refused_with_the_known_ones(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.recipe", "--configs=baseline,nope"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "unknown configuration(s) nope; known: baseline, rope100k" in result.stderr


# -----------------------------------------------------------------------------
# rope_base


def test_rope_base_changes_the_rotary_tables():
    config = model_config_from_depth(2, vocab_size=301, sequence_len=32)
    default, wide = GPT(config), GPT(GPTConfig(**{**asdict(config), "rope_base": 100000.0}))
    assert not torch.allclose(default.cos, wide.cos)
    assert not torch.allclose(default.sin, wide.sin)
    assert torch.equal(default.cos[0], wide.cos[0])  # position 0 is unrotated whatever the base


def test_a_meta_without_rope_base_builds_the_base_10000_model():
    config = asdict(model_config_from_depth(2, vocab_size=301, sequence_len=32))
    del config["rope_base"]  # as written before the field existed
    model = build_model({"model_config": config}, "cpu", "eval")
    assert model.config.rope_base == 10000.0
    head_dim = model.config.n_embd // model.config.n_head
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(model.rotary_len, dtype=torch.float32), inv_freq)
    assert torch.equal(model.cos, freqs.cos()) and torch.equal(model.sin, freqs.sin())
