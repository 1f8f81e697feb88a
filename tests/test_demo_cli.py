"""``llmos demo`` as the README's first command runs it: its own Ray instance and kernel,
progress while it starts, a demo's output as it prints, and, with no terminal to ask, a
dangerous call approved by ``llmos demo`` itself (it says so), then the table of what each
demo measured. One demo (approvals) keeps it short; each demo has its own test."""

from __future__ import annotations

import os
import subprocess
import sys


def test_llmos_demo_starts_its_own_kernel_and_settles_approvals(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "llmos_kernel.cli", "demo", "approvals",
                           "--state-dir", str(tmp_path / "state")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loading 135M weights" in done.stderr  # progress, one line per phase off a tty
    assert "kernel 'demo' ready" in done.stderr
    out = done.stdout
    assert "== approvals:" in out
    assert "waiting for a person" in out.lower()  # the demo's own output, as it printed it
    assert "no terminal to ask, so approving it" in out
    assert "approved" in out.split("== what the demos measured")[1]
    assert "decision approved" in out
