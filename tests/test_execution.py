"""execute_code runs ordinary programs, and contains hostile ones: each escape test asserts the harm did not happen."""

import os
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from vibechat.common import VibechatError
from vibechat.execution import MAX_OUTPUT_BYTES, execute_code
import vibechat.execution

SECRET = "vibechat-sentinel-" + uuid.uuid4().hex

# Where the seccomp filter is missing, these programs would really fork-bomb or kill the host's processes.
harmful_without_seccomp = pytest.mark.skipif(
    vibechat.execution._host_protections()[1] is None, reason="no seccomp filter on this host: the program would do real harm")


def run(code: str, timeout: float = 10.0, **kwargs):
    return execute_code(textwrap.dedent(code), timeout=timeout, **kwargs)


def run_hostile(code: str, **kwargs):
    """Run a hostile program; it must have got as far as its attack (no typo in the test itself)."""
    result = run(code, **kwargs)
    assert not (result.error or "").startswith(("SyntaxError", "NameError", "ImportError", "ModuleNotFoundError")), result.stderr
    return result


@pytest.fixture
def outside(tmp_path):
    """A world-writable directory of the parent's, holding a world-writable sentinel file: only the sandbox protects it."""
    tmp_path.chmod(0o777)
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text(SECRET)
    sentinel.chmod(0o666)
    return tmp_path


