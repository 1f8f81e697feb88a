"""Supervision decisions (``plan_exit``) on a hand-built process tree: restart types,
strategies and intensity limits, as OTP defines them. tests/test_processes.py carries the
same plans out on a live kernel."""

from __future__ import annotations

import pytest

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.proctable import KERNEL_PID, Process, RestartSpec
from llmos_kernel.supervisor import KILLED, NORMAL, SHUTDOWN, plan_exit

KERNEL_SPEC = RestartSpec(intensity=3, period_s=5.0)


class FakeTable:
    """The two things ``plan_exit`` reads from the process table."""

    def __init__(self, *procs: Process):
        self.procs = {p.pid: p for p in procs}

    def children(self, pid: int) -> list[Process]:
        return sorted((p for p in self.procs.values() if p.parent == pid), key=lambda p: p.pid)


def proc(pid: int, parent: int = KERNEL_PID, restart: str = "permanent", **spec) -> Process:
    return Process(pid, {"kind": "module"}, parent=parent, status="running",
                   restart=RestartSpec(restart=restart, **spec))


def tree(strategy: str, intensity: int = 3, period_s: float = 5.0,
         restarts: tuple[str, ...] = ("permanent",) * 3) -> FakeTable:
    """Supervisor 1 with children 2, 3, 4 (started in that order)."""
    sup = proc(1, restart="temporary", strategy=strategy, intensity=intensity, period_s=period_s)
    return FakeTable(sup, *(proc(2 + i, parent=1, restart=r) for i, r in enumerate(restarts)))


@pytest.mark.parametrize("restart, reason, comes_back", [
    ("permanent", NORMAL, True), ("permanent", "error", True), ("permanent", KILLED, False),
    ("transient", NORMAL, False), ("transient", "error", True), ("transient", KILLED, False),
    ("temporary", NORMAL, False), ("temporary", "error", False),
    ("permanent", SHUTDOWN, False),
])
def test_restart_types(restart, reason, comes_back):
    table = tree("one_for_one", restarts=(restart,))
    plan = plan_exit(table, table.procs[2], reason, now=0.0, kernel_spec=KERNEL_SPEC)
    assert plan.restart == ([2] if comes_back else []) and plan.escalate is None


@pytest.mark.parametrize("strategy, restart, terminate", [
    ("one_for_one", [3], []),
    ("one_for_all", [2, 3, 4], [2, 4]),
    ("rest_for_one", [3, 4], [4]),
])
def test_strategies_choose_who_comes_back_with_the_crashed_child(strategy, restart, terminate):
    table = tree(strategy)
    plan = plan_exit(table, table.procs[3], "error", now=0.0, kernel_spec=KERNEL_SPEC)
    assert plan.restart == restart, "restarted in start order"
    assert plan.terminate == terminate, "live siblings are stopped before they restart"


def test_a_temporary_sibling_is_stopped_but_not_restarted():
    table = tree("one_for_all", restarts=("temporary", "permanent", "permanent"))
    plan = plan_exit(table, table.procs[3], "error", now=0.0, kernel_spec=KERNEL_SPEC)
    assert plan.restart == [3, 4] and plan.terminate == [2, 4]


def test_more_restarts_than_the_intensity_within_the_period_escalate():
    table = tree("one_for_one", intensity=2, period_s=10.0)
    child, sup = table.procs[2], table.procs[1]
    assert plan_exit(table, child, "error", now=0.0, kernel_spec=KERNEL_SPEC).restart == [2]
    assert plan_exit(table, child, "error", now=1.0, kernel_spec=KERNEL_SPEC).restart == [2]
    assert sup.child_restarts == [0.0, 1.0]
    third = plan_exit(table, child, "error", now=2.0, kernel_spec=KERNEL_SPEC)
    assert third.restart == [] and third.escalate == 1
    later = plan_exit(table, child, "error", now=11.5, kernel_spec=KERNEL_SPEC)
    assert later.restart == [2] and later.escalate is None, "old restarts fall out of the window"
    assert sup.child_restarts == [11.5]


def test_intensity_zero_means_the_first_crash_escalates():
    table = tree("one_for_one", intensity=0)
    plan = plan_exit(table, table.procs[2], "error", now=0.0, kernel_spec=KERNEL_SPEC)
    assert plan.restart == [] and plan.escalate == 1


def test_the_kernel_gives_up_on_a_top_level_process_without_escalating():
    top = proc(5)
    table = FakeTable(top)
    top.restarts = [0.0, 1.0, 2.0]  # the kernel's clock for it: its own restart times
    plan = plan_exit(table, top, "error", now=3.0, kernel_spec=KERNEL_SPEC)
    assert plan.restart == [] and plan.escalate is None
    assert plan_exit(table, top, "error", now=9.0, kernel_spec=KERNEL_SPEC).restart == [5]


def test_an_exit_stops_the_children_and_tells_links_and_monitors():
    dying = proc(1, restart="temporary")
    table = FakeTable(dying, proc(2, parent=1), proc(3), proc(4), proc(5))
    table.procs[4].trap_exits = True
    table.procs[5].status = "exited"
    dying.links, dying.monitors = [3, 4, 5], [6]
    plan = plan_exit(table, dying, "error", now=0.0, kernel_spec=KERNEL_SPEC)
    assert plan.terminate == [2]
    assert plan.kill_linked == [3], "linked processes die too unless they trap exits"
    assert plan.notices == [(6, "ProcessDown", {"pid": 1, "reason": "error"}),
                            (4, "ExitSignal", {"pid": 1, "reason": "error"})]
    normal = plan_exit(table, dying, NORMAL, now=0.0, kernel_spec=KERNEL_SPEC)
    assert normal.kill_linked == [] and [n[1] for n in normal.notices] == ["ProcessDown"]


@pytest.mark.parametrize("spec, complaint", [
    (RestartSpec(restart="always"), "restart must be one of permanent, transient, temporary"),
    (RestartSpec(strategy="all"), "strategy must be one of one_for_one, one_for_all"),
    (RestartSpec(intensity=-1), "intensity must be an int >= 0"),
    (RestartSpec(period_s=0), "period_s must be a positive number"),
])
def test_a_bad_restart_spec_says_what_is_allowed(spec, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        spec.validate()
