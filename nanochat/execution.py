"""
Run untrusted Python (model-written code: HumanEval completions, the engine's calculator tool) in a
separate, limited process.

Layers, from the inside out:
1. Inside the child, before the untrusted code runs: resource limits (address space, CPU seconds, file
   size, process count, no core dumps) and an audit hook (PEP 578) that refuses sockets, process
   creation, signals, ctypes, raising the limits, and any write, delete, rename, chmod or link outside
   the child's fresh working directory. Audit hooks fire inside C code too and cannot be removed.
2. The child runs in its own session, in a fresh temporary directory, with a minimal environment; it is
   killed (whole process group) at the wall-clock timeout and the directory is removed afterwards.
3. Where the `unshare` tool works (Linux), the child also gets its own network namespace (no network
   at all) and PID namespace (killing it kills everything it spawned).
stdout/stderr go to files rather than pipes, so a chatty program cannot fill the parent's memory;
RLIMIT_FSIZE bounds them and only the first `max_output_bytes` are read back.

This is a best-effort sandbox for model outputs, not a security boundary against a determined attacker.
"""

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Interpreter start-up is not the code's fault: on a loaded machine it can take most of a second.
STARTUP_GRACE_SECONDS = 1.0
MAX_FILE_BYTES = 16 * 1024**2  # RLIMIT_FSIZE: also caps the captured stdout/stderr files


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


# -----------------------------------------------------------------------------
# The runner: trusted code executed by the child interpreter. It reads the untrusted program from
# stdin, locks the process down, then executes the program as __main__.

_RUNNER = r'''
import json, os, resource, sys, traceback

config = json.loads(sys.argv[1])
code = sys.stdin.read()
sys.stdin = open(os.devnull)
sys.stdout.reconfigure(errors="backslashreplace")
sys.stderr.reconfigure(errors="backslashreplace")
root = os.path.realpath(os.getcwd())

def set_limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # e.g. the hard limit is already lower

if config["memory"]:
    set_limit(resource.RLIMIT_AS, config["memory"])
set_limit(resource.RLIMIT_CPU, config["cpu"])
set_limit(resource.RLIMIT_FSIZE, config["fsize"])
set_limit(resource.RLIMIT_CORE, 0)
set_limit(resource.RLIMIT_NPROC, 1)  # no new processes or threads (ignored for root, see the PID namespace)

BLOCKED = {
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.startfile",
    "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sethostname",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "resource.setrlimit", "resource.prlimit", "os.chmod", "os.chown", "os.chflags", "os.lchflags",
    "os.setxattr", "os.removexattr", "os.chroot", "shutil.chown",
}
PATH_CHECKED = {
    "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.link", "os.symlink", "os.mkdir",
    "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move", "shutil.copyfile",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
realpath, fspath, isdir, sep = os.path.realpath, os.fspath, os.path.isdir, os.sep

def inside_root(path):
    resolved = realpath(fspath(path))
    if isinstance(resolved, bytes):
        resolved = resolved.decode(errors="replace")
    return resolved == root or resolved.startswith(root + sep)

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if inside_root(path):
            return
        # Opening a directory outside would hand out a dir_fd that defeats the path checks.
        if writes or isdir(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
    elif event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event in PATH_CHECKED:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not inside_root(arg):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {arg!r}")

def refuse(*args, **kwargs):
    raise PermissionError("sandbox: creating processes is not allowed")

# _posixsubprocess.fork_exec raises no audit event of its own, so take it away as well.
import _posixsubprocess
_posixsubprocess.fork_exec = refuse
os.fork = refuse
sys.modules["ctypes"] = None
sys.modules["_ctypes"] = None
sys.addaudithook(audit)
exit_now = os._exit
user_globals = {"__name__": "__main__", "__builtins__": __builtins__}
del config, set_limit
try:
    exec(compile(code, "<sandbox>", "exec"), user_globals)
except SystemExit:
    raise
except MemoryError:
    user_globals.clear()  # free what the program holds so that reporting cannot fail too
    sys.stderr.write("MemoryError: the sandbox memory limit was exceeded\n")
    sys.stderr.flush()
    exit_now(1)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    exit_now(1)
sys.stdout.flush()
'''


# -----------------------------------------------------------------------------
# Process isolation that needs the `unshare` tool (util-linux); probed once per process.

@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """Command prefix that gives the child fresh network and PID namespaces, or () where unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    # Non-root users need a user namespace to be allowed to create the others.
    user = () if os.geteuid() == 0 else ("--user", "--map-current-user")
    prefix = (unshare, *user, "--net", "--pid", "--fork", "--kill-child")
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=10,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def _read_capped(file, max_bytes: int) -> str:
    file.seek(0)
    data = file.read(max_bytes + 1)
    text = data[:max_bytes].decode("utf-8", errors="replace")
    if len(data) > max_bytes:
        text += f"\n[output truncated at {max_bytes} bytes]"
    return text


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def execute_code(
    code: str,
    timeout: float = 5.0,
    maximum_memory_bytes: int | None = 256 * 1024**2,
    max_output_bytes: int = 64 * 1024,
) -> ExecutionResult:
    """Run `code` as a Python program in a sandboxed child process and report how it went."""
    workdir = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    config = {"memory": maximum_memory_bytes or 0, "cpu": math.ceil(timeout) + 1, "fsize": MAX_FILE_BYTES}
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    command = [*_namespace_prefix(), sys.executable, "-I", "-B", "-c", _RUNNER, json.dumps(config)]
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
                _kill_group(proc)  # also reaps anything the program left behind in its group
            stdout = _read_capped(stdout_file, max_output_bytes)
            stderr = _read_capped(stderr_file, max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    returncode = proc.returncode
    if returncode == -signal.SIGXCPU:
        timed_out = True  # RLIMIT_CPU hit before the wall clock
    if timed_out:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout} seconds", timeout=True)
    last = _last_line(stderr)
    if returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    if last.startswith("MemoryError"):
        return ExecutionResult(False, stdout, stderr, error="memory limit exceeded", memory_exceeded=True)
    if returncode < 0:
        return ExecutionResult(False, stdout, stderr, error=f"killed by signal {signal.Signals(-returncode).name}")
    return ExecutionResult(False, stdout, stderr, error=last or f"exit code {returncode}")
