"""Garbage-collector pauses in the kernel's long-lived processes: timed, and kept short.

A full (generation 2) collection in CPython walks every object the collector tracks, and
stops the process while it does. The kernel holds the tokenizer's vocabulary, the model's
metadata, its services and Ray's own state, and each agent host a runtime and its agents:
there a full collection stopped the event loop (every host's batches, every token
stream) for 100-180 ms in `llmos bench ipc` on the development machine, and
`python bench/gc_pause.py` times one beside the fix. Almost all of those objects live as
long as the process, so once a process has started, ``settle`` collects once and moves
what is left to the permanent generation (``gc.freeze``, CPython's own means for this);
later full collections walk only what came after. Objects frozen there are never
collected, even if they become garbage: ``settle`` runs once, after start-up, when what
exists is what the process keeps.

``watch`` times every collection in this process (``gc.callbacks``); ``snapshot`` says how
many ran and the longest pause per generation (``llmos kernel status``, the actors' info).
"""

from __future__ import annotations

import gc
import time

GENERATIONS = 3


class Pauses:
    """Collections and their pauses in this process, by generation (a ``gc.callbacks``
    entry: ``watch`` installs one)."""

    def __init__(self) -> None:
        self.collections = [0] * GENERATIONS
        self.longest_ms = [0.0] * GENERATIONS
        self.total_ms = [0.0] * GENERATIONS
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation = info["generation"]
        ms = (time.perf_counter() - self._began) * 1e3
        self.collections[generation] += 1
        self.total_ms[generation] += ms
        self.longest_ms[generation] = max(self.longest_ms[generation], ms)

    def snapshot(self) -> dict:
        return {"collections": list(self.collections),
                "longest_pause_ms": [round(v, 3) for v in self.longest_ms],
                "total_pause_ms": [round(v, 3) for v in self.total_ms],
                "frozen_objects": gc.get_freeze_count()}


_pauses: Pauses | None = None
_settled = False


def watch() -> Pauses:
    """Time this process's collections from now on (once per process)."""
    global _pauses
    if _pauses is None:
        _pauses = Pauses()
        gc.callbacks.append(_pauses)
    return _pauses


def snapshot() -> dict:
    """This process's collections and pauses so far (``watch`` starts counting)."""
    return watch().snapshot()


def settle() -> None:
    """The process has started: collect what start-up left, then keep every object that
    remains out of later collections. Once per process: objects made after (agents,
    requests) come and go, and must stay collectable."""
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
