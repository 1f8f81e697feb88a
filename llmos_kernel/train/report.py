"""The loss curve of a training run: ``loss.csv`` and ``loss.png`` beside the adapter."""

from __future__ import annotations

import csv
from pathlib import Path


def write(out: Path, log: list) -> None:
    """One CSV row per optimizer step (``val_loss`` on each epoch's last), and its plot."""
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "lr", "loss", "tokens", "tok_s", "val_loss"])
        for r in log:
            w.writerow([r.step, r.epoch, f"{r.lr:.6g}", f"{r.loss:.6f}", r.tokens,
                        f"{r.tok_s:.1f}", "" if r.val_loss is None else f"{r.val_loss:.6f}"])
    plot(out / "loss.png", log)


def plot(path: Path, log: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r.step for r in log], [r.loss for r in log], label="train", lw=1)
    val = [(r.step, r.val_loss) for r in log if r.val_loss is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
