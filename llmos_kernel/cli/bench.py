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
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def core(model: str, new_tokens: int, batch_size: int, as_json: bool) -> None:
    """The Transformer core vs Hugging Face transformers on the same GGUF."""
    from llmos_kernel.bench import core as core_bench

    result = core_bench.run(model, new_tokens=new_tokens, batch_size=batch_size,
                            progress=lambda m: click.echo(f"[bench] {m}", err=True))
    b = f"batch{batch_size}_tok_s"
    _report(result, [("load seconds (lower wins)", "load_s", "ref_load_s"),
                     ("decode tok/s, 1 stream", "decode_tok_s", "ref_decode_tok_s"),
                     (f"aggregate tok/s, {batch_size} prompts", b, f"ref_{b}")], as_json)
