"""``llmos eval``: perplexity or generation metrics of a model (and adapter) on a file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmos_kernel import store


@click.command(name="eval")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", type=click.Choice(["ppl", "gen"]), required=True,
              help="ppl: perplexity of a text file; gen: answers to a chat JSONL file, "
              "scored against each line's last (assistant) message.")
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True,
              help="Model name in the store, or a path to a .gguf file.")
@click.option("--adapter", default=None, help="A LoRA adapter in the store (or its folder).")
@click.option("--metrics", default="bleu,rouge,exact", show_default=True,
              help="gen: any of bleu, rouge (ROUGE-L), exact (exact match).")
@click.option("--window", type=int, default=None,
              help="ppl: tokens per window (default: the model's context).")
@click.option("--stride", type=int, default=None, help="ppl: tokens between window starts "
              "(default: the window, no overlap).")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="gen: per answer.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def eval_(file: str, task: str, model: str, adapter: str | None, metrics: str,
          window: int | None, stride: int | None, max_tokens: int, dtype: str, device: str,
          as_json: bool) -> None:
    """Evaluate MODEL (with --adapter) on FILE through the serving engine.

    The engine runs in this process with the runner a kernel's model shard uses.
    """
    from llmos_kernel import adapters
    from llmos_kernel.engine.local import load_engine, set_threads
    from llmos_kernel.train import evaluate

    if adapter is not None:
        adapters.check_base(adapters.read_meta(adapter), store.resolve_model(model), adapter)
    set_threads()
    engine = load_engine(model, dtype=dtype, device=device, kv_budget="1GiB")
    if task == "ppl":
        text = Path(file).read_text(encoding="utf-8")
        report = evaluate.perplexity(engine, engine.tokenizer.encode(text), window, stride,
                                     adapter)
    else:
        report = evaluate.generation(engine, file, tuple(m.strip() for m in metrics.split(",")),
                                     adapter, max_tokens)
    report = {"task": task, "file": file, "model": model, "adapter": adapter, **report}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key != "samples":
            click.echo(f"{key:<16} {value:.4f}" if isinstance(value, float)
                       else f"{key:<16} {value}")
