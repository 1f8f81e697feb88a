"""``llmos bench serve --http``: the serve workload through the OpenAI-compatible API.

The same requests as the in-cluster client sends, as streamed chat completions over
real HTTP on the loopback (httpx, one connection pool) to ``llmos serve`` running as its
own process, each generating exactly
``max_tokens`` tokens (``ignore_eos``); the same figures as ``serve._drive``, except that
inter-token latency is per streamed chunk (a chunk carries one engine step's tokens).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmos_kernel.bench.stats import percentile


async def drive(url: str, key: str | None, model: str, workloads: list[list[dict]],
                concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    itls: list[float] = []
    total = 0
    headers = {"authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as http:
        async def one(messages: list[dict]) -> None:
            nonlocal total
            body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            async with gate:
                sent = time.perf_counter()
                last = None
                async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {await reply.aread()!r}")
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        text = "".join(c["delta"].get("content") or ""
                                       for c in chunk.get("choices", []))
                        if not text:
                            continue
                        now = time.perf_counter()
                        if last is None:
                            ttfts.append(now - sent)
                        else:
                            itls.append(now - last)
                        last = now
                        total += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(m) for m in workloads))
        wall = time.perf_counter() - started
    generated = len(workloads) * max_tokens  # ignore_eos: every request makes max_tokens
    return {"agg_tok_s": generated / wall, "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p99_s": percentile(ttfts, 0.99), "itl_p50_s": percentile(itls, 0.5),
            "wall_s": wall, "tokens": generated, "chunks": total}


@dataclass
class ServeProcess:
    """``llmos serve`` as a child process, in front of a kernel of this Ray cluster."""

    url: str
    model_id: str
    process: subprocess.Popen
    keys_file: Path

    @classmethod
    def start(cls, kernel: str, state_dir: str | None, keys: dict,
              timeout: float = 120.0) -> ServeProcess:
        import ray

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        keys_file = Path(tempfile.mkstemp(prefix="llmos-bench-keys-", suffix=".json")[1])
        keys_file.write_text(json.dumps(keys))
        command = [sys.executable, "-m", "llmos_kernel.cli", "serve", "--kernel", kernel,
                   "--port", str(port), "--keys-file", str(keys_file)]
        if state_dir:
            command += ["--state-dir", state_dir]
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        url, key = f"http://127.0.0.1:{port}", next(iter(keys))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llmos serve exited: {process.stderr.read()[-2000:]}")
            try:
                models = httpx.get(f"{url}/v1/models", timeout=5,
                                   headers={"authorization": f"Bearer {key}"}).json()
                return cls(url, models["data"][0]["id"], process, keys_file)
            except httpx.HTTPError:
                time.sleep(0.2)
        process.kill()
        raise RuntimeError(f"llmos serve did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.keys_file.unlink(missing_ok=True)
