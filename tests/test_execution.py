"""The sandbox runs model-written Python and contains every misbehaviour we know of, leaving the host intact.

The attacks are real programs, run through the real sandbox (no mocks). Most start with GUARDS_OFF, which switches
off every check inside the interpreter by introspection (the worker's module through sys.modules, the audit hook's
closure through gc, fresh imports of the patched modules): what stops them then is the kernel's confinement alone.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nanochat import execution
from nanochat.execution import Confinement, ExecutionResult, SandboxUnavailable, execute_code

REPO_ROOT = Path(__file__).resolve().parents[1]

GUARDS_OFF = """
import gc, importlib, os, posix, sys
worker = sys.modules["__main__"]
worker.BLOCKED_EVENTS.clear()
worker.PATH_CHECKED_EVENTS.clear()
for obj in gc.get_objects():
    if callable(obj) and getattr(obj, "__name__", "") == "audit" and getattr(obj, "__closure__", None):
        for cell in obj.__closure__:
            if getattr(cell.cell_contents, "__name__", "") == "inside_root":
                cell.cell_contents = lambda path: True
            elif getattr(cell.cell_contents, "__name__", "") == "isdir":
                cell.cell_contents = lambda path: False
os.fork = posix.fork
for name in ("ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket"):
    sys.modules.pop(name, None)
import ctypes, _posixsubprocess, subprocess, socket
libc = ctypes.CDLL(None, use_errno=True)
open("probe_outside_check", "w").write("x")  # the hook is off: a write passes its check
print("GUARDS OFF", flush=True)
"""


def run(code: str, **kwargs) -> ExecutionResult:
    return execute_code(textwrap.dedent(code), **kwargs)


def attack(code: str, **kwargs) -> ExecutionResult:
    """Run GUARDS_OFF then `code`, and check that the in-interpreter layer really was switched off."""
    result = run(GUARDS_OFF + textwrap.dedent(code), **kwargs)
    assert result.stdout.startswith("GUARDS OFF"), (result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module", autouse=True)
def strong_sandbox():
    """These tests are about the kernel's confinement: tests/run.sh installs bubblewrap, so it must be here."""
    status = execution.confinement()
    assert status.strong, f"kernel confinement unavailable: {status.reason}"


@pytest.fixture
def secret_file(tmp_path) -> tuple[Path, str]:
    token = secrets.token_hex(16)
    path = tmp_path / "secret.txt"
    path.write_text(token)
    return path, token


def assert_no_leak(result: ExecutionResult, token: str) -> None:
    assert token not in result.stdout and token not in result.stderr


def worker_descendants() -> list[int]:
    """Pids of every process below the worker's bubblewrap (its init and the worker itself included)."""
    found, frontier = [], [execution._worker.process.pid]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            children = (task / "children").read_text().split()
            found += [int(c) for c in children]
            frontier += [int(c) for c in children]
    return found


# -----------------------------------------------------------------------------
# Ordinary programs


def test_a_correct_program_succeeds_with_its_output():
    result = run("print(sum(range(10)))\nimport sys; print('warn', file=sys.stderr)")
    assert result.success and result.error is None
    assert result.stdout == "45\n"
    assert result.stderr == "warn\n"
    assert not result.timeout and not result.memory_exceeded


def test_an_exception_fails_and_names_the_error():
    result = run("def f():\n    assert 1 + 1 == 3, 'bad math'\nf()")
    assert not result.success
    assert result.error == "AssertionError: bad math"
    assert "Traceback" in result.stderr


def test_a_nonzero_exit_code_is_a_failure():
    assert run("import sys; sys.exit(0)").success
    result = run("import sys; sys.exit(3)")
    assert not result.success and result.error == "exit code 3"
    result = run("import sys; sys.exit('bye')")
    assert not result.success and result.stderr.strip() == "bye"


def test_an_infinite_loop_is_stopped_by_the_timeout():
    started = time.monotonic()
    result = run("while True:\n    pass", timeout=1.0)
    assert not result.success and result.timeout
    assert time.monotonic() - started < 10


def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    started = time.monotonic()
    result = run("import time\ntime.sleep(60)", timeout=0.5)
    assert result.timeout and not result.success
    assert time.monotonic() - started < 5


