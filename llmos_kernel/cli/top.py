"""``llmos top``: a live terminal view of a kernel — processes, memory, queues, speed.

Drawn with rich's ``Live`` (one screen, redrawn in place, so it does not flicker), from the
same driver calls ``llmos ps`` and ``llmos kernel status --json`` make. Keys: ``q`` quits,
the letters of ``SORTS`` sort the processes. ``--once --json`` prints one snapshot for
scripts.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import sys
import termios
import time
import tty
from pathlib import Path

import click

from llmos_kernel.cli.kernel import state_dir_option

SORTS = {"p": ("pid", False), "t": ("tokens_used", True), "m": ("mailbox", True),
         "r": ("priority", True), "n": ("name", False)}


async def _snapshot(client) -> dict:
    status, procs = await asyncio.gather(client.call("status"), client.call("ps", False))
    return {"status": status, "processes": procs, "at": time.time()}


def _view(snap: dict, sort: str):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    st, mem, q = snap["status"], snap["status"]["memory"], snap["status"]["queues"]
    gib = 1 << 30
    head = Text.assemble(
        ("llmos top", "bold"), f"  kernel {st['name']}  up {st['uptime_s']:.0f}s  ",
        f"{Path(st['model']['path']).name} {st['model']['dtype']} on {st['model']['device']}")
    speed = Text(f"speed {st['throughput_tok_s']:.1f} tok/s   step p50 "
                 f"{(st['step_p50_s'] or 0) * 1e3:.0f} ms   TTFT mean "
                 f"{_mean(st, 'ttft') * 1e3:.0f} ms   queues: running {q['running']}  "
                 f"waiting {q['waiting']}  swapped {q['swapped']}  parked {q['parked']}")
    memory = Text(f"memory weights {mem['weight_bytes'] / gib:.2f} GiB   KV used "
                  f"{mem['kv_blocks_used']}/{mem['num_blocks']} blocks "
                  f"({mem['kv_bytes_used'] / gib:.2f} of {mem['kv_pool_bytes'] / gib:.2f} GiB)"
                  f"   free {mem['kv_blocks_free']}   cached {mem['kv_blocks_cached']}   swap "
                  f"{mem['swap_blocks_used']}/{mem['swap_blocks']}")
    key, reverse = SORTS[sort]
    procs = sorted(snap["processes"], key=lambda p: (p.get(key) is None, p.get(key) or 0)
                   if key != "name" else (p["name"] or ""), reverse=reverse)
    table = Table(expand=True, box=None, header_style="bold reverse")
    for column in ("PID", "NAME", "STATE", "PRIO", "TOKENS", "MAILBOX", "RESTARTS", "PROGRAM"):
        table.add_column(column, no_wrap=True,
                         justify="right" if column in ("PID", "PRIO", "TOKENS", "MAILBOX",
                                                       "RESTARTS") else "left")
    for p in procs:
        table.add_row(str(p["pid"]), p["name"] or "-", p["status"], str(p["priority"]),
                      str(p["tokens_used"]), str(p.get("mailbox", 0)), str(p["restarts"]),
                      p["program"])
    keys = Text("q quit   sort: " + "  ".join(f"{k} {v[0]}" for k, v in SORTS.items())
                + f"   (now: {key})", style="dim")
    return Group(head, speed, memory, table, keys)


def _mean(status: dict, name: str) -> float:
    latency = status.get("latency") or {}
    total = (latency.get("totals") or {}).get(name) or 0
    return latency["sums"][name] / total if total else 0.0


@click.command()
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: the snapshot as JSON.")
@click.option("--sort", type=click.Choice(sorted(SORTS)), default="p", show_default=True,
              help="Sort processes by " + ", ".join(f"{k}: {v[0]}" for k, v in SORTS.items()))
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--kernel", "--name", "kernel", default="kernel", show_default=True,
              help="Kernel actor name (as given to llmos kernel start --name).")
@state_dir_option
def top(once: bool, as_json: bool, sort: str, interval: float, kernel: str,
        state_dir: Path | None) -> None:
    """Live processes, memory map, scheduler queues, tok/s and TTFT of a running kernel."""
    from llmos_kernel.client import KernelClient

    client = KernelClient.connect(kernel, state_dir=state_dir)
    if once:
        snap = asyncio.run(_snapshot(client))
        if as_json:
            click.echo(json.dumps(snap, default=str))
        else:
            from rich.console import Console

            Console().print(_view(snap, sort))
        return
    asyncio.run(_live(client, sort, interval))


async def _live(client, sort: str, interval: float) -> None:
    from rich.live import Live

    interactive = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    try:
        if interactive:
            tty.setcbreak(sys.stdin.fileno())
        with Live(_view(await _snapshot(client), sort), auto_refresh=False,
                  screen=True) as live:
            while True:
                deadline = time.monotonic() + interval
                while time.monotonic() < deadline:
                    key = _key(0.05) if interactive else None
                    if key == "q":
                        return
                    if key in SORTS:
                        sort = key
                        break
                    await asyncio.sleep(0.05 if not interactive else 0)
                live.update(_view(await _snapshot(client), sort), refresh=True)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        await client.close()


def _key(timeout: float) -> str | None:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return os.read(sys.stdin.fileno(), 1).decode(errors="ignore") if ready else None
