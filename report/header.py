"""What `python -m report reset` records about the run: when, which code, on what hardware, with which software."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

# What counts as the project's source when measuring its size (data files and lockfiles do not).
SOURCE_SUFFIXES = {".py", ".rs", ".sh", ".html", ".js", ".css", ".toml", ".md", ".yaml", ".yml"}


def repo_root() -> Path:
    """The checkout this package lives in, or the current directory for an installed (non-editable) copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / ".git").exists() or (root / "pyproject.toml").exists() else Path.cwd()


def run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a command, or None when it is missing or fails (the header then says "unknown")."""
    try:
        result = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# -----------------------------------------------------------------------------
# Code


def git_info(root: Path) -> dict:
    status = run(["git", "status", "--porcelain"], cwd=root)
    return {
        "commit": run(["git", "rev-parse", "--short", "HEAD"], cwd=root) or "none (no commits yet, or not a git checkout)",
        "branch": run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root) or "unknown",
        "dirty": None if status is None else bool(status),
    }


def source_files(root: Path) -> list[Path]:
    """Files git tracks or would track (untracked but not ignored), so a dirty tree is measured as it stands."""
    listing = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root)
    if listing is None:
        candidates = [p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".venv" not in p.parts]
    else:
        candidates = [Path(line) for line in listing.splitlines()]
    return sorted({p for p in candidates if p.suffix in SOURCE_SUFFIXES and (root / p).is_file()})


def code_size(root: Path) -> dict:
    lines = characters = 0
    files = source_files(root)
    for rel in files:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        lines += text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        characters += len(text)
    return {"files": len(files), "lines": lines, "characters": characters,
            "dependencies": count_dependencies(root / "pyproject.toml")}


def count_dependencies(pyproject: Path) -> int | None:
    """Runtime dependencies declared in [project].dependencies."""
    if not pyproject.exists():
        return None
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: count the quoted entries of the dependencies array
        match = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.DOTALL | re.MULTILINE)
        return len(re.findall(r"[\"'][^\"']+[\"']", match.group(1))) if match else 0
    return len(tomllib.loads(text).get("project", {}).get("dependencies", []))


# -----------------------------------------------------------------------------
# Hardware and software


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"count": 0, "devices": []}
    if not torch.cuda.is_available():
        return {"count": 0, "devices": []}
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"name": props.name, "memory_gib": round(props.total_memory / 1024**3, 1)})
    return {"count": len(devices), "devices": devices}


def software_versions() -> dict:
    try:
        import torch
        torch_version = torch.__version__
        cuda_version = torch.version.cuda
    except ImportError:
        torch_version = cuda_version = None
    return {"python": platform.python_version(), "torch": torch_version, "cuda": cuda_version,
            "rustc": run(["rustc", "--version"]), "platform": platform.platform()}


def collect_header() -> dict:
    root = repo_root()
    return {
        "git": git_info(root),
        "hardware": {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "memory_gib": memory_gib(), "gpus": gpu_info()},
        "software": software_versions(),
        "code": code_size(root),
    }