@pytest.fixture
def victim():
    """Another process of the parent's user, with the secret in its environment."""
    proc = subprocess.Popen(["sleep", "60"], env={"AWS_SECRET_ACCESS_KEY": SECRET}, start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def alive_and_running(proc: subprocess.Popen) -> bool:
    with open(f"/proc/{proc.pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return proc.poll() is None and state not in ("T", "t")


def intact(sentinel) -> bool:
    return sentinel.exists() and sentinel.read_text() == SECRET


# ---------------------------------------------------------------------------------------------
# ordinary programs

def test_stdout_and_stderr_are_captured():
    result = run("import sys; print('hello'); print('warn', file=sys.stderr)")
    assert result.success and result.error is None
    assert result.stdout == "hello\n" and result.stderr == "warn\n"


def test_exception_fails_with_its_message_and_traceback():
    result = run("x = 1\nx / 0")
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert result.error == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 2' in result.stderr


def test_syntax_error_fails():
    result = run("def f(:\n")
    assert not result.success and result.error.startswith("SyntaxError")


def test_sys_exit_zero_succeeds_and_nonzero_fails():
    assert run("import sys; sys.exit(0)").success
    result = run("import sys; sys.exit(3)")
    assert not result.success and result.error == "SystemExit: 3"


def test_infinite_loop_times_out():
    result = run("while True: pass", timeout=1)
    assert result.timeout and not result.success and "timed out" in result.error


def test_program_that_closes_its_output_still_times_out():
    result = run("import os, time\nos.close(1); os.close(2)\nwhile True: time.sleep(0.01)", timeout=1)
    assert result.timeout


def test_allocation_past_the_limit_sets_memory_exceeded():
    result = run("x = bytearray(512 * 1024 * 1024)", maximum_memory_bytes=256 * 1024 * 1024)
    assert result.memory_exceeded and not result.success and result.error.startswith("MemoryError")


def test_no_memory_limit_allows_a_large_allocation():
    assert run("x = bytearray(400 * 1024 * 1024); print(len(x))", maximum_memory_bytes=None).stdout == f"{400 * 1024 * 1024}\n"


def test_stdin_is_closed():
    result = run("input()")
    assert result.error.startswith("EOFError")


def test_stdlib_numpy_and_threads_work():
    result = run("""
        import json, math, threading, numpy as np
        t = threading.Thread(target=lambda: print(json.dumps([math.factorial(5), int(np.arange(4).sum())])))
        t.start(); t.join()
    """)
    assert result.success, result.stderr
    assert result.stdout == "[120, 6]\n"


def test_output_is_decoded_as_utf8():
    assert run("print('héllo ✓')").stdout == "héllo ✓\n"


def test_working_directory_is_private_writable_and_deleted_afterwards():
    first = run("import os; open('left.txt', 'w').write('x'); print(os.getcwd())")
    assert first.success, first.stderr
    assert not os.path.exists(first.stdout.strip())
    second = run("import os; print(sorted(os.listdir('.')))")
    assert second.stdout == "['main.py']\n"


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1}, {"maximum_memory_bytes": 0}, {"maximum_memory_bytes": 1.5}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(VibechatError, match="execute_code"):
        execute_code("print(1)", **kwargs)


def test_a_sandbox_that_cannot_be_set_up_raises(monkeypatch):
    landlock_abi, machine = vibechat.execution._host_protections()
    wrong_machine = "aarch64" if machine == "x86_64" else "x86_64"  # a filter for another ABI kills the child at once
    monkeypatch.setattr(vibechat.execution, "_host_protections", lambda: (landlock_abi, wrong_machine))
    with pytest.raises(VibechatError, match="could not be set up"):
        execute_code("print('never runs')")


def test_code_scribbling_on_inherited_descriptors_still_gets_a_failed_result():
    result = run("""
        import os
        for fd in range(3, 64):
            try: os.write(fd, b'not json')
            except OSError: pass
        raise ValueError('bad')
    """)
    assert not result.success and result.error


def test_this_host_provides_landlock_and_seccomp():
    landlock_abi, seccomp_machine = vibechat.execution._host_protections()
    assert landlock_abi >= 1 and seccomp_machine is not None


# ---------------------------------------------------------------------------------------------
# hostile programs: secrets

def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = run_hostile("import os; print(dict(os.environ))")
    assert result.success and SECRET not in result.stdout
    assert "AWS_SECRET_ACCESS_KEY" not in result.stdout and "HF_TOKEN" not in result.stdout


def test_environ_of_another_process_is_unreadable(victim):
    result = run_hostile(f"print(open('/proc/{victim.pid}/environ').read())")
    assert SECRET not in result.stdout + result.stderr


def environment_block(proc: subprocess.Popen) -> tuple[int, int]:
    """Where the process keeps its environment strings: fields 50 and 51 (env_start, env_end) of /proc/<pid>/stat."""
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields from 3 on
    return int(fields[50 - 3]), int(fields[51 - 3])


def test_the_victim_secret_is_where_the_memory_tests_look(victim):
    env_start, env_end = environment_block(victim)
    with open(f"/proc/{victim.pid}/mem", "rb") as f:  # the unconfined parent can read it
        f.seek(env_start)
        assert SECRET.encode() in f.read(env_end - env_start)


def test_memory_of_another_process_is_unreadable_through_proc(victim):
    env_start, env_end = environment_block(victim)
    result = run_hostile(f"""
        with open('/proc/{victim.pid}/mem', 'rb') as f:
            f.seek({env_start}); print(f.read({env_end - env_start}))
    """)
    assert SECRET not in result.stdout + result.stderr


def test_memory_of_another_process_is_unreadable_through_process_vm_readv(victim):
    env_start, env_end = environment_block(victim)
    result = run_hostile(f"""
        import ctypes
        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        buf = ctypes.create_string_buffer({env_end - env_start})
        local, remote = IoVec(ctypes.addressof(buf), len(buf)), IoVec({env_start}, len(buf))
        libc = ctypes.CDLL(None)
        print(libc.process_vm_readv({victim.pid}, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0), buf.raw)
    """)
    assert SECRET not in result.stdout


def test_files_outside_the_sandbox_are_unreadable(outside):
    result = run_hostile(f"print(open('{outside / 'sentinel.txt'}').read())")
    assert SECRET not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# hostile programs: the filesystem

def test_cannot_overwrite_a_file_outside(outside):
    run_hostile(f"open('{outside / 'sentinel.txt'}', 'w').write('pwned')")
    assert intact(outside / "sentinel.txt")


def test_cannot_delete_a_file_outside(outside):
    run_hostile(f"import os; os.remove('{outside / 'sentinel.txt'}')")
    assert intact(outside / "sentinel.txt")


def test_cannot_remove_a_directory_tree_outside(outside):
    run_hostile(f"import shutil; shutil.rmtree('{outside}')")
    assert intact(outside / "sentinel.txt")


def test_cannot_create_a_file_in_a_world_writable_directory_outside(outside):
    run_hostile(f"open('{outside / 'created.txt'}', 'w').write('x')")
    assert not (outside / "created.txt").exists()


def test_cannot_create_a_file_in_tmp():
    target = f"/tmp/vibechat-escape-{uuid.uuid4().hex}"
    run_hostile(f"open('{target}', 'w').write('x')")
    assert not os.path.exists(target)


def test_cannot_create_a_file_in_dev_shm():
    target = f"/dev/shm/vibechat-escape-{uuid.uuid4().hex}"
    run_hostile(f"open('{target}', 'w').write('x')")
    assert not os.path.exists(target)


def test_cannot_write_through_a_symlink_made_in_the_sandbox(outside):
    run_hostile(f"import os; os.symlink('{outside / 'sentinel.txt'}', 'link'); open('link', 'w').write('pwned')")
    assert intact(outside / "sentinel.txt")


def test_cannot_write_through_a_hardlink_made_in_the_sandbox(outside):
    run_hostile(f"import os; os.link('{outside / 'sentinel.txt'}', 'hard'); open('hard', 'w').write('pwned')")
    assert intact(outside / "sentinel.txt")


def test_cannot_move_a_file_outside_into_the_sandbox(outside):
    run_hostile(f"import os; os.rename('{outside / 'sentinel.txt'}', 'stolen.txt')")
    assert intact(outside / "sentinel.txt")


def test_cannot_truncate_a_file_outside(outside):
    run_hostile(f"import os; os.truncate('{outside / 'sentinel.txt'}', 0)")
    assert intact(outside / "sentinel.txt")


def test_cannot_chmod_or_retime_a_file_outside(outside):
    sentinel = outside / "sentinel.txt"
    before = sentinel.stat()
    run_hostile(f"import os\ntry: os.chmod('{sentinel}', 0)\nexcept OSError: pass\nos.utime('{sentinel}', (0, 0))")
    after = sentinel.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_cannot_modify_the_sandbox_own_source():
    path = vibechat.execution.__file__
    with open(path, "rb") as f:
        source = f.read()
    try:
        run_hostile(f"open('{path}', 'a').write('# pwned')")
        with open(path, "rb") as f:
            assert f.read() == source
    finally:  # on failure, leave the repository as it was
        with open(path, "rb") as f:
            if f.read() != source:
                with open(path, "wb") as f:
                    f.write(source)


def test_a_huge_file_is_stopped_at_the_size_limit():
    result = run_hostile("open('big', 'wb').write(b'x' * (64 * 1024 * 1024))", maximum_memory_bytes=None)
    assert not result.success and "File too large" in result.error


# ---------------------------------------------------------------------------------------------
# hostile programs: processes and programs

@harmful_without_seccomp
def test_fork_bomb_creates_no_process():
    result = run_hostile("""
        import os
        while True:
            os.fork()
            print('forked', flush=True)
    """)
    assert not result.success and "forked" not in result.stdout


@pytest.mark.parametrize("launch", [
    "import subprocess; subprocess.run(['touch', MARKER])",
    "import os; os.system('touch ' + MARKER)",
    "import os; os.execv('/bin/sh', ['sh', '-c', 'touch ' + MARKER])",
    "import os; os.posix_spawn('/usr/bin/touch', ['touch', MARKER], {})",
    "import ctypes; ctypes.CDLL(None).system(('touch ' + MARKER).encode())",
], ids=["subprocess", "os.system", "os.execv", "os.posix_spawn", "ctypes-libc-system"])
def test_cannot_run_another_program(outside, launch):
    marker = outside / "ran.txt"
    run_hostile(f"MARKER = '{marker}'\n{launch}")
    assert not marker.exists()


def test_cannot_kill_another_process(victim):
    run_hostile(f"import os, signal; os.kill({victim.pid}, signal.SIGKILL)")
    assert alive_and_running(victim)


@harmful_without_seccomp
def test_cannot_kill_every_process_with_minus_one(victim):
    run_hostile("import os, signal; os.kill(-1, signal.SIGKILL)")
    assert alive_and_running(victim)


def test_cannot_kill_another_process_group(victim):
    run_hostile(f"import os, signal; os.killpg(os.getpgid({victim.pid}), signal.SIGKILL)")
    assert alive_and_running(victim)


def test_cannot_ptrace_another_process(victim):
    result = run_hostile(f"import ctypes; print(ctypes.CDLL(None).ptrace(16, {victim.pid}, 0, 0))")  # PTRACE_ATTACH
    assert result.stdout.strip() == "-1"
    assert alive_and_running(victim)


def test_cannot_lower_the_limits_of_another_process(victim):
    before = open(f"/proc/{victim.pid}/limits").read()
    run_hostile(f"import resource; resource.prlimit({victim.pid}, resource.RLIMIT_NOFILE, (0, 0))")
    assert open(f"/proc/{victim.pid}/limits").read() == before


def test_cannot_renice_another_process(victim):
    before = os.getpriority(os.PRIO_PROCESS, victim.pid)
    run_hostile(f"import os; os.setpriority(os.PRIO_PROCESS, {victim.pid}, 19)")
    assert os.getpriority(os.PRIO_PROCESS, victim.pid) == before


def test_cannot_raise_its_own_hard_limits():
    result = run_hostile("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        x = bytearray(512 * 1024 * 1024)
        print('allocated')
    """)
    assert "allocated" not in result.stdout and not result.success


def test_sigterm_ignoring_program_is_killed_on_timeout():
    result = run_hostile("""
        import os, signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        while True: pass
    """, timeout=1)
    assert result.timeout
    with pytest.raises(ProcessLookupError):
        os.kill(int(result.stdout), 0)


def test_huge_stdout_is_capped():
    result = run_hostile("import sys\nwhile True: sys.stdout.write('x' * 65536)")
    assert not result.success and "output exceeded" in result.error
    assert len(result.stdout) <= MAX_OUTPUT_BYTES


def test_sysv_shared_memory_does_not_outlive_the_child():
    key = int(uuid.uuid4().int % 2**30) + 1
    run_hostile(f"import ctypes; print(ctypes.CDLL(None).shmget({key}, 1 << 20, 0o1666))")  # IPC_CREAT | 0666
    with open("/proc/sysvipc/shm") as f:
        assert all(line.split()[0] != str(key) for line in f.readlines()[1:])


# ---------------------------------------------------------------------------------------------
# hostile programs: the network

def test_no_tcp_connection_reaches_a_loopback_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        run_hostile(f"import socket; socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2).sendall(b'x')")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_no_udp_datagram_reaches_a_loopback_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        run_hostile(f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {receiver.getsockname()[1]}))")
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(1)


def test_no_connection_reaches_an_abstract_unix_socket():
    name = "\0vibechat-test-" + uuid.uuid4().hex
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(name)
        listener.listen()
        run_hostile(f"import socket; socket.socket(socket.AF_UNIX).connect({name!r})")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_no_connection_reaches_a_unix_socket_file(outside):
    path = str(outside / "daemon.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen()
        run_hostile(f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


# ---------------------------------------------------------------------------------------------
# hostile programs against the process that called execute_code (a helper, so that pytest survives a failure)

def run_under_helper_parent(code: str) -> subprocess.CompletedProcess:
    helper = f"from vibechat.execution import execute_code\nr = execute_code({code!r})\nprint('parent survived', r.stdout)"
    return subprocess.run([sys.executable, "-c", helper], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET})


def test_parent_survives_being_killed_by_the_child():
    helper = run_under_helper_parent("import os, signal; os.kill(os.getppid(), signal.SIGKILL)")
    assert helper.returncode == 0 and "parent survived" in helper.stdout


def test_parent_environ_in_proc_is_unreadable_by_the_child():
    helper = run_under_helper_parent("import os; print(open(f'/proc/{os.getppid()}/environ').read())")
    assert "parent survived" in helper.stdout and SECRET not in helper.stdout