def test_a_memory_bomb_hits_the_memory_limit():
    result = run("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", maximum_memory_bytes=256 * 1024**2)
    assert not result.success and result.memory_exceeded
    result = run("x = ' ' * (10**10)")
    assert result.memory_exceeded


def test_output_is_capped():
    result = run("import sys\nfor _ in range(10**4):\n    sys.stdout.write('x' * 1000 + '\\n')", max_output_bytes=10_000)
    assert len(result.stdout) < 11_000
    assert result.stdout.endswith("[output truncated at 10000 bytes]")


def test_the_program_may_use_its_own_fresh_directory_which_is_removed_afterwards():
    code = """
        import os, tempfile
        print(os.getcwd())
        print(sorted(os.listdir('.')))
        with open('scratch.txt', 'w') as f:
            f.write('hello')
        os.mkdir('sub')
        os.rename('scratch.txt', 'sub/moved.txt')
        print(open('sub/moved.txt').read())
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(b'temp files land here too')
    """
    first = run(code)
    assert first.success, first.stderr
    workdir, listing, content = first.stdout.splitlines()
    assert listing == "[]" and content == "hello"
    second = run(f"import os\nprint(os.path.exists({workdir!r}))")
    assert second.stdout == "False\n"  # the next program finds nothing of the last one's


def test_many_programs_run_concurrently_from_threads():
    results: list[ExecutionResult | None] = [None] * 8

    def work(i: int) -> None:
        results[i] = execute_code(f"print({i} * {i})")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(8)]


def test_the_standard_library_works_and_third_party_packages_are_absent():
    result = run("import math, json, re, hashlib, fractions, decimal, statistics, itertools, heapq, datetime, random\n"
                 "print(math.comb(10, 3), json.dumps([1]), hashlib.sha256(b'').hexdigest()[:8])")
    assert result.success and result.stdout == "120 [1] e3b0c442\n", result.stderr
    for package in ("numpy", "torch", "nanochat"):
        result = run(f"import {package}")
        assert not result.success and "ModuleNotFoundError" in result.error, package


# -----------------------------------------------------------------------------
# Attacks, one class a test


def test_files_outside_cannot_be_read(secret_file):
    path, token = secret_file
    for code in (
        f"print(open({str(path)!r}).read())",
        f"import os\nprint(os.read(os.open({str(path)!r}, os.O_RDONLY), 100))",
        f"import os\nfd = os.open({str(path.parent)!r}, os.O_RDONLY)\nprint(os.read(os.open('secret.txt', 0, dir_fd=fd), 99))",
        f"print(open({str(REPO_ROOT / 'README.md')!r}).read())",  # the project checkout
        "import os\nprint(os.listdir('/'), os.listdir('/root'))",
        "import os\nprint(os.listdir('/home'))",
        f"print(open('/proc/self/root{path}').read())",
    ):
        for result in (run(code), attack(code)):
            assert not result.success, code
            assert_no_leak(result, token)
            assert "Error" in result.error, (code, result.error)


