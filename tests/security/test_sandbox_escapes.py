"""Red team: each attack runs twice, as a plain child process of the test (what a program
can do without the sandbox: it succeeds) and sandboxed (it is refused, and the program
sees an error it can catch). Attacks that would harm the machine if they worked (a
reboot, renicing every process) run sandboxed only; their plain outcome is the kernel's
argument check, said beside them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from security.harness import plain, run

REFUSED = {"PermissionError", "OSError"}  # EACCES / EPERM / EXDEV, as Python raises them

# -- files ----------------------------------------------------------------------------------

READ = """
import os
def main(path):
    if os.path.isdir(path):
        return sorted(os.listdir(path))[:3]
    with open(path, "rb") as f:
        return len(f.read())
"""


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A key in a directory no sandbox was given: another agent's home, ~/.ssh, a state dir."""
    path = tmp_path / "elsewhere" / ".ssh" / "id_ed25519"
    path.parent.mkdir(parents=True)
    path.write_text("TOPSECRET key material")
    return path


@pytest.mark.parametrize("target", [
    "secret file", "its parent's environ", "its parent's cmdline", "init's cmdline",
    "every process", "home dir", "/etc/passwd"])
def test_reading_outside_the_runtime_and_its_code_is_refused(target, secret):
    path = {"secret file": str(secret),
            "its parent's environ": f"/proc/{os.getpid()}/environ",
            "its parent's cmdline": f"/proc/{os.getpid()}/cmdline",
            "init's cmdline": "/proc/1/cmdline",
            "every process": "/proc",
            "home dir": str(Path.home()),
            "/etc/passwd": "/etc/passwd"}[target]
    assert plain(READ, {"path": path}).ok
    got = run(READ, {"path": path})
    assert got.error == "PermissionError", (got.result, got.message)


MUTATE = """
import os
def main(op, path):
    if op == "write":
        with open(path, "w") as f:
            f.write("pwned")
    elif op == "create":
        with open(path + ".new", "x") as f:
            f.write("pwned")
    elif op == "unlink":
        os.unlink(path)
    elif op == "rename":
        os.rename(path, path + ".moved")
    elif op == "mkdir":
        os.mkdir(path + ".d")
    elif op == "chmod":
        os.chmod(path, 0o777)
    elif op == "truncate":
        os.truncate(path, 0)
    elif op == "utime":
        os.utime(path, (0, 0))
    return op
"""


@pytest.mark.parametrize("op", ["write", "create", "unlink", "rename", "mkdir", "chmod",
                                "truncate", "utime"])
