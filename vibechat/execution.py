"""Run untrusted Python (model-written programs) in a confined child process.

Every call of execute_code starts a fresh `python -I` process (not a fork of this one) in a new
session, with a scrubbed environment (PATH, LANG, HOME, TMPDIR and one-thread settings for math
libraries), stdin on /dev/null, and a private temporary working directory that is deleted
afterwards. The child confines itself before it runs the code, in this order:

  1. rlimits: address space (maximum_memory_bytes), CPU seconds (a backstop behind the
     wall-clock timeout), 16 MiB per written file, no core files.
  2. a private network and IPC namespace, when this process may create one (root with
     CAP_SYS_ADMIN, as in CI); best effort, as an extra wall behind 5.
  3. Landlock (Linux >= 5.13): the child may read only the Python installation, /usr, /lib*
     and a few /dev nodes; it may write, create and delete only inside its working directory;
     it may execute nothing (/proc and /sys are not readable either); it may not ptrace
     processes outside its domain; with ABI >= 4 no TCP bind/connect; with ABI >= 6 no signals or abstract unix sockets
     outside its domain.
  4. every capability dropped, and no_new_privs set.
  5. a seccomp filter (x86_64, aarch64) that fails with EPERM: creating processes (fork, vfork,
     clone without CLONE_THREAD; clone3 fails with ENOSYS so that threads fall back to clone),
     execve/execveat, socket(), anything aimed at another process (ptrace, process_vm_*, pidfd_*,
     tkill, setpriority, migrate/move_pages, and kill/tgkill/rt_*sigqueueinfo/prlimit64/
     sched_set* unless the target is 0 or the child itself), unshare/setns, io_uring, bpf,
     perf_event_open, userfaultfd, keyrings, SysV IPC and POSIX message queues (they outlive the
     child), and the path-based metadata calls Landlock does not cover (truncate, chmod,
     utimes, xattrs).

The parent reads stdout and stderr with a cap (MAX_OUTPUT_BYTES each; past it the child is
killed), and on timeout it kills the whole process group with SIGKILL, so signal handlers
cannot delay it.

Guaranteed on Linux >= 5.13 with Landlock enabled, on x86_64 or aarch64, whatever the user
(including root, where the child keeps uid 0 but has no capabilities): the child cannot read
the parent's environment or files outside the allowed read paths, cannot write, delete, rename,
truncate, chmod or link any file outside its working directory, cannot start a process or a
program, cannot open a socket (socketpair() is allowed), cannot signal, trace or re-limit
another process, cannot raise its own hard limits, and is dead when execute_code returns.

Not guaranteed: total disk usage in the working directory (bounded per file and by time only);
reading world-readable files under the allowed read paths; kernel bugs. Where Landlock or the
seccomp filter is unavailable (older kernels, other architectures, macOS) execute_code warns
once and runs with what is left: then the child can read and write whatever the parent's user
can, and (without seccomp) open sockets and start processes. docs/security.md has the details.

The child side of this file runs as `python -I execution.py CONFIG` and uses the stdlib only.
"""

import ctypes
import errno
import functools
import json
import logging
import math
import os
import platform
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

logger = logging.getLogger("vibechat")

MAX_OUTPUT_BYTES = 1 << 20  # per stream; a child writing more is killed
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: the largest file the child may write

# Landlock (include/uapi/linux/landlock.h); its syscall numbers are the same on every architecture
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_MAKE_CHAR, _FS_MAKE_BLOCK = 1 << 6, 1 << 11
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

# Linux constants for unshare, prctl, capset and seccomp
_CLONE_THREAD, _CLONE_NEWIPC, _CLONE_NEWNET = 0x00010000, 0x08000000, 0x40000000
_PR_GET_SECCOMP, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 21, 22, 38
_SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_X32_SYSCALL_BIT = 0x40000000

