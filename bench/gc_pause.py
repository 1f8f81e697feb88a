"""How long a full garbage collection stops a process holding what the kernel holds, with
and without ``llmos_kernel.gc_pauses.settle`` (``gc.freeze`` after start-up).

Loads the default model as an engine in this process (weights, tokenizer, scheduler) and
imports the kernel's services and Ray, as a kernel actor does, and makes ``--live``
records that outlive start-up (as a running kernel's processes and messages do); then
times ``--repeat`` full collections (``gc.collect()``) as the process stands, then again
after ``settle`` (which keeps only what exists at start-up out of them: the records made
after it, in a kernel, are still collected). No Ray cluster is started.

    python bench/gc_pause.py [--repeat 5] [--live 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from llmos_kernel import gc_pauses, kernel, store  # noqa: F401 - the kernel's modules, as it has them
from llmos_kernel.engine.local import load_engine


def full_collections(repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - began)
    return times


def records(n: int) -> list[dict]:
    """Objects made after start-up that live on (a process table's rows, say)."""
    return [{"pid": i, "name": f"agent-{i}", "args": {"n": i}, "children": []} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--live", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    engine = load_engine(store.DEFAULT_MODEL, dtype="auto")
    tracked = len(gc.get_objects())
    later = records(args.live)
    before = full_collections(args.repeat)
    del later
    gc_pauses.settle()  # start-up's objects only: the records come after, as in a kernel
    later = records(args.live)
    after = full_collections(args.repeat)
    out = {"tracked_objects": tracked, "frozen_objects": gc.get_freeze_count(),
           "full_collection_ms": statistics.median(before) * 1e3,
           "full_collection_settled_ms": statistics.median(after) * 1e3}
    del engine, later
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['tracked_objects']} objects tracked after start-up, "
          f"{args.live} records made after it")
    print(f"{'':40s} {'settled':>10s} {'as is':>10s} {'ratio':>7s}")
    print(f"{'full collection, median ms':40s} {out['full_collection_settled_ms']:10.2f} "
          f"{out['full_collection_ms']:10.2f} "
          f"{out['full_collection_settled_ms'] / out['full_collection_ms']:6.2f}x")


if __name__ == "__main__":
    main()