def test_changing_any_file_is_refused(op, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("original")
    before = victim.stat()
    got = run(MUTATE, {"op": op, "path": str(victim)})
    assert got.error in REFUSED, (got.result, got.message)
    assert victim.read_text() == "original" and victim.stat().st_mode == before.st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert plain(MUTATE, {"op": op, "path": str(victim)}).ok


def test_its_own_code_and_cwd_are_not_writable(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("X = 1\n")
    got = run("""
        import helper, os
        def main(code):
            out = {"imported": helper.X}
            for path in (os.path.join(code, "helper.py"), os.path.join(code, "evil.py"),
                         "in_cwd.txt"):
                try:
                    open(path, "a").close()
                    out[path] = "written"
                except PermissionError:
                    out[path] = "refused"
            return out
    """, {"code": str(code)}, import_paths=[str(code)])
    assert got.ok, got.message
    assert got.result["imported"] == 1
    assert [v for k, v in got.result.items() if k != "imported"] == ["refused"] * 3


LINKS = """
import os
def main(secret, how):
    if how == "symlink":
        os.symlink(secret, "link")
    elif how == "hardlink":
        os.link(secret, "link")
    elif how == "dotdot":
        return open(os.path.relpath(secret)).read()
    elif how == "proc-root":
        return open("/proc/self/root" + secret).read()
    with open("link") as f:
        return f.read()
"""


@pytest.mark.parametrize("how", ["symlink", "hardlink", "dotdot", "proc-root"])
def test_links_and_paths_from_the_scratch_dir_reach_nothing_outside(how, secret, tmp_path):
    cwd = tmp_path / "plain-cwd"
    cwd.mkdir()
    assert plain(LINKS, {"secret": str(secret), "how": how}, cwd=cwd).result == \
        "TOPSECRET key material"
    got = run(LINKS, {"secret": str(secret), "how": how}, scratch=True)
    assert got.error in REFUSED, (got.result, got.message)
    if got.error == "OSError":  # a hard link across directories: Landlock's REFER denial
        assert "cross-device" in got.message


def test_the_scratch_dir_is_writable_when_given_and_nothing_else_is(tmp_path):
    got = run("""
        import os, tempfile
        def main(outside):
            with open("work.txt", "w") as f:
                f.write("mine")
            with tempfile.NamedTemporaryFile(dir=None) as t:
                t.write(b"tmp")
            os.symlink("work.txt", "alias")
            try:
                open(outside, "w")
            except PermissionError:
                return [open("alias").read(), "outside refused"]
    """, {"outside": str(tmp_path / "x.txt")}, scratch=True)
    assert got.result == ["mine", "outside refused"], got.message


# -- network --------------------------------------------------------------------------------

CONNECT = """
import socket
def main(family, address):
    if family == "tcp":
        socket.create_connection(tuple(address), timeout=5).close()
    elif family == "udp":
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", tuple(address))
    elif family == "unix":
        socket.socket(socket.AF_UNIX).connect(address)
    elif family == "abstract":
        socket.socket(socket.AF_UNIX).connect("\\0" + address)
    return "reached"
"""


@pytest.fixture
def servers(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "kernel.sock"))
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0llmos-test-{os.getpid()}")
    abstract.listen()
    yield {"tcp": tcp.getsockname(), "udp": udp.getsockname(),
           "unix": str(tmp_path / "kernel.sock"), "abstract": f"llmos-test-{os.getpid()}"}
    for s in (tcp, udp, unix, abstract):
        s.close()


@pytest.mark.parametrize("family", ["tcp", "udp", "unix", "abstract"])
def test_no_socket_reaches_a_local_server(family, servers):
    args = {"family": family, "address": servers[family]}
    assert plain(CONNECT, args).result == "reached"
    got = run(CONNECT, args)
    assert got.error == "PermissionError", (got.result, got.message)


def test_only_socketpair_streams_exist_and_the_channel_cannot_be_redirected():
    got = run("""
        import socket, sys
        def attempt(fn):
            try:
                fn()
                return "allowed"
            except PermissionError:
                return "refused"
        def main():
            channel = socket.socket(fileno=int(sys.argv[1]))
            try:
                return {
                    "socketpair stream": attempt(lambda: socket.socketpair()),
                    "socketpair datagram": attempt(
                        lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),
                    "netlink": attempt(lambda: socket.socket(socket.AF_NETLINK,
                                                             socket.SOCK_RAW)),
                    "reconnect the channel": attempt(lambda: channel.connect("/tmp/x")),
                    "listen on the channel": attempt(lambda: channel.listen()),
                }
            finally:
                channel.detach()
    """)
    assert got.result == {"socketpair stream": "allowed", "socketpair datagram": "refused",
                          "netlink": "refused", "reconnect the channel": "refused",
                          "listen on the channel": "refused"}, got.message


# -- processes ------------------------------------------------------------------------------

SPAWN = """
import multiprocessing, os, subprocess
def main(how):
    if how == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    elif how == "subprocess":
        subprocess.run(["/bin/true"], check=True)
    elif how == "posix_spawn":
        os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
    elif how == "multiprocessing":
        p = multiprocessing.get_context("fork").Process(target=int)
        p.start()
        p.join()
    return how
"""


@pytest.mark.parametrize("how", ["fork", "subprocess", "posix_spawn", "multiprocessing"])
def test_no_new_process_can_be_started(how):
    assert plain(SPAWN, {"how": how}).ok
    got = run(SPAWN, {"how": how})
    assert got.error == "PermissionError", (got.result, got.message)


def test_exec_is_refused():  # plain: the process becomes /bin/sh (not run here)
    got = run("""
        import os
        def main():
            os.execv("/bin/sh", ["sh", "-c", "echo escaped"])
    """)
    assert got.error == "PermissionError", got.message


VICTIM = """
import ctypes, sys, time
secret = ctypes.create_string_buffer(b"TOPSECRET in memory")
print(ctypes.addressof(secret), flush=True)
time.sleep(120)
"""


@pytest.fixture
def victim():
    """Another process of the same user (the kernel, another host), holding a secret."""
    proc = subprocess.Popen([sys.executable, "-c", VICTIM], stdout=subprocess.PIPE, text=True)
    address = int(proc.stdout.readline())
    yield proc, address
    proc.kill()
    proc.wait()


KILL = """
import os
def main(pid, sig):
    os.kill(pid, sig)
    return "delivered"
"""


def test_signals_to_other_processes_are_refused(victim):
    proc, _ = victim
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append("USR1"))
    try:
        got = run(KILL, {"pid": os.getpid(), "sig": signal.SIGUSR1})  # at its host
        assert got.error == "PermissionError" and received == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
    for pid in (proc.pid, os.getpid(), -1):  # another process, its host, everyone
        got = run(KILL, {"pid": pid, "sig": 0})
        assert got.error == "PermissionError", (pid, got.message)
    got = run(KILL, {"pid": proc.pid, "sig": signal.SIGKILL})
    assert got.error == "PermissionError"
    time.sleep(0.2)
    assert proc.poll() is None  # still alive
    assert plain(KILL, {"pid": proc.pid, "sig": signal.SIGKILL}).ok
    assert proc.wait(10) == -signal.SIGKILL