def test_the_environment_and_proc_of_the_host_are_out_of_reach(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", token)
    execution._shutdown_worker()  # a worker started now sees (or not) this environment
    result = run("import os\nprint(sorted(os.environ))")
    assert result.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR']\n"
    host = os.getpid()
    for code in ("print(open('/proc/self/environ').read())", "print(open('/proc/1/environ').read())",
                 f"print(open('/proc/{host}/environ').read())", f"print(open('/proc/{host}/mem', 'rb').read(64))",
                 "import os\nprint(os.listdir('/proc'))",
                 ("print(libc.mount(b'proc', b'/tmp', b'proc', 0, None), ctypes.get_errno())\n"
                  "import os\nprint(os.listdir('/tmp'))")):
        result = attack(code)
        assert not result.success, code
        assert_no_leak(result, token)


def test_every_introspection_route_to_the_guards_leads_only_to_the_kernels_limits(secret_file, tmp_path):
    """Frames, importlib.reload, builtins: each reaches (and switches off) what lives in the interpreter; none
    gets past the kernel."""
    path, token = secret_file
    marker = tmp_path / "pwned"
    for route in (
        # the runner's frame, from the program's own
        ("import sys\nframe = sys._getframe()\nwhile frame.f_back: frame = frame.f_back\n"
        "frame.f_globals['BLOCKED_EVENTS'].clear(); frame.f_globals['PATH_CHECKED_EVENTS'].clear()"),
        # fresh modules in place of the patched ones
        ("import importlib, os, _posixsubprocess\nimportlib.reload(os)\nsys_modules = __import__('sys').modules\n"
        "sys_modules.pop('_posixsubprocess', None)\nimport _posixsubprocess"),
        # builtins: an open() that bypasses the hook's view of its argument
        "import builtins, io\nbuiltins.open = io.open",
    ):
        code = (route + f"\nimport os, subprocess\nprint(open({str(path)!r}).read())\n"
                f"subprocess.run(['/bin/sh', '-c', 'touch {marker}'])\nos.fork()")
        result = run(code)
        assert not result.success, route
        assert_no_leak(result, token)
    assert not marker.exists()


def test_no_process_can_be_created_by_any_route(tmp_path):
    marker = tmp_path / "pwned"
    touch = f"['/bin/sh', '-c', 'touch {marker}']"
    routes = [
        f"import os\nassert os.system('touch {marker}') == 0",
        f"import subprocess\nsubprocess.run({touch})",
        f"import os\nos.posix_spawn('/bin/sh', {touch}, {{}})",
        f"import os\nos.execv('/bin/sh', {touch})",
        "import os\nwhile True:\n    os.fork()",
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()",
        "import pty\npty.fork()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import ctypes\nassert ctypes.CDLL(None).fork() >= 0",
    ]
    guards_off_routes = [
        *routes,
        "pid = os.fork()\nprint('forked', pid)",
        f"print(subprocess.run({touch}))",
        "print(libc.fork(), ctypes.get_errno())\nassert libc.fork() > 0",
        f"assert libc.system(b'touch {marker}') == 0",
        "assert libc.syscall(57) > 0  # fork",
        "assert libc.syscall(56, 17, 0, 0, 0, 0) > 0  # clone(SIGCHLD)",
        "assert libc.syscall(435, 0, 0) >= 0  # clone3",
        f"libc.execv(b'/bin/sh', (ctypes.c_char_p * 4)(b'/bin/sh', b'-c', b'touch {marker}', None))\nraise SystemExit(9)",
        "import threading\nfor _ in range(100):\n    threading.Thread(target=input).start()",
    ]
    for code in routes:
        result = run(code, timeout=3.0)
        assert not result.success and not result.timeout, (code, result.error)
    for code in guards_off_routes:
        result = attack(code, timeout=3.0)
        assert not result.success and not result.timeout, (code, result.error)
        assert "forked" not in result.stdout
    assert not marker.exists()
    assert len(worker_descendants()) == 2  # bubblewrap's init and the worker: nothing outlived its call


def test_links_cannot_reach_outside_files(secret_file):
    path, token = secret_file
    for code in (
        f"import os\nos.symlink({str(path)!r}, 'link')\nprint(open('link').read())",
        f"import os\nos.link({str(path)!r}, 'hard')\nprint(open('hard').read())",
        "import os\nos.link(os.__file__, 'hard')\nopen('hard', 'a').write('# pwned')",
        "import os\nos.symlink(os.__file__, 'link')\nopen('link', 'a').write('# pwned')",
        "import os, sys\nos.symlink('/', 'root')\nprint(os.listdir('root'))",
    ):
        for result in (run(code), attack(code)):
            assert not result.success, code
            assert_no_leak(result, token)
    assert path.read_text() == token


def test_the_interpreters_own_files_cannot_be_changed():
    import os as host_os
    import sys

    files = [Path(host_os.__file__), Path(host_os.path.realpath(sys.executable))]
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    for code in (
        "import os\nopen(os.__file__, 'r+').write('# pwned')",
        "import os\nfd = os.open(os.__file__, os.O_RDWR)\nos.write(fd, b'# pwned')",
        "import os\nos.truncate(os.__file__, 0)",
        "import os, sys\nopen(os.path.realpath(sys.executable), 'r+b').write(b'pwned')",
        "import os\nos.remove(os.__file__)",
        "import os\nos.rename(os.__file__, 'stolen.py')",
        "import os\nos.chmod(os.__file__, 0o777)",
        "open('/etc/ld.so.cache', 'r+b').write(b'x')",
    ):
        for result in (run(code), attack(code)):
            assert not result.success, code
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before


def test_files_outside_cannot_be_written_or_deleted(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    keep_dir = tmp_path / "keep_dir"
    keep_dir.mkdir()
    (keep_dir / "inner.txt").write_text("also precious")
    for code in (
        f"open({str(keep)!r}, 'w').write('gone')",
        f"open({str(keep)!r}, 'a').write('more')",
        f"open({str(keep)!r}, 'r+').write('more')",
        f"import os\nos.open({str(keep)!r}, os.O_RDWR)",
        f"import pathlib\npathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')",
        f"import os\nos.remove({str(keep)!r})",
        f"import shutil\nshutil.rmtree({str(keep_dir)!r})",
        f"import shutil\nshutil.move({str(keep)!r}, 'stolen.txt')",
        f"import os\nos.truncate({str(keep)!r}, 0)",
        f"import os\nos.chmod({str(keep)!r}, 0)",
        "open('../escaped.txt', 'w').write('x')",
        "open('/tmp/escaped.txt', 'w').write('x')",
        "open('/dev/shm/escaped', 'w').write('x')",
        "open('/escaped', 'w').write('x')",
    ):
        for result in (run(code), attack(code)):
            assert not result.success, code
    assert keep.read_text() == "precious"
    assert (keep_dir / "inner.txt").read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "keep_dir"]


def test_filling_the_disk_stops_at_the_scratch_limit():
    code = """
        import os
        written = 0
        try:
            for i in range(10**6):
                with open(f'fill{i}', 'wb') as f:
                    for _ in range(16):
                        f.write(b'x' * 2**20)
                        f.flush()
                        written += 2**20
        except OSError as error:
            print(written, type(error).__name__)
    """
    before = os.statvfs("/tmp")
    result = attack("import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n" + textwrap.dedent(code),
                    timeout=20.0)
    assert result.success, result.stderr
    written = int(result.stdout.split()[-2])
    assert 0 < written <= execution.SCRATCH_BYTES
    after = os.statvfs("/tmp")
    assert (before.f_bavail - after.f_bavail) * before.f_frsize < 32 * 1024**2  # the host's disk took none of it
    assert run("import os\nprint(os.statvfs('.').f_bfree == os.statvfs('.').f_blocks)").stdout == "True\n"


def test_fork_and_thread_bombs_end_at_once():
    for code in ("while True:\n    os.fork()", "while True:\n    assert libc.syscall(57) >= 0 and libc.fork() >= 0",
                 "import threading\nwhile True:\n    threading.Thread(target=input).start()"):
        started = time.monotonic()
        result = attack(code, timeout=5.0)
        assert not result.success and not result.timeout, (code, result.error)
        assert time.monotonic() - started < 3
    assert len(worker_descendants()) == 2


def test_no_socket_reaches_anything():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"\0nanochat-test-{secrets.token_hex(4)}"
    abstract.bind(abstract_name)
    abstract.listen(1)
    abstract.settimeout(0.2)
    try:
        for code in (
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({abstract_name!r})",
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('8.8.8.8', 53))",
        ):
            for result in (run(code), attack(code)):
                assert not result.success, code
        for listener in (server, abstract):
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        server.close()
        abstract.close()


