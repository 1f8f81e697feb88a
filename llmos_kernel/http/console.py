"""The web console: one static page at ``/`` and the JSON it polls under ``/api/console``.

The page (``static/``: plain HTML, CSS and JavaScript, no build step and nothing fetched
from elsewhere) asks these routes once a second and draws what they answer; every route
is one driver call through the gateway with the root token, so the console shows the
kernel's own records (the ones ``llmos ps``, ``llmos kernel status`` and
``llmos approvals`` print) and acts with the CLI's authority. That is why the routes sit
under ``/api/``, which the app authenticates like ``/v1/``: with keys configured a caller
needs one, with none only loopback callers are served.

The two routes that act (approve or deny, kill) take a JSON body, which FastAPI reads only
when it is sent as ``application/json``, and refuse a request whose ``Origin`` is another
site: a web page elsewhere cannot make a visitor's browser act on a loopback console, as a
cross-site JSON POST needs a preflight this server never grants and a form POST is not JSON.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from llmos_kernel.http.errors import ApiError
from llmos_kernel.http.gateway import Gateway

router = APIRouter()

STATIC = Path(__file__).parent / "static"
_ASSETS = {"console.css": "text/css", "console.js": "text/javascript"}
LOG_TAIL_CHARS = 64 << 10  # what a first look at a log shows; later polls bring the rest
LOG_FIRST_READS = 16  # kernel reads (each up to its chunk size) a first look may take


class Decision(BaseModel):
    approve: bool


class Signal(BaseModel):
    signal: str = "term"


def _gateway(request: Request) -> Gateway:
    return request.app.state.llmos.gateway


def _same_site(request: Request) -> None:
    """Refuse an acting request whose Origin is another site."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise ApiError(403, f"requests from {origin} may not act on this console",
                       "permission_error", "cross_origin")


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/console/{asset}", include_in_schema=False)
async def asset(asset: str) -> FileResponse:
    if asset not in _ASSETS:
        raise ApiError(404, f"no console asset {asset!r}", "invalid_request_error", "not_found")
    return FileResponse(STATIC / asset, media_type=_ASSETS[asset])


@router.get("/api/console/status")
async def status(request: Request) -> dict:
    """The kernel's status, and the gateway's counters per API key."""
    gateway = _gateway(request)
    answer = await gateway.call("status")
    answer["http_keys"] = {name: {"requests": s.requests, "in_flight": s.streams,
                                  "tokens_in": s.tokens_in, "tokens_out": s.tokens_out,
                                  "pid": s.runtime.pid}
                           for name, s in sorted(gateway.keys.items())}
    return answer


@router.get("/api/console/ps")
async def ps(request: Request, all: bool = False) -> list:
    """Live processes; with ``all``, exited ones too."""
    return await _gateway(request).call("ps", all)


@router.get("/api/console/approvals")
async def approvals(request: Request) -> list:
    return await _gateway(request).call("approvals")


@router.post("/api/console/approvals/{approval_id}")
async def decide(request: Request, approval_id: str, decision: Decision) -> dict:
    _same_site(request)
    return await _gateway(request).call("decide", approval_id, decision.approve)


@router.get("/api/console/logs/{pid}")
async def logs(request: Request, pid: int, offset: int | None = None) -> dict:
    """A process's output from ``offset``; without one, the last ``LOG_TAIL_CHARS`` of it
    (read forward a bounded number of chunks, since the kernel serves logs by offset)."""
    gateway = _gateway(request)
    if offset is not None:
        return await gateway.call("logs", pid, offset)
    tail, answer = "", {"offset": 0}
    for _ in range(LOG_FIRST_READS):
        answer = await gateway.call("logs", pid, answer["offset"])
        tail = (tail + answer["text"])[-LOG_TAIL_CHARS:]
        if not answer["text"]:
            break
    return {**answer, "text": tail}


@router.post("/api/console/kill/{pid}")
async def kill(request: Request, pid: int, signal: Signal) -> dict:
    _same_site(request)
    await _gateway(request).call("kill", pid, signal.signal)
    return {"pid": pid, "signal": signal.signal}
