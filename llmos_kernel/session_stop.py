"""Stopping one Ray instance on a machine that may run others.

``ray stop`` stops every Ray process of the user on the machine: other jobs, test
sessions, another kernel's cluster. ``llmos kernel stop`` stops only the instance it
started, identified by its session directory, which every one of its daemons names on its
command line; the workers they started name nothing, so their descendants go too. Linux
(/proc) only, as the sandbox is. No Ray import: it acts on processes, not through Ray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def stop_session(session_dir: str, grace_s: float = 10.0) -> None:
    """Stop the processes of one Ray instance (those naming its session directory), and
    only those: ``ray stop`` would also stop every other Ray instance on the machine."""
    def members() -> set[int]:
        """Its processes, and every process they started (workers name no session)."""
        named, parent = set(), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if session_dir.encode() in f.read():
                        named.add(int(entry))
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
        found, grew = set(named), True
        while grew:
            more = {pid for pid, ppid in parent.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        return found

    def running(pid: int, started: str) -> bool:
        """Still running (not a zombie), and the same process (not a reused pid)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return fields[0] != "Z" and fields[19] == started

    def start_time(pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None

    # A signalled worker whose parent dies first is re-parented and no longer found by
    # walking from the session's daemons, so wait on every process signalled, by pid.
    signalled: dict[int, str] = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            started = signalled.get(pid) or start_time(pid)
            if started is None:
                continue
            signalled[pid] = started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (
                members() or any(running(p, s) for p, s in signalled.items())):
            time.sleep(0.05)
        if sig == signal.SIGTERM:
            for pid, started in signalled.items():
                if running(pid, started):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
