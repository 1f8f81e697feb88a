"""A host channel driven by hand, for tests that craft the syscalls a host sends.

It speaks the kernel's host protocol (numbered batches, numbered chunks of items) with
whatever host id and secret it is given, so a test can present forged, stale or foreign
capabilities exactly as a hostile host would.
"""

from __future__ import annotations

import itertools
from typing import Any

import ray


class RawHost:
    def __init__(self, kernel_handle: Any, host_id: str, secret: str):
        self.kernel, self.host_id, self.secret = kernel_handle, host_id, secret
        self.epoch, self.seq = "", 0
        self.items: list[dict] = []  # everything the kernel sent this host, in arrival order
        self._ids = itertools.count()

    def call_id(self) -> str:
        return f"{self.host_id}:raw:{next(self._ids)}"

    def batch(self, ops: Any, timeout: float = 60.0) -> dict:
        """Send one batch of ops; the per-call results, or the kernel's error for the batch."""
        while True:
            reply = ray.get(self.kernel.host_batch.remote(
                self.host_id, self.epoch, self.seq, ops, [], {}, self.secret), timeout=timeout)
            if "error" in reply:
                return reply
            if "resync" in reply["ok"]:
                self.epoch, self.seq = reply["ok"]["resync"], 0
                continue
            self.seq += 1
            self.items += reply["ok"]["out"][2]
            return reply["ok"]["results"]

    def poll(self, timeout: float = 1.0) -> list[dict]:
        """What the kernel has for this host within ``timeout`` s (also kept in ``items``)."""
        reply = ray.get(self.kernel.host_poll.remote(self.host_id, timeout, self.secret),
                        timeout=timeout + 60)
        if "error" in reply:
            raise RuntimeError(f"poll refused: {reply['error']}")
        items = reply["ok"][2]
        self.items += items
        return items

    def op(self, capability: Any, name: Any, args: Any, handling: Any = None) -> list:
        return [self.call_id(), capability, name, args, handling]
