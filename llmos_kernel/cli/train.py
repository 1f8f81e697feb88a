"""``llmos train lora``: fine-tune the core with a LoRA adapter on a JSONL file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmos_kernel import store
from llmos_kernel.cli.kernel import state_dir_option
from llmos_kernel.paths import models_dir


@click.group()
def train() -> None:
    """Fine-tune the Transformer core."""


@train.command()
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True,
              help="Base model: a store name or a .gguf path.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="JSONL: {\"messages\": [...]} per line (chat) or {\"text\": ...} (text).")
@click.option("--format", "fmt", type=click.Choice(["chat", "text"]), default="chat",
              show_default=True, help="chat: loss on the assistant turns only.")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=16.0, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of the data held out for the validation loss.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--name", default=None, help="The adapter's name in the model store "
              "(default: the data file's name + '-lora').")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Write the adapter here instead of into the model store.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in the adapter's "
              "folder.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="The frozen base's compute dtype (the adapter is fp32).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda when present.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: every core; "
              "with --kernel, one fewer, left to the model shard).")
@click.option("--kernel", "in_kernel", is_flag=True, help="Run as a process of a running "
              "kernel at low priority (the trainer niced in its own OS process); print its "
              "pid, then its exit record.")
@click.option("--kernel-name", default="kernel", show_default=True,
              help="With --kernel: the kernel's name.")
@state_dir_option
def lora(model: str, data: str, fmt: str, rank: int, alpha: float, lr: float, epochs: int,
         batch: int, grad_accum: int, val_fraction: float, max_steps: int | None,
         name: str | None, out: str | None, resume: bool, dtype: str, device: str,
         seed: int, threads: int | None, in_kernel: bool, kernel_name: str,
         state_dir: Path | None) -> None:
    """Train a LoRA adapter on the attention and MLP projections (base frozen).

    Writes adapter.safetensors, adapter.json, checkpoint.pt, loss.csv and loss.png into the
    adapter's folder and prints its path.
    """
    folder = (Path(out) if out else models_dir() / (name or f"{Path(data).stem}-lora")).resolve()
    if in_kernel:
        model_arg = str(Path(model).resolve()) if Path(model).suffix else model
        argv = ["--model", model_arg, "--data", str(Path(data).resolve()), "--format", fmt,
                "--rank", str(rank), "--alpha", str(alpha), "--lr", str(lr), "--epochs",
                str(epochs), "--batch", str(batch), "--grad-accum", str(grad_accum),
                "--val-fraction", str(val_fraction), "--out", str(folder), "--dtype", dtype,
                "--device", device, "--seed", str(seed)]
        argv += (["--max-steps", str(max_steps)] if max_steps else []) + \
            (["--resume"] if resume else []) + (["--threads", str(threads)] if threads else [])
        _spawn(argv, f"train-{folder.name}", kernel_name, state_dir)
        return
    from llmos_kernel.cli.progress import Phases
    from llmos_kernel.engine.local import set_threads
    from llmos_kernel.train.trainer import TrainConfig
    from llmos_kernel.train.trainer import train as run

    cfg = TrainConfig(data=data, out=str(folder), model=model, format=fmt, rank=rank,
                      alpha=alpha, lr=lr, epochs=epochs, batch=batch, grad_accum=grad_accum,
                      val_fraction=val_fraction, max_steps=max_steps, resume=resume,
                      dtype=dtype, device=device, seed=seed)
    set_threads(threads)
    with Phases() as phases:
        bar = _Bar()
        result = run(cfg, progress=bar, phase=phases.phase)
    bar.close()
    log = result.log
    if log:
        vals = [r.val_loss for r in log if r.val_loss is not None]
        click.echo(f"trained {len(log)} steps in {result.seconds:.0f}s: loss "
                   f"{log[0].loss:.3f} -> {log[-1].loss:.3f}"
                   + (f", validation {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else "")
                   + f", {result.tok_s:.0f} tok/s", err=True)
    click.echo(str(folder))


LOW_PRIORITY = -50  # below every agent's default (0)


def _spawn(argv: list[str], name: str, kernel: str, state_dir: Path | None) -> None:
    import asyncio

    from llmos_kernel.client import KernelClient
    from syscalls.proc import program_spec

    client = KernelClient.connect(kernel, state_dir=state_dir)
    pid = asyncio.run(client.call("spawn", {
        "program": program_spec("llmos_kernel.train.job:main"), "args": {"argv": argv},
        "name": name, "priority": LOW_PRIORITY}))
    click.echo(pid)
    exit_ = asyncio.run(client.call("wait", pid, None))
    click.echo(json.dumps(exit_, indent=2, default=str))
    if exit_.get("reason") != "normal":
        raise SystemExit(1)


class _Bar:
    """A rich progress bar with loss, tok/s and ETA on a terminal; elsewhere one line per
    ``every`` steps and per epoch's validation."""

    def __init__(self, every: int = 10) -> None:
        self.tty, self.every = sys.stderr.isatty(), every
        self.progress = self.task = None

    def __call__(self, r, total: int) -> None:
        if self.tty:
            self._live(r, total)
        elif r.val_loss is not None:
            click.echo(f"epoch {r.epoch} step {r.step}/{total} validation loss "
                       f"{r.val_loss:.4f}", err=True)
        elif r.step % self.every == 0 or r.step == total or r.step == 1:
            click.echo(f"step {r.step}/{total} epoch {r.epoch} loss {r.loss:.4f} "
                       f"lr {r.lr:.2e} {r.tok_s:.0f} tok/s", err=True)

    def _live(self, r, total: int) -> None:
        if self.progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, stats="")
        val = f" val {r.val_loss:.3f}" if r.val_loss is not None else ""
        self.progress.update(self.task, completed=r.step,
                             stats=f"loss {r.loss:.3f}{val} {r.tok_s:.0f} tok/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