def test_signals_reach_no_other_process():
    worker_pid = execution._get_worker().process.pid
    assert run("print('warm')").success
    for code in (
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal\nos.kill(1, signal.SIGKILL)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "import os, signal\nos.killpg(1, signal.SIGKILL)",
        "print(libc.kill(-1, 9), libc.kill(1, 9), libc.kill(2, 9), libc.kill(os.getppid(), 9))\nraise SystemExit(1)",
        "import signal\nfor pid in range(1, 64):\n    if pid != os.getpid():\n        libc.kill(pid, 9)\nraise SystemExit(1)",
    ):
        result = attack(code) if "libc" in code else run(code)
        assert not result.success, code
    # the test process is alive (this line runs), and so is the same worker, which still serves
    assert execution._worker.process.pid == worker_pid and execution._worker.process.poll() is None
    assert run("print(2 + 2)").stdout == "4\n"


def test_a_daemon_cannot_survive_its_call(tmp_path):
    code = """
        import time
        for attempt in (lambda: os.fork(), lambda: libc.fork(), lambda: libc.syscall(57), lambda: libc.daemon(0, 0)):
            try:
                if attempt() == 0:
                    time.sleep(30)
            except OSError:
                pass
        os.setsid() if False else None
        print('parent done')
    """
    result = attack(code, timeout=3.0)
    assert "parent done" in result.stdout
    time.sleep(0.2)
    assert len(worker_descendants()) == 2


