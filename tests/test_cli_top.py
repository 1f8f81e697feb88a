"""``llmos top`` on the session's kernel: as a script (``--once --json``) and live in a
real pseudo-terminal, where it must show a process spawned a moment before and quit on q."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid

import ray

from syscalls import proc


def _top(kernel, *args: str, **kwargs):
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "COLUMNS": "160", "LINES": "40", "TERM": "xterm-256color"}
    return [sys.executable, "-m", "llmos_kernel.cli", "top", "--kernel", kernel.name,
            "--state-dir", str(kernel.state_dir), *args], env


def test_top_once_json_lists_a_process_just_spawned(kernel):
    name = f"top-{uuid.uuid4().hex[:6]}"
    pid = kernel.run(proc.spawn("workers:idle", name=name))
    try:
        command, env = _top(kernel, "--once", "--json")
        snap = json.loads(subprocess.run(command, env=env, capture_output=True, text=True,
                                         check=True, timeout=120).stdout)
        mine = {p["pid"]: p for p in snap["processes"]}[pid]
        assert mine["name"] == name and mine["status"] == "running" and "mailbox" in mine
        assert snap["status"]["memory"]["num_blocks"] == kernel.call("status")["memory"][
            "num_blocks"]
    finally:
        kernel.run(proc.kill(pid))


def test_top_live_in_a_terminal_shows_a_new_process_and_quits_on_q(kernel):
    command, env = _top(kernel, "--interval", "0.3")
    leader, follower = pty.openpty()
    top = subprocess.Popen(command, env=env, stdin=follower, stdout=follower, stderr=follower,
                           close_fds=True)
    os.close(follower)
    screen = b""

    def read_until(needle: bytes, timeout: float) -> bool:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(leader, 65536)
                except OSError:
                    return needle in screen
            if needle in screen:
                return True
        return False

    name = f"live-{uuid.uuid4().hex[:6]}"
    pid = None
    try:
        assert read_until(b"llmos top", 120), screen[-2000:]
        pid = kernel.run(proc.spawn("workers:idle", name=name))
        assert read_until(name.encode(), 30), screen[-3000:]  # refreshed in place
        os.write(leader, b"t")  # sort by tokens: still running
        assert read_until(b"(now: tokens_used)", 10), screen[-2000:]
        os.write(leader, b"q")
        assert top.wait(30) == 0
    finally:
        if top.poll() is None:
            top.kill()
        os.close(leader)
        if pid is not None:
            kernel.run(proc.kill(pid))
