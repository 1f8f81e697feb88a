"""A fork server for sandboxed children: one clean interpreter per host, its runtime
imported once, that forks each child from itself.

Why: a sandboxed child launched as a fresh interpreter (``actors.sandbox.launch``)
imports the runtime and the syscall layer before it can run anything, a quarter of a
second of CPU each, so a host could start only a few a second. A fork of an interpreter
that has imported them costs milliseconds. ``multiprocessing``'s forkserver is the model
but does not fit: its server starts with the host's environment (which every fork's
``/proc/<pid>/environ`` would show), runs a pickled target, and reaps for no one.

What this guarantees:

- the zygote starts exactly as a launched child does (``launch``: a clean environment,
  ``python -I -B``, no descriptor but its control socket, /dev/null and a stderr pipe),
  imports the same modules with Ray made bare, and never runs program code, so it holds
  nothing a child could not find in itself. It stays single-threaded: a fork copies only
  the forking thread, and a child must confine itself alone (``sandbox_policy.apply``).
- each fork gets from the host, over the control socket (SCM_RIGHTS), its end of the
  channel and the write end of its stderr pipe, and a fresh directory; the child closes
  the control socket, starts a session of its own, moves into the directory (its HOME and
  TMPDIR), dies with the zygote (PR_SET_PDEATHSIG), and goes on as a launched child does
  after its imports (``sandbox_child.run``: read Start, confine, run).
- the zygote reaps its children and tells the host each one's exit status and CPU time;
  it dies with its host, and its children with it. A zygote that dies is reported by the
  host as the SIGKILL of each child it had not yet reported.

Frames on the control socket (SOCK_SEQPACKET: one msgpack array a message): the host sends
``["fork", dir]`` with the two descriptors; the zygote answers ``["ready"]`` once (its
imports done), ``["forked", pid]`` to each fork, and ``["exit", pid, status, cpu_s]``
(``status`` as ``os.waitstatus_to_exitcode`` gives it) as its children end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from actors.sandbox import PRELOAD, Spare, launch

PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 1 << 16
FORK_TIMEOUT_S = 10.0  # for the zygote's answer to a fork request

log = logging.getLogger("llmos.sandbox")


class ForkedProcess:
    """A child the zygote forked, as ``actors.sandbox`` sees it (the part of
    ``subprocess.Popen`` it uses): its pid, stderr, and how it ended, once the zygote
    has reaped it and said so."""

    def __init__(self, pid: int, stderr: Any):
        self.pid, self.stderr = pid, stderr
        self.returncode: int | None = None
        self.cpu_s: float | None = None
        self._waiters: list[Callable[[], None]] = []

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> None:
        """Nothing to wait for here: the zygote reaps it."""

    def when_reaped(self, then: Callable[[], None]) -> None:
        if self.returncode is not None:
            then()
        else:
            self._waiters.append(then)

    def reaped(self, returncode: int, cpu_s: float | None) -> None:
        self.returncode, self.cpu_s = returncode, cpu_s
        waiters, self._waiters = self._waiters, []
        for then in waiters:
            then()


class Zygote:
    """The host's side of one zygote: started from the host's event-loop thread (the
    zygote dies with the thread that forked it), ready once its imports are done."""

    def __init__(self, preload: Sequence[str] = PRELOAD):
        spare = launch(preload, module="actors.sandbox_zygote", kind=socket.SOCK_SEQPACKET)
        self.process, self.ctl = spare.process, spare.sock
        self.ctl.setblocking(False)
        shutil.rmtree(spare.dir, ignore_errors=True)  # (it never writes there)
        self.ready = False
        self._settled = asyncio.Event()  # ready, or gone
        self.children: dict[int, ForkedProcess] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.ctl.fileno(), self._on_messages)
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    async def started(self, timeout: float) -> bool:
        """Whether it is ready to fork within ``timeout`` s (False: gone, or still not)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)
        return self.ready and self.alive

    def fork(self) -> Spare:
        """A new child, forked now: its channel, its stderr and its directory."""
        where = tempfile.mkdtemp(prefix="llmos-sandbox-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        try:
            socket.send_fds(self.ctl, [msgspec.msgpack.encode(["fork", where])],
                            [theirs.fileno(), err_w])
            pid = self._forked()
        except BaseException:
            ours.close()
            os.close(err_r)
            shutil.rmtree(where, ignore_errors=True)
            raise
        finally:
            theirs.close()
            os.close(err_w)
        child = self.children[pid] = ForkedProcess(pid, os.fdopen(err_r, "rb", buffering=0))
        return Spare(child, ours, where)

    def _forked(self) -> int:
        """Wait for the answer to a fork request (reports of exits may come first)."""
        self.ctl.settimeout(FORK_TIMEOUT_S)
        try:
            while True:
                data = self.ctl.recv(MAX_MESSAGE)
                if not data:
                    self._lost()
                    raise OSError("the sandbox zygote exited")
                msg = msgspec.msgpack.decode(data)
                if msg[0] == "forked":
                    return msg[1]
                if msg[0] == "failed":
                    raise OSError(f"the sandbox zygote refused a fork: {msg[1]}")
                self._handle(msg)
        except TimeoutError:
            self.close()
            raise OSError("the sandbox zygote did not fork within "
                          f"{FORK_TIMEOUT_S:.0f} s") from None
        finally:
            if not self._closed:
                self.ctl.setblocking(False)

    def _on_messages(self) -> None:
        while not self._closed:
            try:
                data = self.ctl.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._handle(msgspec.msgpack.decode(data))

    def _handle(self, msg: list) -> None:
        match msg:
            case ["ready"]:
                self.ready = True
                self._settled.set()
            case ["exit", int(pid), int(code), cpu_s]:
                child = self.children.pop(pid, None)
                if child is not None:
                    child.reaped(code, float(cpu_s))
            case _:
                log.error("the sandbox zygote sent %r", msg)

    def _lost(self) -> None:
        """The zygote is gone, and its children with it (each dies with it): each not yet
        reported ends as killed."""
        if not self._closed:
            log.warning("the sandbox zygote (pid %s) exited", self.process.pid)
        self.close()

    def close(self) -> None:
        """Stop the zygote (its children die with it) and report them killed."""
        if self._closed:
            return
        self._closed = True
        self._settled.set()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.ctl.fileno())
        self.ctl.close()
        self.process.kill()
        self.process.wait()
        self.process.stderr.close()
        children, self.children = self.children, {}
        for child in children.values():
            child.reaped(-signal.SIGKILL, None)


