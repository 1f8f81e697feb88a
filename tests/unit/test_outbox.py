"""Per-client outboxes: one long-poll takes everything queued for that client, waits when
there is nothing, and never takes another client's items."""

from __future__ import annotations

import asyncio
import time

from llmos_kernel.outbox import Outboxes


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=5))


def test_a_take_drains_the_clients_queue_in_order():
    async def scenario():
        box = Outboxes()
        for i in range(3):
            box.put("a", i)
        box.put("b", "other")
        return await box.take("a", timeout=1), await box.take("b", timeout=1)

    assert run(scenario()) == ([0, 1, 2], ["other"])


def test_an_empty_take_waits_out_its_timeout_and_returns_nothing():
    async def scenario():
        box = Outboxes()
        started = time.monotonic()
        taken = await box.take("a", timeout=0.05)
        return taken, time.monotonic() - started

    taken, waited = run(scenario())
    assert taken == [] and waited >= 0.04


def test_a_waiting_take_wakes_as_soon_as_an_item_arrives():
    async def scenario():
        box = Outboxes()
        poll = asyncio.create_task(box.take("a", timeout=30))
        await asyncio.sleep(0.01)
        box.put("b", "not yours")
        await asyncio.sleep(0.01)
        assert not poll.done(), "another client's item does not wake this poll"
        box.put("a", "yours")
        return await poll

    assert run(scenario()) == ["yours"]


def test_a_take_returns_at_most_limit_and_the_rest_is_ready_at_once():
    async def scenario():
        box = Outboxes()
        for i in range(5):
            box.put("a", i)
        first = await box.take("a", timeout=30, limit=2)
        started = time.monotonic()
        second = await box.take("a", timeout=30, limit=2)
        third = await box.take("a", timeout=30, limit=2)
        return first, second, third, time.monotonic() - started

    first, second, third, waited = run(scenario())
    assert (first, second, third) == ([0, 1], [2, 3], [4]) and waited < 1


def test_dropping_a_client_discards_its_items():
    async def scenario():
        box = Outboxes()
        box.put("a", 1)
        box.drop("a")
        return await box.take("a", timeout=0.01)

    assert run(scenario()) == []
