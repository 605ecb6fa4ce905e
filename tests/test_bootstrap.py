"""speedrun.sh on a bare machine: it installs the tools the install needs (uv, Rust, a C compiler), saying what goes
where first, or with NANOCHAT_NO_BOOTSTRAP=1 lists them; and nanochat/bootstrap.py, which installs uv with the
standard library alone. No real network and no real installs: a server on 127.0.0.1 plays PyPI (its uv is a shell
script), shims play apt, curl and `id`, and PATH is this machine's without the tools under test."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from nanochat.bootstrap import Host, choose_wheel, this_host, wheel_fits

REPO = Path(__file__).resolve().parents[1]
RUST_VERSION = re.search(r'^rust-version = "(.+)"', (REPO / "rustbpe" / "Cargo.toml").read_text(), re.MULTILINE)[1]
FAKE_UV = "#!/bin/sh\necho 'uv 0.0.1 (fake)'\n"

on_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or this_host().glibc is None,
                              reason="the shims and the fake wheel's tag are for glibc Linux")
OS_RELEASE = Path("/etc/os-release").read_text() if Path("/etc/os-release").is_file() else ""
on_debian = pytest.mark.skipif(not re.search(r"^ID(_LIKE)?=.*(debian|ubuntu)", OS_RELEASE, re.MULTILINE),
                               reason="speedrun.sh considers apt only on Debian/Ubuntu, as /etc/os-release says")


# -----------------------------------------------------------------------------
# A fake PyPI: its JSON API, its simple index (for pip) and the wheel files, with the relative URLs a mirror gives


def fake_uv_wheel(platform_tag: str) -> tuple[str, bytes]:
    """A wheel pip accepts, whose uv binary is a shell script."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("uv-0.0.1.data/scripts/uv", FAKE_UV)
        wheel.writestr("uv-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: uv\nVersion: 0.0.1\n")
        wheel.writestr("uv-0.0.1.dist-info/WHEEL",
                       f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-{platform_tag}\n")
        wheel.writestr("uv-0.0.1.dist-info/RECORD", "")
    return f"uv-0.0.1-py3-none-{platform_tag}.whl", buffer.getvalue()


class FakePyPI:
    def __init__(self):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []

    def serve_wheel(self, filename: str, data: bytes, listed_sha256: str | None = None) -> None:
        sha256 = listed_sha256 or hashlib.sha256(data).hexdigest()
        listing = {"info": {"version": "0.0.1"}, "urls": [{
            "filename": filename, "url": f"../../files/{filename}", "packagetype": "bdist_wheel",
            "digests": {"sha256": sha256}}]}
        self.routes["/pypi/uv/json"] = ("application/json", json.dumps(listing).encode())
        self.routes["/simple/uv/"] = ("text/html", f'<a href="../../files/{filename}#sha256={sha256}">{filename}</a>'
                                      .encode())
        self.routes[f"/files/{filename}"] = ("application/octet-stream", data)


@pytest.fixture
def fake_pypi():
    pypi = FakePyPI()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            pypi.requests.append(self.path)
            content_type, body = pypi.routes.get(self.path, ("text/plain", b""))
            self.send_response(200 if self.path in pypi.routes else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pypi.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield pypi
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_uv(fake_pypi):
    """The fake PyPI serving a uv wheel for this machine."""
    fake_pypi.serve_wheel(*fake_uv_wheel(f"manylinux_2_17_{this_host().machine}"))
    return fake_pypi


# -----------------------------------------------------------------------------
# A bare machine: this one's commands without the tools under test, and shims that record how they were called

UNDER_TEST = {"uv", "uvx", "cargo", "rustc", "rustup", "cc", "gcc", "curl", "apt-get", "apt-cache", "id"}


@pytest.fixture(scope="module")
def bare_bin(tmp_path_factory) -> Path:
    """Links to every command in the system's bin directories except the tools under test and any Python."""
    farm = tmp_path_factory.mktemp("bare_bin")
    for directory in ("/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for command in sorted(Path(directory).glob("*")) if Path(directory).is_dir() else []:
            name = command.name
            if name in UNDER_TEST or name.startswith(("python", "pip")) or (farm / name).exists():
                continue
            (farm / name).symlink_to(command)
    return farm


@pytest.fixture(scope="module")
def pipless_python(tmp_path_factory) -> Path:
    """A Python without pip, like Debian's python3 without python3-pip."""
    venv = tmp_path_factory.mktemp("pipless")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


def write_shim(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$SHIM_LOG"\n{body}')
    path.chmod(0o755)


FAKE_RUSTUP_INIT = """cat <<'EOF'
echo "rustup-init $*" >> "$SHIM_LOG"
mkdir -p "$HOME/.cargo/bin"
printf '#!/bin/sh\\necho cargo 1.95.0\\n' > "$HOME/.cargo/bin/cargo"
chmod +x "$HOME/.cargo/bin/cargo"
EOF
"""
# `apt-get install` leaves a working cargo or cc behind; `apt-get update` changes nothing
FAKE_APT_GET = """here="$(dirname "$0")"
case " $* " in *" install "*)
    for package in "$@"; do
        case "$package" in cargo | gcc)
            tool=$package; [ "$package" = gcc ] && tool=cc
            printf '#!/bin/sh\\n' > "$here/$tool"; chmod +x "$here/$tool" ;;
        esac
    done ;;
esac
"""


class BareMachine:
    def __init__(self, root: Path, bare_bin: Path, python: Path, pypi_url: str):
        self.home, self.shims, self.log = root / "home", root / "shims", root / "shims.log"
        self.home.mkdir()
        self.shims.mkdir()
        self.log.touch()
        self.env = {"PATH": f"{self.shims}:{bare_bin}", "HOME": str(self.home), "SHIM_LOG": str(self.log),
                    "NANOCHAT_BASE_DIR": os.environ["NANOCHAT_BASE_DIR"], "NANOCHAT_PYPI_URL": pypi_url,
                    "PIP_CONFIG_FILE": os.devnull, "FAKE_UID": "0", "FAKE_RUSTC_CANDIDATE": "1.63.0+dfsg1-2"}
        self.use_python(python)
        write_shim(self.shims, "cc", "")
        write_shim(self.shims, "curl", FAKE_RUSTUP_INIT)
        write_shim(self.shims, "apt-get", FAKE_APT_GET)
        write_shim(self.shims, "apt-cache",
                   'printf "rustc:\\n  Installed: (none)\\n  Candidate: %s\\n" "$FAKE_RUSTC_CANDIDATE"\n')
        write_shim(self.shims, "id", '[ "$1" = -u ] && echo "$FAKE_UID"\n')

    def use_python(self, python: Path) -> None:
        (self.shims / "python3").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
        (self.shims / "python3").chmod(0o755)

    def speedrun(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([shutil.which("bash"), str(REPO / "speedrun.sh"), *args], check=False,
                              cwd=self.home, env=self.env | env, capture_output=True, text=True, timeout=120)

    def calls(self, command: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.split()[0] == command]

    @property
    def uv(self) -> Path:
        return self.home / ".local" / "bin" / "uv"


@pytest.fixture
def machine(tmp_path, bare_bin, pipless_python, fake_uv) -> BareMachine:
    """No uv, no cargo; root on this Debian (a shim says so), whose apt offers rustc 1.63; python3 without pip."""
    return BareMachine(tmp_path, bare_bin, pipless_python, fake_uv.url)


# -----------------------------------------------------------------------------
# speedrun.sh's bootstrap


@on_linux
def test_without_bootstrap_it_lists_what_is_missing_and_how_to_install_it_and_installs_nothing(machine, fake_uv):
    result = machine.speedrun(NANOCHAT_NO_BOOTSTRAP="1")
    assert result.returncode == 1
    assert "this machine lacks uv, cargo, and NANOCHAT_NO_BOOTSTRAP=1 installs nothing" in result.stderr
    assert "python3 -m nanochat.bootstrap uv --dest ~/.local/bin" in result.stderr
    assert "https://sh.rustup.rs | sh -s -- -y --profile minimal" in result.stderr
    assert "cc:" not in result.stderr  # only what is missing
    assert machine.log.read_text() == "" and fake_uv.requests == [] and not machine.uv.exists()


@on_linux
@on_debian
def test_bootstrap_says_what_goes_where_then_installs_uv_from_the_wheel_and_rust_with_rustup(machine, fake_uv):
    result = machine.speedrun("--bootstrap-only")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    plan = out.index("installing (NANOCHAT_NO_BOOTSTRAP=1 would only list them)")
    assert out.index(f"into {machine.uv.parent}") > plan
    assert f"the distribution's rustc 1.63.0 is older than the {RUST_VERSION} needed" in out
    assert out.index("installed uv 0.0.1 (fake)") > out.index(f"into {machine.home}/.cargo and {machine.home}/.rustup")
    assert "stopping before the project install" in out
    assert machine.uv.read_text() == FAKE_UV and os.access(machine.uv, os.X_OK)
    assert "/pypi/uv/json" in fake_uv.requests and "/simple/uv/" not in fake_uv.requests  # no pip: the wheel
    assert machine.calls("apt-get") == ["apt-get update -qq"]
    rustup_init_sh = "https://static.rust-lang.org/rustup/rustup-init.sh"
    assert machine.calls("curl") == [f"curl --proto =https --tlsv1.2 -sSf {rustup_init_sh}"]
    assert machine.calls("rustup-init") == ["rustup-init -y --profile minimal --no-modify-path"]


@on_linux
@on_debian
def test_root_on_debian_whose_rustc_is_new_enough_gets_cargo_from_apt(machine):
    result = machine.speedrun("--bootstrap-only", FAKE_RUSTC_CANDIDATE="1:1.85.0+dfsg1-1")
    assert result.returncode == 0, result.stderr
    assert "the distribution's cargo and rustc 1.85.0 (apt-get install cargo" in result.stdout
    assert machine.calls("apt-get") == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends cargo"]
    assert machine.calls("curl") == []


@on_linux
def test_a_user_who_is_not_root_gets_rustup_and_apt_is_never_asked(machine):
    result = machine.speedrun("--bootstrap-only", FAKE_UID="1000", FAKE_RUSTC_CANDIDATE="1.85.0")
    assert result.returncode == 0, result.stderr
    assert machine.calls("apt-get") == [] and machine.calls("apt-cache") == []
    assert machine.calls("rustup-init") == ["rustup-init -y --profile minimal --no-modify-path"]


@on_linux
@on_debian
def test_root_on_debian_without_a_c_compiler_gets_gcc_from_apt(machine):
    (machine.shims / "cc").unlink()
    result = machine.speedrun("--bootstrap-only")
    assert result.returncode == 0, result.stderr
    assert "apt-get install -y -qq --no-install-recommends gcc libc6-dev" in machine.calls("apt-get")


@on_linux
def test_without_root_a_missing_c_compiler_stops_it_before_anything_is_installed(machine, fake_uv):
    (machine.shims / "cc").unlink()
    result = machine.speedrun("--bootstrap-only", FAKE_UID="1000")
    assert result.returncode == 1
    assert "this machine has no C compiler (cc)" in result.stderr and "apt-get install gcc" in result.stderr
    assert fake_uv.requests == [] and machine.calls("curl") == [] and not machine.uv.exists()


@on_linux
def test_tools_an_earlier_bootstrap_installed_are_found_off_path(machine):
    assert machine.speedrun("--bootstrap-only", FAKE_UID="1000").returncode == 0
    machine.log.write_text("")
    result = machine.speedrun("--bootstrap-only", FAKE_UID="1000")
    assert result.returncode == 0, result.stderr
    assert "bootstrap:" not in result.stdout and machine.log.read_text() == ""


@on_linux
def test_with_the_tools_in_place_the_project_is_installed_as_uv_lock_pins_it(machine):
    write_shim(machine.shims, "cargo", "")
    # a uv that fails: the test sees how it was called, and speedrun.sh stops before the real .venv is used
    write_shim(machine.shims, "uv", 'echo "uv env $UV_PROJECT_ENVIRONMENT" >> "$SHIM_LOG"; exit 1\n')
    result = machine.speedrun(WANDB_RUN="test")
    assert result.returncode == 1
    assert "uv could not install the project (above); if it says uv.lock is out of date, run: uv lock" in result.stderr
    assert machine.calls("uv") == ["uv sync --locked --inexact --python >=3.11 --extra dev --extra wandb",
                                   f"uv env {REPO}/.venv"]
    assert "bootstrap:" not in result.stdout


# -----------------------------------------------------------------------------
# nanochat/bootstrap.py: uv with pip, or from the wheel


def bootstrap_uv(python: Path, dest: Path, pypi_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(dest.parent), "NANOCHAT_PYPI_URL": pypi_url,
           "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run([str(python), "-m", "nanochat.bootstrap", "uv", "--dest", str(dest), *args],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@on_linux
def test_uv_is_installed_with_pip_where_pip_works(tmp_path, fake_uv):
    result = bootstrap_uv(Path(sys.executable), tmp_path / "bin", fake_uv.url)
    assert result.returncode == 0, result.stderr
    assert "installing uv with pip" in result.stdout
    assert "/simple/uv/" in fake_uv.requests and "/pypi/uv/json" not in fake_uv.requests
    assert (tmp_path / "bin" / "uv").read_text() == FAKE_UV


@on_linux
def test_a_corrupt_wheel_is_a_clear_error_and_leaves_no_uv(tmp_path, fake_pypi, pipless_python):
    filename = f"uv-0.0.1-py3-none-manylinux_2_17_{this_host().machine}.whl"
    fake_pypi.serve_wheel(filename, b"this is not a zip file")
    result = bootstrap_uv(pipless_python, tmp_path / "bin", fake_pypi.url)
    assert result.returncode == 1
    assert result.stderr.startswith(f"bootstrap: error: {filename} is not a valid wheel") and "Traceback" not in \
        result.stderr
    assert not (tmp_path / "bin" / "uv").exists()


@on_linux
def test_a_wheel_that_fails_its_checksum_is_refused(tmp_path, fake_pypi, pipless_python):
    fake_pypi.serve_wheel(*fake_uv_wheel(f"manylinux_2_17_{this_host().machine}"), listed_sha256="0" * 64)
    result = bootstrap_uv(pipless_python, tmp_path / "bin", fake_pypi.url, "--retries", "0")
    assert result.returncode == 1
    assert f"is not the {'0' * 64} the index lists" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bin" / "uv").exists()


@on_linux
def test_no_wheel_for_this_platform_is_a_clear_error(tmp_path, fake_pypi, pipless_python):
    fake_pypi.serve_wheel(*fake_uv_wheel("win_amd64"))
    result = bootstrap_uv(pipless_python, tmp_path / "bin", fake_pypi.url)
    assert result.returncode == 1
    assert "bootstrap: error: PyPI has no uv 0.0.1 wheel for this platform (linux" in result.stderr


UV_WHEELS = ["uv-0.13.9-py3-none-macosx_10_12_x86_64.whl", "uv-0.13.9-py3-none-macosx_11_0_arm64.whl",
             "uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl",
             "uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
             "uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl", "uv-0.13.9-py3-none-win_amd64.whl"]


@pytest.mark.parametrize("host, expected", [
    (Host("linux", "x86_64", (2, 36), False, None), "uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
    (Host("linux", "x86_64", None, True, None), "uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl"),
    (Host("linux", "aarch64", None, True, None),
     "uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl"),
    (Host("darwin", "arm64", None, False, (14, 5)), "uv-0.13.9-py3-none-macosx_11_0_arm64.whl"),
    (Host("darwin", "x86_64", None, False, (10, 15)), "uv-0.13.9-py3-none-macosx_10_12_x86_64.whl"),
])
def test_the_wheel_chosen_is_the_one_built_for_the_host(host, expected):
    release = {"urls": [{"filename": name, "url": name, "packagetype": "bdist_wheel"} for name in UV_WHEELS]}
    assert choose_wheel(release, host)["filename"] == expected


def test_a_wheel_for_a_newer_libc_or_os_does_not_fit():
    assert not wheel_fits("uv-1-py3-none-manylinux_2_28_x86_64.whl", Host("linux", "x86_64", (2, 17), False, None))
    assert wheel_fits("uv-1-py3-none-manylinux2014_x86_64.whl", Host("linux", "x86_64", (2, 17), False, None))
    assert not wheel_fits("uv-1-py3-none-macosx_14_0_arm64.whl", Host("darwin", "arm64", None, False, (13, 0)))
    assert wheel_fits("uv-1-py3-none-macosx_11_0_universal2.whl", Host("darwin", "arm64", None, False, (13, 0)))


# -----------------------------------------------------------------------------
# uv.lock


def requirement_key(requirement: str) -> tuple[str, str]:
    """(normalized name, specifier) of a PEP 508 requirement string without extras or markers."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*([^;]*?)\s*(;.*)?", requirement)
    return re.sub(r"[-_.]+", "-", match[1]).lower(), match[2].replace(" ", "")


def test_uv_lock_pins_what_pyproject_asks_for():
    """A dependency added to pyproject.toml without `uv lock` would make speedrun.sh's `uv sync --locked` fail."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    asked = {(*requirement_key(req), None) for req in project["dependencies"]}
    asked |= {(*requirement_key(req), extra) for extra, reqs in project["optional-dependencies"].items()
              for req in reqs}
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked_project = next(package for package in lock["package"] if package["name"] == "nanochat")
    locked = {(re.sub(r"[-_.]+", "-", req["name"]).lower(), req.get("specifier", ""),
               (re.search(r"extra == '([^']+)'", req.get("marker", "")) or [None, None])[1])
              for req in locked_project["metadata"]["requires-dist"]}
    assert locked == asked, "uv.lock is out of date with pyproject.toml: run `uv lock`"
