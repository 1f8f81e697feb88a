"""``llmos kernel stop`` stops the Ray instance it started and no other: the processes that
name its session directory, and every process they started, while a process of another
session keeps running (``ray stop`` would stop them all)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from llmos_kernel.session_stop import stop_session

# a stand-in for a raylet: names its session on its command line and starts a worker
# (whose command line names nothing), then waits
MEMBER = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
          "print('up', flush=True); time.sleep(120)")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_only_the_named_session_and_its_descendants_stop(tmp_path):
    ours, other = tmp_path / "session_ours", tmp_path / "session_other"
    started = []
    for session in (ours, other):
        p = subprocess.Popen([sys.executable, "-c", MEMBER, f"--session-dir={session}"],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "up"
        started.append(p)
    member, bystander = started
    deadline = time.monotonic() + 10
    while not (_children(member.pid) and _children(bystander.pid)):
        assert time.monotonic() < deadline, "the stand-ins did not start their workers"
        time.sleep(0.05)
    worker, bystanders_worker = _children(member.pid)[0], _children(bystander.pid)[0]
    try:
        began = time.monotonic()
        stop_session(str(ours), grace_s=5.0)
        assert time.monotonic() - began < 5.0  # they went on SIGTERM
        member.wait(5)
        assert not _alive(worker), "a process the session started was left running"
        assert bystander.poll() is None, "a process of another session was stopped"
        assert _alive(bystanders_worker)
    finally:
        for p in started:
            p.kill()
            p.wait()
        for pid in (worker, bystanders_worker):
            if _alive(pid):
                os.kill(pid, 9)
