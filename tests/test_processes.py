"""Processes on a real kernel: many agents, supervision as in OTP, links, monitors, rights.

Every scenario runs as the attached test driver (``kernel.run``); the programs it
starts live in tests/agents/workers.py and run in the kernel's agent hosts.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from checks import reports, table, until
from workers import Cmd, Commanded, forge, idle, linked_to, supervise, try_kill

from llmos_kernel.errors import AlreadyExists
from syscalls import ipc, proc


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def test_a_thousand_agents_alive_at_once(kernel):
    """1,000 idle agents spawned at once all run (ps lists them, their hosts hold them)."""
    async def held_by(hosts: set[str]) -> int:
        infos = (await kernel.actors())["hosts"]
        return sum(infos[h]["agents"] for h in hosts)

    async def spawn():
        started = time.perf_counter()
        pids = await asyncio.gather(*(proc.spawn(idle) for _ in range(1000)))
        rows = await until(lambda t: all(t[p]["status"] == "running" for p in pids),
                           what="1,000 agents to run")
        hosts = {rows[p]["host"] for p in pids}
        while await held_by(hosts) < 1000:
            await asyncio.sleep(0.05)
        return pids, hosts, time.perf_counter() - started

    async def stop(pids):
        await asyncio.gather(*(proc.kill(p) for p in pids))
        return await asyncio.gather(*(proc.wait(p, timeout=60) for p in pids))

    pids, hosts, took = kernel.run(spawn())
    print(f"\n1,000 agents spawned and running in {took:.2f} s on {len(hosts)} hosts")
    listed = {p["pid"] for p in kernel.call("ps", False)}  # what `llmos ps` shows
    exits = kernel.run(stop(pids))
    assert len(set(pids)) == 1000
    assert len(hosts) == 2, "the shared hosts share the load"
    assert set(pids) <= listed
    assert {e["reason"] for e in exits} == {"killed"}


def _children(tag: str, restart: str = "permanent") -> list[dict]:
    return [{"program": "workers:Commanded", "name": f"{tag}-{x}", "restart": restart}
            for x in "abc"]


@pytest.mark.parametrize("strategy, restarted", [
    ("one_for_one", "b"), ("one_for_all", "abc"), ("rest_for_one", "bc")])
def test_restart_strategies(kernel, strategy, restarted):
    """b crashes; its supervisor restarts b alone, all three, or b and those started after."""
    tag = _tag()

    async def scenario():
        sup = await proc.spawn(supervise, {"children": _children(tag)}, restart={
            "restart": "temporary", "strategy": strategy, "intensity": 5, "period_s": 60})
        await until(lambda t: sum(p["parent"] == sup and p["status"] == "running"
                                  for p in t.values()) == 3, what="three children")
        await ipc.send(f"{tag}-b", Cmd("crash"))
        rows = await until(lambda t: sum(p["parent"] == sup and p["status"] == "running"
                                         and p["restarts"] >= (p["name"][-1] in restarted)
                                         for p in t.values()) == 3, what="the restarts")
        counts = {p["name"][-1]: p["restarts"] for p in rows.values() if p["parent"] == sup}
        await proc.kill(sup)
        return counts

    counts = kernel.run(scenario())
    assert counts == {x: int(x in restarted) for x in "abc"}


@pytest.mark.parametrize("restart, how, comes_back", [
    ("permanent", "exit", True), ("permanent", "crash", True), ("permanent", "kill", False),
    ("transient", "exit", False), ("transient", "crash", True),
    ("temporary", "exit", False), ("temporary", "crash", False)])
def test_restart_types(kernel, restart, how, comes_back):
    """permanent: always back (but an explicit kill is final); transient: back only after an
    abnormal exit; temporary: never. The driver kills its grandchild: an ancestor may."""
    tag = _tag()

    async def scenario():
        sup = await proc.spawn(supervise, {"children": [
            {"program": "workers:Commanded", "name": f"{tag}-w", "restart": restart}]},
            restart={"restart": "temporary", "intensity": 5, "period_s": 60})
        rows = await until(lambda t: any(p["parent"] == sup and p["status"] == "running"
                                         for p in t.values()), what="the child")
        (child,) = [p["pid"] for p in rows.values() if p["parent"] == sup]
        if how == "kill":
            await proc.kill(child)
        else:
            await ipc.send(child, Cmd(how))
        rows = await until(lambda t: t[child]["restarts"] == 1 and t[child]["status"] ==
                           "running" if comes_back else t[child]["status"] == "exited",
                           what=f"the child to {'come back' if comes_back else 'stay down'}")
        await proc.kill(sup)
        return rows[child]

    child = kernel.run(scenario())
    assert child["restarts"] == int(comes_back)
    if not comes_back:
        assert child["exit"]["reason"] == {"exit": "normal", "crash": "error",
                                           "kill": "killed"}[how]


def test_intensity_limit_escalates_to_the_top(kernel):
    """A worker that always crashes: its supervisor S2 (at most 2 restarts) gives up and
    exits "escalated"; S1 restarts S2 once (its limit), then gives up itself."""
    tag = _tag()
    worker = {"program": "workers:crash_at_once", "restart": "permanent"}
    s2 = {"program": "workers:supervise", "args": {"children": [worker]}, "name": f"{tag}-s2",
          "restart": {"restart": "permanent", "intensity": 2, "period_s": 60}}

    async def scenario():
        s1 = await proc.spawn(supervise, {"children": [s2]}, restart={
            "restart": "temporary", "intensity": 1, "period_s": 60})
        s1_exit = await proc.wait(s1, timeout=60)
        rows = await until(lambda t: all(p["status"] == "exited" for p in t.values()
                                         if p["parent"] in (s1, *_pids(t, s1))),
                           what="the whole tree to exit")
        return s1_exit, rows, s1

    s1_exit, rows, s1 = kernel.run(scenario())
    (sup2,) = [p for p in rows.values() if p["parent"] == s1]
    workers = [p for p in rows.values() if p["parent"] == sup2["pid"]]
    assert s1_exit["reason"] == "escalated"
    assert (sup2["exit"]["reason"], sup2["restarts"]) == ("escalated", 1)
    assert [(w["exit"]["reason"], w["restarts"]) for w in workers] == [("error", 2)] * 2, \
        "each incarnation of S2 restarted its worker twice, then gave up on the third crash"


def _pids(rows: dict, parent: int) -> list[int]:
    return [p["pid"] for p in rows.values() if p["parent"] == parent]


def test_monitor_notice_arrives_as_a_message(kernel):
    async def scenario():
        watched = await proc.spawn(Commanded)
        await proc.monitor(watched)
        await proc.kill(watched)
        down = await ipc.recv(type=proc.ProcessDown, timeout=30)
        await proc.monitor(watched)  # already down: the notice comes at once
        again = await ipc.recv(type=proc.ProcessDown, timeout=30)
        return watched, down, again

    watched, down, again = kernel.run(scenario())
    assert (down.sender, down.body.pid, down.body.reason) == (0, watched, "killed")
    assert (again.body.pid, again.body.reason) == (watched, "killed")


def test_links_kill_or_signal_the_other_side(kernel):
    """An abnormal exit kills a linked process, or sends ExitSignal if it traps exits;
    a normal exit does neither."""
    async def scenario():
        me = proc.pid()
        crashing, exiting = await proc.spawn(Commanded), await proc.spawn(Commanded)
        plain = await proc.spawn(linked_to, {"peer": crashing, "report_to": me})
        trapping = await proc.spawn(linked_to, {"peer": crashing, "report_to": me},
                                    trap_exits=True)
        calm = await proc.spawn(linked_to, {"peer": exiting, "report_to": me})
        assert await reports(3) == ["linked"] * 3
        await ipc.send(crashing, Cmd("crash"))
        await ipc.send(exiting, Cmd("exit"))
        signal = await reports(1)
        plain_exit = await proc.wait(plain, timeout=30)
        await proc.wait(exiting, timeout=30)
        rows = await table()
        for pid in (trapping, calm):
            await proc.kill(pid)
        return crashing, signal, plain_exit, rows[trapping]["status"], rows[calm]["status"]

    crashing, signal, plain_exit, trapping, calm = kernel.run(scenario())
    assert signal == [f"{crashing} error"]
    assert plain_exit["reason"] == "linked"
    assert (trapping, calm) == ("running", "running")


def test_kill_needs_ownership_or_a_grant(kernel):
    """Siblings cannot kill each other, nor their parent, until the owner grants it."""
    async def scenario():
        me = proc.pid()
        target = await proc.spawn(Commanded)
        killer = await proc.spawn(try_kill, {"target": target, "report_to": me})
        parent_killer = await proc.spawn(try_kill, {"target": me, "report_to": me})
        await ipc.send(killer, Cmd("try"))
        await ipc.send(parent_killer, Cmd("try"))
        refused = await reports(2)
        await proc.grant(target, to=killer)
        await ipc.send(killer, Cmd("try"))
        granted = await reports(1)
        target_exit = await proc.wait(target, timeout=30)
        for pid in (killer, parent_killer):
            await proc.kill(pid)
        return refused, granted, target_exit

    refused, granted, target_exit = kernel.run(scenario())
    assert refused == ["PermissionDenied", "PermissionDenied"]
    assert granted == ["killed"]
    assert target_exit["reason"] == "killed"


def test_a_program_cannot_send_as_another_pid(kernel):
    """The kernel stamps the sender from the capability; claiming another pid or presenting
    a made-up capability is refused."""
    async def scenario():
        me = proc.pid()
        forger = await proc.spawn(forge, {"report_to": me, "victim": me})
        msg = await ipc.recv(timeout=30)
        errors = (await proc.wait(forger, timeout=30))["result"]
        return forger, msg, errors

    forger, msg, errors = kernel.run(scenario())
    assert errors == ["InvalidArgument", "PermissionDenied"]
    assert (msg.body.text, msg.sender) == ("honest", forger)


def test_an_isolated_agent_gets_a_host_process_of_its_own(kernel):
    """Agents of a shared host share its Python process; ``isolated=True`` is how a program
    that must not share one (a hostile one, or one needing its own resources) gets its own."""
    async def scenario():
        shared = [await proc.spawn("syscall_agents:os_process") for _ in range(2)]
        alone = [await proc.spawn("syscall_agents:os_process", isolated=True) for _ in range(2)]
        return ([(await proc.wait(p, timeout=120))["result"] for p in shared],
                [(await proc.wait(p, timeout=120))["result"] for p in alone])

    shared, alone = kernel.run(scenario())
    shared_os_pids = {s["os_pid"] for s in shared}
    assert {a["os_pid"] for a in alone}.isdisjoint(shared_os_pids)
    assert alone[0]["os_pid"] != alone[1]["os_pid"]  # one host each, not one for all isolated
    assert alone[0]["host"] != alone[1]["host"]
    assert os.getpid() not in shared_os_pids | {a["os_pid"] for a in alone}


def test_a_name_is_held_by_one_live_process(kernel):
    name = f"unique-{uuid.uuid4().hex[:6]}"

    async def scenario():
        first = await proc.spawn(idle, name=name)
        try:
            with pytest.raises(AlreadyExists, match=name):
                await proc.spawn(idle, name=name)
        finally:
            await proc.kill(first)
            await proc.wait(first, timeout=30)

    kernel.run(scenario())


def test_ps_shows_each_process_its_unhandled_messages(kernel):
    """``mailbox`` counts what the kernel holds for a process that its handlers have not
    finished; a process that waits for another type keeps the rest there."""
    async def scenario():
        pid = await proc.spawn(idle, name=f"mailbox-{_tag()}")
        for n in range(3):
            await ipc.send(pid, {"n": n})
        full = await until(lambda t: t[pid]["mailbox"] == 3, what="three messages held")
        await ipc.send(pid, Cmd("stop"))
        await proc.wait(pid, timeout=60)
        return full[pid]["mailbox"], (await table())[pid]["mailbox"]

    held, after = kernel.run(scenario())
    assert held == 3
    assert after == 0  # exited: what it never handled became dead letters


def test_an_edited_program_file_runs_again_with_its_message_types(kernel, tmp_path):
    """Edit a program that declares a message type and run it again on the same kernel:
    the new text replaces the old module (same file), so its @message class replaces the
    old one instead of clashing with it by name."""
    program = tmp_path / "edited.py"
    kind = f"edit.Note{_tag()}"

    def write(version: int) -> None:
        program.write_text(
            "from llmos_kernel.messages import message\n"
            "from syscalls import ipc, proc\n\n"
            f"@message(name={kind!r})\n"
            "class Note:\n    text: str\n\n"
            "async def main():\n"
            "    await ipc.send(proc.pid(), Note('hi'))\n"
            "    got = await ipc.recv(type=Note, timeout=30)\n"
            f"    return [{version}, got.body.text]\n")

    for version in (1, 2):
        write(version)
        pid = kernel.run(proc.spawn(str(program)))
        exit_ = kernel.run(proc.wait(pid, timeout=60), timeout=90)
        assert exit_["reason"] == "normal", exit_
        assert exit_["result"] == [version, "hi"]
