"""The gateway's side of the kernel: one in-process agent host, one process per API key.

An HTTP request runs as its key's process (``as_process``): every syscall it makes is
that process's, batched with the others' through the gateway's one host, so an HTTP
caller is scheduled, charged and limited exactly as an agent is. Processes are attached
on a key's first request and kept for the server's life.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from actors.driver import attach
from actors.runtime import AgentRuntime, current
from llmos_kernel.client import KernelClient
from llmos_kernel.errors import QuotaExceeded
from llmos_kernel.http.keys import ApiKey


@dataclass
class KeyState:
    key: ApiKey
    runtime: AgentRuntime
    streams: int = 0  # requests in flight
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass
class Gateway:
    client: KernelClient
    keys: dict[str, KeyState] = field(default_factory=dict)  # by key name
    _attaching: dict[str, asyncio.Future] = field(default_factory=dict)
    _host: Any = None  # the in-process AgentHost every key's process runs on

    @classmethod
    def connect(cls, kernel: str, *, address: str | None = None,
                state_dir: str | None = None) -> Gateway:
        return cls(KernelClient.connect(kernel, address=address, state_dir=state_dir))

    async def process(self, key: ApiKey) -> KeyState:
        """The key's process, attached on first use."""
        state = self.keys.get(key.name)
        if state is not None:
            return state
        pending = self._attaching.get(key.name)
        if pending is None:
            pending = self._attaching[key.name] = asyncio.ensure_future(self._attach(key))
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done() and pending.exception() is not None:
                self._attaching.pop(key.name, None)

    async def _attach(self, key: ApiKey) -> KeyState:
        runtime = await attach(self.client.handle, self.client.token, f"http:{key.name}",
                               priority=key.priority, quotas=key.quotas, default=False,
                               host=self._host)
        self._host = runtime.host
        state = self.keys[key.name] = KeyState(key, runtime)
        return state

    async def enter(self, key: ApiKey) -> KeyState:
        """Count one more request of ``key`` in flight (refused past its limit) and make
        the calling task act as the key's process; ``leave`` when it is done."""
        state = await self.process(key)
        if state.streams >= key.max_streams:
            raise QuotaExceeded(f"key {key.name!r} has {state.streams} requests in flight, its "
                                f"limit; wait for one to finish")
        state.streams += 1
        state.requests += 1
        current.set(state.runtime)
        return state

    @staticmethod
    def leave(state: KeyState) -> None:
        state.streams -= 1

    @contextlib.asynccontextmanager
    async def as_process(self, key: ApiKey) -> AsyncIterator[KeyState]:
        """Run the block as ``key``'s process, counting it against the key's stream limit."""
        state = await self.enter(key)
        try:
            yield state
        finally:
            self.leave(state)

    async def call(self, method: str, *args: Any) -> Any:
        """A driver-API call with the root token (status, ps, approvals...)."""
        return await self.client.call(method, *args)

    async def close(self) -> None:
        if self._host is not None:
            await self._host.stop()
        await self.client.close()
