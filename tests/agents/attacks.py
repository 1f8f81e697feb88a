"""Attacks a hostile program tries from inside an agent process, for the red-team suite on
a real kernel (tests/test_red_team.py). Each returns ``{"escaped": True, ...}`` when the
escape worked, ``{"escaped": False, "error": TYPE}`` when the OS refused it; some end the
process instead (the test reads its exit record).

The ones marked harmless may also run unsandboxed, to document what ``sandbox=False``
leaves open: they read, probe with signal 0 or connect, and change nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess


def _refused(e: BaseException) -> dict:
    return {"escaped": False, "error": type(e).__name__}


def read_root_token(state_dir: str) -> dict:  # harmless
    try:
        with open(os.path.join(state_dir, "root.token")) as f:
            return {"escaped": True, "bytes": len(f.read())}
    except OSError as e:
        return _refused(e)


def read_kernel_environ(kernel_pid: int) -> dict:  # harmless
    try:
        with open(f"/proc/{kernel_pid}/environ", "rb") as f:
            return {"escaped": True, "bytes": len(f.read())}
    except OSError as e:
        return _refused(e)


def list_command_lines() -> dict:  # harmless
    """Other processes' command lines (where secrets passed as arguments would show)."""
    seen = 0
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        seen += bool(f.read())
                except OSError:
                    pass
    except OSError as e:
        return _refused(e)
    return {"escaped": seen > 0, "seen": seen} if seen else {"escaped": False,
                                                               "error": "nothing readable"}


def write_state_dir(state_dir: str) -> dict:
    path = os.path.join(state_dir, f"planted-{os.getpid()}.txt")
    try:
        with open(path, "w") as f:
            f.write("planted")
    except OSError as e:
        return _refused(e)
    os.unlink(path)
    return {"escaped": True}


def reach_ray(kernel_name: str) -> dict:  # harmless: asks for a handle, calls nothing
    try:
        import ray

        if not ray.is_initialized():
            ray.init(address="auto", namespace="llmos", logging_level="ERROR")
        ray.get_actor(kernel_name, namespace="llmos")
    except (ImportError, AttributeError, ValueError, ConnectionError, OSError) as e:
        return _refused(e)
    return {"escaped": True}


def open_socket(port: int) -> dict:  # harmless: connects and closes
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    except OSError as e:
        return _refused(e)
    return {"escaped": True}


def run_subprocess() -> dict:  # harmless: /bin/true
    try:
        subprocess.run(["/bin/true"], check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return _refused(e)
    return {"escaped": True}


def signal_kernel(kernel_pid: int) -> dict:  # harmless: signal 0 only asks "may I?"
    try:
        os.kill(kernel_pid, 0)
    except OSError as e:
        return _refused(e)
    return {"escaped": True}


def stop_host() -> dict:
    """SIGSTOP the process that runs this one (its host, when sandboxed)."""
    try:
        os.kill(os.getppid(), signal.SIGSTOP)
    except OSError as e:
        return _refused(e)
    os.kill(os.getppid(), signal.SIGCONT)
    return {"escaped": True}


def ptrace_kernel(kernel_pid: int) -> dict:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PTRACE_SEIZE = 0x4206
    if libc.ptrace(PTRACE_SEIZE, kernel_pid, 0, 0) == 0:
        libc.ptrace(17, kernel_pid, 0, 0)  # PTRACE_DETACH
        return {"escaped": True}
    return {"escaped": False, "error": os.strerror(ctypes.get_errno())}


def fork_bomb() -> dict:
    children = 0
    try:
        for _ in range(10_000):
            if os.fork() == 0:
                os._exit(0)
            children += 1
    except OSError as e:
        return {**_refused(e), "children": children}
    return {"escaped": True, "children": children}


def memory_bomb() -> dict:
    hoard = []
    while True:
        hoard.append(bytearray(64 << 20))


def symlink_out_of_scratch(state_dir: str) -> dict:
    """Point a link in the writable scratch dir at the root token and read through it."""
    try:
        os.symlink(os.path.join(state_dir, "root.token"), "token-link")
    except OSError as e:
        return _refused(e)
    try:
        with open("token-link") as f:
            return {"escaped": True, "bytes": len(f.read())}
    except OSError as e:
        return _refused(e)


def forge_frames() -> dict:
    """Write garbage down every socket this process holds (its channel to the host)."""
    sent = 0
    for fd in range(3, 64):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.write(fd, b"\xff\x00\x00\x10forged op, not a frame" * 64)
                sent += 1
        except OSError:
            pass
    return {"escaped": False, "wrote_to": sent}  # the host decides what that did
