"""``llmos serve``: an OpenAI-compatible HTTP API, metrics and a console for a kernel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from llmos_kernel.paths import DEFAULT_NAME


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--kernel", "kernel_name", default=DEFAULT_NAME, show_default=True,
              help="The running kernel to serve (start one with: llmos kernel start).")
@click.option("--address", default=None, help="Its Ray cluster (default: the local one).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="That kernel's state dir (for its root token).")
@click.option("--api-key", default=None, help="One key every caller must present.")
@click.option("--keys-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSON: {"KEY": {"name": ..., "priority": 0, "tokens": N, '
                   '"max_streams": 16}}. Each key is a kernel process of its own.')
@click.option("--max-tokens", type=int, default=None,
              help="The most tokens one request may ask for (default 4096).")
def serve(host: str, port: int, kernel_name: str, address: str | None,
          state_dir: Path | None, api_key: str | None, keys_file: Path | None,
          max_tokens: int | None) -> None:
    """Serve /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, /metrics
    and the web console at /.

    With no --api-key or --keys-file only loopback callers are served."""
    from llmos_kernel.http.gateway import Gateway
    from llmos_kernel.http.keys import KeyRing
    from llmos_kernel.http.run import serve as run

    keys = KeyRing.load(keys_file, api_key)
    gateway = Gateway.connect(kernel_name, address=address,
                              state_dir=str(state_dir) if state_dir else None)
    click.echo(f"serving kernel {kernel_name!r} on http://{host}:{port}/v1 "
               f"({'loopback only, no keys' if keys.open else f'{len(keys.keys)} key(s)'})",
               err=True)
    limits = {} if max_tokens is None else {"max_tokens": max_tokens}
    asyncio.run(run(gateway, keys, host, port, **limits))
