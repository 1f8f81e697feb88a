"""demos/approvals.py on the real model: the agent's dangerous call waits in the kernel's
approval queue; a person's ``llmos approve`` / ``llmos deny`` (the real CLI, in a subprocess,
as from another shell) decides, and the file is deleted only when approved."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray

from syscalls import proc

WANTED = "old-draft.md"  # what "Delete the old draft of the report." means in the demo's home


def _held_call(kernel, pid: int, timeout: float = 300.0) -> dict:
    """The approval request the demo process ``pid`` is waiting on, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in kernel.call("approvals"):
            if request["pid"] == pid:
                return request
        row = next(p for p in kernel.call("ps") if p["pid"] == pid)
        assert row["status"] != "exited", f"the demo ended without asking: {row['exit']}"
        time.sleep(0.2)
    raise AssertionError(f"process {pid} never asked for approval")


def _llmos(kernel, *args: str) -> str:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "llmos_kernel.cli", *args,
                           "--kernel", kernel.name, "--state-dir", str(kernel.state_dir)],
                          check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("verb, decision", [("approve", "approved"), ("deny", "denied")])
def test_the_dangerous_call_waits_for_a_person(kernel, verb, decision):
    pid = kernel.run(proc.spawn("demos.approvals:main", {},
                                sandbox=True, scratch=True, name=f"demo-approvals-{verb}"))
    request = _held_call(kernel, pid)
    assert (request["tool"], request["args"]) == ("delete_file", {"path": WANTED})
    time.sleep(1.0)
    assert pid in {p["pid"] for p in kernel.call("ps", False)}, "it waits for the decision"
    listed = _llmos(kernel, "approvals")
    assert request["id"] in listed and WANTED in listed
    assert _llmos(kernel, verb, request["id"]).strip() == f"{request['id']} {decision}"

    exit_ = kernel.run(proc.wait(pid, timeout=120), timeout=180)
    assert exit_["reason"] == "normal", exit_
    result = exit_["result"]
    print(f"approvals ({verb}) metrics:", result["metrics"])
    assert result["decision"] == decision
    assert result["call"]["args"] == {"path": WANTED}
    before, after = result["files_before"], result["files_after"]
    assert WANTED in before
    if decision == "approved":
        assert after == sorted(set(before) - {WANTED}) and result["effect"] == f"deleted {WANTED}"
    else:
        assert after == before and result["effect"] == f"{WANTED} is still there"
