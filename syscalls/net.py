"""net: HTTP(S) through the kernel, to the hosts this process was allowed at spawn.

    page = await net.fetch("http://localhost:8080/data.json")
    page.status, page.json()

A process reaches no host unless its spawn allowed it (``proc.spawn(..., net=[...])``);
a refused host raises PermissionDenied naming the allowlist. The kernel makes the
request (a sandboxed process has no sockets of its own), follows redirects only to
allowed hosts, enforces ``timeout`` (Timeout) and ``max_bytes`` (QuotaExceeded), and
logs every request (``llmos net log``).
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

from syscalls import _context


@dataclass
class Response:
    url: str  # after redirects
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    content: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.content.decode(_charset(self.headers), errors="replace")

    def json(self) -> Any:
        return _json.loads(self.content)


async def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                body: str | bytes | None = None, timeout: float = 10.0,
                max_bytes: int = 1 << 20) -> Response:
    """Make one HTTP request as this process; the whole response, at most ``max_bytes``."""
    args: dict[str, Any] = {"url": url, "method": method, "timeout": timeout,
                            "max_bytes": max_bytes}
    if headers:
        args["headers"] = headers
    if body is not None:
        args["body"] = body
    reply = await _context.call("net.fetch", **args)
    return Response(reply["url"], reply["status"], reply["headers"], reply["body"])


def _charset(headers: dict[str, str]) -> str:
    for part in headers.get("content-type", "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip('"')
    return "utf-8"
