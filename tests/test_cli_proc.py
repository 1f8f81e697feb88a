"""``llmos run|ps|kill|logs|send|approvals|approve|deny`` against the session's kernel.

One test runs the real ``llmos`` executable in a subprocess, joining the session's
Ray cluster through RAY_ADDRESS as a user's shell would; the others invoke the
same click commands in this process (a new process costs seconds to join Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from click.testing import CliRunner
from workers import Num

from llmos_kernel.cli import main
from syscalls import ipc

HELLO = Path(__file__).parent / "agents" / "hello.py"


@pytest.fixture(scope="module")
def llmos(kernel):
    """``llmos(*args)``: run a CLI command against the session kernel; (exit code, stdout,
    stderr)."""
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(main, [*args, "--kernel", kernel.name,
                                      "--state-dir", str(kernel.state_dir)])
        return result.exit_code, result.stdout, result.stderr

    return invoke


def test_llmos_run_as_a_subprocess(kernel):
    """The shell path: spawn, wait, print the exit record; failure gives exit status 1 and
    errors are one line."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    base = [sys.executable, "-m", "llmos_kernel.cli", "run", "--kernel", kernel.name,
            "--state-dir", str(kernel.state_dir)]
    done = subprocess.run([*base, f"{HELLO}", "--arg", 'lines=["one", "two"]'], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    failed = subprocess.run([*base, f"{HELLO}", "--arg", "lines=[]", "--arg", "fail=true",
                             "--name", "cli-fails"], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    pid, exit_ = done.stdout.split("\n", 1)
    assert done.returncode == 0, done.stderr
    assert json.loads(exit_)["result"] == {"printed": 2}
    assert kernel.call("logs", int(pid))["text"] == "one\ntwo\n"
    assert failed.returncode == 1
    assert json.loads(failed.stdout.split("\n", 1)[1])["error"]["message"] == "asked to fail"


def test_run_detached_ps_logs_and_kill(kernel, llmos):
    code, out, _ = llmos("run", f"{HELLO}", "--name", "cli-talker", "--detach",
                         "--arg", 'lines=["a", "b", "c"]', "--arg", "pause=0.3")
    pid = int(out)
    _, table, _ = llmos("ps")
    _, listed, _ = llmos("ps", "--json")
    code_follow, followed, _ = llmos("logs", str(pid), "--follow")  # returns when it exits
    _, gone, _ = llmos("ps", "--json")
    _, everything, _ = llmos("ps", "--all", "--json")
    assert code == 0
    assert "cli-talker" in table and table.splitlines()[0].split()[:3] == ["PID", "NAME",
                                                                          "STATUS"]
    assert pid in {p["pid"] for p in json.loads(listed)}
    assert (code_follow, followed) == (0, "a\nb\nc\n")
    assert pid not in {p["pid"] for p in json.loads(gone)}
    assert {p["pid"]: (p["exit"] or {}).get("reason") for p in json.loads(everything)}[pid] \
        == "normal"

    _, out, _ = llmos("run", "workers:idle", "--name", "cli-idle", "--detach")
    code, _, _ = llmos("kill", "cli-idle")
    assert code == 0
    assert kernel.call("wait", int(out), 30)["reason"] == "killed"
    code, _, err = llmos("kill", "cli-idle")
    assert (code, err) == (1, "llmos: error: no live process named 'cli-idle'\n")


def test_send_plain_and_typed_messages(kernel, llmos):
    kernel.run(ipc.publish("declare-types", Num(0)))  # the kernel learns test.Num
    received = []
    for type_, fields in (("dict", {"greeting": "hi"}), ("test.Num", {"n": 5})):
        _, out, _ = llmos("run", f"{HELLO}:inbox", "--detach")
        code, sent_id, _ = llmos("send", out.strip(), type_, json.dumps(fields))
        assert code == 0 and sent_id.strip()
        received.append(kernel.call("wait", int(out), 30)["result"])
    assert received[0] == {"sender": 0, "type": "dict", "body": {"greeting": "hi"}}
    assert received[1] == {"sender": 0, "type": "test.Num", "body": {"n": 5}}

    _, out, _ = llmos("run", f"{HELLO}:inbox", "--detach")
    bad = [llmos("send", out.strip(), "test.Num", '{"n": "five"}'),
           llmos("send", out.strip(), "no.Such", "{}"),
           llmos("send", out.strip(), "dict", "[1, 2]")]
    llmos("kill", out.strip())
    assert [(code, err.splitlines()) for code, _, err in bad] == [
        (1, ["llmos: error: test.Num.n: expected int, got str"]),
        (1, [("llmos: error: unknown message type 'no.Such'; it becomes known when a program "
              "that declares it sends one, or use type 'dict' for a plain dict")]),
        (1, ["llmos: error: FIELDS must be a JSON object"])]


def test_approve_and_deny_a_dangerous_tool_call(kernel, llmos):
    pids = [int(llmos("run", "workers:delete_after_approval", "--detach",
                      "--arg", f"path={name}.txt")[1]) for name in ("keep", "go")]
    deadline = time.monotonic() + 60
    pending: dict = {}
    while len(pending) < 2 and time.monotonic() < deadline:
        pending = {a["pid"]: a for a in json.loads(llmos("approvals", "--json")[1])
                   if a["pid"] in pids}
        time.sleep(0.1)
    _, listing, _ = llmos("approvals")
    assert all(a["id"] in listing and a["tool"] == "delete_file" for a in pending.values())
    assert llmos("deny", pending[pids[0]]["id"])[:2] == (0, f"{pending[pids[0]]['id']} denied\n")
    assert llmos("approve", pending[pids[1]]["id"])[0] == 0
    denied, approved = (kernel.call("wait", pid, 60) for pid in pids)
    assert denied["error"]["type"] == "PermissionDenied"
    assert approved["result"] == "deleted go.txt"
    assert llmos("approve", "no-such-approval")[0] == 1
