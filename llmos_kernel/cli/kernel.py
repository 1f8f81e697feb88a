"""``llmos kernel start|status|stop``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from llmos_kernel import store
from llmos_kernel.engine.scheduler import SchedulerConfig
from llmos_kernel.paths import default_state_dir


def state_dir_option(fn):
    return click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None,
                        help="Durable state (default: $LLMOS_STATE_DIR, else $LLMOS_HOME/state).")(fn)


def name_option(fn):
    return click.option("--name", default="kernel", show_default=True,
                        help="Kernel actor name (several kernels can share a cluster).")(fn)


@click.group()
def kernel() -> None:
    """Start, inspect and stop a kernel (a detached Ray actor)."""


@kernel.command()
@click.option("--address", default=None, help="Existing Ray cluster (default: start a local one).")
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--kv-budget", default="auto", show_default=True,
              help="KV pool bytes, e.g. 2GiB, or 'auto' (a quarter of free memory, at most 4 GiB).")
@click.option("--swap-budget", default="auto", show_default=True,
              help="Host memory for preempted and suspended KV, or 0 for none.")
@click.option("--max-batch-tokens", type=int, default=SchedulerConfig.max_batch_tokens,
              show_default=True, help="Tokens computed per engine step.")
@click.option("--max-seqs", type=int, default=SchedulerConfig.max_seqs, show_default=True,
              help="Sequences running at once.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="bf16: bf16 matrix products (AMX tiles or AVX512-BF16 "
              "where the CPU has them) and KV; auto: bf16 where that is the fast path, else "
              "fp32.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--shards", type=int, default=1, show_default=True,
              help="Pipeline stages: the layers split so each does about the same work per "
              "token (by weight bytes where that does not fit), each range its own model "
              "shard actor, placed by a Ray placement group (spread over nodes); stages "
              "on one node divide its cores.")
@click.option("--placement", type=click.Choice(["auto"]), default=None,
              help="auto: the fewest stages whose heaviest fits a place (a node's memory, "
              "or a GPU), instead of --shards.")
@click.option("--stage-budget", default="auto", show_default=True,
              help="Bytes each stage may hold (weights + its KV share), e.g. 2GiB; auto: "
              "its node's Ray memory, shared by the stages there.")
@click.option("--no-prefix-cache", is_flag=True)
@click.option("--sandbox", is_flag=True, help="Run every agent process sandboxed (Landlock, "
              "seccomp, rlimits): it reaches the world only through its syscalls.")
@click.option("--hosts", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Shared agent hosts, spread over the cluster's nodes.")
@name_option
@state_dir_option
def start(address, model, kv_budget, swap_budget, max_batch_tokens, max_seqs, dtype, device,
          shards, placement, stage_budget, no_prefix_cache, sandbox, hosts, name, state_dir) -> None:
    """Start a kernel: load the model, size the KV pool, begin serving. A start that fails
    leaves nothing running: no kernel, no shard, no placement group, no Ray head of its
    own."""
    import torch

    from llmos_kernel.cli.progress import Phases, build_c_kernels
    from llmos_kernel.core.gguf_file import GGUFFile
    from llmos_kernel.core.options import KernelOptions
    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.errors import AlreadyExists
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import HEAD_FILE, connect_ray, find_kernel, start_kernel, stop_kernel
    from llmos_kernel.memory import parse_bytes
    from llmos_kernel.placement import split_layers

    state = (state_dir or default_state_dir()).expanduser().resolve()
    path = store.resolve_model(model)  # fail fast, before starting anything
    if placement == "auto":
        if shards != 1:
            raise click.UsageError("give --shards N or --placement auto, not both")
        shards = "auto"
    else:
        split_layers(GGUFFile.open(path).config(), torch.float32, shards, 1, 16)  # valid
    if stage_budget != "auto":
        parse_bytes(stage_budget)
    had_head = (state / HEAD_FILE).exists()
    with Phases() as phases:
        phases.phase("starting a local Ray head" if address is None
                     else f"joining Ray at {address}")
        connect_ray(address, start_head=True, state_dir=state)
        if find_kernel(name) is not None:
            raise AlreadyExists(f"a kernel named {name!r} is already running "
                                "(llmos kernel status; llmos kernel stop)")
        if address is None:  # the shard runs on this node: build its kernels here, visibly
            build_c_kernels(phases)
        cfg = KernelConfig(state_dir=str(state), name=name, llm=LLMConfig.of(
            model=model, dtype=dtype, device=device, kv_budget=kv_budget,
            swap_budget=swap_budget, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
            prefix_caching=not no_prefix_cache, kernels=KernelOptions.from_env(),
            shards=shards, stage_budget=stage_budget), sandbox=sandbox, hosts=hosts)
        try:
            start_kernel(cfg, detached=True, on_phase=phases.phase)
        except BaseException:  # the kernel is gone; the Ray head too, if this command began it
            stop_kernel(name, None if had_head else state)
            raise
        took = phases.elapsed()
    click.echo(f"kernel {name!r} is running (state dir {state}; started in {took:.1f}s)")


@kernel.command()
@click.option("--json", "as_json", is_flag=True)
@name_option
@state_dir_option
def status(as_json: bool, name: str, state_dir: Path | None) -> None:
    """Memory map, queues and live throughput of a running kernel."""
    from llmos_kernel.client import KernelClient

    client = KernelClient.connect(name, state_dir=state_dir)
    st = asyncio.run(client.status())
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    mem, q = st["memory"], st["queues"]
    gib = 1 << 30
    click.echo(f"kernel {st['name']}  up {st['uptime_s']:.0f}s  state {st['state_dir']}")
    shard = st["shard"]
    products = (f"bf16 products on {shard.get('bf16_kernel')}, "
                if shard.get("bf16_products") else "")
    click.echo(f"model   {st['model']['path']}  ({st['model']['params'] / 1e6:.0f}M params, "
               f"{st['model']['dtype']} on {st['model']['device']}: {products}"
               f"KV {shard.get('kv_dtype', '?').removeprefix('torch.')})")
    for d in mem["devices"]:
        click.echo(f"device  {d['name']:8s} {d['free_bytes'] / gib:6.1f} GiB free of "
                   f"{d['total_bytes'] / gib:.1f}")
    click.echo(f"weights {mem['weight_bytes'] / gib:.2f} GiB")
    mib = 1 << 20
    for stage in st.get("stages", []) if len(st.get("stages", [])) > 1 else []:
        first, end = stage["layers"]
        click.echo(f"stage {stage['index']}  layers {first}-{end - 1}  node "
                   f"{(stage['node'] or '?')[:12]}  {stage['device']}  "
                   f"{stage['bytes'] / mib:.0f} MiB ({stage['weight_bytes'] / mib:.0f} weights + "
                   f"{stage['kv_bytes'] / mib:.0f} KV), {stage.get('threads') or '?'} "
                   "threads")
    if len(st.get("stages", [])) > 1:
        flight = st["steps_in_flight"]
        click.echo(f"steps   in flight {flight['now']} (at most {flight['max']}; "
                   f"{flight['overlapped_steps']} steps overlapped another)")
    click.echo(f"kv pool {mem['kv_bytes_used'] / gib:.2f} / {mem['kv_pool_bytes'] / gib:.2f} GiB "
               f"({mem['kv_blocks_used']}/{mem['num_blocks']} blocks of {mem['block_size']} "
               f"tokens; {mem['kv_blocks_cached']} cached for prefix reuse)")
    click.echo(f"swap    {mem['swap_blocks_used']}/{mem['swap_blocks']} blocks")
    click.echo(f"queues  running {q['running']}  waiting {q['waiting']}  swapped {q['swapped']}"
               f"  parked {q['parked']}")
    pre = st["preemptions"]
    click.echo("preempt " + "  ".join(f"{k} {v}" for k, v in pre.items()))
    click.echo(f"prefix  hit rate {st['prefix_cache']['hit_rate']:.1%}")
    click.echo(f"speed   {st['throughput_tok_s']:.1f} tok/s (last 10 s)  "
               f"shard restarts {st['shard']['restarts']}")
    gc = st["gc"]
    longest, runs = gc["longest_pause_ms"], gc["collections"]
    click.echo(f"gc      kernel's longest pause {longest[2]:.1f} ms in {runs[2]} full "
               f"collections, {max(longest[:2]):.1f} ms in {sum(runs[:2])} young ones; "
               f"{gc['frozen_objects']} start-up objects kept out of them")
    for line in placement_lines(st):
        click.echo(line)


def placement_lines(st: dict) -> list[str]:
    """Where the kernel, its shard and its agent hosts run, node by node."""
    place = st.get("placement") or {}
    nodes = {n["node"]: n.get("address", "?") for n in place.get("nodes", []) if "node" in n}

    def where(node: str | None) -> str:
        return f"node {node[:12]} ({nodes.get(node, 'gone')})" if node else "node ?"

    lines = [f"nodes   {len(nodes)}: " + ", ".join(f"{n[:12]} ({a})" for n, a in nodes.items())]
    lines.append(f"kernel  {where(place.get('kernel_node'))}")
    lines.append(f"shard   {where(st.get('shard', {}).get('node'))}")
    for h in place.get("hosts", []):
        kind = "own" if h["isolated"] else "shared"
        lines.append(f"host    {h['host']}  {where(h['node'])}  {kind}, {h['agents']} agents"
                     f"{', sandbox' if h['sandbox'] else ''}")
    return lines


@kernel.command()
@name_option
@state_dir_option
def stop(name: str, state_dir: Path | None) -> None:
    """Stop the kernel and its shards (and the local Ray head llmos started)."""
    from llmos_kernel.launcher import connect_ray, stop_kernel

    state = (state_dir or default_state_dir()).expanduser().resolve()
    connect_ray(None, start_head=False, state_dir=state)
    if stop_kernel(name, state):
        click.echo(f"kernel {name!r} stopped")
    else:
        click.echo(f"no kernel named {name!r} was running", err=True)
