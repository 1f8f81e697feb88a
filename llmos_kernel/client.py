"""A Python client for a running kernel: submit generations, stream tokens, cancel.

One background task per client long-polls the kernel and routes each batch of
results to the requests waiting on them, so many concurrent requests cost one
Ray call per engine step, not one per token.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from llmos_kernel import wire
from llmos_kernel.deltas import fold_delta
from llmos_kernel.errors import LlmosError, PermissionDenied, Unavailable
from llmos_kernel.paths import (
    DEFAULT_NAME,
    NAMESPACE,
    ROOT_TOKEN_FILE,
    default_state_dir,
    published_state_dir,
)
from llmos_kernel.wire import unwrap

__all__ = ["Completion", "KernelClient", "unwrap"]


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    logprobs: list[float] | None = None
    context_id: str | None = None


class KernelClient:
    def __init__(self, handle: ray.actor.ActorHandle, token: str, client_id: str | None = None):
        self.handle, self.token = handle, token
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self._queues: dict[str, asyncio.Queue] = {}
        self._poller: asyncio.Task | None = None

    @classmethod
    def connect(cls, name: str = DEFAULT_NAME, *, address: str | None = None,
                state_dir: str | Path | None = None) -> KernelClient:
        from llmos_kernel.launcher import connect_ray

        connect_ray(address)
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            raise Unavailable(f"no kernel named {name!r} is running; start one with: "
                              "llmos kernel start") from None
        state = Path(state_dir) if state_dir else default_state_dir()
        token_path = state / ROOT_TOKEN_FILE
        if not token_path.exists() and state_dir is None:
            published = published_state_dir(name)  # a kernel started with another state dir
            if published is not None:
                token_path = published / ROOT_TOKEN_FILE
        if not token_path.exists():
            raise PermissionDenied(f"kernel {name!r} is running but its root token is not at "
                                   f"{token_path}; pass the kernel's --state-dir (or set "
                                   "LLMOS_STATE_DIR), from a user that can read it")
        return cls(handle, token_path.read_text().strip())

    async def call(self, method: str, *args, **kwargs) -> Any:
        return unwrap(await getattr(self.handle, method).remote(self.token, *args, **kwargs))

    async def status(self) -> dict:
        return await self.call("status")

    # -- generation -----------------------------------------------------------
    async def submit(self, *, prompt: str | None = None, messages: list | None = None,
                     prompt_ids: list[int] | None = None, priority: int = 0, owner: int = 0,
                     cache_salt: str = "", keep_context: bool = False, context: str | None = None,
                     request_id: str | None = None, **params) -> str:
        request_id = request_id or uuid.uuid4().hex[:16]
        spec: dict[str, Any] = {"params": params, "request_id": request_id}
        for key, value in (("prompt", prompt), ("messages", messages), ("prompt_ids", prompt_ids),
                           ("context", context)):
            if value is not None:
                spec[key] = value
        if keep_context:
            spec["keep_context"] = True
        self._ensure_poller()
        self._queues[request_id] = asyncio.Queue()  # before submit: deltas may come at once
        try:
            return await self.call("submit", self.client_id, spec, priority, owner, cache_salt)
        except BaseException:
            self._queues.pop(request_id, None)
            raise

    async def stream(self, request_id: str) -> AsyncIterator[wire.TokenDelta]:
        """Deltas of a submitted request until it finishes (the last one has ``finished``)."""
        queue = self._queues[request_id]
        try:
            while True:
                delta = await queue.get()
                if delta.error is not None:
                    raise delta.error.exception()
                yield delta
                if delta.finished:
                    return
        finally:
            self._queues.pop(request_id, None)

    async def generate(self, **kwargs) -> Completion:
        request_id = await self.submit(**kwargs)
        out = Completion(request_id)
        async for delta in self.stream(request_id):
            fold_delta(out, delta)
        return out

    async def cancel(self, request_id: str) -> None:
        await self.call("cancel", self.client_id, request_id)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                batch = await self.call("poll", self.client_id, 5.0)
            except (ray.exceptions.RayActorError, LlmosError) as e:
                error = wire.failure(Unavailable(f"kernel unreachable: {e}")).error
                for request_id, queue in self._queues.items():
                    queue.put_nowait(wire.TokenDelta(0, request_id, [], "", finished=True,
                                                     error=error))
                return
            for delta in batch:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
