"""The inside of the python tool's sandbox: trusted code that runs in the confined interpreter, before and around
the untrusted program. Standard library only, and no nanochat imports: nothing of the project is visible in there.
nanochat/execution.py (the outside) passes this file's source to the interpreter with `-c`.

Two entry points, chosen by argv[1]:
- `serve CONFIG`: the pre-confined worker. It starts once, inside bubblewrap, and forks a fresh child per program
  (a fork costs about a millisecond, an interpreter start-up 20-60). Requests arrive on a Unix socket with the
  program's stdin/stdout/stderr and a reply socket attached as file descriptors; each child confines itself further
  (below) before it reads its program, and the worker reports its exit status and whether it ran out of time.
- `once CONFIG`: the weak fallback, one interpreter per program, for where bubblewrap cannot run. Only the layers
  inside the interpreter (resource limits, the audit hook) apply there.

What a child does before the program runs, each step a layer the kernel enforces from then on:
1. its own session, killed with the worker (PDEATHSIG); only the three stdio descriptors kept open;
2. resource limits: address space, CPU seconds, file size, open files, processes (1: no new ones), no core dumps;
3. Landlock: read access only to the interpreter's files, read-write only to its own scratch directory (so two
   programs running at once cannot see each other's files), and, where the kernel has it, no signals or abstract
   Unix sockets outside its own domain, no TCP;
4. no_new_privs, and a seccomp filter that refuses process creation (fork, clone, exec), ptrace and other
   processes' memory, signals to anything but itself, sockets, namespaces, mounts, keyrings, BPF, io_uring;
5. an audit hook (PEP 578) that refuses the same operations with a readable message: an extra layer only, since
   code in the same interpreter can in principle reach it, the kernel's layers it cannot.
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

# -----------------------------------------------------------------------------
# Kernel interfaces through libc: prctl, Landlock, seccomp (numbers from linux/prctl.h, landlock.h, seccomp.h)

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22
SECCOMP_MODE_FILTER = 2
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # the same on every arch
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (1 << 14) | (1 << 15)  # + truncate, ioctl_dev


def fs_rights(abi: int) -> int:
    """Every filesystem right the kernel's Landlock ABI knows: all of them are handled, i.e. denied unless a rule
    grants them (ABI 1: 13 rights; 2 adds refer, 3 truncate, 5 ioctl on devices)."""
    rights = (1 << 13) - 1
    for version, right in ((2, 1 << 13), (3, 1 << 14), (5, 1 << 15)):
        if abi >= version:
            rights |= right
    return rights


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def prctl(option: int, arg2=0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2) if isinstance(arg2, int) else arg2, 0, 0, 0), f"prctl({option})")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    version = _libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def landlock_confine(readable: list[str], writable: list[str], read_write_files: list[str]) -> int:
    """Restrict this process (and anything it could start) to reading `readable`, writing inside `writable`, and
    reading and writing the files `read_write_files` (/dev/null). Returns the ABI used."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError("Landlock is not available in this kernel")
    handled = fs_rights(abi)
    # struct landlock_ruleset_attr grew with the ABI: handled_access_fs, handled_access_net (4), scoped (6)
    if abi >= 6:
        attr = struct.pack("=QQQ", handled, 0b11, 0b11)  # no TCP bind/connect; signals, abstract sockets scoped
    elif abi >= 4:
        attr = struct.pack("=QQ", handled, 0b11)
    else:
        attr = struct.pack("=Q", handled)
    ruleset = _check(_libc.syscall(LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), 0),
                     "landlock_create_ruleset")
    try:
        for paths, rights in ((readable, FS_READ), (writable, handled), (read_write_files, FS_READ_FILE | FS_WRITE_FILE)):
            for path in paths:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    allowed = rights & handled if os.path.isdir(path) else rights & handled & FS_FILE_RIGHTS
                    rule = struct.pack("=Qi", allowed, fd)  # struct landlock_path_beneath_attr is packed
                    _check(_libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
                           f"landlock_add_rule({path})")
                finally:
                    os.close(fd)
        _check(_libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# Syscalls the child never needs. Numbers per architecture (x86_64: arch/x86/entry/syscalls/syscall_64.tbl;
# aarch64: include/uapi/asm-generic/unistd.h). Refused with EPERM, so Python raises PermissionError.
_DENIED = {
    # process creation and replacement
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "execve": (59, 221), "execveat": (322, 281),
    # other processes: tracing, memory, pidfds
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "kcmp": (312, 272),
    # network and IPC endpoints
    "socket": (41, 198), "socketpair": (53, 199),
    # namespaces, mounts, root
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    # kernel attack surface a Python program has no use for
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "personality": (135, 92),
    "mknod": (133, None), "mknodat": (259, 33), "fanotify_init": (300, 262),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224),
    "swapoff": (168, 225), "acct": (163, 89), "syslog": (103, 116), "iopl": (172, None), "ioperm": (173, None),
}
# Signals: allowed only when the target (first argument) is the child itself, e.g. raise() or os.kill(os.getpid())
_SELF_ONLY = {"kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
              "rt_tgsigqueueinfo": (297, 240)}
_AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # AUDIT_ARCH_* and the column above


def seccomp_program(machine: str, own_pid: int) -> bytes:
    """The classic-BPF filter, as the bytes of a sock_filter array: wrong architecture -> kill; x32 syscalls ->
    EPERM; a denied syscall -> EPERM; a signal to anyone but `own_pid` -> EPERM; everything else allowed."""
    arch, column = _AUDIT_ARCH[machine]
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # SECCOMP_RET_ALLOW, ERRNO(EPERM), KILL_PROCESS
    denied = [numbers[column] for numbers in _DENIED.values() if numbers[column] is not None]
    self_only = [numbers[column] for numbers in _SELF_ONLY.values()]
    # (code, jump-if-true label, jump-if-false label, k); labels are resolved to relative offsets below
    program = [(ld_abs, None, None, 4), (jeq, None, "kill", arch), (ld_abs, None, None, 0)]
    if machine == "x86_64":
        program.append((jge, "deny", None, 0x40000000))  # the x32 ABI: same kernel, other numbers
    program += [(jeq, "self", None, nr) for nr in self_only]
    program += [(jeq, "deny", None, nr) for nr in denied]
    labels = {"allow": len(program)}
    program.append((ret, None, None, allow))
    labels["self"] = len(program)
    program += [(ld_abs, None, None, 16), (jeq, None, "deny", own_pid)]  # low word of args[0]: a pid_t
    program.append((ret, None, None, allow))  # (BPF jumps only forward: a second allow, not a jump back)
    labels["deny"] = len(program)
    program.append((ret, None, None, deny))
    labels["kill"] = len(program)
    program.append((ret, None, None, kill))
    encoded = b""
    for index, (code, true, false, k) in enumerate(program):
        jt = labels[true] - index - 1 if true else 0
        jf = labels[false] - index - 1 if false else 0
        encoded += struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)
    return encoded


def seccomp_confine(own_pid: int) -> None:
    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        raise OSError(f"no seccomp filter for the {machine} architecture")
    program = seccomp_program(machine, own_pid)
    filters = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(program) // 8, ctypes.addressof(filters))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "prctl(PR_SET_SECCOMP)")


# -----------------------------------------------------------------------------
# The layers inside the interpreter: resource limits and the audit hook


def set_limits(limits: dict) -> None:
    def set_limit(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # e.g. the hard limit is already lower

    if limits["memory"]:
        set_limit(resource.RLIMIT_AS, limits["memory"])
    set_limit(resource.RLIMIT_CPU, limits["cpu"])
    set_limit(resource.RLIMIT_FSIZE, limits["fsize"])
    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_NOFILE, 64)
    set_limit(resource.RLIMIT_NPROC, 1)  # no new processes or threads (only for a non-root uid; see seccomp)


BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.startfile",
    "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sethostname",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "resource.setrlimit", "resource.prlimit", "os.chmod", "os.chown", "os.chflags", "os.lchflags",
    "os.setxattr", "os.removexattr", "os.chroot", "shutil.chown",
}
PATH_CHECKED_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.link", "os.symlink", "os.mkdir",
    "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move", "shutil.copyfile",
}


def install_audit_hook(root: str) -> None:
    """Refuse, with a readable PermissionError, what the program may not do: process creation, signals, sockets,
    ctypes, raising the limits, and writes outside `root`. (The kernel's layers enforce the same; this one explains.)"""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
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
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if inside_root(path):
                return
            # Opening a directory outside would hand out a dir_fd that defeats the path checks.
            if writes or isdir(path):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
        elif event in BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in PATH_CHECKED_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside_root(arg):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {arg!r}")

    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: creating processes is not allowed")

    import _posixsubprocess  # its fork_exec raises no audit event of its own
    _posixsubprocess.fork_exec = refuse
    os.fork = refuse
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None
    sys.addaudithook(audit)


def run_program(code: str) -> None:
    """Execute `code` as __main__ and leave the process with its exit status (never returns)."""
    sys.stdin = open(os.devnull)  # noqa: SIM115  (the program's stdin for its whole life)
    sys.stdout.reconfigure(errors="backslashreplace")
    sys.stderr.reconfigure(errors="backslashreplace")
    user_globals = {"__name__": "__main__", "__builtins__": __builtins__}
    status = 0
    try:
        exec(compile(code, "<sandbox>", "exec"), user_globals)  # noqa: S102  (running it is the point)
    except SystemExit as exit_request:  # the interpreter's own rules: None -> 0, int -> itself, else print it -> 1
        code_ = exit_request.code
        if code_ is None or isinstance(code_, int):
            status = code_ or 0
        else:
            print(code_, file=sys.stderr)
            status = 1
    except MemoryError:
        user_globals.clear()  # free what the program holds so that reporting cannot fail too
        sys.stderr.write("MemoryError: the sandbox memory limit was exceeded\n")
        status = 1
    except BaseException:  # noqa: BLE001  (whatever the program raised is its own failure, reported)
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001  (a closed or broken stream: the status says it)
            status = status or 1
    os._exit(status & 0xFF)


# -----------------------------------------------------------------------------
# One program in a forked child of the worker


def confine_child(config: dict, limits: dict, workdir: str) -> None:
    """Everything between fork and the program: see the module docstring, steps 1-4."""
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the worker died between fork and prctl
        os._exit(70)
    hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    highest = hard_limit if 0 < hard_limit < 1 << 30 else 1 << 20  # one close_range(2) call either way
    os.closerange(3, highest)  # the worker's control socket, the reply sockets: the program gets none of them
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PATH": "/nonexistent"})
    set_limits(limits)
    landlock_confine(config["readable"], [workdir], config["read_write_files"])
    prctl(PR_SET_DUMPABLE, 0)  # its memory and /proc entries stay its own
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    seccomp_confine(os.getpid())


def child_main(config: dict, limits: dict, workdir: str) -> None:
    try:
        confine_child(config, limits, workdir)
        with os.fdopen(0, "rb", closefd=False) as stdin:
            code = stdin.read().decode("utf-8", errors="replace")
    except BaseException as error:  # noqa: BLE001  (never run a program unconfined: report and leave)
        os.write(2, f"sandbox setup failed: {error!r}\n".encode())
        os._exit(71)
    install_audit_hook(os.path.realpath(workdir))
    run_program(code)


# -----------------------------------------------------------------------------
# The worker: receives requests, forks children, reports their ends