def main(argv: list[str]) -> None:
    """``python -m actors.sandbox_zygote FD MODULE...``: serve forks on control socket FD."""
    from actors import sandbox_child

    ctl = socket.socket(fileno=int(argv[1]))
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the host
    sandbox_child._without_ray()
    for name in argv[2:]:
        importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    encode = msgspec.msgpack.encode
    ctl.send(encode(["ready"]))
    while True:
        readable, _, _ = select.select([ctl, wake_r], [], [])
        if wake_r in readable:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        _reap(ctl)
        if ctl not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(ctl, MAX_MESSAGE, 2)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)  # the host closed its end: it is gone
        try:
            kind, where = msgspec.msgpack.decode(data)
            if kind != "fork" or len(fds) != 2 or not isinstance(where, str):
                raise ValueError(f"not a fork request: {kind!r} with {len(fds)} descriptors")
        except (ValueError, TypeError, msgspec.DecodeError) as e:
            for fd in fds:
                os.close(fd)
            ctl.send(encode(["failed", str(e)]))
            continue
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(ctl, (wake_r, wake_w), fds, where)  # never returns
        for fd in fds:
            os.close(fd)
        ctl.send(encode(["forked", pid]))


def _reap(ctl: socket.socket) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        ctl.send(msgspec.msgpack.encode(["exit", pid, os.waitstatus_to_exitcode(status),
                                         usage.ru_utime + usage.ru_stime]))


def _child(ctl: socket.socket, wake: tuple[int, int], fds: list[int], where: str) -> None:
    """In the fork: shed the zygote's descriptors and handlers, then run as a child."""
    status = 1
    try:
        zygote = os.getppid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctl.close()
        for fd in wake:
            os.close(fd)
        channel, stderr = fds
        os.dup2(stderr, 2)
        os.close(stderr)
        os.setsid()
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != zygote:  # the zygote died before the line above: so do we
            os._exit(1)
        os.chdir(where)
        os.environ["HOME"] = os.environ["TMPDIR"] = where
        sys.argv[1] = str(channel)  # as a launched child's argv names its channel
        from actors import sandbox_child

        sandbox_child.run(socket.socket(fileno=channel))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            sys.stderr.write(f"{e.code}\n")
    except BaseException as e:  # noqa: BLE001 - a fork must never return into the zygote
        sys.stderr.write(f"llmos sandbox: {type(e).__name__}: {e}\n")
    finally:
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    main(sys.argv)
