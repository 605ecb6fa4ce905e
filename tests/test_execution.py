"""The sandbox runs model-written Python and contains every misbehaviour we know of, leaving the host intact."""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path

from nanochat.execution import ExecutionResult, execute_code


def run(code: str, **kwargs) -> ExecutionResult:
    return execute_code(textwrap.dedent(code), **kwargs)


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


def test_an_infinite_loop_is_stopped_by_the_timeout():
    started = time.monotonic()
    result = run("while True:\n    pass", timeout=1.0)
    assert not result.success and result.timeout
    assert time.monotonic() - started < 10


def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    started = time.monotonic()
    result = run("import time\ntime.sleep(60)", timeout=0.5)
    assert result.timeout and not result.success
    assert time.monotonic() - started < 10


def test_a_memory_bomb_hits_the_memory_limit():
    result = run("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", maximum_memory_bytes=256 * 1024**2)
    assert not result.success and result.memory_exceeded
    result = run("x = ' ' * (10**10)")
    assert result.memory_exceeded


def test_a_fork_bomb_cannot_create_processes():
    for code in (
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nsubprocess.run(['true'])",
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import pty\npty.fork()",
    ):
        result = run(code, timeout=2.0)
        assert not result.success and not result.timeout, code
        assert "PermissionError" in result.error or "ctypes" in result.error, (code, result.error)


def test_os_system_and_kill_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    result = run(f"import os\nos.system('touch {marker}')")
    assert not result.success and "os.system" in result.error
    result = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert not result.success and "os.kill" in result.error
    assert not marker.exists()


def test_files_outside_the_working_directory_cannot_be_written_or_deleted(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    keep_dir = tmp_path / "keep_dir"
    keep_dir.mkdir()
    (keep_dir / "inner.txt").write_text("also precious")
    attacks = [
        f"open({str(keep)!r}, 'w').write('gone')",
        f"open({str(keep)!r}, 'a').write('more')",
        f"import pathlib\npathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')",
        f"import os\nos.remove({str(keep)!r})",
        f"import os\nos.unlink({str(keep)!r})",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')",
        f"import shutil\nshutil.rmtree({str(keep_dir)!r})",
        f"import shutil\nshutil.move({str(keep)!r}, 'stolen.txt')",
        f"import os\nos.truncate({str(keep)!r}, 0)",
        f"import os\nos.chmod({str(keep)!r}, 0)",
        f"import os\nos.symlink({str(keep)!r}, 'link')\nopen('link', 'w').write('via link')",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('keep.txt', os.O_WRONLY, dir_fd=fd)",
        "open('../escaped.txt', 'w').write('x')",
    ]
    for code in attacks:
        result = run(code)
        assert not result.success, code
        assert "PermissionError" in result.error, (code, result.error)
    assert keep.read_text() == "precious"
    assert (keep_dir / "inner.txt").read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "keep_dir"]


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
        os.remove('sub/moved.txt')
        os.rmdir('sub')
    """
    result = run(code)
    assert result.success, result.stderr
    workdir, listing, content = result.stdout.splitlines()
    assert listing == "[]" and content == "hello"
    assert not Path(workdir).exists()


def test_opening_a_socket_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for code in (
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        ):
            result = run(code)
            assert not result.success, code
        try:
            server.accept()
            raise AssertionError("the sandboxed program reached the test's server")
        except TimeoutError:
            pass
    finally:
        server.close()


def test_output_is_capped():
    result = run("import sys\nfor _ in range(10**4):\n    sys.stdout.write('x' * 1000 + '\\n')", max_output_bytes=10_000)
    assert len(result.stdout) < 11_000
    assert result.stdout.endswith("[output truncated at 10000 bytes]")


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
