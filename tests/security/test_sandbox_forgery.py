"""Abusing the channel: a program writes its own frames into the socket it inherited
(its fd is in sys.argv). Whatever it writes, the host does not crash: a frame that is
malformed, oversize or out of protocol kills the child and is reported as its crash;
a forged call with bad arguments is answered with an error; a flood of calls is capped;
a child that stops reading is killed. The host keeps serving other sandboxes."""

from __future__ import annotations

import asyncio

import pytest

from actors import sandbox
from actors.sandbox import Sandbox
from llmos_kernel import wire
from security.harness import FakeHost, outcome, program, run, sandboxed, until

FORGE = """
import os, sys, time
import msgspec
from actors import sandbox_protocol as protocol
from llmos_kernel import wire
def main(what):
    fd = int(sys.argv[1])
    frames = {
        "garbage": b"\\x00\\x00\\x00\\x05hello",
        "oversize": b"\\xff\\xff\\xff\\xff",
        "a host's message": protocol.frame(protocol.Answer(1, msgspec.Raw(b"\\xc0"))),
        "a wrong field type": protocol.frame(["call", "one", "proc.self", {}, None]),
        "a second Ready": protocol.frame(protocol.Ready()),
        "a tool result it was never asked for": protocol.frame(
            protocol.ToolResult("t-99", wire.encode_result(wire.ok("forged")))),
    }
    os.write(fd, frames[what])
    time.sleep(30)
"""


@pytest.mark.parametrize("what", ["garbage", "oversize", "a host's message",
                                  "a wrong field type", "a second Ready",
                                  "a tool result it was never asked for"])
def test_a_forged_frame_kills_the_child_and_not_the_host(what):
    async def scenario():
        host = FakeHost({"test.echo": lambda args: args})
        got = await sandboxed(FORGE, {"what": what}, host=host)
        after = await sandboxed("""
            from syscalls import _context
            async def main():
                return await _context.call("test.echo", still="serving")
        """, host=host)
        return got, after

    got, after = asyncio.run(scenario())
    assert got.error == "ProtocolViolation", (got.report, got.message)
    assert got.host.tool_results == {}
    assert after.result == {"still": "serving"}


def test_a_forged_exit_report_cannot_claim_another_pid():
    got = run("""
        import os, sys
        from actors import sandbox_protocol as protocol
        from llmos_kernel import wire
        def main():
            report = wire.ExitReport(1, "normal", result="I am init")
            os.write(int(sys.argv[1]), protocol.frame(protocol.Exit(report)))
            os._exit(0)
    """)
    assert got.report.pid == 7 and got.result == "I am init"


def test_a_second_exit_report_is_a_violation():
    got = run("""
        import os, sys
        from actors import sandbox_protocol as protocol
        from llmos_kernel import wire
        def main():
            os.write(int(sys.argv[1]), protocol.frame(protocol.Exit(wire.ExitReport(7, "normal"))))
            return "and again"
    """)
    assert got.error == "ProtocolViolation" and "second exit report" in got.message


def test_a_forged_call_with_bad_arguments_is_answered_not_served():
    host = FakeHost({"test.echo": lambda args: args})
    got = run("""
        import os, sys
        import msgspec
        from actors import sandbox_protocol as protocol
        from syscalls import _context
        async def main():
            bad = protocol.Call(999, "proc.kill", msgspec.Raw(msgspec.msgpack.encode([1, 2])))
            os.write(int(sys.argv[1]), protocol.frame(bad))
            return await _context.call("test.echo", fine=True)
    """, host=host)
    assert got.result == {"fine": True}, got.message
    assert [name for name, _, _ in host.calls] == ["test.echo"]


def test_calls_in_flight_are_capped(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_CALLS", 50)

    async def scenario():
        release = asyncio.Event()

        async def slow(args):
            await release.wait()
            return "done"

        host = FakeHost({"test.slow": slow})
        box = Sandbox(host, 7, program("""
            import asyncio
            from syscalls import _context
            async def main():
                got = await asyncio.gather(*(_context.call("test.slow") for _ in range(60)),
                                           return_exceptions=True)
                return sorted(type(g).__name__ for g in got)
        """))
        await box.start()
        await until(lambda: len(host.calls) == 50, "50 calls in flight")
        await asyncio.sleep(0.2)
        release.set()
        return await box.wait()

    report = asyncio.run(scenario())
    assert report.reason == "normal"
    assert report.result == ["QuotaExceeded"] * 10 + ["str"] * 50


def test_a_child_that_stops_reading_is_killed(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_UNREAD", 1 << 20)

    async def scenario():
        box = Sandbox(FakeHost(), 7, program("""
            import time
            def main():
                time.sleep(60)  # blocks its loop: nothing it is sent is read
        """))
        await box.start()
        for i in range(64):
            box.push(wire.TokenDelta(7, "r", [i], "x" * (64 << 10)))
            await asyncio.sleep(0)
        return outcome(await asyncio.wait_for(box.wait(), 30))

    got = asyncio.run(scenario())
    assert got.error == "ProtocolViolation" and "unread" in got.message