def test_programs_running_at_once_cannot_see_each_other():
    token = secrets.token_hex(16)
    writer_result: list[ExecutionResult] = []
    writer = threading.Thread(target=lambda: writer_result.append(run(
        f"import os, time\nopen('note.txt', 'w').write({token!r})\nprint(os.getcwd(), flush=True)\ntime.sleep(1.5)")))
    writer.start()
    time.sleep(0.5)
    reader = attack("""
        for n in range(1, 2000):
            try:
                print(open(f'/tmp/run-{n}/note.txt').read())
            except OSError:
                pass
        print(os.listdir('/tmp'))
    """)
    writer.join()
    assert writer_result[0].success
    assert_no_leak(reader, token)


# -----------------------------------------------------------------------------
# Where the kernel's confinement is missing


def test_without_confinement_served_callers_are_refused_and_others_warned(monkeypatch, capsys):
    monkeypatch.setattr(execution, "confinement", lambda: Confinement(False, "bubblewrap (bwrap) is not installed"))
    monkeypatch.setattr(execution, "_warned", False)
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        execute_code("print(1)", require_confinement=True)
    assert execute_code("print(6 * 7)").stdout == "42\n"  # evaluation may run on the weak layers
    assert execute_code("import os\nos.system('true')").error.startswith("PermissionError")
    assert execute_code("print(1)").success
    warnings = capsys.readouterr().err
    assert warnings.count("no kernel confinement") == 1 and "bwrap" in warnings


def test_a_bubblewrap_too_old_to_size_the_scratch_space_is_named_as_the_reason(monkeypatch):
    monkeypatch.setattr(execution, "_bwrap_version", lambda: (0, 6, 1))
    status = execution.confinement.__wrapped__()  # the probe itself, not this process's cached answer
    assert not status.strong and "bubblewrap 0.6.1 is too old" in status.reason and "--size" in status.reason


def test_the_sandbox_holds_for_an_ordinary_user_too(tmp_path):
    """The same sandbox run by an unprivileged user (uid 65534, with Debian's own python3, whose files that user can
    read): a user namespace stands in for root's capabilities, and the planted secret, which that user could read
    outside, stays out of reach."""
    import json
    import shutil
    import stat
    import subprocess
    import tempfile

    python, setpriv = shutil.which("python3", path="/usr/bin:/bin"), shutil.which("setpriv")
    if os.geteuid() != 0 or python is None or setpriv is None:
        pytest.skip("needs root (to become another user), setpriv and a system python3")
    world = Path(tempfile.mkdtemp(prefix="nanochat-user-test-", dir="/tmp"))
    try:
        package = world / "nanochat"
        package.mkdir()
        for name in ("execution.py", "sandbox_worker.py"):
            shutil.copy(REPO_ROOT / "nanochat" / name, package / name)
        (package / "__init__.py").write_text("")
        token = secrets.token_hex(16)
        (world / "secret.txt").write_text(token)
        for path in (world, package, *package.iterdir(), world / "secret.txt"):
            path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | (0o055 if path.is_dir() else 0))
        script = f"""
import json, sys
sys.path.insert(0, {str(world)!r})
from nanochat import execution
status = execution.confinement()
runs = [execution.execute_code(code) for code in (
    "import os; print(os.getuid(), 2 + 2)",
    "print(open({str(world / 'secret.txt')!r}).read())",
    "import posix; posix.fork()",
    "import socket; socket.socket()",
)]
print(json.dumps({{"strong": status.strong, "reason": status.reason,
                  "runs": [[r.success, r.stdout, r.stderr] for r in runs]}}))
"""
        result = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                                 script], capture_output=True, text=True, timeout=120, check=False, cwd=world,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["strong"], report["reason"]
        (ok, out, _), *attacks = report["runs"]
        assert ok and out == "65534 4\n"
        for success, out, err in attacks:
            assert not success and token not in out + err
    finally:
        shutil.rmtree(world, ignore_errors=True)
