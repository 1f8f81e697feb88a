"""``llmos demo [NAME ...]``: run the demo agents (``demos/``) on the real model.

Starts a local kernel of its own (or uses a running one with ``--kernel``), runs each
chosen demo as a top-level process, one after another, shows what it prints as it
prints it, and ends with a table of what each measured. Dangerous tool calls the demos
ask for are put to the person at the terminal; without one (a script, CI) ``llmos demo``
approves them itself and says so, as ``llmos approve ID`` would.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from llmos_kernel import store
from llmos_kernel.errors import InvalidArgument

DEMO_TIMEOUT_S = 1800.0
POLL_S = 0.3


def _parse_args(pairs: tuple[str, ...], names: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` pairs -> {demo name: {key: value}} (VALUE is JSON, else text)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for pair in pairs:
        target, sep, value = pair.partition("=")
        name, dot, key = target.partition(".")
        name = name.replace("-", "_")
        if not sep or not dot or not key:
            raise InvalidArgument(f"--arg takes NAME.KEY=VALUE (e.g. team.goal=tea), got {pair!r}")
        if name not in out:
            raise InvalidArgument(f"--arg {pair!r} names demo {name!r}, which is not being run "
                                  f"(running: {', '.join(names)})")
        try:
            out[name][key] = json.loads(value)
        except json.JSONDecodeError:
            out[name][key] = value
    return out


@click.command()
@click.argument("names", nargs=-1)
@click.option("--list", "list_only", is_flag=True, help="List the demos and what each shows.")
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--kernel", default=None,
              help="Run on this running kernel (llmos kernel start --name) instead of "
                   "starting one.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State dir: of the running --kernel (default: $LLMOS_STATE_DIR, else "
                   "$LLMOS_HOME/state), or where the demo kernel keeps its state (default: "
                   "a temporary directory).")
@click.option("--arg", "pairs", multiple=True, metavar="NAME.KEY=VALUE",
              help="An argument for one demo's main (VALUE is JSON, else a string); "
                   "repeatable.")
@click.option("--json", "as_json", is_flag=True,
              help="End with every demo's exit record as one JSON object.")
@click.option("--sandbox", is_flag=True,
              help="Run each demo (and so every process it starts) sandboxed, with a "
                   "scratch dir.")
def demo(names: tuple[str, ...], list_only: bool, model: str, kernel: str | None,
         state_dir: Path | None, pairs: tuple[str, ...], as_json: bool, sandbox: bool) -> None:
    """Run the demo agents (all, or the NAMEs given) on the real model.

    Starts a local kernel for them unless --kernel names a running one.
    """
    import demos

    if list_only:
        width = max(len(d.name) for d in demos.DEMOS)
        for d in demos.DEMOS:
            click.echo(f"{d.name:{width}s}  {d.shows}")
        return
    try:
        chosen = [demos.find(n) for n in names] if names else list(demos.DEMOS)
    except KeyError as e:
        raise InvalidArgument(e.args[0]) from None
    args = _parse_args(pairs, [d.name for d in chosen])
    if kernel is not None:
        from llmos_kernel.client import KernelClient

        client = KernelClient.connect(kernel, state_dir=state_dir)
        records = asyncio.run(_run_all(client, chosen, args, sandbox))
    else:
        records = _with_own_kernel(model, state_dir, chosen, args, sandbox)
    if as_json:
        click.echo(json.dumps(records, indent=2, default=str))
    if any(r.get("reason") != "normal" for r in records.values()):
        raise SystemExit(1)


def _with_own_kernel(model: str, state_dir: Path | None, chosen, args, sandbox: bool) -> dict:
    import ray

    from llmos_kernel.cli.progress import Phases, build_c_kernels
    from llmos_kernel.client import KernelClient
    from llmos_kernel.core.options import KernelOptions
    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import start_kernel

    store.resolve_model(model)  # fail fast, before starting anything
    state = (state_dir or Path(tempfile.mkdtemp(prefix="llmos-demo-"))).expanduser().resolve()
    with Phases() as phases:
        phases.phase("starting a local Ray instance")
        ray.init(address="local", namespace="llmos", logging_level="ERROR", log_to_driver=False,
                 include_dashboard=False)
        build_c_kernels(phases)
        handle = start_kernel(KernelConfig(state_dir=str(state), name="demo",
                                           llm=LLMConfig(model=model, kv_budget="1GiB",
                                                         kernels=KernelOptions.from_env())),
                              detached=False, on_phase=phases.phase)
        took = phases.elapsed()
    click.echo(f"kernel 'demo' ready on {model} in {took:.1f}s (state in {state})", err=True)
    try:
        client = KernelClient(handle, (state / "root.token").read_text().strip())
        return asyncio.run(_run_all(client, chosen, args, sandbox))
    finally:
        ray.kill(handle)
        ray.shutdown()


async def _run_all(client, chosen, args, sandbox: bool = False) -> dict[str, dict]:
    from syscalls.proc import program_spec

    records: dict[str, dict] = {}
    for d in chosen:
        click.secho(f"\n== {d.name}: {d.shows}", bold=True)
        started = time.perf_counter()
        spec = {"program": program_spec(d.program), "args": args[d.name],
                "name": f"demo-{d.name}"}
        if sandbox:  # with a scratch dir: some libraries want a temporary directory
            spec.update(sandbox=True, scratch=True)
        pid = await client.call("spawn", spec)
        exit_ = await _follow(client, pid)
        exit_["seconds"] = round(time.perf_counter() - started, 1)
        records[d.name] = exit_
        if exit_.get("reason") != "normal":
            error = exit_.get("error") or {}
            click.secho(f"   {d.name} (pid {pid}) ended {exit_.get('reason')}: "
                        f"{error.get('type', '')}: {error.get('message', '')}", fg="red")
        else:
            click.echo(f"   {d.name} (pid {pid}) finished in {exit_['seconds']:.1f}s")
    _summary(records)
    return records


async def _follow(client, pid: int) -> dict:
    """Print the process's output as it comes and settle its approvals; its exit record."""
    waiting = asyncio.ensure_future(client.call("wait", pid, DEMO_TIMEOUT_S))
    offset, asked = 0, set()
    while True:
        chunk = await client.call("logs", pid, offset)
        if chunk["text"]:
            click.echo("   " + chunk["text"].replace("\n", "\n   ").rstrip(" "), nl=False)
            offset = chunk["offset"]
            continue
        for request in await client.call("approvals"):
            if request["pid"] == pid and request["id"] not in asked:
                asked.add(request["id"])
                await _decide(client, request)
        if waiting.done():
            return waiting.result()
        await asyncio.sleep(POLL_S)


async def _decide(client, request: dict) -> None:
    call = f"{request['tool']}({json.dumps(request['args'])})"
    if sys.stdin.isatty():
        approve = await asyncio.to_thread(
            click.confirm, f"\n   process {request['pid']} asks to run {call}. Approve?")
    else:
        approve = True
        click.echo(f"\n   [llmos demo] approval {request['id']} for {call}: no terminal to ask, "
                   f"so approving it as `llmos approve {request['id']}` would")
    decided = await client.call("decide", request["id"], approve)
    click.echo(f"   [llmos demo] approval {decided['id']} {decided['state']}")


def _summary(records: dict[str, dict]) -> None:
    click.secho("\n== what the demos measured", bold=True)
    for name, exit_ in records.items():
        result = exit_.get("result")
        metrics = result.get("metrics") if isinstance(result, dict) else None
        if exit_.get("reason") != "normal":
            text = f"failed ({exit_.get('reason')})"
        elif metrics:
            text = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        else:
            text = "done"
        click.echo(f"   {name:16s} {exit_.get('seconds', 0):6.1f}s  {text}")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
