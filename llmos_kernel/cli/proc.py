"""Processes from the shell: ``llmos run|ps|kill|logs|send`` and ``llmos approvals|approve|deny``.

Each command talks to a running kernel (``llmos kernel start``) through its
driver API with the root token from the kernel's state dir. Programs started
here are top-level processes: the kernel supervises them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click

from llmos_kernel.cli.kernel import state_dir_option
from llmos_kernel.errors import InvalidArgument

LOG_POLL_S = 0.5


def _kernel_option(*flags: str):
    return click.option(*flags, "kernel", default="kernel", show_default=True,
                        help="Kernel actor name (as given to llmos kernel start --name).")


def _kernel_options(fn):
    return _kernel_option("--kernel", "--name")(state_dir_option(fn))


def _call(kernel: str, state_dir: Path | None, method: str, *args: Any) -> Any:
    from llmos_kernel.client import KernelClient

    client = KernelClient.connect(kernel, state_dir=state_dir)
    return asyncio.run(client.call(method, *args))


def _target(text: str) -> int | str:
    """A pid if it is one, else a process name."""
    return int(text) if text.isdigit() else text


def parse_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidArgument(f"--arg takes key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _resources(pairs: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        key, sep, amount = pair.partition("=")
        try:
            out[key] = float(amount)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: give NAME=AMOUNT, e.g. num_gpus=1",
                                     param_hint="--resource") from None
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: give NAME=AMOUNT", param_hint="--resource")
    return out


@click.command()
@click.argument("program")
@click.option("--name", "process_name", default=None, help="Name the process (unique while it "
              "lives); other commands accept it in place of the pid.")
@click.option("--priority", type=int, default=None, help="-100..100; higher runs its LLM "
              "requests first.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE",
              help="Argument for the program's entry point (VALUE is JSON, else a string); "
                   "repeatable.")
@click.option("--restart", type=click.Choice(["temporary", "transient", "permanent"]),
              default=None, help="What the kernel does when it exits (default: temporary).")
@click.option("--detach", is_flag=True, help="Print the pid and return at once.")
@click.option("--sandbox", is_flag=True, help="Run it confined: no files, sockets or "
              "processes of its own, only its syscalls.")
@click.option("--net", "net_hosts", multiple=True, metavar="HOST",
              help="A host its net.fetch may reach (host, host:port or *.domain); "
                   "repeatable. None by default.")
@click.option("--node", default=None, help="Run it on this Ray node (its id, or the first 6+ "
              "characters; llmos kernel status lists them), in an agent host of its own.")
@click.option("--resource", "resources", multiple=True, metavar="NAME=AMOUNT",
              help="A Ray resource it needs (num_cpus, num_gpus, memory, or a node's custom "
                   "resource): it gets an agent host of its own where one is; repeatable.")
@_kernel_option("--kernel")
@state_dir_option
def run(program: str, process_name: str | None, priority: int | None, args: tuple[str, ...],
        restart: str | None, detach: bool, sandbox: bool, net_hosts: tuple[str, ...],
        node: str | None, resources: tuple[str, ...], kernel: str,
        state_dir: Path | None) -> None:
    """Start PROGRAM (a file.py, file.py:entry or module:function) as a process.

    Prints its pid; unless --detach, then waits and prints its exit record as JSON (exit
    status 1 if the program failed).
    """
    from syscalls.proc import program_spec

    spec: dict[str, Any] = {"program": program_spec(program),
                            "args": dict(parse_arg(a) for a in args)}
    for key, value in (("name", process_name), ("priority", priority),
                       ("restart", {"restart": restart} if restart else None),
                       ("sandbox", sandbox or None), ("net", list(net_hosts) or None),
                       ("node", node), ("resources", _resources(resources) or None)):
        if value is not None:
            spec[key] = value
    pid = _call(kernel, state_dir, "spawn", spec)
    click.echo(pid)
    if detach:
        return
    exit_ = _call(kernel, state_dir, "wait", pid, None)
    _print_json(exit_)
    if exit_.get("reason") != "normal":
        raise SystemExit(1)


@click.command()
@click.option("--all", "include_exited", is_flag=True, help="Include processes that exited.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@_kernel_options
def ps(include_exited: bool, as_json: bool, kernel: str, state_dir: Path | None) -> None:
    """List processes."""
    rows = _call(kernel, state_dir, "ps", include_exited)
    if as_json:
        _print_json(rows)
        return
    now = time.time()
    table = [("PID", "NAME", "STATUS", "PARENT", "PRIO", "RESTARTS", "AGE", "HOST", "SANDBOX",
              "PROGRAM")]
    for p in rows:
        status = p["status"] if p["status"] != "exited" else f"exited({p['exit']['reason']})"
        table.append((str(p["pid"]), p["name"] or "-", status, str(p["parent"]),
                      str(p["priority"]), str(p["restarts"]), f"{now - p['created']:.0f}s",
                      p["host"] or "-", "yes" if p.get("sandbox") else "-", p["program"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@click.command()
@click.argument("target")
@click.option("--force", is_flag=True, help="Kill at once (no terminate hook, no grace).")
@_kernel_options
def kill(target: str, force: bool, kernel: str, state_dir: Path | None) -> None:
    """Stop a process (TARGET: pid or name); an explicit kill is never restarted."""
    _call(kernel, state_dir, "kill", _target(target), "kill" if force else "term")


@click.command()
@click.argument("target")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until it exits.")
@_kernel_options
def logs(target: str, follow: bool, kernel: str, state_dir: Path | None) -> None:
    """Print what a process (TARGET: pid or name) wrote to stdout and stderr."""
    from llmos_kernel.client import KernelClient
    from llmos_kernel.errors import NotFound

    client = KernelClient.connect(kernel, state_dir=state_dir)

    async def show() -> None:
        pid = _target(target)
        if isinstance(pid, str):  # a name: the newest process that had it
            named = [p for p in await client.call("ps", True) if p["name"] == pid]
            if not named:
                raise NotFound(f"no process named {target!r} (llmos ps --all lists them)")
            pid = max(named, key=lambda p: p["created"])["pid"]
        offset = 0
        while True:
            chunk = await client.call("logs", pid, offset)
            click.echo(chunk["text"], nl=False)
            offset = chunk["offset"]
            if chunk["text"]:
                continue
            if not follow or not chunk["alive"]:
                return
            await asyncio.sleep(LOG_POLL_S)

    asyncio.run(show())


@click.command()
@click.argument("target")
@click.argument("message_type")
@click.argument("fields")
@_kernel_options
def send(target: str, message_type: str, fields: str, kernel: str, state_dir: Path | None) -> None:
    """Send a message to a process (TARGET: pid or name) as the user (sender pid 0).

    MESSAGE_TYPE is a type a program declared (e.g. chess.Move) or "dict" for a plain
    dict; FIELDS is a JSON object. Prints the message id.
    """
    try:
        value = json.loads(fields)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"FIELDS is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("FIELDS must be a JSON object")
    click.echo(_call(kernel, state_dir, "send", _target(target), message_type, value)["id"])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@_kernel_options
def approvals(as_json: bool, kernel: str, state_dir: Path | None) -> None:
    """Dangerous tool calls waiting for a person's decision."""
    rows = _call(kernel, state_dir, "approvals")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no pending approvals", err=True)
    for a in rows:
        click.echo(f"{a['id']}  pid {a['pid']}  {a['tool']}({json.dumps(a['args'])})")


