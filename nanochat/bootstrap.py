"""Getting uv onto a bare machine, for speedrun.sh's bootstrap: standard library only, so it runs from the checkout
before anything is installed (nanochat/__init__.py imports nothing):

    python3 -m nanochat.bootstrap uv --dest ~/.local/bin

pip installs uv where a working pip exists: it knows this platform's wheel tags and honours the user's pip
configuration (mirror, proxy, certificates). `--target` keeps the install out of every environment, so it also works
on a system Python that PEP 668 marks externally managed. Without pip (Debian's python3 often comes without it), the
wheel for this platform is picked from PyPI's JSON API, fetched through nanochat/download.py (retries, length check,
sha256) and its `uv` binary extracted: a wheel is a zip whose `<name>-<version>.data/scripts/` holds the binaries.

NANOCHAT_PYPI_URL (default https://pypi.org) names the index for both ways: the JSON API at `/pypi/uv/json`, pip's
simple index at `/simple/`. The tests point it at a server on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
from pathlib import Path
from typing import NamedTuple

from nanochat.download import DownloadError, download_file

INDEX_ENV = "NANOCHAT_PYPI_URL"
DEFAULT_INDEX = "https://pypi.org"
MANUAL_INSTALL = "https://docs.astral.sh/uv/getting-started/installation/"


class BootstrapError(RuntimeError):
    """uv could not be installed; the message says why and what to do."""


# -----------------------------------------------------------------------------
# Which wheel runs here: the platform part of a wheel's tags (PEP 425, PEP 600 manylinux, PEP 656 musllinux)


class Host(NamedTuple):
    system: str  # "linux" or "darwin"
    machine: str  # "x86_64", "aarch64", "arm64", ...
    glibc: tuple[int, int] | None  # (2, 36); None on musl and macOS
    musl: bool
    macos: tuple[int, int] | None  # (14, 5) on macOS


def this_host() -> Host:
    system, machine = platform.system().lower(), platform.machine().lower()
    if system == "darwin":
        major, minor = (platform.mac_ver()[0] + ".0").split(".")[:2]
        return Host(system, machine, None, False, (int(major), int(minor)))
    libc, version = platform.libc_ver()
    glibc = tuple(int(part) for part in version.split(".")[:2]) if libc == "glibc" else None
    musl = glibc is None and any(Path("/lib").glob("ld-musl-*.so.1"))
    return Host(system, machine, glibc, musl, None)


# the manylinux names from before PEP 600, and the glibc each one means
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def platform_tag_fits(tag: str, host: Host) -> bool:
    """Whether a wheel built for platform `tag` (e.g. manylinux_2_17_x86_64) runs on `host`."""
    if host.system == "linux" and host.glibc is not None:
        if match := re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag):
            return (int(match[1]), int(match[2])) <= host.glibc and match[3] == host.machine
        legacy, _, arch = tag.partition("_")
        return legacy in LEGACY_MANYLINUX and LEGACY_MANYLINUX[legacy] <= host.glibc and arch == host.machine
    if host.system == "linux" and host.musl:
        # every musl still in use is 1.1 or later, the oldest musllinux uv is built for
        match = re.fullmatch(r"musllinux_1_\d+_(\w+)", tag)
        return bool(match) and match[1] == host.machine
    if host.system == "darwin" and host.macos is not None:
        match = re.fullmatch(r"macosx_(\d+)_(\d+)_(\w+)", tag)
        return bool(match) and (int(match[1]), int(match[2])) <= host.macos and match[3] in (host.machine, "universal2")
    return False


def wheel_fits(filename: str, host: Host) -> bool:
    """A wheel's name ends in -{python}-{abi}-{platform}.whl, where each part may list several tags joined by '.'."""
    if not filename.endswith(".whl"):
        return False
    return any(platform_tag_fits(tag, host) for tag in filename[:-len(".whl")].split("-")[-1].split("."))


def describe(host: Host) -> str:
    libc = f"glibc {host.glibc[0]}.{host.glibc[1]}" if host.glibc else "musl" if host.musl else ""
    macos = f"macOS {host.macos[0]}.{host.macos[1]}" if host.macos else ""
    return " ".join(part for part in (host.system, host.machine, libc, macos) if part)


# -----------------------------------------------------------------------------
# Installing: with pip, or from the wheel


