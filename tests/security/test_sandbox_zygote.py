"""A host's zygote (actors.sandbox_zygote): children forked from it are confined as launched
ones are, cannot reach the zygote, are reaped and reported, and die with it.

Every other test in this directory runs its programs in forks too (the harness forks by
default); these are about the zygote itself, and the launched path it replaces.
"""

from __future__ import annotations

import asyncio
import os
import signal

from actors.sandbox import Sandbox
from actors.sandbox_zygote import Zygote
from security.harness import FakeHost, outcome, plain, program, run, until

PARENT = """
import os, signal
def main():
    out = {}
    for what in ("environ", "cmdline", "maps"):
        try:
            with open(f"/proc/{os.getppid()}/{what}", "rb") as f:
                f.read(1)
            out[what] = "read"
        except PermissionError:
            out[what] = "refused"
        except OSError as e:
            out[what] = type(e).__name__
    try:
        os.kill(os.getppid(), 0)
        out["signal"] = "sent"
    except PermissionError:
        out["signal"] = "refused"
    return out
"""


def test_a_fork_cannot_read_or_signal_its_zygote():
    assert plain(PARENT).result == {"environ": "read", "cmdline": "read", "maps": "read",
                                    "signal": "sent"}
    got = run(PARENT)
    assert got.result == {"environ": "refused", "cmdline": "refused", "maps": "refused",
                          "signal": "refused"}, got.message


def test_a_launched_child_is_confined_as_a_fork_is():
    forked, launched = run(PARENT), run(PARENT, forked=False)
    assert forked.result == launched.result and forked.ok


def test_forks_are_reaped_and_report_status_cpu_time_and_stderr():
    async def scenario():
        zygote = Zygote()
        try:
            assert await zygote.started(60)
            boxes = [Sandbox(FakeHost(), pid, program(f"""
                import os, time
                def main():
                    end = time.process_time() + 0.2
                    while time.process_time() < end:
                        pass
                    os.write(2, b"note from {pid}\\n")  # its stderr (print goes to the host)
                    if {pid} == 2:
                        raise SystemExit(3)
                    return {pid}
            """)) for pid in (1, 2)]
            for box in boxes:
                await box.start(zygote.fork())
            reports = [await asyncio.wait_for(box.wait(), 60) for box in boxes]
            return boxes, reports, dict(zygote.children)
        finally:
            zygote.close()

    boxes, (first, second), left = asyncio.run(scenario())
    assert first.reason == "normal" and first.result == 1
    assert second.reason == "error" and second.error["type"] == "ProcessCrashed"
    assert "exited with status 3" in second.error["message"]
    assert "note from 2" in second.error["traceback"]
    for box in boxes:
        assert box.process.pid != os.getpid() and box.cpu_s >= 0.2
        assert not os.path.exists(box.dir)
    assert left == {}  # every child reported


def test_children_die_with_their_zygote_and_are_reported_killed():
    async def scenario():
        zygote = Zygote()
        assert await zygote.started(60)
        box = Sandbox(FakeHost(), 9, program("""
            import time
            def main():
                time.sleep(600)
        """))
        await box.start(zygote.fork())
        child = box.process.pid
        os.kill(zygote.process.pid, signal.SIGKILL)
        report = await asyncio.wait_for(box.wait(), 30)
        await until(lambda: not zygote.alive, "the zygote's end")
        zygote.close()
        return report, child

    report, child = asyncio.run(scenario())
    assert outcome(report).error == "ProcessCrashed" and "SIGKILL" in report.error["message"]
    try:  # gone, or a zombie its new parent has yet to reap
        with open(f"/proc/{child}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")


def test_a_malformed_fork_request_is_refused_and_the_zygote_keeps_serving():
    import msgspec

    async def scenario():
        zygote = Zygote()
        try:
            assert await zygote.started(60)
            zygote.ctl.send(msgspec.msgpack.encode(["fork", "/tmp"]))  # no descriptors
            try:
                zygote._forked()  # its answer to that request
            except OSError as e:
                refused = str(e)
            box = Sandbox(FakeHost(), 4, program("def main():\n    return 'served'\n"))
            await box.start(zygote.fork())
            return refused, await asyncio.wait_for(box.wait(), 60)
        finally:
            zygote.close()

    refused, report = asyncio.run(scenario())
    assert "refused a fork" in refused and "0 descriptors" in refused
    assert report.result == "served"
