"""Resource limits from the process's quotas: a memory bomb, a CPU spin, a thread bomb, too
many files, too large a file. Each is stopped, and reported as the program's crash with
the quota it hit. Without the sandbox none of them is bounded (not run plain here: a
memory bomb in a host takes every agent of that host with it). Also: where the sandbox
cannot be enforced, nothing starts."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from actors import sandbox_policy
from actors.sandbox import Sandbox
from actors.sandbox_policy import Limits, SandboxUnavailable, policy
from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument
from security.harness import FakeHost, program, run


def test_a_memory_bomb_fails_at_its_quota_and_is_reported():
    got = run("""
        def main():
            hoard = []
            while True:
                hoard.append(bytearray(16 << 20))
    """, limits=Limits(memory_bytes=512 << 20))
    assert got.error == "MemoryError"
    assert f"memory_bytes quota: {512 << 20} bytes" in got.message


def test_a_cpu_spin_is_killed_when_its_cpu_seconds_run_out():
    got = run("""
        def main():
            while True:
                pass
    """, limits=Limits(cpu_s=1))
    assert got.report.reason == "error"
    assert got.error == "QuotaExceeded" and "SIGXCPU" in got.message
    assert "over its cpu_s quota of 1 s" in got.message


def test_ignoring_sigxcpu_only_buys_a_second_before_sigkill():
    got = run("""
        import signal
        def main():
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
            while True:
                pass
    """, limits=Limits(cpu_s=1))
    assert got.error == "QuotaExceeded" and "SIGKILL" in got.message
    assert 1.5 < got.sandbox.cpu_s < 3.0  # the hard limit: a second past the soft one


def test_threads_are_bounded_by_the_address_space():
    got = run("""
        import threading, time
        def main():
            stop = threading.Event()
            started = 0
            try:
                while started < 10_000:
                    threading.Thread(target=stop.wait, daemon=True).start()
                    started += 1
            finally:
                stop.set()
    """, limits=Limits(memory_bytes=512 << 20))
    assert got.error == "RuntimeError" and "can't start new thread" in got.message


def test_open_files_are_bounded():
    got = run("""
        def main():
            return [open("/dev/null") for _ in range(100)]
    """, limits=Limits(open_files=32))
    assert got.error == "OSError" and "Too many open files" in got.message


def test_a_file_in_the_scratch_dir_is_bounded():
    got = run("""
        def main():
            with open("big.bin", "wb") as f:
                f.write(bytes(2 << 20))
    """, limits=Limits(file_bytes=1 << 20), scratch=True)
    assert got.error == "OSError" and "File too large" in got.message


def test_quotas_name_the_limits():
    limits = Limits.from_quotas({"memory_bytes": 1 << 30, "cpu_s": 30, "tokens": 5000})
    assert (limits.memory_bytes, limits.cpu_s, limits.open_files) == (1 << 30, 30, 256)
    assert Limits.from_quotas({"memory_bytes": None}).memory_bytes is None
    for bad in ({"cpu_s": -1}, {"open_files": None}, {"memory_bytes": True}, {"cpu_s": "9"}):
        with pytest.raises(InvalidArgument):
            Limits.from_quotas(bad)


def test_the_policy_reads_the_runtime_and_the_code_and_nothing_of_the_host():
    rules = policy(wire.Program("module", ref="syscall_agents:identity"), Limits())
    read = [Path(p) for p in rules.read]
    assert Path(sys.prefix).resolve() in read and Path(sys.base_prefix).resolve() in read
    assert rules.modules == {"syscall_agents": str(Path(__file__).parents[1] / "agents"
                                                   / "syscall_agents.py")}
    for forbidden in (Path.home(), Path("/proc"), Path("/tmp"), Path("/etc"),
                      Path(__file__).parents[2]):  # the repository holds more than code
        assert not any(p == forbidden or forbidden.is_relative_to(p) for p in read), forbidden
    assert rules.scratch is None


def test_without_landlock_no_sandboxed_process_starts(monkeypatch):
    monkeypatch.setattr(sandbox_policy, "landlock_abi", lambda: 0)
    box = Sandbox(FakeHost(), 7, program("def main(): pass"))
    with pytest.raises(SandboxUnavailable, match="no Landlock"):
        asyncio.run(box.start())
    assert box.process is None


def test_a_child_that_cannot_confine_itself_runs_nothing():
    # with one file descriptor allowed it cannot even create its Landlock ruleset
    host = FakeHost({"test.escape": lambda args: "ran"})
    box = Sandbox(host, 7, program("""
        from syscalls import _context
        async def main():
            await _context.call("test.escape")
    """), limits=Limits(open_files=1))
    with pytest.raises(SandboxUnavailable, match="could not confine itself"):
        asyncio.run(box.start())
    assert host.calls == [] and box.process.returncode != 0
    assert not os.path.exists(box.dir)
