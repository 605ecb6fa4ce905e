"""Run untrusted Python (model-written code: the engine's python tool, HumanEval completions) in a sandbox the
kernel enforces.

What the sandbox guarantees, on Linux with bubblewrap (`bwrap`) and Landlock (the strong path, `confinement()`):
- Filesystem: the program sees, read-only, only the interpreter, its standard library (site-packages and
  dist-packages hidden: no third-party packages), the shared libraries the interpreter loads and /etc/ld.so.cache;
  a minimal /dev (null, zero, random, urandom). No home directories, no project checkout, no checkpoints, no /proc,
  no /etc besides that cache, none of the parent's environment. It writes only in its own scratch directory on a
  tmpfs of SCRATCH_BYTES (shared by the programs running at that moment; Landlock keeps each out of the others').
- Processes: no fork, clone, exec or thread (seccomp); no ptrace, no other process's memory; signals only to itself
  (seccomp, and Landlock's signal scope where the kernel has it); its own PID namespace, so it sees no host process.
  Nothing outlives the call: the child is killed at the wall-clock timeout, and the worker (and every child) dies
  with the parent (--die-with-parent, PDEATHSIG).
- Network: none (its own network namespace; sockets refused by seccomp; TCP by Landlock where it has that).
- Limits: CPU seconds, address space, file size (MAX_FILE_BYTES, which also caps stdout/stderr), open files,
  processes, wall-clock time, and only `max_output_bytes` of output read back.
- Identity: run as root, the worker drops to uid/gid 65534 (nobody) before any program runs; run as an ordinary
  user, it stays that user inside a user namespace in which it can create no further namespaces.
- Inside the interpreter, an audit hook (PEP 578) refuses the same things with readable errors. It is an extra
  layer: code in the same interpreter can reach it, which is why the layers above are the kernel's.
What it does not guarantee: protection against kernel bugs; fairness between programs running at the same moment
(one can fill the shared scratch tmpfs or use its CPU time); secrecy of timing or of what the interpreter's files
reveal about the host (its Python version, its library versions); that a program which needs third-party packages,
/proc, threads or subprocesses works (none is there).

Speed: one pre-confined worker per process (started on first use, ~0.2 s) forks a fresh child per program, so a
call costs a fork and the confinement syscalls, not an interpreter start-up (bench/sandbox.py measures it).

Where the strong path is unavailable (not Linux, bubblewrap missing, user namespaces or Landlock disabled), the
reason is printed once and `execute_code` falls back to the weak layers: one interpreter per program with resource
limits, the audit hook, and where `unshare` works, network and PID namespaces. Callers that serve a model to
users pass `require_confinement=True`, which refuses instead (SandboxUnavailable).
"""

from __future__ import annotations

import array
import atexit
import functools
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 16 * 1024**2  # RLIMIT_FSIZE: also caps the captured stdout/stderr
SCRATCH_BYTES = 64 * 1024**2  # the sandbox's whole writable space (a tmpfs)
WALL_GRACE_SECONDS = 0.25  # on top of the timeout: the child's own set-up (a fork and a few syscalls)
STARTUP_GRACE_SECONDS = 1.0  # the weak path starts an interpreter per program: on a loaded machine most of a second
SANDBOX_UID = 65534  # nobody: the uid a root caller's sandbox runs as
WORKER_SOURCE = (Path(__file__).parent / "sandbox_worker.py").read_text()
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


class SandboxUnavailable(RuntimeError):
    """Kernel confinement is unavailable here and the caller required it."""


@dataclass(frozen=True)
class Confinement:
    strong: bool
    reason: str  # what is missing and how to get it; "" when strong


# -----------------------------------------------------------------------------
# What the interpreter needs to see: probed once per process


_PROBE = r"""
import importlib, json, os, sys
for entry in sys.path:
    if os.path.isdir(entry) and entry.endswith("lib-dynload"):
        for name in sorted(os.listdir(entry)):
            if name.startswith("_tkinter"):
                continue  # no display in there: Tk and X11 stay out
            try:
                importlib.import_module(name.split(".")[0])
            except Exception:
                pass
maps = set()
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            maps.add(fields[5].strip())
print("\n" + json.dumps({"path": sys.path, "maps": sorted(maps)}))
"""


