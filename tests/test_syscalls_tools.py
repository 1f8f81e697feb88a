"""The tools syscalls on a real kernel: built-ins, allowlists, approvals, agent tools, run_loop.

Programs call ``tools.call`` as themselves; the kernel decides what they may run, asks a
person before a dangerous tool runs, and turns every failure into a typed error.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time
import uuid
from typing import Literal

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel.errors import InvalidArgument, NotFound, PermissionDenied, Timeout, ToolError
from llmos_kernel.services.tools import spec_of
from syscalls import fs, ipc, proc, tools


def _unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _wait_for_approval(kernel, tool_name: str, timeout: float = 30.0) -> dict:
    """The pending approval request for ``tool_name`` from the test driver, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in kernel.call("approvals"):
            if request["tool"] == tool_name and request["pid"] == kernel.pid:
                return request
        time.sleep(0.1)
    raise AssertionError(f"no approval request for {tool_name} appeared")


# -- built-in tools --------------------------------------------------------------------


@settings(max_examples=15)
@given(a=st.integers(-10**6, 10**6), b=st.integers(-10**6, 10**6), c=st.integers(1, 999))
def test_calculator_agrees_with_python_arithmetic(kernel, a, b, c):
    expression = f"({a} + {b}) * {c} - {a} // {c}"
    result = kernel.run(tools.call("calculator", expression=expression))
    assert result == (a + b) * c - a // c


def test_clock_tells_the_time_in_a_zone(kernel):
    stamp = kernel.run(tools.call("clock", timezone="Asia/Tokyo"))
    now = datetime.datetime.fromisoformat(stamp)
    assert now.utcoffset() == datetime.timedelta(hours=9)
    assert abs(now.timestamp() - time.time()) < 60


def test_file_tools_act_on_the_callers_own_home(kernel):
    name = _unique("tool-notes") + ".txt"

    async def scenario():
        written = await tools.call("write_file", path=f"tooldir/{name}", content="héllo")
        via_fs = await fs.read_text(f"tooldir/{name}")
        listed = await tools.call("list_files", path="tooldir")
        read = await tools.call("read_file", path=f"tooldir/{name}")
        return written, via_fs, listed, read

    written, via_fs, listed, read = kernel.run(scenario())
    assert written["size"] == len("héllo".encode())
    assert via_fs == read == "héllo"
    assert f"tooldir/{name}" in listed


def test_key_value_tools_remember_per_process(kernel):
    key = _unique("colour")

    async def scenario():
        await tools.call("remember", key=key, value="teal")
        mine = await tools.call("recall", key=key)
        child = await proc.spawn("syscall_agents:probe", {"calls": [
            ["tools.call", {"name": "recall", "args": {"key": key}}]]})
        return mine, (await proc.wait(child, timeout=60))["result"]

    mine, theirs = kernel.run(scenario())
    assert mine == "teal"
    assert theirs == [{"ok": ""}]  # another process has its own key-value memory


def test_tool_errors_are_typed_and_the_tool_is_named(kernel):
    async def attempt(name, **args):
        try:
            await tools.call(name, **args)
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            return type(e), str(e)
        return None, None

    async def scenario():
        return [await attempt("calculator", expression="1 / 0"),
                await attempt("calculator", expression="__import__('os')"),
                await attempt("calculator"),
                await attempt("read_file", path="../../etc/passwd"),
                await attempt("no_such_tool"),
                await attempt("clock", timezone="Mars/Olympus")]

    (div, imp, missing, escape, unknown, zone) = kernel.run(scenario())
    assert div[0] is ToolError and "calculator" in div[1]
    assert imp[0] is ToolError
    assert missing[0] is InvalidArgument and "expression" in missing[1]
    assert escape[0] is ToolError and "read_file" in escape[1]
    assert unknown[0] is NotFound and "no_such_tool" in unknown[1]
    assert zone[0] is ToolError and "Mars/Olympus" in zone[1]


def test_list_shows_schemas_and_the_dangerous_flag(kernel):
    listed = {t["function"]["name"]: t for t in kernel.run(tools.list())}
    assert {"calculator", "clock", "read_file", "write_file", "list_files", "delete_file",
            "remember", "recall"} <= set(listed)
    assert listed["delete_file"]["dangerous"] and not listed["read_file"]["dangerous"]
    schema = listed["write_file"]["function"]["parameters"]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == ["path", "content"]


# -- permissions -----------------------------------------------------------------------


def test_an_allowlist_given_at_spawn_is_enforced(kernel):
    async def scenario():
        child = await proc.spawn("syscall_agents:probe", {"calls": [
            ["tools.list", {}],
            ["tools.call", {"name": "calculator", "args": {"expression": "6 * 7"}}],
            ["tools.call", {"name": "write_file", "args": {"path": "x", "content": "y"}}],
            ["tools.call", {"name": "clock", "args": {}}],
        ]}, tools=["calculator"])
        return (await proc.wait(child, timeout=60))["result"]

    listed, calc, write, clock = kernel.run(scenario())
    assert [t["function"]["name"] for t in listed["ok"]] == ["calculator"]
    assert calc == {"ok": 42}
    assert write["error"] == clock["error"] == "PermissionDenied"
    assert "allowlist" in write["message"]


