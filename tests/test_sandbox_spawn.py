"""Who runs sandboxed, decided at spawn without a kernel: the option, the kernel-wide
default, a sandboxed parent, hosts that cannot; and the quotas that become its rlimits.

Model-free, but not in tests/unit: the process manager imports Ray."""

from __future__ import annotations

import pytest

from actors.sandbox_policy import Limits
from llmos_kernel.errors import InvalidArgument, SandboxUnavailable
from llmos_kernel.processes import HostInfo, ProcessManager
from llmos_kernel.proctable import ProcessTable, Quotas

PROGRAM = {"kind": "module", "ref": "workers:Commanded"}


@pytest.fixture
def table(tmp_path):
    t = ProcessTable(tmp_path / "procs.db")
    yield t
    t.close()


def manager(table: ProcessTable, *, sandbox_hosts: bool = True,
            kernel_default: bool = False) -> ProcessManager:
    procs = ProcessManager("k", table, ipc=None, outboxes=None, sandbox=kernel_default)
    for host in ("h1", "h2"):
        procs.hosts[host] = HostInfo(host, handle=object(), secret="s", sandbox=sandbox_hosts)
    return procs


def spawn(procs: ProcessManager, parent=None, **spec):
    fields = procs.validate_spawn(parent, {"program": PROGRAM, **spec})
    return procs.table.create(fields)[0]


def test_sandbox_is_asked_for_or_given_by_the_kernel_or_the_parent(table):
    procs = manager(table)
    assert not spawn(procs).sandbox
    boxed = spawn(procs, sandbox=True, scratch=True)
    assert (boxed.sandbox, boxed.scratch) == (True, True)
    assert spawn(procs, boxed, sandbox=False).sandbox  # a sandboxed parent's child always is
    assert not spawn(procs, scratch=True).scratch  # a scratch dir only inside a sandbox
    assert spawn(manager(table, kernel_default=True)).sandbox


def test_an_attached_driver_is_never_sandboxed(table):
    procs = manager(table, kernel_default=True)
    procs.hosts["driver"] = HostInfo("driver", None, "s")
    proc, _ = procs.attach("script", 0, "driver")
    assert not proc.sandbox


def test_sandbox_is_refused_where_no_host_can_enforce_it(table):
    procs = manager(table, sandbox_hosts=False)
    with pytest.raises(SandboxUnavailable, match="needs Landlock"):
        spawn(procs, sandbox=True)
    with pytest.raises(SandboxUnavailable):
        spawn(manager(table, sandbox_hosts=False, kernel_default=True))
    with pytest.raises(InvalidArgument, match="sandbox must be True or False"):
        spawn(manager(table), sandbox="yes")


def test_the_rlimit_quotas_are_the_sandbox_limits_and_a_child_gets_at_most_its_parents(table):
    assert Limits.from_quotas(Quotas().limits()) == Limits()
    procs = manager(table)
    parent = spawn(procs, sandbox=True, quotas={"memory_bytes": 1 << 30, "cpu_s": 10,
                                                "open_files": 64})
    child = spawn(procs, parent, quotas={"memory_bytes": None, "cpu_s": 60,
                                         "file_bytes": 1 << 20})
    assert child.quotas.limits() == {"memory_bytes": 1 << 30, "cpu_s": 10, "open_files": 64,
                                     "file_bytes": 1 << 20}
    for bad in ({"memory_bytes": 0}, {"open_files": None}, {"cpu_s": True}):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            spawn(procs, quotas=bad)