def _decide(approve_it: bool):
    verb = "approve" if approve_it else "deny"

    @click.command(name=verb, help=f"{verb.capitalize()} a pending tool call (see llmos "
                                   f"approvals).")
    @click.argument("approval_id")
    @_kernel_options
    def decide(approval_id: str, kernel: str, state_dir: Path | None) -> None:
        decided = _call(kernel, state_dir, "decide", approval_id, approve_it)
        click.echo(f"{decided['id']} {decided['state']}")

    return decide


@click.group()
def net() -> None:
    """Network requests processes made with net.fetch."""


@net.command(name="log")
@click.option("--pid", "target", default=None, help="Only this process's (pid or name).")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of lines.")
@_kernel_options
def net_log(target: str | None, limit: int, as_json: bool, kernel: str,
            state_dir: Path | None) -> None:
    """The last requests, allowed or refused, oldest first."""
    rows = _call(kernel, state_dir, "net_log", None if target is None else _target(target),
                 limit)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no network requests yet", err=True)
    for r in rows:
        when = time.strftime("%H:%M:%S", time.localtime(r["at"]))
        status = r.get("status", r["outcome"])
        extra = f"  {r['reason']}" if r["outcome"] != "ok" and r.get("reason") else ""
        click.echo(f"{when}  pid {r['pid']}  {r['method']} {r['url']}  {status}  "
                   f"{r.get('bytes', 0)} B  {r['seconds'] * 1e3:.0f} ms{extra}")


approve = _decide(True)
deny = _decide(False)
COMMANDS = [run, ps, kill, logs, send, approvals, approve, deny, net]
