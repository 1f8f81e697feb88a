"""The process table on a real SQLite file: pids, capabilities (stored hashed), lookups,
and what a restarted kernel finds."""

from __future__ import annotations

import pytest

from llmos_kernel.errors import InvalidArgument, NoSuchProcess
from llmos_kernel.proctable import ProcessTable, Quotas, RestartSpec

PROGRAM = {"kind": "module", "ref": "workers:Commanded"}


@pytest.fixture
def path(tmp_path):
    return tmp_path / "procs.db"


@pytest.fixture
def table(path):
    t = ProcessTable(path)
    yield t
    t.close()


def test_each_process_gets_a_new_pid_and_a_capability_that_finds_it(table):
    a, cap_a = table.create({"program": PROGRAM, "name": "a"})
    b, cap_b = table.create({"program": PROGRAM, "parent": a.pid})
    assert b.pid > a.pid and cap_a != cap_b
    assert table.by_capability(cap_a) is a and table.by_capability(cap_b) is b
    assert table.by_capability("forged") is None and table.by_capability(None) is None
    assert table.children(a.pid) == [b]


def test_a_reissued_capability_replaces_the_old_one(table):
    proc, old = table.create({"program": PROGRAM})
    new = table.reissue(proc)
    assert table.by_capability(new) is proc and table.by_capability(old) is None


def test_capabilities_are_stored_only_as_hashes(table, path):
    _, cap = table.create({"program": PROGRAM})
    stored = b"".join(f.read_bytes() for f in path.parent.iterdir())  # the db and its WAL
    assert table.by_capability(cap) is not None and cap.encode() not in stored


def test_a_restarted_kernel_finds_its_processes_and_never_reuses_a_pid(path):
    table = ProcessTable(path)
    a, cap = table.create({"program": PROGRAM, "name": "a", "args": {"blob": b"\x00\xff"},
                           "quotas": Quotas(tokens=100), "restart": RestartSpec("transient")})
    last, _ = table.create({"program": PROGRAM})
    table.forget(last.pid)
    table.close()
    table = ProcessTable(path)
    try:
        again = table.get(a.pid)
        assert again == a and table.by_capability(cap) == a
        assert (again.args, again.quotas.tokens, again.restart.restart) == (
            {"blob": b"\x00\xff"}, 100, "transient")
        fresh, _ = table.create({"program": PROGRAM})
        assert fresh.pid > last.pid
    finally:
        table.close()


def test_lookups_by_pid_and_by_name(table):
    a, _ = table.create({"program": PROGRAM, "name": "worker"})
    assert table.find("worker") is a and table.find(a.pid) is a
    a.status = "exited"
    with pytest.raises(NoSuchProcess, match="no live process named 'worker'"):
        table.find("worker")
    with pytest.raises(NoSuchProcess, match="no process with pid 999"):
        table.get(999)
    with pytest.raises(InvalidArgument, match="a pid is an int, got True"):
        table.get(True)


@pytest.mark.parametrize("quotas", [Quotas(tokens=-1), Quotas(fs_bytes=None),
                                    Quotas(mailbox=True), Quotas(memory_items=1.5)])
def test_a_bad_quota_names_the_field(quotas):
    with pytest.raises(InvalidArgument, match="quota .* must be an int >= 0"):
        quotas.validate()
