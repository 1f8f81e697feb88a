"""``llmos models``: pull models into the store, list them, inspect a model file."""

from __future__ import annotations

import json
import sys

import click

from llmos_kernel import store


@click.group()
def models() -> None:
    """Manage the model store ($LLMOS_HOME/models, default ~/.llmos/models)."""


@models.command()
@click.argument("names", nargs=-1)
def pull(names: tuple[str, ...]) -> None:
    """Fetch known models into the store and print their paths (a no-op if there).

    With no NAME: the default model.
    """
    for name in names or (store.DEFAULT_MODEL,):
        click.echo(store.pull(name, progress=_ProgressLine()))


@models.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_(as_json: bool) -> None:
    """Show the models in the store, LoRA adapters with their base model."""
    entries = store.list_models()
    if as_json:
        rows = [dict(vars(e), path=str(e.path)) for e in entries]
        click.echo(json.dumps(rows, indent=2))
        return
    if not entries:
        click.echo(f"no models in the store; run: llmos models pull {store.DEFAULT_MODEL}",
                   err=True)
        return
    table = [("NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "BASE", "PATH")] + [
        (e.name, e.arch, _human(e.params, ""), e.quant, _human(e.bytes, "B"), e.base or "-",
         str(e.path)) for e in entries
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@models.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect(model: str, as_json: bool) -> None:
    """Show a model's shape, quantization, tokenizer and memory needs (MODEL: name or path)."""
    facts = store.inspect_model(model)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        if key == "tensor_types":
            value = ", ".join(f"{name}×{count}" for name, count in value.items())
        elif key.endswith("_bytes") or key.startswith("kv_bytes"):
            value = f"{value:,} ({_human(value, 'B')})"
        elif key == "n_params":
            value = f"{value:,} ({_human(value, '')})"
        click.echo(f"{key.ljust(width)}  {value}")


class _ProgressLine:
    """Draws one progress line per phase on stderr, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.finished_phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == self.finished_phase:
            return
        finished = total > 0 and done >= total
        pct = f"{100 * done / total:5.1f}%" if total else ""
        line = f"{phase:<8} {_human(done, 'B'):>9} / {_human(total, 'B'):<9} {pct}"
        if self.tty:
            click.echo("\r" + line, err=True, nl=finished)
        elif finished:
            click.echo(line, err=True)
        if finished:
            self.finished_phase = phase


def _human(n: int, unit: str) -> str:
    """12_345_678 -> '12.3 M' + unit: decimal prefixes, as model sizes are usually quoted."""
    prefixes = ("", "k", "M", "G", "T")
    value, i = float(n), 0
    while abs(value) >= 1000 and i < len(prefixes) - 1:
        value, i = value / 1000, i + 1
    return f"{n} {unit}".strip() if i == 0 else f"{value:.1f} {prefixes[i]}{unit}"
