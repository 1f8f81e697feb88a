"""``llmos train lora``: the training loop.

AdamW over the adapter's A and B only (the base stays frozen), a linear warm-up then a
cosine decay, gradient accumulation, a validation loss on a held-out split after each
epoch, and a checkpoint (adapter, optimizer, schedule, step) after each epoch that
``resume`` continues from. The adapter is written into its folder with ``loss.csv`` and
``loss.png`` beside it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmos_kernel import adapters, store
from llmos_kernel.core.lora import PARTS, LoraAdapter
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.core.weights import load_model, parse_dtype, resolve_dtype
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.train import report
from llmos_kernel.train.data import IGNORE, Example, load_examples
from llmos_kernel.train.forward import LoraModel

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: str
    out: str  # the adapter's folder (its name is the folder's)
    model: str = store.DEFAULT_MODEL
    format: str = "chat"
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    epochs: int = 3
    batch: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: float = 0.1  # share of the steps spent warming up
    val_fraction: float = 0.1
    targets: tuple[str, ...] = PARTS
    dtype: str = "auto"  # auto: bf16 where the CPU multiplies bf16 natively, else fp32
    device: str = "cpu"
    seed: int = 0
    max_steps: int | None = None  # stop early (benchmarks and tests)
    resume: bool = False


@dataclass
class StepLog:
    step: int
    epoch: int
    lr: float
    loss: float
    tokens: int  # labelled tokens in the step
    tok_s: float  # processed (all) tokens per second
    val_loss: float | None = None


@dataclass
class TrainResult:
    out: Path
    log: list[StepLog] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0  # processed tokens
    wall_seconds: float = 0.0  # with loading and validation

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


Progress = Callable[[StepLog, int], None]  # each step's log and the total steps


def batches(examples: list[Example], size: int, rng: random.Random
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled right-padded ``(tokens, labels)`` batches."""
    order = list(examples)
    rng.shuffle(order)
    out = []
    for i in range(0, len(order), size):
        group = order[i:i + size]
        width = max(len(e.ids) for e in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(group):
            tokens[row, :len(e.ids)] = torch.tensor(e.ids)
            labels[row, :len(e.labels)] = torch.tensor(e.labels)
        out.append((tokens, labels))
    return out


def schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to 0.1 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def split(examples: list[Example], fraction: float, seed: int
          ) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded ``fraction`` held out (none for tiny sets)."""
    if fraction <= 0 or len(examples) < 10:
        return examples, []
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, int(len(examples) * fraction))
    return shuffled[n_val:], shuffled[:n_val]


def train(cfg: TrainConfig, progress: Progress | None = None,
          phase: Callable[[str], None] = lambda text: None) -> TrainResult:
    if cfg.rank <= 0 or cfg.epochs <= 0 or cfg.batch <= 0 or cfg.grad_accum <= 0:
        raise InvalidArgument("rank, epochs, batch and grad_accum must be positive")
    out = Path(cfg.out).expanduser()
    base_path = store.resolve_model(cfg.model)
    phase(f"loading {base_path.name} (dequantized, frozen)")
    model, gguf = load_model(base_path, device=cfg.device,
                             options=KernelOptions(c_kernels=False, mkl_pack=False))
    tok = Tokenizer.from_gguf(gguf.metadata)
    phase(f"reading {cfg.data}")
    examples = load_examples(cfg.data, tok, cfg.format, model.config.context_length)
    train_set, val_set = split(examples, cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    adapter = LoraAdapter.init(model.config, cfg.rank, cfg.alpha, tuple(cfg.targets))
    lm = LoraModel(model, adapter, parse_dtype(resolve_dtype(cfg.dtype, cfg.device)))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=0.0)
    per_epoch = -(-len(train_set) // cfg.batch) // cfg.grad_accum or 1
    total = per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  schedule(total, max(1, int(total * cfg.warmup))))
    result = TrainResult(out)
    first_epoch = 0
    if cfg.resume:
        first_epoch = _restore(out, adapter, optimizer, scheduler, result)
    step = scheduler.last_epoch  # optimizer steps done (resumed ones included)
    phase(f"training: {len(train_set)} examples ({len(val_set)} held out), {total} steps")
    started = time.perf_counter()
    for epoch in range(first_epoch, cfg.epochs):
        rng = random.Random(cfg.seed * 1000 + epoch)
        micro = batches(train_set, cfg.batch, rng)
        for i in range(0, len(micro) - cfg.grad_accum + 1, cfg.grad_accum):
            if step >= total:
                break
            t0 = time.perf_counter()
            group = micro[i:i + cfg.grad_accum]
            n_labels = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in group)
            loss_sum = 0.0
            for tokens, labels in group:
                loss, _ = lm.loss(tokens.to(lm.device), labels.to(lm.device))
                (loss / n_labels).backward()
                loss_sum += loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            processed = sum(t.numel() for t, _ in group)
            took = time.perf_counter() - t0
            result.seconds += took
            result.tokens += processed
            entry = StepLog(step, epoch + 1, lr, loss_sum / n_labels, n_labels, processed / took)
            result.log.append(entry)
            if progress is not None:
                progress(entry, total)
        if val_set:
            result.log[-1].val_loss = validation_loss(lm, val_set, cfg.batch)
            if progress is not None:
                progress(result.log[-1], total)
        _save(cfg, out, adapter, optimizer, scheduler, epoch + 1, result, base_path)
        if step >= total:
            break
    result.wall_seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def validation_loss(lm: LoraModel, examples: list[Example], size: int) -> float:
    total, count = 0.0, 0
    for tokens, labels in batches(examples, size, random.Random(0)):
        loss, n = lm.loss(tokens.to(lm.device), labels.to(lm.device))
        total, count = total + loss.item(), count + n
    return total / max(count, 1)


def _save(cfg: TrainConfig, out: Path, adapter: LoraAdapter, optimizer, scheduler,
          epochs_done: int, result: TrainResult, base_path: Path) -> None:
    adapters.save(adapter, out, base_path, cfg.model if not Path(cfg.model).suffix
                  else base_path.name)
    torch.save({"epoch": epochs_done, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "log": [asdict(r) for r in result.log],
                "config": asdict(cfg), "seconds": result.seconds, "tokens": result.tokens},
               out / CHECKPOINT)
    report.write(out, result.log)


def _restore(out: Path, adapter: LoraAdapter, optimizer, scheduler, result: TrainResult) -> int:
    """Load the last checkpoint in ``out``; the first epoch still to run."""
    if not (out / CHECKPOINT).is_file():
        raise InvalidArgument(f"nothing to resume: {out / CHECKPOINT} does not exist")
    state = torch.load(out / CHECKPOINT, weights_only=False)
    saved = adapters.load(out).adapter
    if saved.weights.keys() != adapter.weights.keys() or saved.rank != adapter.rank:
        raise InvalidArgument(f"the checkpoint in {out} has another rank or targets")
    with torch.no_grad():
        for k, t in adapter.weights.items():
            t.copy_(saved.weights[k].to(t.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.log[:] = [StepLog(**r) for r in state["log"]]
    result.seconds, result.tokens = state["seconds"], state["tokens"]
    return state["epoch"]
