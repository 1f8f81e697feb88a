"""``python bench/gc_pause.py``: a full collection timed in a process holding the loaded
real model, as it stands and after ``gc_pauses.settle``, with the same records made after
start-up in both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "gc_pause.py"


def test_the_gc_bench_times_both_on_the_loaded_model():
    done = subprocess.run([sys.executable, str(SCRIPT), "--repeat", "2", "--live", "1000",
                           "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tracked_objects"] > 100_000  # the engine, the tokenizer, the modules
    # start-up's objects were kept out; the records made after were not
    assert report["tracked_objects"] - 1000 <= report["frozen_objects"] < \
        report["tracked_objects"] + 1000 * 4
    assert report["full_collection_ms"] > 0 and report["full_collection_settled_ms"] > 0
