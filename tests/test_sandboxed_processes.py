"""Sandboxed processes on a real kernel (``proc.spawn(..., sandbox=True)``): their syscalls
work as anyone's, the files around them do not, and their crashes are supervised.

The model-free red-team suite is tests/security; here the same child runs under a real
agent host. The programs live in tests/agents/sandboxed.py.
"""

from __future__ import annotations

import pytest
from checks import until

from llmos_kernel.errors import ToolError
from syscalls import ipc, proc, tools

pytestmark = pytest.mark.usefixtures("sandbox_available")


def test_a_sandboxed_agent_chats_writes_files_and_talks_to_an_unsandboxed_one(kernel):
    """llm.chat, fs.write/read, ipc.call, send and recv all work from inside the sandbox,
    with an ordinary agent as its partner; the two run in different OS processes."""
    async def scenario():
        partner = await proc.spawn("sandboxed:peer")
        boxed = await proc.spawn("sandboxed:worker", {"peer": partner}, sandbox=True)
        return (await proc.wait(boxed, timeout=240), await proc.wait(partner, timeout=60),
                await proc.self())

    boxed, partner, _ = kernel.run(scenario())
    assert boxed["reason"] == "normal", boxed
    got = boxed["result"]
    assert got["file"] == f"chat said: {got['chat']}"
    assert got["answer"] == {"n": 2}
    assert got["back"]["seen"] > 0
    assert partner["reason"] == "normal", partner
    assert got["os_pid"] != partner["result"]["os_pid"]  # a child process, not the host


def test_open_outside_the_sandbox_is_refused_but_works_without_it(kernel):
    """The kernel's root token is a plain file: without the sandbox a program reads it
    (the escape sandbox=False leaves open); sandboxed, open() raises PermissionError."""
    secret = str(kernel.state_dir / "root.token")

    async def scenario(sandbox: bool):
        pid = await proc.spawn("sandboxed:read_file", {"path": secret}, sandbox=sandbox)
        return await proc.wait(pid, timeout=120)

    plain, boxed = kernel.run(scenario(False)), kernel.run(scenario(True))
    assert plain["result"] == {"read": len((kernel.state_dir / "root.token").read_text())}
    assert boxed["reason"] == "normal", boxed
    assert boxed["result"] == {"error": "PermissionError"}


def test_a_memory_bomb_and_a_cpu_spin_are_stopped_and_reported(kernel):
    """Over its memory_bytes quota a bomb fails with MemoryError naming the quota; over
    cpu_s a spin is killed as QuotaExceeded; both are error exits, and the kernel goes on
    serving others."""
    async def scenario():
        bomb = await proc.spawn("sandboxed:memory_bomb", sandbox=True,
                                quotas={"memory_bytes": 512 << 20})
        spin = await proc.spawn("sandboxed:cpu_spin", sandbox=True, quotas={"cpu_s": 1})
        bombed, spun = await proc.wait(bomb, timeout=120), await proc.wait(spin, timeout=120)
        other = await proc.spawn("sandboxed:read_file", {"path": "/nonexistent"})
        return bombed, spun, await proc.wait(other, timeout=60)

    bombed, spun, other = kernel.run(scenario())
    assert bombed["reason"] == "error", bombed
    assert bombed["error"]["type"] == "MemoryError"
    assert f"memory_bytes quota: {512 << 20} bytes" in bombed["error"]["message"]
    assert spun["reason"] == "error", spun
    assert spun["error"]["type"] == "QuotaExceeded"
    assert "cpu_s quota of 1 s" in spun["error"]["message"]
    assert other == {**other, "reason": "normal", "result": {"error": "FileNotFoundError"}}


def test_a_permanent_sandboxed_process_that_crashes_is_restarted(kernel):
    """A child that dies without an exit report (ProcessCrashed) is an error exit: its
    restart type applies, and it comes back sandboxed (its third life cannot read the
    root token either)."""
    async def scenario():
        pid = await proc.spawn("sandboxed:crash_twice", {
            "driver": kernel.pid, "path": str(kernel.state_dir / "root.token")},
            sandbox=True, restart="permanent")
        third = await ipc.recv(sender=pid, timeout=120)
        rows = await until(lambda t: t[pid]["restarts"] == 2 and t[pid]["status"] == "running",
                           timeout=60, what="two restarts")
        await proc.kill(pid)
        return rows[pid], third.body, await proc.wait(pid, timeout=60)

    row, third, ended = kernel.run(scenario())
    assert row["restarts"] == 2
    assert third == {"error": "PermissionError"}
    assert ended["reason"] == "killed"


def test_a_sandboxed_parent_can_only_have_sandboxed_children(kernel):
    """sandbox=False from a sandboxed parent still runs the child sandboxed."""
    secret = str(kernel.state_dir / "root.token")

    async def scenario():
        pid = await proc.spawn("syscall_agents:spawn_and_wait", {"spec": {
            "program": proc.program_spec("sandboxed:read_file"), "args": {"path": secret}}},
            sandbox=True)
        return await proc.wait(pid, timeout=240)

    got = kernel.run(scenario())
    assert got["reason"] == "normal", got
    assert got["result"]["result"] == {"error": "PermissionError"}


def test_a_sandboxed_agents_tools_run_in_its_child_and_kill_stops_it(kernel):
    """Tools it registers run in its child (ToolCall pushed down, its result relayed back,
    failures typed); a kill ends it with reason "killed"."""
    async def scenario():
        pid = await proc.spawn("syscall_agents:ToolProvider", {"grant_to": kernel.pid},
                               sandbox=True)
        info = (await ipc.call(pid, {"ask": "who"}, timeout=120)).body
        where = await tools.call("where_am_i")
        try:
            await tools.call("explode", why="inside the box")
            failed = None
        except ToolError as e:
            failed = str(e)
        await proc.kill(pid)
        return info, where, failed, await proc.wait(pid, timeout=60)

    info, where, failed, ended = kernel.run(scenario())
    assert where == {"pid": info["pid"], "os_pid": info["os_pid"]}
    assert "ValueError: inside the box" in failed
    assert ended["reason"] == "killed"
