"""One generation's state as the engine tracks it (tokens, KV blocks, timings)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.block_manager import BlockTable


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted by recompute: holds no KV
    RUNNING = "running"  # holds KV blocks and is scheduled step by step
    SWAPPED = "swapped"  # preempted: its KV lives in host swap space
    PARKED = "parked"  # finished a turn, KV kept for a follow-up request (resident)
    SUSPENDED = "suspended"  # parked and moved to host memory under pressure
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0  # higher runs first
    owner: int = 0  # pid charged for the tokens; fairness is across owners
    salt: str = ""  # prefix-cache namespace (the tenant)
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the pool
    table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    swap_handle: int | None = None
    num_cached: int = 0  # prompt tokens served from the prefix cache
    first_scheduled: float | None = None
    arrival_step: int = 0  # the engine's step count when it arrived (see Usage.steps_waited)
    first_step: int | None = None  # the number of the step it first ran in
    first_token_at: float | None = None
    preemptions: int = 0
    constraint: Any = None  # grammar matcher (see llmos_kernel.engine.grammar)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    adapter: str | None = None  # the LoRA adapter it runs with
    prompt_logprobs: list[float] | None = None  # scored prompt tokens so far (when asked)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_uncomputed > 1