def install_binary(data: bytes, target: Path) -> Path:
    """Write an executable atomically: a half-written uv would be found on PATH and fail confusingly."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target


def install_with_pip(dest: Path, index: str | None) -> Path | None:
    """uv installed by this Python's pip, or None (with the reason printed) when pip is missing or fails."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], check=False, capture_output=True).returncode != 0:
        print(f"{sys.executable} has no working pip: downloading uv's wheel instead", flush=True)
        return None
    with tempfile.TemporaryDirectory(prefix="uv-pip-") as target:
        # --only-binary: uv's sdist would need the Rust toolchain we may be about to install
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--only-binary=:all:", "--target", target, "uv"]
        if index:
            command += ["--index-url", f"{index.rstrip('/')}/simple/"]
        print("installing uv with pip", flush=True)
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        binary = Path(target) / "bin" / "uv"
        if result.returncode != 0 or not binary.is_file():
            reason = (result.stderr.strip().splitlines() or ["it installed no bin/uv"])[-1]
            print(f"pip could not install uv ({reason}): downloading uv's wheel instead", flush=True)
            return None
        return install_binary(binary.read_bytes(), dest / "uv")


def choose_wheel(release: dict, host: Host) -> dict:
    """The first wheel in PyPI's JSON for `release` that runs on `host`."""
    version = release.get("info", {}).get("version", "?")
    for file in release["urls"]:
        usable = file.get("packagetype") == "bdist_wheel" and file.get("url") and not file.get("yanked")
        if usable and wheel_fits(file.get("filename", ""), host):
            return file
    raise BootstrapError(f"PyPI has no uv {version} wheel for this platform ({describe(host)}): install uv by hand, "
                         f"see {MANUAL_INSTALL}")


def sha256_check(expected: str | None):
    def validate(path: Path) -> None:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if expected and actual != expected:
            raise ValueError(f"sha256 {actual} is not the {expected} the index lists")
    return validate


def extract_uv(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if re.fullmatch(r"[^/]+\.data/scripts/uv", name)]
            if not members:
                raise BootstrapError(f"{wheel.name} holds no uv binary (<name>.data/scripts/uv): the index "
                                     f"(${INDEX_ENV}, default {DEFAULT_INDEX}) does not serve uv's real wheels")
            data = archive.read(members[0])  # checks the member's CRC
    except zipfile.BadZipFile as e:
        raise BootstrapError(f"{wheel.name} is not a valid wheel ({e}): the index served a broken file; "
                             f"run again, or install uv by hand ({MANUAL_INSTALL})") from e
    return install_binary(data, dest / "uv")


def install_from_wheel(dest: Path, index: str, retries: int) -> Path:
    """uv's binary from the wheel for this platform, as PyPI's JSON API lists it."""
    json_url = f"{index.rstrip('/')}/pypi/uv/json"
    with tempfile.TemporaryDirectory(prefix="uv-wheel-") as scratch:
        listing = download_file(json_url, Path(scratch) / "uv.json", retries=retries)
        try:
            release = json.loads(listing.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BootstrapError(f"{json_url} is not PyPI's JSON API ({e}): check ${INDEX_ENV}") from e
        if not isinstance(release, dict) or not isinstance(release.get("urls"), list):
            raise BootstrapError(f"{json_url} lists no files (no 'urls'), so it is not PyPI's JSON API: "
                                 f"check ${INDEX_ENV}")
        wheel = choose_wheel(release, this_host())
        # PyPI gives absolute URLs; a mirror may give them relative to the JSON's own
        wheel_url = urllib.parse.urljoin(json_url, wheel["url"])
        print(f"downloading {wheel['filename']} from {wheel_url}", flush=True)
        path = download_file(wheel_url, Path(scratch) / wheel["filename"], retries=retries,
                             validate=sha256_check(wheel.get("digests", {}).get("sha256")), progress=True)
        return extract_uv(path, dest)


def check_runs(binary: Path) -> str:
    """uv's --version line; a binary that cannot run here (another CPU, a missing loader) is removed, not left."""
    try:
        result = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        result = subprocess.CompletedProcess([], 1, "", str(e))
    if result.returncode != 0:
        binary.unlink(missing_ok=True)
        raise BootstrapError(f"the uv installed at {binary} does not run here ({result.stderr.strip()[-200:]}): "
                             f"install uv by hand, see {MANUAL_INSTALL}")
    return result.stdout.strip()


def install_uv(dest: Path, index: str | None, retries: int = 3) -> Path:
    binary = install_with_pip(dest, index) or install_from_wheel(dest, index or DEFAULT_INDEX, retries)
    print(f"installed {check_runs(binary)} at {binary}", flush=True)
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m nanochat.bootstrap",
                                     description="Install a tool speedrun.sh needs, standard library only.")
    parser.add_argument("tool", choices=["uv"], help="what to install")
    parser.add_argument("--dest", type=Path, required=True, help="directory the binary goes into, e.g. ~/.local/bin")
    parser.add_argument("--retries", type=int, default=3, help="download retries (default 3)")
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error(f"--retries must be 0 or more, got {args.retries}")
    try:
        install_uv(args.dest.expanduser(), os.environ.get(INDEX_ENV) or None, args.retries)
    except (BootstrapError, DownloadError) as e:
        print(f"bootstrap: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the destination is not writable, the disk is full
        print(f"bootstrap: error: cannot write uv into {args.dest} ({e}): choose a writable directory", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
