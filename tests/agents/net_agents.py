"""Programs for the net.fetch tests: each fetches what it is told and reports the outcome
(a response's fields, or the type of the error it got)."""

from __future__ import annotations

from llmos_kernel.errors import LlmosError
from syscalls import net, proc


async def fetch(url: str, method: str = "GET", body: str | None = None,
                timeout: float = 10.0, max_bytes: int = 1 << 20) -> dict:
    try:
        page = await net.fetch(url, method=method, body=body, timeout=timeout,
                               max_bytes=max_bytes, headers={"x-probe": "llmos"})
    except LlmosError as e:  # the test asserts on the type
        return {"error": type(e).__name__, "message": str(e)}
    return {"status": page.status, "url": page.url, "text": page.text,
            "type": page.headers.get("content-type")}


async def fetch_all(urls: list[str]) -> list[dict]:
    return [await fetch(u) for u in urls]


async def delegate(net_hosts: list[str], urls: list[str]) -> dict:
    """Spawn a child asking for ``net_hosts``; what it got, and its fetches."""
    child = await proc.spawn(fetch_all, {"urls": urls}, net=net_hosts)
    row = next(p for p in await proc.ps(all=True) if p["pid"] == child)
    return {"net": row["net"], "results": (await proc.wait(child, timeout=60))["result"]}