# Syscall numbers per machine: (x86_64, aarch64); None where the call does not exist there.
_DENIED_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "socket": (41, 198),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440), "process_mrelease": (448, 448), "tkill": (200, 130),
    "migrate_pages": (256, 238), "move_pages": (279, 239), "setpriority": (141, 140), "ioprio_set": (251, 30),
    "unshare": (272, 97), "setns": (308, 268),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "shmget": (29, 194), "msgget": (68, 186), "semget": (64, 190), "mq_open": (240, 180),
    "truncate": (76, 45), "chmod": (90, None), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "removexattr": (197, 14), "lremovexattr": (198, 15),
    "setxattrat": (463, 463), "removexattrat": (466, 466),
}
# Calls whose first argument names a process: allowed only for 0 (meaning "myself") or the child's own pid.
_SELF_ONLY_SYSCALLS = {
    "kill": (62, 129), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "prlimit64": (302, 261), "sched_setaffinity": (203, 122), "sched_setparam": (142, 118),
    "sched_setscheduler": (144, 119), "sched_setattr": (314, 274),
}
_CLONE = (56, 220)
_CLONE3 = (435, 435)
_MACHINES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # table column, AUDIT_ARCH_*


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 * 1024 * 1024) -> ExecutionResult:
    """Run `code` as the __main__ module of a confined child process; see the module docstring."""
    # imported here, not at the top: the child runs this file as a script and must start without torch
    from vibechat.common import VibechatError

    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise VibechatError(f"execute_code: timeout must be a positive number of seconds, got {timeout!r}")
    if maximum_memory_bytes is not None and not (isinstance(maximum_memory_bytes, int) and maximum_memory_bytes > 0):
        raise VibechatError(
            f"execute_code: maximum_memory_bytes must be a positive int or None, got {maximum_memory_bytes!r}")
    landlock_abi, seccomp_machine = _host_protections()
    with tempfile.TemporaryDirectory(prefix="vibechat-exec-") as workdir:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        status_read, status_write = os.pipe()
        config = {
            "status_fd": status_write,
            "cpu_seconds": math.ceil(timeout) + 1,
            "memory_bytes": maximum_memory_bytes,
            "landlock_abi": landlock_abi,
            "seccomp_machine": seccomp_machine,
            "read_paths": _read_paths(),
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        deadline = time.monotonic() + timeout
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-u", os.path.abspath(__file__), json.dumps(config)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(status_write,), start_new_session=True,
            )
        finally:
            os.close(status_write)
        try:
            (stdout, stderr, status), killed_for = _collect(proc, status_read, deadline)
        finally:
            _kill_group(proc)  # the group is gone once its leader is reaped, so kill before waiting
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            os.close(status_read)
    ready, _, final_status = status.partition("\n")
    final_status = _parse_status(final_status)
    result = ExecutionResult(success=False, stdout=stdout, stderr=stderr)
    if killed_for == "timeout":
        result.timeout, result.error = True, f"timed out after {timeout:g} s"
    elif killed_for == "output":
        result.error = f"output exceeded {MAX_OUTPUT_BYTES} bytes"
    elif ready != "ready":  # written by the child once confined, before the code runs: the code cannot forge its absence
        raise VibechatError(f"execute_code: the sandbox could not be set up on this host "
                            f"(child exit status {proc.returncode}): {stderr.strip()[-2000:]}")
    elif final_status.get("error"):
        result.error = str(final_status["error"])
        result.memory_exceeded = final_status.get("memory_exceeded") is True
    elif proc.returncode == -signal.SIGXCPU:
        result.timeout, result.error = True, "CPU time limit exceeded"
    elif proc.returncode < 0:
        result.error = f"killed by {signal.Signals(-proc.returncode).name}"
    elif proc.returncode > 0:
        result.error = f"exited with status {proc.returncode}"
    result.success = result.error is None
    return result


def _collect(proc: subprocess.Popen, status_read: int, deadline: float) -> tuple[list[str], str | None]:
    """Read stdout, stderr and the status pipe until all close; stop early on the deadline or the output cap.

    Returns the three texts and why the child must be killed: "timeout", "output" or None.
    """
    outputs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_read: bytearray()}
    killed_for = None
    with selectors.DefaultSelector() as selector:
        for fd in outputs:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = "timeout"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                outputs[key.fd] += chunk
                if len(outputs[key.fd]) > MAX_OUTPUT_BYTES:
                    del outputs[key.fd][MAX_OUTPUT_BYTES:]
                    killed_for = "output"
            if killed_for:
                break
    if killed_for is None:
        try:  # every pipe is closed but the child may still run (it can close its own stdout)
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed_for = "timeout"
    return [output.decode("utf-8", errors="replace") for output in outputs.values()], killed_for


def _parse_status(text: str) -> dict:
    """The child's last word, {"error", "memory_exceeded"}; {} if it died before writing it."""
    try:
        status = json.loads(text)
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}  # the code may scribble on its own status pipe


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@functools.cache
def _host_protections() -> tuple[int, str | None]:
    """(Landlock ABI version or 0, machine name if the seccomp filter applies or None), found once; warns if weak."""
    landlock_abi, seccomp_machine = 0, None
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        landlock_abi = max(0, libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                                           ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)))
        if platform.machine() in _MACHINES and libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) >= 0:
            seccomp_machine = platform.machine()
    if not landlock_abi:
        logger.warning("execute_code: no Landlock on this host, so sandboxed code can read and write "
                       "the files this user can; see docs/security.md")
    if not seccomp_machine:
        logger.warning("execute_code: no seccomp filter on this host, so sandboxed code can start processes "
                       "and open sockets; see docs/security.md")
    return landlock_abi, seccomp_machine


