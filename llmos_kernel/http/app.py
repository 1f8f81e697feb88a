"""The ASGI app ``llmos serve`` runs: FastAPI on uvicorn, as vLLM's OpenAI server is.

Why FastAPI/Starlette rather than Ray Serve: the gateway is one process that joins the
kernel's Ray cluster as a driver, and the kernel already batches every caller's work in
one engine; Ray Serve would add replicas and a proxy in front of a single scheduler
without adding capacity, and its HTTP proxy is itself Starlette/uvicorn.

Every request is authenticated first: with keys configured, ``Authorization: Bearer KEY``
names the caller (its kernel process); with none, only loopback callers are served.
Bodies over ``max_body_bytes`` are refused before they are read whole.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmos_kernel.http import errors
from llmos_kernel.http.gateway import Gateway
from llmos_kernel.http.keys import ANONYMOUS, ApiKey, KeyRing

MAX_BODY_BYTES = 4 << 20
MAX_TOKENS = 4096  # per request, unless the server is told otherwise


@dataclass
class Server:
    """What the routes share: the gateway, the keys, the served models and the limits."""

    gateway: Gateway
    keys: KeyRing
    model_id: str
    model_aliases: list[str]
    embedding_model: str
    tokenizer: Any = None  # the model's, to name logprobs' tokens
    max_tokens: int = MAX_TOKENS
    max_body_bytes: int = MAX_BODY_BYTES
    started: float = field(default_factory=time.time)
    fingerprint: str = "llmos"

    def token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"<{token}>"
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(server: Server) -> FastAPI:
    from llmos_kernel.http import console, metrics, openai_api

    app = FastAPI(title="llmos", docs_url=None, redoc_url=None)
    app.state.llmos = server
    errors.install(app)

    app.add_middleware(Authenticate, server=server)

    app.include_router(openai_api.router)
    app.include_router(metrics.router)
    app.include_router(console.router)
    return app


class Authenticate:
    """Checks a request's size and key before any route sees it, as plain ASGI: it only
    reads headers, and passes a streamed response through untouched (no wrapping per
    chunk, as Starlette's BaseHTTPMiddleware would)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        request = Request(scope)
        length = request.headers.get("content-length")
        limit = self.server.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return errors.response(413, f"the body has {length} bytes, over this server's "
                                   f"limit of {limit}", "invalid_request_error",
                                   "body_too_large")
        path = scope["path"]
        if path.startswith(("/v1/", "/api/")) or path == "/metrics":
            key = _authenticate(self.server.keys, request)
            if isinstance(key, JSONResponse):
                return key
            scope.setdefault("state", {})["api_key"] = key
        return None


def _authenticate(keys: KeyRing, request: Request) -> ApiKey | JSONResponse:
    header = request.headers.get("authorization", "")
    presented = header[7:].strip() if header.lower().startswith("bearer ") else None
    if keys.open:
        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]")
        if not _loopback(request.client.host if request.client else None) or not (
                host == "localhost" or _loopback(host)):  # no DNS rebinding either
            return errors.response(403, "this server has no API keys configured, so it serves "
                                   "loopback callers only; start it with --api-key or "
                                   "--keys-file", "permission_error")
        return ApiKey(ANONYMOUS)
    key = keys.find(presented)
    if key is None:
        return errors.response(401, "missing or unknown API key: send 'Authorization: Bearer "
                               "KEY' with a key this server knows", "invalid_request_error",
                               "invalid_api_key")
    return key
