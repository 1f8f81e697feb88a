"""``llmos_kernel.gc_pauses``: collections timed per generation; ``settle`` keeps what
exists out of later full collections, and what comes after is still collected."""

from __future__ import annotations

import gc
import time
import weakref

from llmos_kernel import gc_pauses


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_every_collection_is_counted_and_timed_in_its_generation():
    pauses = gc_pauses.Pauses()  # the collector's calls, made here: nothing else adds to it
    for generation, seconds in ((1, 0.002), (2, 0.004), (2, 0.001)):
        pauses("start", {"generation": generation})
        time.sleep(seconds)
        pauses("stop", {"generation": generation})
    out = pauses.snapshot()
    assert out["collections"] == [0, 1, 2]
    assert out["longest_pause_ms"][0] == 0 and out["longest_pause_ms"][1] >= 2
    assert out["longest_pause_ms"][2] >= 4
    assert out["total_pause_ms"][2] >= out["longest_pause_ms"][2] + 1


def test_the_process_collector_reports_to_its_one_watch():
    pauses = gc_pauses.watch()
    assert gc_pauses.watch() is pauses  # one per process
    before = gc_pauses.snapshot()
    gc.collect(1)
    gc.collect(2)
    after = gc_pauses.snapshot()
    # at least these two (another thread of this process may collect meanwhile)
    assert after["collections"][1] >= before["collections"][1] + 1
    assert after["collections"][2] >= before["collections"][2] + 1
    assert after["total_pause_ms"][2] > before["total_pause_ms"][2]
    assert 0 < after["longest_pause_ms"][2] <= after["total_pause_ms"][2]


def test_settle_keeps_what_exists_out_and_still_collects_what_comes_after(monkeypatch):
    monkeypatch.setattr(gc_pauses, "_settled", False)  # as in a process just started
    kept = [Node() for _ in range(1000)]
    try:
        gc_pauses.settle()
        frozen = gc.get_freeze_count()
        assert frozen >= 1000
        more = [Node() for _ in range(1000)]
        gc_pauses.settle()  # once per process: what came after start-up stays collectable
        walked = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert all(id(node) in walked for node in more)
        del more, walked
        later = Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None  # made after settle: collected
        collected = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert not any(id(node) in collected for node in kept)  # no collection walks them
        assert id(kept) not in collected
        assert gc_pauses.snapshot()["frozen_objects"] >= len(kept)
    finally:
        gc.unfreeze()  # this test process goes on: give its objects back to the collector
        del kept
