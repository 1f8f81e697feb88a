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

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while members() and time.monotonic() < deadline:
            time.sleep(0.1)
