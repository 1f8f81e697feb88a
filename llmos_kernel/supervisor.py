"""Supervision decisions, OTP-style: what happens when a process exits.

Every process supervises the children it spawned (the kernel supervises the
top level). When a child exits, its restart type decides whether it comes
back (permanent: always; transient: only after an abnormal exit; temporary:
never, and an explicit kill is never undone), its supervisor's strategy
decides who comes back with it (one_for_one: itself; one_for_all: every
sibling; rest_for_one: the siblings started after it), and the supervisor's
intensity decides when to give up (more than ``intensity`` restarts within
``period_s``: the supervisor stops all its children and exits itself with
reason ``escalated``, which its own supervisor handles like any abnormal exit,
up to the top). At the top, the kernel and attached driver scripts give up
by leaving the child exited. A restarted supervisor starts with a fresh
restart history, and spawns its children again itself.

This module only decides; the process manager carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos_kernel.proctable import KERNEL_PID, Process, ProcessTable, RestartSpec

NORMAL = "normal"
KILLED = "killed"  # an explicit kill: final, never restarted
SHUTDOWN = "shutdown"  # stopped by its supervisor


@dataclass
class ExitPlan:
    terminate: list[int] = field(default_factory=list)  # live processes to stop (no restart)
    restart: list[int] = field(default_factory=list)  # processes to start again, in order
    escalate: int | None = None  # a supervisor that gave up and must exit ("escalated")
    notices: list[tuple[int, str, dict]] = field(default_factory=list)  # (to pid, type, fields)
    kill_linked: list[int] = field(default_factory=list)  # linked processes that die too


def wants_restart(proc: Process, reason: str) -> bool:
    if reason in (KILLED, SHUTDOWN):
        return False
    kind = proc.restart.restart
    return kind == "permanent" or (kind == "transient" and reason != NORMAL)


def plan_exit(table: ProcessTable, proc: Process, reason: str, now: float,
              kernel_spec: RestartSpec) -> ExitPlan:
    """Decide the consequences of ``proc`` exiting with ``reason``."""
    plan = ExitPlan()
    for watcher in proc.monitors:
        plan.notices.append((watcher, "ProcessDown", {"pid": proc.pid, "reason": reason}))
    if reason != NORMAL:
        for other_pid in proc.links:
            other = table.procs.get(other_pid)
            if other is None or not other.alive:
                continue
            if other.trap_exits:
                plan.notices.append((other_pid, "ExitSignal", {"pid": proc.pid, "reason": reason}))
            else:
                plan.kill_linked.append(other_pid)
    plan.terminate.extend(c.pid for c in table.children(proc.pid) if c.alive)

    if not wants_restart(proc, reason):
        return plan
    supervisor = table.procs.get(proc.parent) if proc.parent != KERNEL_PID else None
    # The kernel keeps one clock per top-level process: its own restart times.
    spec = supervisor.restart if supervisor is not None else kernel_spec
    clock = supervisor.child_restarts if supervisor is not None else proc.restarts
    recent = [t for t in clock if now - t <= spec.period_s]
    if len(recent) + 1 > spec.intensity:
        if supervisor is not None:
            plan.escalate = supervisor.pid
        return plan  # the kernel gives up on a top-level process: it stays exited
    if supervisor is not None:
        supervisor.child_restarts[:] = [*recent, now]

    siblings = table.children(proc.parent)
    if spec.strategy == "one_for_all":
        group = siblings
    elif spec.strategy == "rest_for_one":
        group = [s for s in siblings if s.pid >= proc.pid]
    else:
        group = [proc]
    for sib in group:
        if sib.pid == proc.pid:
            plan.restart.append(sib.pid)
        elif sib.alive and sib.restart.restart != "temporary":
            plan.terminate.append(sib.pid)
            plan.restart.append(sib.pid)
        elif sib.alive:
            plan.terminate.append(sib.pid)
    return plan