def _elf_interpreter(path: str) -> str | None:
    """The program interpreter (PT_INTERP, the dynamic loader) an ELF executable names, or None."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return None
        wide, order = header[4] == 2, "<" if header[5] == 1 else ">"
        phoff = struct.unpack_from(order + ("Q" if wide else "I"), header, 32 if wide else 28)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", header, 54 if wide else 42)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            entry = f.read(phentsize)
            if struct.unpack_from(order + "I", entry, 0)[0] == 3:  # PT_INTERP
                offset, size = (struct.unpack_from(order + "QQ", entry, 8)[0], struct.unpack_from(order + "Q", entry, 32)[0]) \
                    if wide else (struct.unpack_from(order + "I", entry, 4)[0], struct.unpack_from(order + "I", entry, 16)[0])
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def _expose(path: str, mounts: dict[str, tuple[str, ...]]) -> None:
    """Make `path` resolve inside the sandbox as it does on the host: each symlink on the way recreated as a
    symlink, the file or directory it ends at bound read-only at its real path."""
    parts = Path(path).parts[1:]
    for depth in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:depth])
        if os.path.islink(prefix):
            target = os.readlink(prefix)
            mounts.setdefault(prefix, ("--symlink", target))
            resolved = os.path.normpath(os.path.join(os.path.dirname(prefix), target))
            return _expose(os.path.join(resolved, *parts[depth:]), mounts)
    mounts.setdefault(path, ("--ro-bind",))


def _soname_links(libraries: list[str]) -> list[str]:
    """The symlinks beside each loaded library that point at it (libffi.so.8 -> libffi.so.8.1.2): the names the
    dynamic loader looks up."""
    wanted = {os.path.realpath(path) for path in libraries}
    links = []
    for directory in sorted({os.path.dirname(path) for path in wanted}):
        with os.scandir(directory) as entries:
            links += [e.path for e in entries if e.is_symlink() and os.path.realpath(e.path) in wanted]
    return links


@dataclass(frozen=True)
class _Layout:
    executable: str
    arguments: tuple[str, ...]  # bubblewrap's filesystem arguments
    readable: tuple[str, ...]  # the same paths, for Landlock


@functools.cache
def _layout() -> _Layout:
    executable = os.path.realpath(sys.executable)
    probe = subprocess.run([executable, "-I", "-S", "-B", "-c", _PROBE], capture_output=True, text=True, timeout=60,
                           env={"LANG": "C.UTF-8"}, check=True)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    directories = [os.path.realpath(p) for p in found["path"] if os.path.isdir(p)]
    files = [executable, *found["maps"]]
    loader = _elf_interpreter(executable)
    if loader:
        files.append(loader)
    if os.path.isfile("/etc/ld.so.cache"):
        files.append("/etc/ld.so.cache")
    files += _soname_links(found["maps"])
    mounts: dict[str, tuple[str, ...]] = {}
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr links, as the loader expects
        if os.path.islink(top):
            mounts[top] = ("--symlink", os.readlink(top))
    for path in sorted(set(directories)) + sorted(set(files)):
        if os.path.exists(path) and not any(path.startswith(d + "/") for d in directories):
            _expose(path, mounts)
    # every directory above a mount, created world-traversable: bubblewrap's own would keep the dropped uid out
    ancestors = sorted({str(parent) for dest in mounts for parent in Path(dest).parents if str(parent) != "/"})
    arguments: list[str] = [arg for ancestor in ancestors for arg in ("--perms", "0755", "--dir", ancestor)]
    for dest, (kind, *target) in mounts.items():
        arguments += [kind, target[0], dest] if kind == "--symlink" else [kind, dest, dest]
    for directory in directories:  # third-party packages stay out: an empty read-only tmpfs over them
        for name in ("site-packages", "dist-packages"):
            hidden = os.path.join(directory, name)
            if os.path.isdir(hidden):
                arguments += ["--tmpfs", hidden, "--remount-ro", hidden]
    readable = tuple(dest for dest, (kind, *_) in mounts.items() if kind == "--ro-bind")
    return _Layout(executable, tuple(arguments), readable + ("/dev/zero", "/dev/random", "/dev/urandom"))


def _bwrap_command(control_fd: int) -> list[str]:
    layout = _layout()
    root = os.geteuid() == 0
    config = {"control_fd": control_fd, "uid": SANDBOX_UID if root else None, "scratch": "/tmp",
              "readable": list(layout.readable), "read_write_files": ["/dev/null"]}
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    # root: no user namespace (its uid map would keep uid 0), all capabilities dropped but the two the worker
    # needs to become nobody; anyone else: a user namespace, closed to further ones
    identity = (["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root
                else ["--unshare-user", "--disable-userns"])
    return ["bwrap", *namespaces, *identity, "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox", *layout.arguments, "--dev", "/dev",
            "--perms", "1777", "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp",
            "--", layout.executable, "-I", "-S", "-B", "-c", WORKER_SOURCE, "serve", json.dumps(config)]


# -----------------------------------------------------------------------------
# The pre-confined worker, one per process


class _Worker:
    def __init__(self):
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = parent_end
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115  (open while the worker lives; read on failure)
        try:
            self.process = subprocess.Popen(_bwrap_command(worker_end.fileno()), pass_fds=(worker_end.fileno(),),
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                            cwd="/")
        finally:
            worker_end.close()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.process.poll() is None

    def error_output(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read(4000).decode(errors="replace").strip()

    def run(self, code: bytes, limits: dict) -> tuple[dict | None, int, int]:
        """Run one program; (the worker's reply or None if it died, stdout fd, stderr fd)."""
        program = os.memfd_create("nanochat-program", os.MFD_CLOEXEC)
        stdout = os.memfd_create("nanochat-stdout", os.MFD_CLOEXEC)
        stderr = os.memfd_create("nanochat-stderr", os.MFD_CLOEXEC)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.write(program, code)
            os.lseek(program, 0, os.SEEK_SET)
            fds = array.array("i", [program, stdout, stderr, theirs.fileno()])
            with self.lock:
                self.control.sendmsg([json.dumps(limits).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            theirs.close()
            mine.settimeout(limits["wall"] + 10)  # the worker enforces the wall clock; this only guards a hang
            reply = mine.recv(4096)
            return (json.loads(reply) if reply else None), stdout, stderr
        except (OSError, TimeoutError):
            return None, stdout, stderr
        finally:
            os.close(program)
            theirs.close()
            mine.close()

    def close(self) -> None:
        self.control.close()  # the worker reads EOF, kills its children and exits
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _get_worker() -> _Worker:
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.alive():
            if _worker is not None and _worker.pid == os.getpid():
                _worker.close()
            _worker = _Worker()
        return _worker


def _shutdown_worker() -> None:
    if _worker is not None and _worker.pid == os.getpid():
        _worker.close()


atexit.register(_shutdown_worker)


# -----------------------------------------------------------------------------
# Is the strong path available? Probed once per process, by running a program through it


MIN_BWRAP_VERSION = (0, 8)


def _bwrap_version() -> tuple[int, ...]:
    """bubblewrap's version ("bubblewrap 0.8.0" -> (0, 8, 0)); () when it cannot say."""
    try:
        words = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, timeout=10,
                               check=False).stdout.split()
        return tuple(int(part) for part in words[-1].split("."))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ()


@functools.cache
def confinement() -> Confinement:
    """Whether programs run under the kernel's confinement here, and if not, what is missing and how to get it."""
    if sys.platform != "linux":
        return Confinement(False, f"kernel confinement needs Linux (this is {sys.platform})")
    if shutil.which("bwrap") is None:
        return Confinement(False, f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    version = _bwrap_version()
    if version < MIN_BWRAP_VERSION:
        found = ".".join(map(str, version)) if version else "of unknown version"
        return Confinement(False, f"bubblewrap {found} is too old: 0.8 or newer sizes the scratch tmpfs (--size); "
                                  "install a newer bubblewrap (Debian 12, Ubuntu 24.04 and later ship one)")
    if not hasattr(os, "pidfd_open") or not hasattr(os, "memfd_create"):
        return Confinement(False, "this Python lacks os.pidfd_open/os.memfd_create (needs Python 3.9+ on Linux 5.3+)")
    from nanochat.sandbox_worker import landlock_abi  # Linux only: the worker's own probe, from here on

    if landlock_abi() < 1:
        return Confinement(False, "Landlock is not enabled in this kernel (Linux 5.13+ with landlock in the lsm= list)")
    try:
        _layout()
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        return Confinement(False, f"could not list the interpreter's files: {error}")
    result = _run_confined("print(2 + 2)", _limits(5.0, 256 * 1024**2), 1024)
    if result.stdout != "4\n":
        worker_error = _worker.error_output() if _worker is not None else ""
        detail = worker_error or result.stderr.strip() or result.error or "no output"
        hint = "" if os.geteuid() == 0 else (" (as an ordinary user bubblewrap needs unprivileged user namespaces: "
                                             "sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04+ an "
                                             "AppArmor profile for bwrap)")
        return Confinement(False, f"bubblewrap could not start the sandbox: {detail[-500:]}{hint}")
    return Confinement(True, "")


_warned = False


def _warn_weak_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"nanochat sandbox: WARNING: no kernel confinement ({reason}); model-written code runs with "
              "in-interpreter limits only", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Running a program


def _limits(timeout: float, maximum_memory_bytes: int | None) -> dict:
    return {"memory": maximum_memory_bytes or 0, "cpu": math.ceil(timeout) + 1, "fsize": MAX_FILE_BYTES,
            "wall": timeout + WALL_GRACE_SECONDS}


def _read_capped(fd: int, max_bytes: int) -> str:
    data = os.pread(fd, max_bytes + 1, 0)
    text = data[:max_bytes].decode("utf-8", errors="replace")
    if len(data) > max_bytes:
        text += f"\n[output truncated at {max_bytes} bytes]"
    return text


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _result(returncode: int, timed_out: bool, stdout: str, stderr: str, timeout: float) -> ExecutionResult:
    if returncode == -signal.SIGXCPU:
        timed_out = True  # RLIMIT_CPU hit before the wall clock
    if timed_out:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout} seconds", timeout=True)
    if returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    last = _last_line(stderr)
    if last.startswith("MemoryError"):
        return ExecutionResult(False, stdout, stderr, error="memory limit exceeded", memory_exceeded=True)
    if returncode < 0:
        return ExecutionResult(False, stdout, stderr, error=f"killed by signal {signal.Signals(-returncode).name}")
    return ExecutionResult(False, stdout, stderr, error=last or f"exit code {returncode}")


def _run_confined(code: str, limits: dict, max_output_bytes: int) -> ExecutionResult:
    worker = _get_worker()
    reply, stdout_fd, stderr_fd = worker.run(code.encode("utf-8", errors="replace"), limits)
    try:
        stdout, stderr = _read_capped(stdout_fd, max_output_bytes), _read_capped(stderr_fd, max_output_bytes)
    finally:
        os.close(stdout_fd)
        os.close(stderr_fd)
    if reply is None:
        return ExecutionResult(False, stdout, stderr, error="the sandbox worker stopped; it restarts on the next call")
    if "error" in reply:
        return ExecutionResult(False, stdout, stderr, error=reply["error"])
    return _result(reply["returncode"], reply["timed_out"], stdout, stderr, limits["wall"] - WALL_GRACE_SECONDS)


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """Weak path: a command prefix giving the child fresh network and PID namespaces, or () where unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    user = () if os.geteuid() == 0 else ("--user", "--map-current-user")  # non-root needs a user namespace
    prefix = (unshare, *user, "--net", "--pid", "--fork", "--kill-child")
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=10,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def _run_weak(code: str, limits: dict, max_output_bytes: int) -> ExecutionResult:
    """One interpreter per program, in a fresh temporary directory, in-interpreter layers only."""
    workdir = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    command = [*_namespace_prefix(), sys.executable, "-I", "-B", "-c", WORKER_SOURCE, "once", json.dumps(limits)]
    timeout = limits["wall"] - WALL_GRACE_SECONDS
    try:
        with tempfile.TemporaryFile() as stdout_file, tempfile.TemporaryFile() as stderr_file:
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=stdout_file,
                                    stderr=stderr_file, start_new_session=True)
            timed_out = False
            try:
                proc.communicate(input=code.encode("utf-8", errors="replace"), timeout=timeout + STARTUP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # also reaps anything the program left in its group
                except ProcessLookupError:
                    pass
                proc.wait()
            stdout = _read_capped(stdout_file.fileno(), max_output_bytes)
            stderr = _read_capped(stderr_file.fileno(), max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(proc.returncode, timed_out, stdout, stderr, timeout)


def execute_code(
    code: str,
    timeout: float = 5.0,
    maximum_memory_bytes: int | None = 256 * 1024**2,
    max_output_bytes: int = 64 * 1024,
    require_confinement: bool = False,
) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox and report how it went. Without kernel confinement this
    warns once and uses the weak layers, or raises SandboxUnavailable when `require_confinement`."""
    limits = _limits(timeout, maximum_memory_bytes)
    status = confinement()
    if status.strong:
        return _run_confined(code, limits, max_output_bytes)
    if require_confinement:
        raise SandboxUnavailable(f"the python sandbox is unavailable: {status.reason}")
    _warn_weak_once(status.reason)
    return _run_weak(code, limits, max_output_bytes)


# -----------------------------------------------------------------------------
# The policy of the scripts that serve a model to people (chat_web, chat_cli)

UNSAFE_FLAG = "--unsafe-python-tool-without-sandbox"


def add_unsafe_tool_flag(parser) -> None:
    parser.add_argument(UNSAFE_FLAG, dest="unsafe_python_tool", action="store_true",
                        help="where the kernel sandbox is unavailable, run the model's python tool calls anyway, "
                             "with in-interpreter limits only: whoever types can then steer code that reads "
                             "this machine's files")


def served_tool_requires_confinement(allow_unconfined: bool) -> bool:
    """Say once, at start-up, how the model's python tool calls will run; returns Engine's require_confinement."""
    status = confinement()
    if status.strong:
        print("python tool: runs in the kernel sandbox (bubblewrap + Landlock + seccomp)", file=sys.stderr, flush=True)
        return True
    if allow_unconfined:
        print(f"python tool: WARNING: running WITHOUT the kernel sandbox ({status.reason}), as {UNSAFE_FLAG} "
              "asked: model-written code can read this machine's files", file=sys.stderr, flush=True)
        return False
    print(f"python tool: DISABLED, no kernel sandbox here: {status.reason}. The model's tool calls get an error "
          f"instead; {UNSAFE_FLAG} runs them with in-interpreter limits only.", file=sys.stderr, flush=True)
    return True
