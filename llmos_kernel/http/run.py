"""Running the gateway: connect to a kernel, build the app, serve it with uvicorn.

``serve`` blocks (the CLI); ``start_in_thread`` runs a server on a loop of its own and
returns its URL (tests and ``llmos bench serve --http`` drive it with real clients).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from llmos_kernel.http.app import MAX_BODY_BYTES, MAX_TOKENS, Server, create_app
from llmos_kernel.http.gateway import Gateway
from llmos_kernel.http.keys import KeyRing


async def open_server(gateway: Gateway, keys: KeyRing, *, max_tokens: int = MAX_TOKENS,
                      max_body_bytes: int = MAX_BODY_BYTES) -> Server:
    """The served models as the kernel reports them, and a tokenizer to name tokens."""
    status = await gateway.call("status")
    path = Path(status["model"]["path"])
    configured = status["config"]["llm"]["model"]
    model_id = configured if not configured.endswith(".gguf") else path.stem
    tokenizer = None
    if path.is_file():  # on this node: name the tokens logprobs report
        from llmos_kernel.core.gguf_file import GGUFFile
        from llmos_kernel.core.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(GGUFFile.open(path).metadata)
    # Every configured key's process now, not on its first request (which would wait).
    await asyncio.gather(*(gateway.process(key) for key in keys.keys.values()))
    return Server(gateway, keys, model_id, [model_id, path.name, path.stem],
                  status["config"]["memory_model"], tokenizer, max_tokens, max_body_bytes)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve(gateway: Gateway, keys: KeyRing, host: str, port: int, **limits) -> None:
    server = await open_server(gateway, keys, **limits)
    config = uvicorn.Config(create_app(server), log_level="warning", lifespan="off")
    await uvicorn.Server(config).serve(sockets=[_bind(host, port)])


@dataclass
class Running:
    url: str
    server: Server
    _uvicorn: uvicorn.Server
    _thread: threading.Thread
    _loop: asyncio.AbstractEventLoop

    def stop(self) -> None:
        """Stop serving, then let the gateway's processes go (their host stops)."""
        self._uvicorn.should_exit = True
        self._thread.join(30)
        self._loop.run_until_complete(self.server.gateway.close())
        self._loop.close()


def start_in_thread(gateway: Gateway, keys: KeyRing, host: str = "127.0.0.1", port: int = 0,
                    **limits) -> Running:
    """A server on its own thread and loop; returns once it accepts connections."""
    loop = asyncio.new_event_loop()
    sock = _bind(host, port)
    ready = threading.Event()
    box: dict = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        box["server"] = loop.run_until_complete(open_server(gateway, keys, **limits))
        config = uvicorn.Config(create_app(box["server"]), log_level="warning", lifespan="off")
        box["uvicorn"] = uvicorn.Server(config)
        ready.set()
        loop.run_until_complete(box["uvicorn"].serve(sockets=[sock]))

    thread = threading.Thread(target=main, daemon=True, name="llmos-http")
    thread.start()
    ready.wait(120)
    if "uvicorn" not in box:
        raise RuntimeError("the HTTP server did not start")
    while not box["uvicorn"].started and thread.is_alive():
        time.sleep(0.02)
    bound_host, bound_port = sock.getsockname()[:2]
    return Running(f"http://{bound_host}:{bound_port}", box["server"], box["uvicorn"], thread,
                   loop)
