"""Step plans that carry only what changed: the two halves of each sequence's mirrored state.

A sequence's block table, generated ids and (for repetition penalties) prompt ids grow
with its context; sent whole every step, a plan at 64 sequences of 1,000 tokens is about
a hundred kilobytes, read by every pipeline stage. Instead the runner keeps each
sequence's lists between steps (``RunnerState``) and the engine keeps a copy of what it
has sent (``PlanSender``); a ``SeqStep`` carries each list from the first index where it
differs from what the runner holds (``blocks_at``, ``output_at``, ``prompt_at``) onward,
and its sampling parameters only when they are not the ones sent before (``None``).
In a steady decode step that is nothing but the new token, and a new block every
``block_size`` tokens.

Guarantees: after ``RunnerState.apply`` every step's lists are exactly the engine's (any
change is found, appends and rewrites alike: a copy-on-write block replaced, a table
rebuilt after preemption, beams reordered); a sequence the engine no longer holds is
released from the runner in the next plan. Plans must reach a runner in the order they
were made (Ray runs one caller's calls to an actor in order), and a runner that lost its
state (restarted) must be paired with a cleared sender: the engine clears it whenever it
forgets the KV pool, which every runner restart does. A plan that assumes state the
runner lacks fails loudly (``PlanStateError``) instead of computing on wrong blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PlanStateError(RuntimeError):
    """A plan refers to sequence state this runner does not hold (a lost update)."""


def _sync(sent: list[int], current: list[int]) -> int:
    """The first index where ``current`` differs from ``sent``; ``sent`` becomes a copy of
    ``current``. Appends cost only their length (the equal prefix compares in C)."""
    n = len(sent)
    if len(current) >= n and current[:n] == sent:
        at = n
    else:
        at = next((i for i, (a, b) in enumerate(zip(sent, current)) if a != b),
                  min(n, len(current)))
    sent[at:] = current[at:]
    return at


@dataclass
class _Lists:
    """One sequence's lists: as last sent (engine side) or as held (runner side)."""

    blocks: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    params: Any = None  # the sampling parameters object


class PlanSender:
    """The engine's half: what each sequence's runner state holds, as last sent."""

    def __init__(self) -> None:
        self.sent: dict[int, _Lists] = {}

    def clear(self) -> None:
        """The runner's state is gone (restarted): the next plans send everything."""
        self.sent.clear()

    def encode(self, step: Any) -> None:
        """Cut ``step``'s lists (full, as the engine holds them) to what the runner lacks."""
        mine = self.sent.setdefault(step.seq_id, _Lists())
        step.blocks_at = _sync(mine.blocks, step.blocks)
        step.blocks = step.blocks[step.blocks_at:]
        if step.sample or step.beam_width:  # the sampler reads these only then
            if step.params is not None and step.params is mine.params:
                step.params = None  # the runner holds them (a request's never change)
            else:
                mine.params = step.params
            step.output_at = _sync(mine.output, step.output_ids)
            step.output_ids = step.output_ids[step.output_at:]
            if step.prompt_ids:
                step.prompt_at = _sync(mine.prompt, step.prompt_ids)
                step.prompt_ids = step.prompt_ids[step.prompt_at:]

    def release(self, live: set[int]) -> list[int]:
        """The sequences sent before that are no longer live: the runner may drop them."""
        gone = [sid for sid in self.sent if sid not in live]
        for sid in gone:
            del self.sent[sid]
        return gone


class RunnerState:
    """The runner's half: each sequence's full lists, rebuilt from the plans' differences."""

    def __init__(self) -> None:
        self.held: dict[int, _Lists] = {}

    def apply(self, plan: Any) -> None:
        """Turn every step of ``plan`` back into full lists, and drop released sequences."""
        for sid in plan.release:
            self.held.pop(sid, None)
        for step in plan.seqs:
            held = self.held.get(step.seq_id)
            if held is None:
                held = self.held[step.seq_id] = _Lists()
            step.blocks = _merge(held.blocks, step.blocks_at, step.blocks, step.seq_id, "blocks")
            if step.sample or step.beam_width:
                if step.params is None:
                    step.params = held.params
                else:
                    held.params = step.params
                step.output_ids = _merge(held.output, step.output_at, step.output_ids,
                                         step.seq_id, "output ids")
                if step.prompt_ids or step.prompt_at:
                    step.prompt_ids = _merge(held.prompt, step.prompt_at, step.prompt_ids,
                                             step.seq_id, "prompt ids")
            step.blocks_at = step.output_at = step.prompt_at = 0  # now whole

    def clear(self) -> None:
        self.held.clear()


def _merge(held: list[int], at: int, tail: list[int], seq_id: int, what: str) -> list[int]:
    if at > len(held):
        raise PlanStateError(f"sequence {seq_id}'s {what} continue at {at}, but this runner "
                             f"holds {len(held)}: a plan was lost or the runner restarted "
                             "without the engine forgetting its KV")
    held[at:] = tail
    return held
