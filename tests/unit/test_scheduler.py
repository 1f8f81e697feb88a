"""The scheduler and block manager stepped with fabricated model outputs, as vLLM's
tests/v1/core/test_scheduler.py does: no model, no runner, each test in milliseconds.

tests/test_scheduler.py checks the same guarantees end to end on the real model; here
each is pinned to the exact step at which it must hold.
"""

from __future__ import annotations

import itertools

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.block_manager import BlockManager
from llmos_kernel.engine.scheduler import Schedule, Scheduler, SchedulerConfig
from llmos_kernel.engine.sequence import Sequence, Status

BS = 4  # tokens per KV block
TOKEN = 7  # what the fake model samples


class Harness:
    """A scheduler over a small pool, stepped with a fake model that samples ``TOKEN``.

    Like the engine: a sequence whose every token is computed yields one new token; one with
    ``max_tokens`` outputs finishes (is removed, or parked if added with ``keep=``).
    Every step is checked against the scheduler's invariants.
    """

    def __init__(self, *, num_blocks: int = 64, max_batch_tokens: int = 64, max_seqs: int = 8,
                 preemption: str = "auto", swap_blocks: int = 0, prefix_caching: bool = False):
        self.blocks = BlockManager(num_blocks, BS, prefix_caching)
        self.sched = Scheduler(SchedulerConfig(max_batch_tokens=max_batch_tokens,
                                               max_seqs=max_seqs, preemption=preemption,
                                               swap_blocks=swap_blocks), self.blocks)
        self.ids = itertools.count(1)
        self.steps = 0
        self.first_step: dict[int, int] = {}  # seq_id -> step it first ran in
        self.finished: list[Sequence] = []
        self.keep: dict[int, str] = {}

    def add(self, prompt_len: int, *, max_tokens: int = 4, priority: int = 0, owner: int = 0,
            prompt: list[int] | None = None, keep: str | None = None) -> Sequence:
        n = next(self.ids)
        tokens = prompt if prompt is not None else [n * 1000 + i for i in range(prompt_len)]
        seq = Sequence(n, f"r{n}", tokens, SamplingParams(max_tokens=max_tokens),
                       priority=priority, owner=owner, arrival=float(n))
        if keep is not None:
            self.keep[n] = keep
        self.sched.add(seq)
        return seq

    def step(self) -> Schedule:
        out = self.sched.schedule()
        self.steps += 1
        self._check(out)
        self.sched.landed(w.seq for w in out.works)
        for work in out.works:
            seq = work.seq
            self.first_step.setdefault(seq.seq_id, self.steps)
            self.sched.computed(seq, work.num_tokens)
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk: no token yet
            seq.output_ids.append(TOKEN)
            if len(seq.output_ids) >= seq.params.max_tokens:
                if seq.seq_id in self.keep:
                    self.sched.park(self.keep[seq.seq_id], seq)
                else:
                    self.sched.remove(seq)
                    seq.status = Status.FINISHED
                self.finished.append(seq)
        return out

    def run(self, max_steps: int = 2000) -> None:
        while self.sched.has_work():
            assert self.steps < max_steps, "the scheduler stopped making progress"
            self.step()

    def _check(self, out: Schedule) -> None:
        cfg = self.sched.cfg
        assert out.num_tokens <= cfg.max_batch_tokens
        assert len(self.sched.running) <= cfg.max_seqs
        sizes = [w.num_tokens for w in out.works]
        assert sizes == sorted(sizes, key=lambda n: n != 1), "single-token works come first"
        assert len({w.seq.seq_id for w in out.works}) == len(out.works)
        for work in out.works:
            seq, n = work.seq, work.num_tokens
            assert seq.status is Status.RUNNING and 0 < n <= seq.num_uncomputed
            assert len(seq.table.blocks) * BS >= seq.num_computed + n, "KV room for the step"
            written = seq.table.blocks[seq.num_computed // BS:(seq.num_computed + n - 1) // BS + 1]
            assert all(self.blocks.blocks[b].ref_count == 1 for b in written), \
                "a block written this step is shared"
        assert self.sched.swap.used <= self.sched.swap.capacity

    def works(self, out: Schedule) -> list[tuple[Sequence, int]]:
        return [(w.seq, w.num_tokens) for w in out.works]


# -- token budget, decode first, chunked prefill, max_seqs -----------------------------
def test_decodes_go_first_and_a_new_prompt_takes_what_is_left_of_the_budget():
    h = Harness(max_batch_tokens=8)
    a, b = h.add(3, max_tokens=20), h.add(3, max_tokens=20)
    assert h.works(h.step()) == [(a, 3), (b, 3)]
    c = h.add(20, max_tokens=2)
    assert h.works(h.step()) == [(a, 1), (b, 1), (c, 6)]
    assert h.works(h.step()) == [(a, 1), (b, 1), (c, 6)]
    assert h.works(h.step()) == [(a, 1), (b, 1), (c, 6)]
    assert c.output_ids == [], "no token before the whole prompt is computed"
    assert h.works(h.step()) == [(a, 1), (b, 1), (c, 2)]
    assert c.output_ids == [TOKEN]
    assert h.works(h.step()) == [(a, 1), (b, 1), (c, 1)]


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks():
    h = Harness(max_batch_tokens=16)
    seq = h.add(50, max_tokens=2)
    chunks = [h.works(h.step()) for _ in range(5)]
    assert chunks == [[(seq, 16)], [(seq, 16)], [(seq, 16)], [(seq, 2)], [(seq, 1)]]
    assert seq.status is Status.FINISHED and h.blocks.num_free == h.blocks.num_blocks


def test_max_seqs_caps_the_batch_and_a_finished_sequence_frees_its_slot():
    h = Harness(max_seqs=3)
    seqs = [h.add(2, max_tokens=2) for _ in range(5)]
    assert [s for s, _ in h.works(h.step())] == seqs[:3]
    assert len(h.sched.waiting) == 2
    assert [s for s, _ in h.works(h.step())] == seqs[:3]  # they finish here
    assert [s for s, _ in h.works(h.step())] == seqs[3:]
    h.run()
    assert len(h.finished) == 5


# -- priorities -------------------------------------------------------------------------
def test_a_high_priority_newcomer_runs_in_the_very_next_step_alone():
    h = Harness(max_batch_tokens=16, max_seqs=16)
    low = [h.add(4, max_tokens=50) for _ in range(10)]
    for _ in range(3):
        h.step()
    urgent = h.add(12, max_tokens=3, priority=10)
    assert h.works(h.step()) == [(urgent, 12)], "its prompt is not batched with others' decodes"
    assert h.sched.express_steps == 1
    assert h.works(h.step())[0] == (urgent, 1)
    assert {s for s, _ in h.works(h.step())} >= {urgent, low[0]}, "then everyone runs again"
    assert h.sched.express_steps == 1


def test_waiting_work_is_admitted_by_priority_then_arrival():
    h = Harness(max_seqs=1)
    first, high, second = h.add(2, max_tokens=1), h.add(2, max_tokens=1, priority=5), \
        h.add(2, max_tokens=1)
    order = [h.works(h.step())[0][0] for _ in range(3)]
    assert order == [high, first, second]


def test_a_higher_priority_newcomer_takes_a_slot_from_lower_priority_work():
    h = Harness(max_seqs=2, swap_blocks=16)
    low = [h.add(4, max_tokens=20) for _ in range(2)]
    h.step()
    same = h.add(4, max_tokens=2)
    h.step()
    assert same.status is Status.WAITING, "equal priority waits for a free slot"
    high = h.add(4, max_tokens=2, priority=1)
    out = h.step()
    assert h.works(out) == [(high, 4)]
    assert out.preempted == [low[1]], "the newest of the lowest priority gives way"
    assert low[1].status is Status.SWAPPED and low[0].status is Status.RUNNING


# -- fair share between owners ------------------------------------------------------------
def test_a_late_owner_is_served_before_a_flooding_owners_backlog():
    h = Harness(max_seqs=4)
    for _ in range(20):
        h.add(4, max_tokens=6, owner=1)
    for _ in range(3):
        h.step()
    late = [h.add(4, max_tokens=6, owner=2) for _ in range(2)]
    before = h.steps
    while not all(s.seq_id in h.first_step for s in late):
        h.step()
    admitted_after = [sid for sid, step in h.first_step.items() if step > before]
    assert admitted_after[:2] == [s.seq_id for s in late], \
        "the next free slots go to the owner served least, not to the oldest request"


def test_an_owner_flooding_the_queue_does_not_starve_another():
    """Slots are not taken back for fairness, so b waits for the first slots to free; from
    then on it holds its 3 of the 6 (as many as it asks for), not one slot in 11."""
    h = Harness(max_seqs=6)
    for _ in range(30):
        h.add(6, max_tokens=24, owner=1)
    b = [h.add(6, max_tokens=24, owner=2) for _ in range(3)]
    served = {1: 0, 2: 0}
    while not all(s.status is Status.FINISHED for s in b):
        works = h.step().works
        if all(s.seq_id in h.first_step for s in b):
            assert sorted(w.seq.owner for w in works) == [1, 1, 1, 2, 2, 2]
        for w in works:
            served[w.seq.owner] += w.num_tokens
    assert served[2] / (served[1] + served[2]) >= 0.25, served


# -- preemption when blocks run out -------------------------------------------------------
def two_growing(preemption: str, swap_blocks: int) -> tuple[Harness, Sequence, Sequence]:
    """Two equal sequences in a pool of 6 blocks: each holds 3 when the pool runs dry."""
    h = Harness(num_blocks=6, preemption=preemption, swap_blocks=swap_blocks)
    older, newer = h.add(8, max_tokens=10), h.add(8, max_tokens=10)
    while h.blocks.num_free or older.num_computed % BS:
        h.step()
    return h, older, newer


def test_out_of_blocks_the_newest_sequence_is_swapped_out_and_later_back_in():
    h, older, newer = two_growing("auto", swap_blocks=8)
    out = h.step()
    assert out.preempted == [newer] and newer.status is Status.SWAPPED
    assert [len(blocks) for _, blocks in out.swap_out] == [3]
    assert h.works(out) == [(older, 1)]
    assert h.sched.preemptions["swap"] == 1 and h.sched.swap.used == 3
    swapped_in = []
    while newer.status is not Status.FINISHED:
        swapped_in += h.step().swap_in
    assert [len(blocks) for _, blocks in swapped_in] == [3]
    assert len(newer.output_ids) == 10 and newer.preemptions == 1
    assert h.sched.swap.used == 0 and h.blocks.num_free == 6
    assert h.sched.preemptions["recompute"] == 0


def test_recompute_preemption_frees_the_blocks_and_recomputes_prompt_and_output():
    h, _, newer = two_growing("recompute", swap_blocks=8)
    out = h.step()
    assert out.preempted == [newer] and out.swap_out == []
    assert newer.status is Status.WAITING and newer.num_computed == 0
    assert newer.table.blocks == [] and len(newer.output_ids) == 5, "its tokens are kept"
    h.run()
    assert len(newer.output_ids) == 10 and h.sched.preemptions == {
        "swap": 0, "recompute": 1, "suspend": 0, "drop": 0}
    assert h.blocks.num_free == 6


def test_auto_preemption_recomputes_when_the_swap_space_is_full():
    h, _, newer = two_growing("auto", swap_blocks=2)
    assert h.step().preempted == [newer]
    assert newer.status is Status.WAITING and h.sched.preemptions["recompute"] == 1


def test_a_sequence_that_cannot_grow_and_may_preempt_no_one_preempts_itself():
    h = Harness(num_blocks=4, swap_blocks=8)
    older = h.add(12, max_tokens=20)
    newer = h.add(4, max_tokens=20)
    h.step()  # older: 3 blocks, newer: 1 block, pool full
    out = h.step()  # newer's second block: older is scheduled (and older), so newer yields
    assert out.preempted == [newer] and h.works(out) == [(older, 1)]
    assert newer.status is Status.SWAPPED


def test_lower_priority_work_is_preempted_for_a_higher_priority_prompt():
    h = Harness(num_blocks=3, swap_blocks=8)
    low = h.add(8, max_tokens=4)
    h.step()  # low holds 2 of the 3 blocks
    high = h.add(8, max_tokens=2, priority=1)
    out = h.step()
    assert out.preempted == [low] and h.works(out) == [(high, 8)]
    h.run()
    assert low.status is high.status is Status.FINISHED and len(low.output_ids) == 4


def test_forty_requests_complete_in_a_pool_that_holds_only_a_few():
    per_seq = -(-(20 + 8) // BS)
    h = Harness(num_blocks=4 * per_seq, max_batch_tokens=48, max_seqs=16,
                swap_blocks=per_seq, prefix_caching=True)
    shared = [5, 6, 7, 8, 9, 10, 11, 12]
    seqs = [h.add(0, max_tokens=8, priority=i % 3, owner=i % 4,
                  prompt=(shared if i % 2 else []) + [i * 100 + j for j in range(4 + i % 13)])
            for i in range(40)]
    h.run()
    assert [len(s.output_ids) for s in seqs] == [8] * 40
    assert h.sched.preemptions["swap"] > 0 and h.sched.preemptions["recompute"] > 0, \
        h.sched.preemptions
    assert h.blocks.num_free == h.blocks.num_blocks, "no block leaked"
    assert h.sched.swap.used == 0 and h.blocks.hits > 0


# -- parked contexts ----------------------------------------------------------------------
def parked_and_busy(swap_blocks: int) -> tuple[Harness, Sequence, Sequence]:
    h = Harness(num_blocks=8, swap_blocks=swap_blocks)
    ctx = h.add(12, max_tokens=1, keep="ctx")
    h.step()
    assert h.sched.parked["ctx"] is ctx and ctx.status is Status.PARKED
    assert len(ctx.table.blocks) == 3, "a parked context stays resident while memory allows"
    busy = h.add(16, max_tokens=12)  # needs more than the 5 blocks left
    return h, ctx, busy


def test_a_parked_context_moves_to_host_memory_before_running_work_is_preempted():
    h, ctx, busy = parked_and_busy(swap_blocks=8)
    h.run()
    assert busy.status is Status.FINISHED and busy.preemptions == 0
    assert ctx.status is Status.SUSPENDED and ctx.table.blocks == []
    assert h.sched.preemptions == {"swap": 0, "recompute": 0, "suspend": 1, "drop": 0}
    assert h.sched.swap.used == 3
    handle = ctx.swap_handle
    h.sched.drop_parked("ctx")
    assert h.sched.swap.used == 0 and h.step().drop_swap == [handle]


def test_without_host_room_a_parked_context_is_dropped_and_will_recompute():
    h, ctx, busy = parked_and_busy(swap_blocks=0)
    h.run()
    assert busy.status is Status.FINISHED and busy.preemptions == 0
    assert h.sched.preemptions["drop"] == 1
    assert ctx.status is Status.PARKED and ctx.num_computed == 0 and ctx.table.blocks == []


def test_removing_a_swapped_sequence_frees_its_host_space():
    h, _, newer = two_growing("auto", swap_blocks=8)
    h.step()
    handle = newer.swap_handle
    h.sched.remove(newer)
    assert h.sched.swap.used == 0 and newer.swap_handle is None
    assert h.step().drop_swap == [handle], "the runner is told to drop the bytes"


def test_after_the_kv_pool_is_lost_every_sequence_recomputes():
    h, older, newer = two_growing("auto", swap_blocks=8)
    h.step()  # newer is swapped out
    waiting = h.add(4, max_tokens=2)
    fresh = BlockManager(6, BS, prefix_caching=False)
    h.sched.forget_kv(fresh)
    h.blocks = fresh
    for seq in (older, newer, waiting):
        assert seq.status is Status.WAITING and seq.num_computed == 0 and not seq.table.blocks
    assert h.sched.swap.used == 0 and h.sched.running == []
    h.run()
    assert [len(s.output_ids) for s in (older, newer, waiting)] == [10, 10, 2]


# -- steps in flight (a pipeline of stages keeps several) ---------------------------------
def decoding(h: Harness, n: int, **kw) -> list[Sequence]:
    seqs = [h.add(4, max_tokens=50, **kw) for _ in range(n)]
    h.step()  # every prompt in one step: from now on each decodes
    return seqs


def test_a_sequence_in_flight_is_not_scheduled_again_until_its_step_lands():
    h = Harness(max_seqs=8)
    seqs = decoding(h, 6)
    first, second = h.sched.schedule(parts=2), h.sched.schedule(parts=2)
    a, b = ({w.seq for w in s.works} for s in (first, second))
    assert len(a) == len(b) == 3 and a | b == set(seqs) and not a & b
    assert h.sched.schedule(parts=2).works == [], "all six are in flight"
    h.sched.landed(w.seq for w in first.works)
    assert {w.seq for w in h.sched.schedule(parts=2).works} == a


def test_parts_share_the_token_budget_and_the_sequences():
    h = Harness(max_batch_tokens=16, max_seqs=8)
    seqs = decoding(h, 4)
    prompt = h.add(30, max_tokens=2)
    first = h.sched.schedule(parts=2)
    assert first.num_tokens <= 8 and len(first.works) <= 3  # ceil(16/2), ceil(5 live/2)
    second = h.sched.schedule(parts=2)
    assert second.num_tokens <= 8
    scheduled = [w.seq for s in (first, second) for w in s.works]
    assert set(seqs) <= set(scheduled) and prompt in scheduled


def test_a_sequence_in_flight_is_never_preempted_even_for_a_higher_priority():
    h = Harness(num_blocks=3, swap_blocks=8)
    low = h.add(8, max_tokens=6)
    h.step()  # low holds 2 of the 3 blocks
    in_flight = h.sched.schedule(parts=2)
    assert [w.seq for w in in_flight.works] == [low]
    high = h.add(8, max_tokens=2, priority=1)
    out = h.sched.schedule(parts=2)
    assert out.works == [] and out.preempted == [] and low.status is Status.RUNNING
    assert high.status is Status.WAITING, "it waits for low's step to land"
    h.sched.landed(w.seq for w in in_flight.works)
    h.sched.computed(low, 1)
    out = h.sched.schedule(parts=2)
    assert out.preempted == [low] and [w.seq for w in out.works] == [high]


def test_a_sequence_removed_in_flight_keeps_its_blocks_until_its_step_lands():
    h = Harness(num_blocks=16)
    seq = h.add(8, max_tokens=6)
    step = h.sched.schedule()
    held = list(seq.table.blocks)
    h.sched.remove(seq)  # aborted while its step computes
    assert seq not in h.sched.live()
    assert h.blocks.num_free == 16 - len(held), "a later step must not be handed them"
    other = h.add(40, max_tokens=1)
    h.sched.schedule()
    assert not set(other.table.blocks) & set(held)
    h.sched.landed(w.seq for w in step.works)
    assert h.blocks.num_free == 16 - len(other.table.blocks)


def test_losing_the_pool_drops_every_step_in_flight():
    h = Harness(max_seqs=8)
    seqs = decoding(h, 4)
    h.sched.schedule(parts=2)
    h.sched.schedule(parts=2)
    h.sched.forget_kv(BlockManager(64, BS))
    assert not h.sched.in_flight
    assert {w.seq for w in h.sched.schedule(parts=2).works} <= set(seqs)


def test_one_part_is_the_whole_budget_as_ever():
    h = Harness(max_batch_tokens=64, max_seqs=8)
    seqs = decoding(h, 6)
    assert {w.seq for w in h.sched.schedule(parts=1).works} == set(seqs)
