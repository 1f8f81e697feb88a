"""``llmos demo``: start a local kernel on the real model and run the demo agents."""

from __future__ import annotations

import asyncio
import tempfile
import textwrap
import time
from pathlib import Path

import click

from llmos_kernel import store

DEMOS = [
    ("team", "demos.team:main", ("a coordinator splits writing tasks between two writer "
                                "processes (typed messages, supervision, files)")),
    ("home assistant", "demos.home_assistant:main", ("an agent that uses two tools to do a "
                                                    "task (grammar-constrained tool calls)")),
]


def _say(text: str) -> None:
    click.echo(text, err=True)


@click.command()
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--topics", default="tea,rivers", show_default=True,
              help="Comma-separated topics for the team demo.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo kernel's state here (default: a temporary directory).")
def demo(model: str, topics: str, state_dir: Path | None) -> None:
    """Start a local kernel on the real model and run the demo agents on it."""
    import ray

    from llmos_kernel.core.options import KernelOptions
    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import start_kernel

    store.resolve_model(model)
    state = state_dir or Path(tempfile.mkdtemp(prefix="llmos-demo-"))
    _say("starting a local Ray instance...")
    ray.init(namespace="llmos", logging_level="ERROR", log_to_driver=False,
             include_dashboard=False)
    started = time.perf_counter()
    _say(f"starting kernel 'demo' on {model} (state in {state})...")
    handle = start_kernel(KernelConfig(state_dir=str(state), name="demo",
                                       llm=LLMConfig(model=model, kv_budget="1GiB",
                                                     kernels=KernelOptions.from_env())),
                          detached=False)
    _say(f"kernel ready in {time.perf_counter() - started:.1f}s")
    try:
        asyncio.run(_run(state, topics))
    finally:
        ray.kill(handle)
        ray.shutdown()


async def _run(state: Path, topics: str) -> None:
    import syscalls
    from syscalls import proc

    me = await syscalls.attach("demo", kernel="demo", state_dir=str(state))
    click.echo(f"\nllmos demo: this script is process {me}; agents run in an agent host.\n")
    for title, program, what in DEMOS:
        click.echo(f"== {title}: {what}")
        started = time.perf_counter()
        args = {"topics": topics} if title == "team" else {}
        pid = await proc.spawn(program, args, name=title.replace(" ", "-"))
        exit_ = await proc.wait(pid, timeout=1800)
        took = time.perf_counter() - started
        if exit_.get("reason") != "normal":
            error = exit_.get("error") or {}
            click.echo(f"   process {pid} ended ({exit_.get('reason')}): "
                       f"{error.get('type', '')}: {error.get('message', '')}\n")
            continue
        click.echo(f"   process {pid} finished in {took:.1f}s")
        _show(exit_.get("result"))
    click.echo("== processes")
    for p in await proc.ps(all=True):
        click.echo(f"   pid {p['pid']:>3}  {p['status']:8s} {p['name'] or ''!s:16s} "
                   f"{p['program']:28s} tokens {p['tokens_used']}")


def _show(result, indent: str = "   ") -> None:
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, dict):
                click.echo(f"{indent}{key}:")
                _show(value, indent + "  ")
            else:
                text = str(value)
                click.echo(textwrap.fill(f"{key}: {text}", width=100, initial_indent=indent,
                                         subsequent_indent=indent + "  "))
    else:
        click.echo(f"{indent}{result}")
    click.echo("")