MAX_REQUEST_BYTES = 4096
MAX_FDS = 4  # stdin (the program), stdout, stderr, reply socket


class Child:
    def __init__(self, pid: int, reply: socket.socket, deadline: float, workdir: str):
        self.pid, self.reply, self.deadline, self.workdir = pid, reply, deadline, workdir
        self.pidfd = os.pidfd_open(pid)
        self.timed_out = False


def receive_request(control: socket.socket):
    """(limits, [stdin, stdout, stderr], reply socket) of the next request; None when the parent is gone."""
    fds_size = socket.CMSG_LEN(MAX_FDS * 4)
    message, ancillary, _flags, _address = control.recvmsg(MAX_REQUEST_BYTES, fds_size)
    if not message:
        return None
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    if len(fds) != MAX_FDS:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a request carries {MAX_FDS} file descriptors, got {len(fds)}")
    return json.loads(message), fds[:3], socket.socket(fileno=fds[3])


def start_child(config: dict, limits: dict, stdio: list[int], reply: socket.socket, sequence: int) -> Child:
    workdir = os.path.join(config["scratch"], f"run-{sequence}")
    os.mkdir(workdir, 0o700)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)
            child_main(config, limits, workdir)
        finally:
            os._exit(70)
    for fd in stdio:
        os.close(fd)
    return Child(pid, reply, time.monotonic() + limits["wall"], workdir)


def finish_child(child: Child) -> None:
    _, status = os.waitpid(child.pid, 0)
    os.close(child.pidfd)
    shutil.rmtree(child.workdir, ignore_errors=True)
    try:
        child.reply.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                     "timed_out": child.timed_out}).encode())
    except OSError:
        pass  # the caller stopped waiting
    child.reply.close()


def drop_privileges(config: dict) -> None:
    """As root, bubblewrap leaves the worker only CAP_SETUID/CAP_SETGID: become the unprivileged uid, which
    clears those too (a non-root caller's worker already runs as that caller, in a user namespace)."""
    uid = config.get("uid")
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("could not drop to the sandbox uid")


def serve(config: dict) -> None:
    drop_privileges(config)
    prctl(PR_SET_DUMPABLE, 0)
    control = socket.socket(fileno=config["control_fd"])
    children: dict[int, Child] = {}
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    sequence = 0
    while True:
        now = time.monotonic()
        next_deadline = min((c.deadline for c in children.values() if not c.timed_out), default=None)
        wait_ms = None if next_deadline is None else max(0, int((next_deadline - now) * 1000) + 1)
        for fd, _events in poller.poll(wait_ms):
            if fd == control.fileno():
                request = receive_request(control)
                if request is None:  # the parent is gone: so are its programs
                    for child in children.values():
                        os.kill(child.pid, signal.SIGKILL)
                    return
                limits, stdio, reply = request
                sequence += 1
                try:
                    child = start_child(config, limits, stdio, reply, sequence)
                except OSError as error:  # e.g. the scratch space is full: this request fails, the worker goes on
                    reply.send(json.dumps({"error": f"the sandbox could not start the program: {error}"}).encode())
                    reply.close()
                    continue
                children[child.pidfd] = child
                poller.register(child.pidfd, select.POLLIN)
            else:
                poller.unregister(fd)
                finish_child(children.pop(fd))
        now = time.monotonic()
        for child in children.values():
            if not child.timed_out and child.deadline <= now:
                child.timed_out = True
                os.kill(child.pid, signal.SIGKILL)


def once(config: dict) -> None:
    """The weak fallback: confine this interpreter as far as it can be without the kernel's help, run stdin."""
    code = sys.stdin.read()
    set_limits(config)
    install_audit_hook(os.path.realpath(os.getcwd()))
    run_program(code)


if __name__ == "__main__":
    mode, raw_config = sys.argv[1], json.loads(sys.argv[2])
    del sys.argv[1:]
    {"serve": serve, "once": once}[mode](raw_config)
