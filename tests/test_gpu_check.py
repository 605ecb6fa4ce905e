"""bench/gpu_check.sh and bench/gpu_recipe.sh, the commands a lent GPU runs, cannot rot between GPU runs: their CPU
dry runs (every part at toy sizes) pass here, and each summary has a line of figures and a verdict for every part."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


def test_the_gpu_check_dry_run_passes_every_part(tmp_path):
    env = {**os.environ, "NANOCHAT_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    lines = summary.splitlines()
    assert lines[0].startswith("machine: CPU ") and "dry run" in lines[0]
    verdicts = {line.split(":")[0]: line.split(": ", 1)[1].split(" |")[0] for line in lines[1:]}
    assert {part: verdicts[part] for part in ("speedrun", "serve", "base_train")} == {
        "speedrun": "PASS", "serve": "PASS", "base_train": "PASS"}
    assert verdicts["engine"] in ("PASS", "SKIP")  # SKIP: transformers, the peer, is not a project dependency
    assert "11 stages" in summary and "step 00008/00008" in summary and "python tool 2**10 = 1024" in summary
    assert (tmp_path / "out" / "report.md").is_file()  # the speedrun's report card lands in OUT, not the checkout


def test_the_gpu_recipe_dry_run_passes_every_part(tmp_path):
    env = {**os.environ, "NANOCHAT_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "bench/gpu_recipe.sh", "--cpu-dry-run", str(tmp_path / "out")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    lines = summary.splitlines()
    assert lines[0].startswith("machine: CPU ") and "dry run" in lines[0]
    verdicts = {line.split(":")[0]: line.split(": ", 1)[1].split(" |")[0] for line in lines[1:]}
    assert verdicts == dict.fromkeys(["speed_bf16", "speed_fp8", "speed_ratio", "race_old", "race_new",
                                      "race_difference"], "PASS")
    assert "fp8: 0 linear layers" in summary  # toy layers are narrower than fp8's threshold: the flag still runs
    assert summary.count("val bpb ") == 3 and "new - old val bpb = " in summary  # the two races, their difference
    assert re.search(r"training time new / old = \d+\.\d{3}, (also at equal time|not by itself an equal-time)", summary)
