"""The network service behind ``net.fetch``: HTTP(S) requests made by the kernel for a
process, to the hosts its spawn allowed and nowhere else.

What it guarantees:
- A process reaches only the hosts in its allowlist (``spawn(..., net=[...])``; none by
  default, so ``net.fetch`` is refused until someone allows a host). An entry is a host
  (any port), ``host:port``, or ``*.domain`` (any subdomain of it, not the domain
  itself). A child's allowlist is cut to what its parent may reach.
- Redirects are followed by the service, at most ``MAX_REDIRECTS``, and every hop is
  checked against the same allowlist, so an allowed host cannot bounce a process to one
  that is not.
- Each request has a deadline (``timeout``, at most ``MAX_TIMEOUT_S``) and a response
  size limit (``max_bytes``, at most ``MAX_RESPONSE_BYTES``): the body is read as a
  stream and the request fails with ``QuotaExceeded`` the moment it grows past the limit,
  so a huge response never sits in kernel memory.
- Every request, allowed or refused, is logged: one JSON line per attempt in
  ``<state dir>/logs/net.jsonl`` (pid, method, url, outcome, status, bytes, seconds),
  which ``llmos net log`` reads.

httpx does the HTTP (a maintained client with HTTP/1.1, TLS and streaming); proxies
come from the environment as for any httpx client.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from pathlib import Path
from typing import Any

from llmos_kernel.errors import (
    InvalidArgument,
    LlmosError,
    PermissionDenied,
    QuotaExceeded,
    Timeout,
    Unavailable,
)
from llmos_kernel.net_allowlist import allows

log = logging.getLogger("llmos.net")

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
DEFAULT_RESPONSE_BYTES = 1 << 20
MAX_RESPONSE_BYTES = 16 << 20
MAX_REQUEST_BYTES = 1 << 20
MAX_HEADERS = 64
MAX_REDIRECTS = 5
LOG_FILE = "net.jsonl"
_OUTCOMES = {PermissionDenied: "refused", QuotaExceeded: "too large",
             InvalidArgument: "invalid"}


class NetService:
    def __init__(self, log_dir: Path):
        self.log_path = Path(log_dir) / LOG_FILE
        self.recent: collections.deque[dict] = collections.deque(maxlen=10_000)
        self.stats = collections.Counter()
        self._client = None

    def _http(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(follow_redirects=False, http2=False)
        return self._client

    async def fetch(self, pid: int, allowlist: list[str], args: dict) -> dict:
        method, url, headers, body, timeout, max_bytes = _check_request(args)
        started = time.monotonic()
        record = {"at": time.time(), "pid": pid, "method": method, "url": url}
        import httpx

        try:
            reply = await asyncio.wait_for(
                self._follow(allowlist, method, url, headers, body, max_bytes, record),
                timeout)
        except TimeoutError:
            self._log(record, started, "timeout")
            raise Timeout(f"net.fetch {url}: no complete response within {timeout:g} s "
                          f"(timeout may be raised to {MAX_TIMEOUT_S:g})") from None
        except LlmosError as e:
            self._log(record, started, _OUTCOMES.get(type(e), "failed"), reason=str(e))
            raise
        except httpx.HTTPError as e:  # connection refused, TLS, protocol: say which
            self._log(record, started, "failed", reason=f"{type(e).__name__}: {e}")
            raise Unavailable(f"net.fetch {url}: {type(e).__name__}: {e}") from None
        self._log(record, started, "ok", status=reply["status"], bytes=len(reply["body"]),
                  final_url=reply["url"])
        return reply

    async def _follow(self, allowlist: list[str], method: str, url: str, headers: dict,
                      body: bytes | None, max_bytes: int, record: dict) -> dict:
        import httpx

        for _hop in range(MAX_REDIRECTS + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as e:
                raise InvalidArgument(f"net.fetch: bad url {url!r}: {e}") from None
            if target.scheme not in ("http", "https") or not target.host:
                raise InvalidArgument(f"net.fetch: {url!r} is not an http(s) URL")
            port = target.port or (443 if target.scheme == "https" else 80)
            if not allows(allowlist, target.host, port):
                raise PermissionDenied(
                    f"net.fetch: {target.host}:{port} is not in this process's network "
                    f"allowlist ({', '.join(allowlist) or 'empty'}); hosts are allowed at "
                    "spawn: proc.spawn(..., net=['" + target.host + "'])")
            request = self._http().build_request(method, target, headers=headers, content=body)
            response = await self._http().send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = str(target.join(response.headers["location"]))
                    record.setdefault("redirects", []).append(url)
                    if response.status_code in (301, 302, 303) and method != "HEAD":
                        method, body = "GET", None
                    continue
                data = bytearray()
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > max_bytes:
                        raise QuotaExceeded(f"net.fetch {url}: the response is larger than "
                                            f"max_bytes={max_bytes} (at most "
                                            f"{MAX_RESPONSE_BYTES} may be asked for)")
                return {"url": str(target), "status": response.status_code,
                        "headers": dict(response.headers.items()), "body": bytes(data)}
            finally:
                await response.aclose()
        raise PermissionDenied(f"net.fetch: more than {MAX_REDIRECTS} redirects from {url}")

    def _log(self, record: dict, started: float, outcome: str, **more: Any) -> None:
        record.update(outcome=outcome, seconds=round(time.monotonic() - started, 4), **more)
        self.recent.append(record)
        self.stats[outcome] += 1
        log.info("net %s pid=%s %s %s", outcome, record["pid"], record["method"], record["url"])
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            log.error("cannot write the network log %s: %s", self.log_path, e)

    def history(self, pid: int | None = None, limit: int = 100) -> list[dict]:
        """The last ``limit`` requests (of process ``pid``), oldest first, read from the log
        file so they outlive a kernel restart."""
        if not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise InvalidArgument("limit must be an int in 1..10000")
        if pid is not None and not isinstance(pid, int):
            raise InvalidArgument("pid must be an int")
        try:
            lines = self.log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        rows = []
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if pid is None or row.get("pid") == pid:
                rows.append(row)
                if len(rows) == limit:
                    break
        return rows[::-1]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _check_request(args: dict) -> tuple[str, str, dict, bytes | None, float, int]:
    url = args["url"]
    if not isinstance(url, str) or not 0 < len(url) <= 8192:
        raise InvalidArgument("net.fetch: url must be a string of at most 8192 characters")
    method = args.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InvalidArgument(f"net.fetch: method must be one of {', '.join(METHODS)}")
    headers = args.get("headers") or {}
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 8192
            for k, v in headers.items()):
        raise InvalidArgument(f"net.fetch: headers must be a dict of at most {MAX_HEADERS} "
                              "string pairs")
    body = args.get("body")
    if isinstance(body, str):
        body = body.encode()
    if body is not None and (not isinstance(body, bytes) or len(body) > MAX_REQUEST_BYTES):
        raise InvalidArgument(f"net.fetch: body must be str or bytes of at most "
                              f"{MAX_REQUEST_BYTES} bytes")
    timeout = args.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not 0 < timeout <= MAX_TIMEOUT_S:
        raise InvalidArgument(f"net.fetch: timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds")
    max_bytes = args.get("max_bytes", DEFAULT_RESPONSE_BYTES)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or \
            not 0 < max_bytes <= MAX_RESPONSE_BYTES:
        raise InvalidArgument(f"net.fetch: max_bytes must be an int in 1..{MAX_RESPONSE_BYTES}")
    return method.upper(), url, headers, body, float(timeout), max_bytes
