"""A host channel driven by hand, for tests that craft the syscalls a host sends.

It speaks the kernel's host protocol (numbered batches, numbered chunks of items) with
whatever host id and secret it is given, so a test can present forged, stale or foreign
capabilities exactly as a hostile host would. Batches are built as plain msgpack, not
through ``wire``'s structs, so a test can put anything in them.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
import ray

from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument


def _encodable(value: Any) -> bool:
    try:
        msgspec.msgpack.encode(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def plain(result: wire.Result) -> dict:
    """A result in the shape tests compare: {"ok": v}, {"error": {...}} or {"pending": True}."""
    if result.error is not None:
        return {"error": wire.to_builtins(result.error)}
    return {"pending": True} if result.pending else {"ok": result.ok}


class RawHost:
    def __init__(self, kernel_handle: Any, host_id: str, secret: str):
        self.kernel, self.host_id, self.secret = kernel_handle, host_id, secret
        self.epoch, self.seq = "", 0
        self.items: list = []  # everything the kernel sent this host (wire items), in order
        self._ids = itertools.count()

    def call_id(self) -> str:
        return f"{self.host_id}:raw:{next(self._ids)}"

    def send(self, data: Any, timeout: float = 60.0) -> wire.Answer:
        """One host_batch call carrying ``data`` as it is; the kernel's decoded answer."""
        return wire.decode_answer(ray.get(self.kernel.host_batch.remote(
            self.host_id, data, self.secret), timeout=timeout))

    def batch(self, ops: Any, timeout: float = 60.0) -> dict:
        """Send one batch of ops; the per-call results as plain dicts ({"ok": v},
        {"error": {...}} or {"pending": True}), or the kernel's error for the batch.

        Arguments msgpack cannot carry (an int past 64 bits) never reach the kernel: a real
        host refuses them when the call is made, and so does this one, through the host's
        own encoder (``wire.encode_args``)."""
        sendable, refused = [], {}
        for op in ops:
            if _encodable(op):
                sendable.append(op)
            elif isinstance(op, list) and len(op) == 5 and not _encodable(op[3]):
                with pytest.raises(InvalidArgument) as e:
                    wire.encode_args(op[3])
                refused[op[0]] = {"error": e.value.to_wire()}
            else:  # no msgpack carries it: a hostile host sends the nearest thing it can
                sendable.append([v if _encodable(v) else repr(v) for v in op])
        while True:
            reply = self.send(msgspec.msgpack.encode([self.epoch, self.seq, sendable, [], {}]),
                              timeout)
            if reply.error is not None:
                return {"error": wire.to_builtins(reply.error)}
            if reply.resync is not None:
                self.epoch, self.seq = reply.resync, 0
                continue
            self.seq += 1
            self.items += reply.out.items
            return {**{call: plain(wire.decode_result(raw))
                       for call, raw in reply.results.items()}, **refused}

    def poll(self, timeout: float = 1.0) -> list:
        """What the kernel has for this host within ``timeout`` s (also kept in ``items``)."""
        reply = wire.decode_answer(ray.get(self.kernel.host_poll.remote(
            self.host_id, timeout, self.secret), timeout=timeout + 60))
        if reply.error is not None:
            raise RuntimeError(f"poll refused: {reply.error}")
        self.items += reply.out.items
        return reply.out.items

    @staticmethod
    def result(raw: Any) -> dict:
        """A Reply item's result as a plain dict."""
        return plain(wire.decode_result(raw))

    def op(self, capability: Any, name: Any, args: Any, handling: Any = None) -> list:
        return [self.call_id(), capability, name, args, handling]