def test_a_program_may_signal_itself():
    got = run("""
        import os, signal
        def main():
            seen = []
            signal.signal(signal.SIGUSR1, lambda *_: seen.append("USR1"))
            os.kill(os.getpid(), signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            return seen
    """)
    assert got.result == ["USR1", "USR1"], got.message


PTRACE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def main(pid):
    if libc.ptrace(0x4206, pid, 0, 0) != 0:  # PTRACE_SEIZE: attach without stopping it
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return "attached"
"""

PEEK = """
import ctypes, os
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
libc = ctypes.CDLL(None, use_errno=True)
def main(pid, address):
    buf = ctypes.create_string_buffer(19)
    local, remote = IOVec(ctypes.addressof(buf), 19), IOVec(address, 19)
    if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return buf.raw.decode()
"""


def test_ptrace_is_refused(victim):
    proc, _ = victim
    got = run(PTRACE, {"pid": proc.pid})
    assert got.error == "PermissionError", got.message
    assert plain(PTRACE, {"pid": proc.pid}).result == "attached"  # detached as it exits


def test_reading_another_process_memory_is_refused(victim):
    proc, address = victim
    args = {"pid": proc.pid, "address": address}
    assert plain(PEEK, args).result == "TOPSECRET in memory"
    got = run(PEEK, args)
    assert got.error == "PermissionError", got.message
    got = run(READ, {"path": f"/proc/{proc.pid}/mem"})
    assert got.error == "PermissionError"


def test_kernel_facilities_answer_eperm():
    """Each is called with arguments that would do no harm were it allowed: without the
    sandbox they get as far as the kernel's own checks (EFAULT, EBADF, EINVAL, ESRCH) or do
    nothing; in it, the filter refuses each before the kernel looks at its arguments."""
    pyseccomp = pytest.importorskip("pyseccomp")
    nr = {name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in (
        "ptrace", "unshare", "setns", "mount", "bpf", "perf_event_open", "io_uring_setup",
        "keyctl", "userfaultfd", "pidfd_open", "kcmp", "execve", "chroot", "init_module",
        "reboot", "chmod", "fchmodat2", "chown", "setxattr", "setrlimit", "prlimit64",
        "setpriority", "sched_setaffinity", "ioctl", "tkill", "clone3")}
    nr["setxattrat"] = 463
    got = run("""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        def main(nr, ppid):
            args = {"ptrace": (2, ppid, 0, 0), "unshare": (0x10000000,), "setns": (-1, 0),
                    "pidfd_open": (ppid, 0), "kcmp": (ppid, os.getpid(), 0, 0, 0),
                    "prlimit64": (0, 9, 1, 0), "setpriority": (0, ppid, 0),
                    "sched_setaffinity": (1, 0, 0), "ioctl": (0, 0x5412, 0),
                    "tkill": (ppid, 0), "perf_event_open": (0, 0, -1, -1, 0)}
            out = {}
            for name, number in nr.items():
                ctypes.set_errno(0)
                ret = libc.syscall(number, *args.get(name, (0, 0, 0, 0, 0)))
                out[name] = "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]
            return out
    """, {"nr": nr, "ppid": os.getpid()})
    assert got.ok, got.message
    expected = {name: "EPERM" for name in nr} | {"clone3": "ENOSYS"}  # libc falls back to clone
    assert got.result == expected


# -- what it inherits -----------------------------------------------------------------------

ENVIRONMENT = """
import os, sys
def main():
    return {"env": dict(os.environ), "isolated": sys.flags.isolated}
"""


def test_the_environment_is_clean(monkeypatch):
    monkeypatch.setenv("LLMOS_TEST_SECRET", "hunter2")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert plain(ENVIRONMENT).result["env"]["LLMOS_TEST_SECRET"] == "hunter2"
    got = run(ENVIRONMENT)
    assert got.ok, got.message
    env = got.result["env"]
    assert set(env) <= {"LC_ALL", "HOME", "TMPDIR", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                        "MKL_NUM_THREADS"}, env
    assert "hunter2" not in str(env) and not any(k.startswith("RAY_") for k in env)
    assert got.result["isolated"] == 1


RAISE_LIMIT = """
import resource
def main():
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return "raised"
"""


def test_its_limits_cannot_be_raised():
    assert plain(RAISE_LIMIT).ok  # root may raise its own hard limits
    got = run(RAISE_LIMIT)
    assert got.error == "ValueError" and "not allowed" in got.message