def _read_paths() -> list[str]:
    """What the child may read: the Python installation (stdlib, site-packages) and the system libraries."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted({os.path.realpath(p) for p in prefixes} | {"/usr", "/lib", "/lib64"})


# ---------------------------------------------------------------------------------------------
# The child: `python -I -u execution.py CONFIG`, cwd = its working directory holding main.py.

def _child_main(config: dict) -> None:
    status = os.fdopen(config["status_fd"], "w")
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    _confine(config)  # if this fails, the traceback goes to stderr and "ready" is never written
    status.write("ready\n")
    status.flush()
    error, memory_exceeded = None, False
    try:
        exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        if e.code not in (None, 0):
            error = f"SystemExit: {e.code}"
    except BaseException as e:
        memory_exceeded = isinstance(e, MemoryError) or getattr(e, "errno", None) == errno.ENOMEM
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # tb_next: leave out this frame
    status.write(json.dumps({"error": error, "memory_exceeded": memory_exceeded}))
    status.close()
    sys.exit(1 if error else 0)


def _confine(config: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], config["cpu_seconds"] + 1))
    if config["memory_bytes"] is not None:
        resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"], config["memory_bytes"]))
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    # best effort: it fails without CAP_SYS_ADMIN, and then the seccomp filter still blocks socket() and SysV IPC
    libc.unshare(_CLONE_NEWNET | _CLONE_NEWIPC)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if config["landlock_abi"]:
        _landlock(libc, config["landlock_abi"], config["read_paths"])
    _drop_capabilities(libc)
    if config["seccomp_machine"]:
        _seccomp(libc, config["seccomp_machine"])


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(libc: ctypes.CDLL, abi: int, read_paths: list[str]) -> None:
    """Handle every filesystem right this ABI knows, then grant reads on read_paths and all but exec/devices on cwd."""
    handled_fs = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    handled_fs |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | (_FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _LandlockRulesetAttr(handled_fs, _NET_BIND_TCP | _NET_CONNECT_TCP, _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    attr_size = 8 if abi < 4 else 16 if abi < 6 else 24  # the kernel reads only the fields this ABI has
    ruleset = _check(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(attr_size), 0),
                     "landlock_create_ruleset")
    file_rights = _FS_READ_FILE | _FS_WRITE_FILE | (handled_fs & _FS_TRUNCATE)
    workdir_rights = handled_fs & ~(_FS_EXECUTE | _FS_MAKE_CHAR | _FS_MAKE_BLOCK | _FS_IOCTL_DEV)
    rules = [(p, _FS_READ_FILE | _FS_READ_DIR) for p in read_paths]
    rules += [("/dev/null", file_rights), ("/dev/zero", _FS_READ_FILE), ("/dev/urandom", _FS_READ_FILE)]
    rules.append((".", workdir_rights))
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        rule = _LandlockPathBeneathAttr(rights, fd)
        _check(libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
               f"landlock_add_rule({path})")
        os.close(fd)
    _check(libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """Empty effective, permitted and inheritable sets: a root child keeps uid 0 but loses every privilege."""
    _check(libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)()), "capset")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The BPF program: each rule is `if nr == N: <block ending in a return>`, then allow."""
    column, audit_arch = _MACHINES[machine]
    eperm = _SECCOMP_RET_ERRNO | errno.EPERM
    arg0 = 16  # offsetof(struct seccomp_data, args[0]); the low 32 bits on little-endian
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # arch
        (_BPF_JEQ_K, 1, 0, audit_arch),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS),  # another ABI (i386 int 0x80) has other numbers
        (_BPF_LD_W_ABS, 0, 0, 0),  # syscall number
    ]
    if machine == "x86_64":
        program += [(_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_BPF_RET_K, 0, 0, eperm)]

    def rule(numbers: tuple[int | None, int | None], block: list[tuple[int, int, int, int]]) -> None:
        if numbers[column] is not None:
            program.append((_BPF_JEQ_K, 0, len(block), numbers[column]))
            program.extend(block)

    for numbers in _DENIED_SYSCALLS.values():
        rule(numbers, [(_BPF_RET_K, 0, 0, eperm)])
    for numbers in _SELF_ONLY_SYSCALLS.values():
        rule(numbers, [(_BPF_LD_W_ABS, 0, 0, arg0), (_BPF_JEQ_K, 2, 0, 0), (_BPF_JEQ_K, 1, 0, pid),
                       (_BPF_RET_K, 0, 0, eperm), (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)])
    rule(_CLONE, [(_BPF_LD_W_ABS, 0, 0, arg0), (_BPF_JSET_K, 1, 0, _CLONE_THREAD),
                  (_BPF_RET_K, 0, 0, eperm), (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)])
    rule(_CLONE3, [(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS)])  # its flags are behind a pointer
    program.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    return program


def _seccomp(libc: ctypes.CDLL, machine: str) -> None:
    program = _seccomp_program(machine, os.getpid())
    filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), filters)
    _check(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
