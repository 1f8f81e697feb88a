"""The approval queue: requests, decisions, waiting, expiry and persistence in one SQLite file."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from llmos_kernel.errors import InvalidArgument, NotFound
from llmos_kernel.services.approvals import ApprovalQueue


@pytest.fixture
def queue(tmp_path: Path) -> ApprovalQueue:
    queue = ApprovalQueue(tmp_path / "approvals.db")
    yield queue
    queue.close()


def test_submit_gives_a_short_unique_typeable_id(queue: ApprovalQueue) -> None:
    ids = {queue.submit(7, "rm", {"path": f"f{i}"}).id for i in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{8}", approval_id) for approval_id in ids)
    assert len(queue.pending()) == 50


def test_decide_records_who_and_why(queue: ApprovalQueue) -> None:
    request = queue.submit(7, "rm", {"path": "notes.txt", "force": True})
    assert [a.id for a in queue.pending()] == [request.id]

    denied = queue.decide(request.id.upper(), approve=False, by="alice", reason="keep it")

    assert (denied.state, denied.decided_by, denied.reason) == ("denied", "alice", "keep it")
    assert denied.args == {"path": "notes.txt", "force": True}
    assert denied.pid == 7 and denied.tool == "rm"
    assert queue.pending() == []
    assert queue.get(request.id) == denied


def test_unknown_id_and_double_decision_are_refused(queue: ApprovalQueue) -> None:
    with pytest.raises(NotFound, match="deadbeef"):
        queue.decide("deadbeef", approve=True)
    with pytest.raises(NotFound):
        queue.get("deadbeef")
    request = queue.submit(1, "rm", {})
    queue.decide(request.id, approve=True)
    with pytest.raises(InvalidArgument, match="already approved"):
        queue.decide(request.id, approve=False)
    with pytest.raises(InvalidArgument, match="already approved"):
        queue.decide(request.id, approve=True)


def test_wait_returns_as_soon_as_decided_in_process(queue: ApprovalQueue) -> None:
    request = queue.submit(3, "shell", {"cmd": "ls"})

    async def scenario() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, queue.decide, request.id, True, "bob")
        started = time.monotonic()
        decided = await queue.wait(request.id, timeout_s=10)
        return decided.state, time.monotonic() - started

    state, waited = asyncio.run(scenario())
    assert state == "approved"
    assert waited < 0.2  # woken by the decision, well before the next poll of the file


def test_wait_times_out_and_expires_the_request(queue: ApprovalQueue) -> None:
    request = queue.submit(3, "shell", {})
    expired = asyncio.run(queue.wait(request.id, timeout_s=0.1))
    assert expired.state == "expired"
    assert "0.1s" in expired.reason
    with pytest.raises(InvalidArgument, match="already expired"):
        queue.decide(request.id, approve=True)


def test_cancelled_waiter_expires_the_request(queue: ApprovalQueue) -> None:
    request = queue.submit(3, "shell", {})

    async def scenario() -> None:
        waiter = asyncio.create_task(queue.wait(request.id, timeout_s=10))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(scenario())
    assert queue.get(request.id).state == "expired"


def test_decision_from_another_instance_wakes_the_waiter(tmp_path: Path) -> None:
    kernel = ApprovalQueue(tmp_path / "approvals.db", poll_interval_s=0.05)
    human = ApprovalQueue(tmp_path / "approvals.db")  # as `llmos approve` opens it
    request = kernel.submit(9, "send_email", {"to": "x@example.com"})
    assert [a.id for a in human.pending()] == [request.id]

    async def scenario() -> str:
        asyncio.get_running_loop().call_later(0.1, human.decide, request.id, False, "carol")
        return (await kernel.wait(request.id, timeout_s=5)).state

    assert asyncio.run(scenario()) == "denied"
    kernel.close()
    human.close()


def test_requests_persist_across_instances(tmp_path: Path) -> None:
    first = ApprovalQueue(tmp_path / "state" / "approvals.db")
    pending = first.submit(4, "rm", {"path": "a"})
    decided = first.submit(4, "rm", {"path": "b"})
    first.decide(decided.id, approve=True, by="dave")
    first.close()

    second = ApprovalQueue(tmp_path / "state" / "approvals.db")
    assert second.pending() == [pending]
    assert second.get(decided.id).decided_by == "dave"
    second.close()
