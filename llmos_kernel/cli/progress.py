"""Progress of long CLI operations (Ray start, C kernel builds, model load) on stderr.

On a terminal each phase is a live line with a spinner and its running time, ticked off
when the next begins (rich); elsewhere (logs, CI, pipes) each phase is one plain line,
so a newcomer waiting on ``llmos kernel start`` sees what is happening either way.
"""

from __future__ import annotations

import sys
import time
from typing import Self

import click


class Phases:
    """``with Phases() as p: p.phase("loading weights"); ...`` — one line per phase."""

    def __init__(self) -> None:
        self._live = sys.stderr.isatty()
        self._progress = None
        self._task = None
        self._started = time.perf_counter()
        self._phase_started = self._started

    def __enter__(self) -> Self:
        if self._live:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(finished_text="[green]✓"),
                                      TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=Console(stderr=True))
            self._progress.start()
        return self

    def phase(self, text: str) -> None:
        """Start a new phase (the previous one is done)."""
        self._finish()
        self._phase_started = time.perf_counter()
        if self._progress is not None:
            self._task = self._progress.add_task(text, total=1)
        else:
            click.echo(f"[{self._phase_started - self._started:6.1f}s] {text}", err=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def _finish(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=1)
            self._progress.stop_task(self._task)
            self._task = None

    def __exit__(self, *exc) -> None:
        self._finish()
        if self._progress is not None:
            self._progress.stop()


def build_c_kernels(phases: Phases) -> None:
    """Build the C kernels this machine lacks before a kernel starts, as their own phase
    (a model shard on this node then finds them cached); nothing where all are built or
    C kernels are switched off."""
    from llmos_kernel.core import ckernel
    from llmos_kernel.core.options import KernelOptions

    if not KernelOptions.from_env().c_kernels:
        return
    todo = ckernel.missing()
    if not todo:
        return
    phases.phase(f"compiling {len(todo)} C kernels for this CPU (first use; cached in "
                 "$LLMOS_HOME/cache/kernels)")
    ckernel.prebuild()
