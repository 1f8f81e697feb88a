"""``llmos bench core|serve|ipc``: ours beside a baseline, in one run, as ratios."""

from __future__ import annotations

import json

import click

from llmos_kernel import store


def _report(result: dict, pairs: list[tuple[str, str, str]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{'metric':28s} {'llmos':>12s} {'baseline':>12s} {'ratio':>8s}")
    for label, ours, ref in pairs:
        a, b = result[ours], result[ref]
        click.echo(f"{label:28s} {a:12.2f} {b:12.2f} {a / b if b else float('inf'):7.2f}x")


@click.group()
def bench() -> None:
    """Benchmarks: each prints llmos beside a baseline measured in the same run."""


@bench.command()
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--batch", "batch_size", type=int, default=32, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True,
              help="Batch runs per side, alternating; the best of each side counts.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="Both sides run in it (auto: as the kernel resolves it).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def core(model: str, new_tokens: int, batch_size: int, repeat: int, dtype: str,
         as_json: bool) -> None:
    """The Transformer core vs Hugging Face transformers on the same GGUF."""
    from llmos_kernel.bench import core as core_bench

    result = core_bench.run(model, new_tokens=new_tokens, batch_size=batch_size, repeat=repeat,
                            dtype=dtype, progress=lambda m: click.echo(f"[bench] {m}", err=True))
    b = f"batch{batch_size}_tok_s"
    _report(result, [("load seconds (lower wins)", "load_s", "ref_load_s"),
                     ("decode tok/s, 1 stream", "decode_tok_s", "ref_decode_tok_s"),
                     (f"aggregate tok/s, {batch_size} prompts", b, f"ref_{b}")], as_json)
    if not as_json:
        runs = f"batch{batch_size}_runs_tok_s"
        click.echo(f"batch runs, tok/s: llmos {_runs(result[runs])}; "
                   f"baseline {_runs(result[f'ref_{runs}'])} (best counts)")
        click.echo(f"1,000-token context: restored from a snapshot in "
                   f"{result['context_restore_s']:.3f}s, recomputed in "
                   f"{result['context_recompute_s']:.3f}s "
                   f"({result['context_recompute_s'] / result['context_restore_s']:.1f}x)")


@bench.command(name="train")
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps per run.")
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="The frozen base's dtype on both sides.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def train_(model: str, steps: int, batch: int, rank: int, repeat: int, dtype: str,
           as_json: bool) -> None:
    """A LoRA training step vs Hugging Face peft on transformers' model of the same GGUF."""
    from llmos_kernel.bench import train as train_bench
    from llmos_kernel.engine.local import set_threads

    set_threads()
    result = train_bench.run(model, steps=steps, batch=batch, rank=rank, dtype=dtype,
                             repeat=repeat,
                             progress=lambda m: click.echo(f"[bench] {m}", err=True))
    _report(result, [(f"train tok/s ({result['dtype']}, r{rank})", "train_tok_s",
                      "ref_train_tok_s")], as_json)


@bench.command()
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per side and size, alternating; the best of each counts.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="fp32: our kernels vs MKL's packed fp32; bf16: our bf16 kernel (AMX "
              "tiles or AVX512-BF16) vs torch's bf16 F.linear (oneDNN).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def gemm(model: str, repeat: int, dtype: str, as_json: bool) -> None:
    """The model's projections per step size: llmos's kernels vs torch's GEMM."""
    from llmos_kernel.bench import gemm as gemm_bench

    result = gemm_bench.run(str(store.resolve_model(model)), repeat=repeat, dtype=dtype,
                            progress=lambda m: click.echo(f"[bench] {m}", err=True))
    if as_json:
        click.echo(json.dumps(result))
        return
    ref = "MKL" if dtype == "fp32" else "torch"
    click.echo(f"{'rows':>6s} {'llmos ms':>10s} {ref + ' ms':>10s} {'GF/s':>7s} "
               f"{ref + ' GF/s':>10s} {'ratio':>7s}")
    for i, m in enumerate(result["rows"]):
        click.echo(f"{m:6d} {result['ms'][i]:10.1f} {result['ref_ms'][i]:10.1f} "
                   f"{result['gflops'][i]:7.0f} {result['ref_gflops'][i]:10.0f} "
                   f"{result['ref_ms'][i] / result['ms'][i]:6.2f}x")


def _runs(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


@bench.command()
@click.option("--agents", type=int, default=1000, show_default=True,
              help="Idle agents spawned at once (they stay alive during the ping-pong).")
@click.option("--messages", type=int, default=60, show_default=True,
              help="Round trips per ping-pong pair (two messages each).")
@click.option("--pairs", type=int, default=300, show_default=True,
              help="Ping-pong pairs running at once (so hosts batch their calls).")
@click.option("--kernel", "kernel_name", default=None,
              help="A running kernel to measure (default: start a local Ray and a kernel).")
@click.option("--state-dir", default=None, help="That kernel's state dir (for its root token).")
@click.option("--sandbox", is_flag=True, help="Also sandboxed agents beside unsandboxed ones: "
              "spawn rate, syscall and ping-pong round trips (child processes: a few only).")
@click.option("--sandbox-agents", type=int, default=16, show_default=True)
@click.option("--sandbox-pairs", type=int, default=4, show_default=True)
@click.option("--sandbox-rounds", type=click.IntRange(min=1), default=4, show_default=True,
              help="Rounds of sandboxed and plain round trips, taken in turn.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def ipc(agents: int, messages: int, pairs: int, kernel_name: str | None, state_dir: str | None,
        sandbox: bool, sandbox_agents: int, sandbox_pairs: int, sandbox_rounds: int,
        as_json: bool) -> None:
    """Spawn rate, memory per agent and message ping-pong vs plain Ray actor calls."""
    from llmos_kernel.bench import ipc as ipc_bench

    result = ipc_bench.run(agents=agents, messages=messages, pairs=pairs, kernel=kernel_name,
                           state_dir=state_dir, sandbox=sandbox, sandbox_agents=sandbox_agents,
                           sandbox_pairs=sandbox_pairs, sandbox_rounds=sandbox_rounds,
                           progress=lambda m: click.echo(f"[bench] {m}", err=True))
    if as_json:
        click.echo(json.dumps(result))
        _check_replies(result)
        return
    click.echo(f"spawned {agents} agents in {result['spawn_s']:.2f} s "
               f"({result['spawn_per_s']:.0f}/s); {result['agents_alive']} alive; "
               f"{result['bytes_per_idle_agent'] / 1024:.1f} KiB of host memory per idle agent")
    ray_calls = result["ray_calls_per_s"]
    click.echo(f"{'':34s} {'llmos':>10s} {'Ray actors':>11s} {'ratio':>7s}")
    for label, key in (("messages/s, agents on one host", "msgs_per_s_local"),
                       ("messages/s, agents on two hosts", "msgs_per_s_cross")):
        click.echo(f"{label:34s} {result[key]:10.0f} {ray_calls:11.0f} "
                   f"{result[key] / ray_calls:6.1f}x")
    for q in ("p50", "p99"):
        click.echo(f"{'round trip ' + q + ' ms, two hosts':34s} {result[f'lat_{q}_s'] * 1e3:10.1f} "
                   f"{result[f'ray_lat_{q}_s'] * 1e3:11.1f}")
    if sandbox:
        _sandbox_table(result)
    _check_replies(result)


def _check_replies(result: dict) -> None:
    """A ping-pong call answered with something other than its own reply is a bug in
    message delivery, not a slow run: the command fails."""
    if result.get("wrong_replies"):
        raise click.ClickException(
            f"{result['wrong_replies']} of {result['round_trips']} ping-pong calls were "
            "answered with another message than their own reply")


def _sandbox_table(result: dict) -> None:
    click.echo(f"{'':34s} {'sandboxed':>10s} {'plain':>11s} {'ratio':>7s}")
    rows = [("agents spawned to running /s", "spawn_per_s", 1.0)] + [
        (f"{what} {q} ms", f"{key}_{q}_s", 1e3) for what, key in
        (("syscall round trip", "syscall"), ("ping-pong round trip", "pingpong"))
        for q in ("p50", "p99")]
    for label, key, scale in rows:
        ours, theirs = result[f"sbx_{key}"], result[f"plain_{key}"]
        click.echo(f"{label:34s} {ours * scale:10.1f} {theirs * scale:11.1f} "
                   f"{ours / theirs:6.2f}x")
    for label, key in (("syscall", "syscall"), ("ping-pong", "pingpong")):
        click.echo(f"{label} p50 ratio in each round: "
                   + " / ".join(f"{r:.2f}x" for r in result[f"{key}_p50_ratios"]))
    if result["unsettled_measures"]:
        click.echo(f"{result['unsettled_measures']} measures began before the machine settled "
                   "(another job is running?): their ratios are less reliable")


@bench.command()
@click.option("--address", default=None,
              help="Drive the kernel of this Ray cluster ('auto' for the local one); "
                   "default: start a private kernel for the run.")
@click.option("--name", "kernel_name", default="kernel", show_default=True,
              help="Kernel to drive; started here (and stopped after) if none is running.")
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True)
@click.option("--concurrency", type=int, default=64, show_default=True)
@click.option("--requests", type=int, default=128, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of each side, alternating; the best of each is compared.")
@click.option("--shared-prefix", type=int, default=0, show_default=True,
              help="Every prompt starts with the same system text of this many tokens; the "
                   "workload is also run with prefix caching off.")
@click.option("--max-words", type=click.IntRange(min=8), default=200, show_default=True,
              help="User messages run from 8 words to this many (prompt lengths spread "
                   "evenly); shorter prompts make the workload decode-heavy.")
@click.option("--no-baseline", is_flag=True, help="Skip the transformers baseline.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="The kernel's, where it is started here; the baseline "
              "runs in fp32 and, beside a bf16 kernel, in bf16 too.")
@click.option("--http", is_flag=True, help="Also send the same workload through `llmos "
              "serve`'s OpenAI API (started here, on the loopback), alternating runs.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="N > 1: the workload through a single-shard kernel and an N-stage "
              "pipeline kernel, both started here, side by side (no transformers baseline).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def serve(address, kernel_name, model, concurrency, requests, max_tokens, repeat, shared_prefix,
          max_words, no_baseline, dtype, http, shards, as_json) -> None:
    """The kernel under concurrent load vs transformers' padded batches."""
    from llmos_kernel.bench import serve as serve_bench

    if shards > 1:
        result = serve_bench.compare_shards(
            shards, address=address, concurrency=concurrency, requests=requests,
            max_tokens=max_tokens, repeat=repeat, shared_prefix=shared_prefix,
            max_words=max_words, model=model, dtype=dtype,
            progress=lambda m: click.echo(f"[bench] {m}", err=True))
        if as_json:
            click.echo(json.dumps(result))
            return
        _shards_report(result)
        return
    result = serve_bench.run(kernel_name=kernel_name, address=address, concurrency=concurrency,
                             requests=requests, max_tokens=max_tokens, repeat=repeat,
                             shared_prefix=shared_prefix, max_words=max_words,
                             baseline=not no_baseline, model=model, dtype=dtype, http=http,
                             progress=lambda m: click.echo(f"[bench] {m}", err=True))
    if as_json:
        click.echo(json.dumps(result))
        return
    serve_report(result)


def _shards_report(result: dict) -> None:
    """``llmos bench serve --shards N``: the pipeline beside the single shard."""
    n = result["shards"]
    click.echo(f"llmos in {result['single']['dtype']}: {n} pipeline stages vs one shard, "
               "same workload, same run")
    click.echo(f"{'metric':28s} {f'{n} stages':>12s} {'1 shard':>12s} {'ratio':>8s}")
    for label, key in (("aggregate tok/s", "agg_tok_s"), ("processed tok/s", "processed_tok_s"),
                       ("TTFT p50 s", "ttft_p50_s"), ("ITL p50 s", "itl_p50_s"),
                       ("step p50 s", "step_p50_s")):
        ours, base = result["split"][key], result["single"][key]
        click.echo(f"{label:28s} {ours:12.3f} {base:12.3f} {ours / base:7.2f}x")
    click.echo("steps in flight at most: " + ", ".join(
        f"{result[k]['steps_in_flight']['max']} ({result[k]['steps_in_flight']['overlapped_steps']}"
        f" steps overlapped) {label}" for k, label in (("split", f"{n} stages"),
                                                       ("single", "1 shard"))))
    click.echo(f"step plan at {result['plan_seqs']} sequences x {result['plan_context']}-token "
               f"contexts, a steady decode step: {result['plan_pickle_bytes']:,} bytes pickled "
               f"(what Ray sends; {result['plan_whole_pickle_bytes']:,} with every list whole), "
               f"{result['plan_msgpack_bytes']:,} msgpack "
               f"({result['plan_whole_msgpack_bytes']:,} whole); put once per step, read by "
               "every stage")


def _peak_parts(result: dict, key: str) -> str:
    """``"; torch 131, llmos 353"``: who reached the peak, where both were measured."""
    parts = [f"{who} {result[f'gemm_peak{key}_{who}_gflops']:.0f}" for who in ("torch", "llmos")
             if f"gemm_peak{key}_{who}_gflops" in result]
    return "; " + ", ".join(parts) if parts else ""


def serve_report(result: dict) -> None:
    """``llmos bench serve``'s figures as text."""
    refs = [(key, label) for key, label in (("ref", "fp32"), ("ref_bf16", "bf16"))
            if f"{key}_agg_tok_s" in result]
    if result["repeat"] > 1:
        click.echo("runs, llmos: " + ", ".join(f"{v:.1f}" for v in result["runs_agg_tok_s"])
                   + "".join(f"; transformers {label}: " + ", ".join(
                       f"{v:.1f}" for v in result[f"runs_{key}_agg_tok_s"])
                       for key, label in refs) + " (best of each below)")
    kernel = result.get("bf16_kernel")
    click.echo(f"llmos in {result['dtype']}" + (
        f" (bf16 products on {kernel}, fp32 activations, bf16 KV)" if kernel else
        " (the whole model in torch's bf16)" if result["dtype"] == "bf16" else ""))
    for key, label in refs:
        click.echo(f"baseline: transformers {label}" + (
            " (its whole model in bf16)" if label == "bf16" else ""))
        _report(result, [("aggregate tok/s", "agg_tok_s", f"{key}_agg_tok_s"),
                         ("processed tok/s", "processed_tok_s", f"{key}_processed_tok_s")],
                False)
    if not refs:
        click.echo(f"aggregate tok/s {result['agg_tok_s']:.1f}, processed (prompt + "
                   f"generated) tok/s {result['processed_tok_s']:.1f}")
    bound = result["compute_bound_tok_s"]
    click.echo(f"compute bound {bound:.0f} tok/s (fp32 GEMM peak {result['gemm_peak_gflops']:.0f} "
               f"GFLOP/s{_peak_parts(result, '')}): generated tokens reach "
               f"{result['agg_tok_s'] / bound:.0%} of it, "
               f"processed tokens {result['processed_tok_s'] / bound:.0%}")
    if "compute_bound_bf16_tok_s" in result:
        bound16 = result["compute_bound_bf16_tok_s"]
        click.echo(f"bf16 compute bound {bound16:.0f} tok/s (bf16 GEMM peak "
                   f"{result['gemm_peak_bf16_gflops']:.0f} GFLOP/s"
                   f"{_peak_parts(result, '_bf16')}): generated "
                   f"{result['agg_tok_s'] / bound16:.0%}, processed "
                   f"{result['processed_tok_s'] / bound16:.0%}")
    click.echo(f"TTFT p50 {result['ttft_p50_s']:.2f}s p99 {result['ttft_p99_s']:.2f}s; "
               f"ITL p50 {result['itl_p50_s'] * 1e3:.0f}ms p99 {result['itl_p99_s'] * 1e3:.0f}ms; "
               f"prefix hit rate {result['prefix_hit_rate']:.0%}")
    waited = result["high_priority_steps_waited"]
    click.echo(f"high-priority TTFT: {result['ttft_high_priority_idle_s']:.2f}s idle, "
               f"{result['ttft_high_priority_busy_s']:.2f}s under load: "
               f"{result['high_priority_queue_s']:.2f}s for the step in flight to end, then "
               + ("the very next step" if waited == 0 else f"{waited} more steps")
               + f" (step p50 {result['step_p50_s']:.2f}s)")
    if "http_agg_tok_s" in result:
        click.echo(f"through the HTTP API (same requests, same run): "
                   f"{result['http_agg_tok_s']:.1f} tok/s, "
                   f"{result['http_agg_tok_s'] / result['agg_tok_s']:.2f}x the in-cluster "
                   f"client; TTFT p50 {result['http_ttft_p50_s']:.2f}s")
    if "ttft_p50_nocache_s" in result:
        click.echo(f"TTFT p50 without prefix caching {result['ttft_p50_nocache_s']:.2f}s "
                   f"({result['ttft_p50_nocache_s'] / result['ttft_p50_s']:.1f}x the cached)")
