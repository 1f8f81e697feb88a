"""Who runs next: continuous batching under a token budget, priorities, fairness, preemption.

Every step the scheduler walks all live sequences in one order:

    higher priority first; within a priority, running sequences (decode first),
    then swapped ones, then waiting ones; within those, the owner that has been
    served the fewest tokens first (fair share across agents); then arrival.

Each gets the tokens it needs (one for a decode, a chunk of its prompt for a
prefill) while the step's token budget and sequence cap last. So a new
high-priority request joins the very next step, ahead of low-priority work,
and an agent flooding the queue cannot starve another of the same priority.

When KV blocks run out the scheduler preempts the lowest-priority, newest
running sequence that has not been scheduled in this step: by swapping its
blocks to host memory while the swap budget lasts, else by recompute (its
blocks are freed but stay in the prefix cache, so recompute is often cheap).
Parked contexts (finished turns kept for a follow-up) are suspended to host
memory, or dropped, before any running sequence is touched.

Steps in flight (a pipeline of stages keeps several, one per stage, so the stages
overlap): a step's sequences are in flight from ``schedule`` until ``landed``. A
sequence in flight is never scheduled again (its next token depends on this one),
never chosen for preemption or swap, and, if removed meanwhile (an abort), keeps its
blocks until its step lands, so no later step can be handed blocks a step before it
still writes. ``schedule(parts=n)`` plans one of n steps meant to be in flight
together: a 1/n share of the token budget and of the sequences, so the steps are of
about equal size and every stage has work.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmos_kernel.engine.block_manager import BlockManager
from llmos_kernel.engine.sequence import Sequence, Status

_RANK = {Status.RUNNING: 0, Status.SWAPPED: 1, Status.WAITING: 2}


@dataclass
class SchedulerConfig:
    max_batch_tokens: int = 256  # tokens computed per step, prompt chunks and decodes
    max_seqs: int = 64  # sequences running at once
    preemption: str = "auto"  # "auto" (swap while host space lasts), "swap" or "recompute"
    swap_blocks: int = 0  # host swap space, in blocks (the memory plan sizes it)


@dataclass
class Work:
    seq: Sequence
    num_tokens: int


@dataclass
class Schedule:
    works: list[Work] = field(default_factory=list)  # single-token works first
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)
    swap_in: list[tuple[int, list[int]]] = field(default_factory=list)
    drop_swap: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(w.num_tokens for w in self.works)


class SwapSpace:
    """Host-memory accounting for swapped and suspended KV (the bytes live in the runner)."""

    def __init__(self, num_blocks: int):
        self.capacity, self.used, self._next = num_blocks, 0, 1
        self.sizes: dict[int, int] = {}

    def reserve(self, n_blocks: int) -> int | None:
        if self.used + n_blocks > self.capacity:
            return None
        handle, self._next = self._next, self._next + 1
        self.sizes[handle] = n_blocks
        self.used += n_blocks
        return handle

    def release(self, handle: int) -> None:
        self.used -= self.sizes.pop(handle)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.swap = SwapSpace(cfg.swap_blocks)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.parked: OrderedDict[str, Sequence] = OrderedDict()  # LRU of kept contexts
        self.served: dict[int, float] = {}  # owner -> tokens computed (fair-share clock)
        self.preemptions = {"swap": 0, "recompute": 0, "suspend": 0, "drop": 0}
        self.express_steps = 0  # steps given to a higher-priority newcomer alone (_express)
        self._pending_swap_out: list[tuple[int, list[int]]] = []
        self._pending_drops: list[int] = []
        self.in_flight: set[int] = set()  # seq ids in steps scheduled and not yet landed
        self._free_on_landing: dict[int, Sequence] = {}  # removed while in flight

    # -- queue management -------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.owner not in self.served:
            active = [self.served[s.owner] for s in self.live() if s.owner in self.served]
            self.served[seq.owner] = min(active, default=0.0)
        seq.status = Status.WAITING if seq.swap_handle is None else Status.SWAPPED
        (self.waiting if seq.swap_handle is None else self.swapped).append(seq)

    def live(self) -> list[Sequence]:
        return self.running + self.swapped + self.waiting

    def has_work(self) -> bool:
        return bool(self.running or self.swapped or self.waiting or self._pending_swap_out
                    or self._pending_drops)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of every queue and free whatever memory it holds (once its
        step in flight, if any, has landed)."""
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq.seq_id in self.in_flight:
            self._free_on_landing[seq.seq_id] = seq
        else:
            self._free(seq)

    def landed(self, seqs: Iterable[Sequence]) -> None:
        """A step's results are back: its sequences may be scheduled, preempted and freed."""
        for seq in seqs:
            self.in_flight.discard(seq.seq_id)
            if self._free_on_landing.pop(seq.seq_id, None) is not None:
                self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.blocks.release(seq.table)
        if seq.swap_handle is not None:
            self.swap.release(seq.swap_handle)
            self._pending_drops.append(seq.swap_handle)
            seq.swap_handle = None

    # -- parked contexts ----------------------------------------------------
    def park(self, key: str, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = Status.PARKED
        self.parked[key] = seq

    def unpark(self, key: str) -> Sequence | None:
        """Detach a parked context (resident or suspended) for its follow-up request."""
        return self.parked.pop(key, None)

    def drop_parked(self, key: str) -> None:
        seq = self.parked.pop(key, None)
        if seq is not None:
            self._free(seq)

    def _reclaim_parked(self) -> bool:
        """Free device blocks held by the least recently parked resident context."""
        for key, seq in self.parked.items():
            if seq.status is Status.PARKED and seq.table.blocks:
                self.suspend(key)
                return True
        return False

    def suspend(self, key: str) -> bool:
        """Move a parked context's KV to host memory (or, without room there, drop it:
        a follow-up then recomputes). False if it holds no device blocks."""
        seq = self.parked.get(key)
        if seq is None or seq.status is not Status.PARKED or not seq.table.blocks:
            return False
        if self._swap_out(seq):
            seq.status = Status.SUSPENDED
            self.preemptions["suspend"] += 1
        else:
            self.blocks.release(seq.table)
            seq.num_computed = 0
            self.preemptions["drop"] += 1
        self.parked.move_to_end(key)
        return True

    # -- the step -----------------------------------------------------------
    def _order(self, seq: Sequence) -> tuple:
        return (-seq.priority, _RANK[seq.status], self.served.get(seq.owner, 0.0),
                seq.arrival, seq.seq_id)

    def schedule(self, parts: int = 1) -> Schedule:
        """The next step, its sequences in flight until ``landed``; with ``parts`` > 1, one
        of that many steps in flight at once, each with a 1/parts share of the budget."""
        out = Schedule()
        budget = self.cfg.max_batch_tokens
        rows = math.inf  # sequences this step may take
        if parts > 1:
            budget = -(-budget // parts)
            rows = -(-min(len(self.live()), self.cfg.max_seqs) // parts)
        scheduled: set[int] = set(self.in_flight)  # (and so never preempted this step)
        blocked_below: int | None = None  # waiting work at or below this priority must wait
        live = sorted(self.live(), key=self._order)
        express = self._express(live)
        for seq in live:
            if budget <= 0 or len(out.works) >= rows or (express is not None
                                                          and seq.priority < express):
                break
            if seq in out.preempted or seq.seq_id in self.in_flight:
                continue
            if seq.status is Status.RUNNING:
                n = min(seq.num_uncomputed, budget)
                if n == 0:
                    continue  # e.g. a beam waiting for the rest of its round
                if self._make_room(seq, n, scheduled, out):
                    self._add_work(out, seq, n, scheduled)
                    budget -= n
                continue
            if blocked_below is not None and seq.priority <= blocked_below:
                continue
            if not self._admit(seq, budget, scheduled, out):
                blocked_below = seq.priority
                continue
            n = min(seq.num_uncomputed, budget)
            self._add_work(out, seq, n, scheduled)
            budget -= n
        out.works.sort(key=lambda w: w.num_tokens != 1)
        out.swap_out, self._pending_swap_out = self._pending_swap_out, []
        out.drop_swap, self._pending_drops = self._pending_drops, []
        out.copies = self.blocks.take_copies()
        self.in_flight.update(w.seq.seq_id for w in out.works)
        return out

    def _express(self, live: list[Sequence]) -> int | None:
        """A newcomer above every running priority gets a step of its own (with any work of
        its priority or more): its prompt then costs what it costs on an idle kernel instead
        of riding along with everyone's decode rows. The others wait out that one step."""
        if not live or not self.running or live[0].status is Status.RUNNING:
            return None
        top = live[0].priority
        if any(s.priority >= top for s in self.running):
            return None
        self.express_steps += 1
        return top

    def _add_work(self, out: Schedule, seq: Sequence, n: int, scheduled: set[int]) -> None:
        out.works.append(Work(seq, n))
        scheduled.add(seq.seq_id)

    def _admit(self, seq: Sequence, budget: int, scheduled: set[int], out: Schedule) -> bool:
        """Move a waiting or swapped sequence to running, preempting lower priorities if needed."""
        while len(self.running) >= self.cfg.max_seqs:
            if not self._preempt_one(seq, scheduled, out, victims_of_equal=False):
                return False
        saved_blocks = self.swap.sizes[seq.swap_handle] if seq.swap_handle is not None else 0
        fresh = not seq.table.blocks and seq.num_computed == 0
        if fresh:
            seq.num_cached = self.blocks.match_prefix(seq.table, seq.token_ids, seq.salt)
            seq.num_computed = seq.num_cached
        n = min(seq.num_uncomputed, budget)
        if not self._allocate(seq, seq.num_computed, n, scheduled, out):
            if fresh or saved_blocks:
                self.blocks.release(seq.table)  # cached blocks stay cached, saved ones saved
            if fresh:
                seq.num_computed = seq.num_cached = 0
            return False
        if saved_blocks:
            out.swap_in.append((seq.swap_handle, seq.table.blocks[:saved_blocks]))
            self.swap.release(seq.swap_handle)
            seq.swap_handle = None
        (self.swapped if seq.status is Status.SWAPPED else self.waiting).remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def _allocate(self, seq: Sequence, num_computed: int, n: int, scheduled: set[int],
                  out: Schedule) -> bool:
        """Blocks for a sequence being admitted: reclaim parked contexts, then lower priorities."""
        while not self.blocks.allocate(seq.table, num_computed, n):
            if not (self._reclaim_parked()
                    or self._preempt_one(seq, scheduled, out, victims_of_equal=False)):
                return False
        return True

    def _make_room(self, seq: Sequence, n: int, scheduled: set[int], out: Schedule) -> bool:
        """Blocks for a running sequence; if nothing else can give way, it is preempted."""
        while not self.blocks.allocate(seq.table, seq.num_computed, n):
            if self._reclaim_parked():
                continue
            if not self._preempt_one(seq, scheduled, out, victims_of_equal=True):
                self._preempt(seq, out)
                return False
        return True

    def _preempt_one(self, for_seq: Sequence, scheduled: set[int], out: Schedule,
                     victims_of_equal: bool) -> bool:
        """Preempt the lowest-priority, newest running sequence neither scheduled this step
        nor in flight."""
        candidates = [s for s in self.running if s.seq_id not in scheduled and s is not for_seq
                      and (s.priority < for_seq.priority
                           or (victims_of_equal and s.priority == for_seq.priority
                               and s.arrival > for_seq.arrival))]
        if not candidates:
            return False
        victim = min(candidates, key=lambda s: (s.priority, -s.arrival))
        self._preempt(victim, out)
        return True

    def _preempt(self, seq: Sequence, out: Schedule) -> None:
        self.running.remove(seq)
        seq.preemptions += 1
        out.preempted.append(seq)
        if self.cfg.preemption != "recompute" and self._swap_out(seq):
            seq.status = Status.SWAPPED
            self.swapped.append(seq)
            self.preemptions["swap"] += 1
            return
        self.blocks.release(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self.preemptions["recompute"] += 1

    def _swap_out(self, seq: Sequence) -> bool:
        """Reserve host space and queue a copy of the sequence's computed blocks."""
        n_blocks = -(-seq.num_computed // self.blocks.block_size)
        if n_blocks == 0:
            return False
        handle = self.swap.reserve(n_blocks)
        if handle is None:
            return False
        self._pending_swap_out.append((handle, list(seq.table.blocks[:n_blocks])))
        self.blocks.release(seq.table)
        seq.swap_handle = handle
        return True

    def forget_kv(self, blocks: BlockManager) -> None:
        """The KV pool and swap space are gone (a runner died): every sequence recomputes."""
        self.blocks = blocks
        self.swap = SwapSpace(self.cfg.swap_blocks)
        self._pending_swap_out, self._pending_drops = [], []
        self.in_flight.clear()  # the steps in flight are lost with the pool
        self._free_on_landing.clear()
        for seq in self.running + self.swapped + self.waiting + list(self.parked.values()):
            seq.table.blocks.clear()
            seq.table.digests.clear()
            seq.num_computed = seq.num_cached = 0
            seq.swap_handle = None
            if seq.status is not Status.PARKED and seq.status is not Status.SUSPENDED:
                seq.status = Status.WAITING
            else:
                seq.status = Status.PARKED
        self.waiting = self.running + self.swapped + self.waiting
        self.running, self.swapped = [], []

    # -- after the step -----------------------------------------------------
    def computed(self, seq: Sequence, n: int) -> None:
        seq.num_computed += n
        self.served[seq.owner] = self.served.get(seq.owner, 0.0) + n
        self.blocks.commit(seq.table, seq.token_ids, seq.num_computed, seq.salt)
