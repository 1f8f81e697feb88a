"""Per-client queues the kernel fills and clients long-poll: one delivery per poll."""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class Outboxes:
    """Per-client queues of results; a client's long-poll drains its queue."""

    def __init__(self) -> None:
        self.items: dict[str, list] = collections.defaultdict(list)
        self.events: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    def put(self, client: str, item: Any) -> None:
        self.items[client].append(item)
        self.events[client].set()

    async def take(self, client: str, timeout: float, limit: int = 5000) -> list:
        event = self.events[client]
        if not self.items.get(client):
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                pass
        event.clear()
        items = self.items.get(client, [])
        taken, rest = items[:limit], items[limit:]
        if rest:
            self.items[client] = rest
            event.set()
        else:
            self.items.pop(client, None)
        return taken

    def drop(self, client: str) -> None:
        self.items.pop(client, None)
        self.events.pop(client, None)