def test_a_child_cannot_widen_its_parents_allowlist(kernel):
    async def scenario():
        grandchild_spec = {"program": {"kind": "module", "ref": "syscall_agents:probe"},
                           "args": {"calls": [["tools.call", {"name": "clock", "args": {}}]]},
                           "tools": ["calculator", "clock"]}
        child = await proc.spawn("syscall_agents:spawn_and_wait", {"spec": grandchild_spec},
                                 tools=["calculator"])
        return (await proc.wait(child, timeout=120))["result"]["result"]

    assert kernel.run(scenario())[0]["error"] == "PermissionDenied"


def test_a_dangerous_tool_runs_only_after_approval(kernel):
    name = _unique("doomed") + ".txt"
    kernel.run(fs.write(name, "bye"))
    pending = asyncio.run_coroutine_threadsafe(tools.call("delete_file", path=name), kernel.loop)
    request = _wait_for_approval(kernel, "delete_file")
    assert request["args"] == {"path": name}
    time.sleep(0.5)
    assert not pending.done() and kernel.run(fs.exists(name))  # nothing ran before the decision
    kernel.call("decide", request["id"], True)
    assert pending.result(30) == f"deleted {name}"
    assert not kernel.run(fs.exists(name))


def test_a_denied_dangerous_call_is_refused_and_nothing_happens(kernel):
    name = _unique("kept") + ".txt"
    kernel.run(fs.write(name, "stay"))
    pending = asyncio.run_coroutine_threadsafe(tools.call("delete_file", path=name), kernel.loop)
    kernel.call("decide", _wait_for_approval(kernel, "delete_file")["id"], False)
    with pytest.raises(PermissionDenied, match="denied"):
        pending.result(30)
    assert kernel.run(fs.read_text(name)) == "stay"


def test_an_unanswered_dangerous_call_times_out_undone(kernel):
    name = _unique("unanswered") + ".txt"
    kernel.run(fs.write(name, "stay"))
    started = time.monotonic()
    with pytest.raises(Timeout, match="timed out"):
        kernel.run(tools.call("delete_file", path=name, approval_timeout_s=1.5))
    assert 1.5 <= time.monotonic() - started < 30
    assert all(r["args"] != {"path": name} for r in kernel.call("approvals"))
    assert kernel.run(fs.read_text(name)) == "stay"


def test_a_process_spawned_with_approval_deny_never_asks(kernel):
    async def scenario():
        child = await proc.spawn("syscall_agents:probe", {"calls": [
            ["fs.write", {"path": "f.txt", "data": "x"}],
            ["tools.call", {"name": "delete_file", "args": {"path": "f.txt"}}],
            ["fs.exists", {"path": "f.txt"}]]}, approval="deny")
        return (await proc.wait(child, timeout=60))["result"]

    _, deleted, exists = kernel.run(scenario())
    assert deleted["error"] == "PermissionDenied" and "deny" in deleted["message"]
    assert exists == {"ok": True}


# -- tools registered by agents --------------------------------------------------------


@pytest.fixture(scope="module")
def provider(kernel):
    """A ToolProvider agent that granted its tools to the test driver."""
    async def start():
        pid = await proc.spawn("syscall_agents:ToolProvider", {"grant_to": kernel.pid})
        reply = await ipc.call(pid, {"ask": "who"}, timeout=60)
        return pid, reply.body

    pid, info = kernel.run(start())
    yield {"pid": pid, **info}
    kernel.run(proc.kill(pid))


def test_an_agent_tool_runs_in_the_agents_own_process(kernel, provider):
    where = kernel.run(tools.call("where_am_i"))
    assert where == {"pid": provider["pid"], "os_pid": provider["os_pid"]}
    assert where["os_pid"] not in (os.getpid(), kernel.call("status")["pid"])


def test_an_agent_tools_failures_come_back_typed(kernel, provider):
    with pytest.raises(ToolError, match="ValueError: the fuse was short"):
        kernel.run(tools.call("explode", why="the fuse was short"))
    started = time.monotonic()
    with pytest.raises(Timeout, match="nap"):
        kernel.run(tools.call("nap", seconds=30))
    assert time.monotonic() - started < 20
    assert kernel.run(tools.call("nap", seconds=0.01)) == "rested"  # the provider is fine


def test_an_agent_tool_is_invisible_to_processes_not_granted_it(kernel, provider):
    async def scenario():
        child = await proc.spawn("syscall_agents:probe", {"calls": [
            ["tools.call", {"name": "where_am_i", "args": {}}],
            ["tools.list", {}]]})
        return (await proc.wait(child, timeout=60))["result"]

    call, listed = kernel.run(scenario())
    assert call["error"] == "NotFound"
    assert "where_am_i" not in [t["function"]["name"] for t in listed["ok"]]


