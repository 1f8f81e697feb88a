"""Helpers the process tests share: wait for the process table to reach a state."""

import asyncio
import time
from collections.abc import Callable

from syscalls import ipc, proc


async def table() -> dict[int, dict]:
    """Every process, exited ones too, by pid."""
    return {p["pid"]: p for p in await proc.ps(all=True)}


async def until(condition: Callable[[dict[int, dict]], bool], timeout: float = 60.0,
                what: str = "the processes to settle") -> dict[int, dict]:
    """Poll the process table until ``condition(table)`` holds; returns that table."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await table()
        if condition(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: "
                                 f"{[(p['pid'], p['name'], p['status']) for p in rows.values()][-8:]}")
        await asyncio.sleep(0.05)


async def reports(count: int, timeout: float = 30.0) -> list[str]:
    """The texts of the next ``count`` Report messages sent to this process."""
    from workers import Report

    return [(await ipc.recv(type=Report, timeout=timeout)).body.text for _ in range(count)]