def test_a_restarted_agent_registers_its_tools_again(kernel):
    """Its first run registers tools and crashes; the restarted run (same pid, new
    capability) registers them again and gets to serve, instead of crashing on a clash."""
    async def restarts(pid: int) -> int:
        return next(p["restarts"] for p in await proc.ps() if p["pid"] == pid)

    async def scenario():
        pid = await proc.spawn("syscall_agents:ToolProvider", {"crash_first": True},
                               restart="transient")
        for _ in range(600):
            if await restarts(pid):
                break
            await asyncio.sleep(0.1)
        info = (await ipc.call(pid, {"ask": "who"}, timeout=60)).body
        after = await restarts(pid)
        await proc.kill(pid)
        return pid, info, after

    pid, info, after = kernel.run(scenario())
    assert info["pid"] == pid and after == 1


def test_the_loop_runs_local_tools_and_reports_failures_to_the_model(kernel):
    """run_loop with tool_choice "required" and one step: the model's call runs here, and the
    tool's exception becomes the tool result the model reads, not a crash."""
    @tools.tool
    def lookup_order(order_id: int) -> dict:
        """Look up an order by its number.

        Args:
            order_id: The order number.
        """
        raise KeyError(order_id)

    result = kernel.run(tools.run_loop(
        [{"role": "user", "content": "Where is my order 1234?"}], [lookup_order],
        max_steps=1, tool_choice="required", max_tokens=48, temperature=0))
    roles = [m["role"] for m in result.messages]
    assert roles == ["user", "assistant", "tool"]
    call = result.messages[1]["tool_calls"][0]["function"]
    jsonschema.validate(json.loads(call["arguments"]), spec_of(lookup_order).parameters)
    assert "ToolError" in json.loads(result.messages[2]["content"])["error"]
    assert not result.tool_calls  # the last answer is text


def test_a_dangerous_local_tool_waits_for_a_person_in_the_loop(kernel):
    """A program's own dangerous tool goes through the kernel's approval queue before
    run_loop runs it: denied, it does not run and the model reads why; approved, it runs."""
    ran: list[str] = []
    name = f"unlock_{uuid.uuid4().hex[:6]}"

    @tools.tool(name=name, dangerous=True)
    def unlock(door: Literal["front", "back"]) -> dict:
        """Unlock a door of the house.

        Args:
            door: Which door.
        """
        ran.append(door)
        return {"unlocked": door}

    async def decide(approve: bool) -> dict:
        for _ in range(600):
            mine = [a for a in await asyncio.to_thread(kernel.call, "approvals")
                    if a["tool"] == name]
            if mine:
                return await asyncio.to_thread(kernel.call, "decide", mine[0]["id"], approve)
            await asyncio.sleep(0.2)
        raise AssertionError("the call never reached the approval queue")

    async def scenario(approve: bool):
        return await asyncio.gather(tools.run_loop(
            [{"role": "user", "content": "Unlock the front door."}], [unlock], max_steps=1,
            tool_choice="required", max_tokens=64, temperature=0), decide(approve))

    result, decided = kernel.run(scenario(False))
    assert decided["state"] == "denied" and not ran
    assert "PermissionDenied" in json.loads(result.messages[2]["content"])["error"]
    result, decided = kernel.run(scenario(True))
    assert decided["state"] == "approved" and len(ran) == 1
    assert json.loads(result.messages[2]["content"])["unlocked"] == ran[0]


def test_the_loop_refuses_kernel_tools_the_process_may_not_call(kernel):
    with pytest.raises(NotFound, match="no_such_tool"):
        kernel.run(tools.run_loop([{"role": "user", "content": "hi"}], ["no_such_tool"]))


def test_approval_auto_is_given_only_explicitly_and_then_runs_dangerous_tools_unasked(kernel):
    """The root (the person at the CLI) may spawn with approval='auto'; a process whose own
    policy is 'ask' may not hand 'auto' down."""
    name = f"auto-{uuid.uuid4().hex[:6]}.txt"
    pid = kernel.call("spawn", {
        "program": {"kind": "module", "ref": "syscall_agents:probe"}, "approval": "auto",
        "args": {"calls": [["fs.write", {"path": name, "data": "x"}],
                           ["tools.call", {"name": "delete_file", "args": {"path": name}}],
                           ["fs.exists", {"path": name}]]}})
    exit_ = kernel.call("wait", pid, 60)
    assert exit_["reason"] == "normal", exit_
    _, deleted, exists = exit_["result"]
    assert "error" not in deleted and exists == {"ok": False}
    assert all(r["pid"] != pid for r in kernel.call("approvals"))
    with pytest.raises(PermissionDenied, match="approval='auto'"):
        kernel.run(proc.spawn("syscall_agents:probe", {"calls": []}, approval="auto"))
