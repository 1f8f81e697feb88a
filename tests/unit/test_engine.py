"""The engine's step loop on a fake runner: scheduler, block manager, prefix cache, swap and
parked contexts together, with no model.

The fake runner keeps each token in the KV slot the plan names and derives the next token
from what the request's block table reads back, so a wrong table, a lost swap, a stale
prefix-cache hit or a missing copy changes the output. Every request must generate exactly
what it generates alone with ample memory (``reference``), as tests/test_scheduler.py checks
on the real model.
"""

from __future__ import annotations

import collections

import pytest

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import Delta, EngineConfig, LLMEngine, Request
from llmos_kernel.engine.plan_state import RunnerState
from llmos_kernel.engine.runner import StepOutput, StepPlan
from llmos_kernel.engine.scheduler import SchedulerConfig
from llmos_kernel.engine.sequence import Status
from llmos_kernel.errors import (
    AlreadyExists,
    ContextOverflow,
    InvalidArgument,
    LlmosError,
    NotFound,
    QuotaExceeded,
)

VOCAB = 512
EOS = 0
BS = 4


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context; never EOS."""
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return 1 + h % (VOCAB - 1)


def reference(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


class FakeTokenizer:
    vocab_size = VOCAB
    stop_token_ids = frozenset({EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(f"<{t}>" for t in ids if not (skip_special_tokens and t == EOS))

    def incremental_decoder(self, skip_special_tokens: bool = True) -> FakeDecoder:
        return FakeDecoder()


class FakeDecoder:
    def push(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


class FakeKVRunner:
    """A ``Runner`` whose KV pool holds token ids: it moves them exactly as a StepPlan says.
    Plans carry only what changed; it rebuilds the lists as the real runner does
    (plan_state.RunnerState), so a lost or wrong difference reads the wrong blocks."""

    def __init__(self, num_blocks: int, block_size: int = BS):
        self.state = RunnerState()
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.swapped: dict[int, list[list[int | None]]] = {}

    def execute(self, plan: StepPlan) -> StepOutput:
        self.state.apply(plan)
        for handle, blocks in plan.swap_out:
            self.swapped[handle] = [list(self.kv[b]) for b in blocks]
        for handle in plan.drop_swap:
            self.swapped.pop(handle, None)
        for handle, blocks in plan.swap_in:
            saved = self.swapped.pop(handle)
            assert len(saved) == len(blocks)
            for b, data in zip(blocks, saved):
                self.kv[b] = list(data)
        for src, dst in plan.copies:
            self.kv[dst] = list(self.kv[src])
        for s in plan.seqs:  # all writes first: a block shared by mistake then shows up
            for pos, token in enumerate(s.tokens, s.start):
                self.kv[s.blocks[pos // self.bs]][pos % self.bs] = token
        out = StepOutput()
        for s in plan.seqs:
            if s.sample:
                context = [self.kv[s.blocks[p // self.bs]][p % self.bs]
                           for p in range(s.start + len(s.tokens))]
                assert None not in context, "the step attends to KV that was never written"
                out.tokens[s.seq_id] = next_token(context)
        return out


def make_engine(num_blocks: int = 256, context_length: int = 4096, **scheduling) -> LLMEngine:
    """An engine on the fake runner; ``scheduling`` takes SchedulerConfig's fields."""
    cfg = EngineConfig(block_size=BS, num_blocks=num_blocks,
                       scheduler=SchedulerConfig(**scheduling))
    return LLMEngine(FakeTokenizer(), FakeKVRunner(num_blocks), context_length, cfg)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def prompt(i: int, length: int) -> list[int]:
    return [1 + (i * 37 + j * 11) % (VOCAB - 1) for j in range(length)]


def test_a_fake_run_with_ample_memory_matches_the_reference():
    eng = make_engine()
    eng.add_request(Request("a", prompt(1, 10), greedy(6)))
    out = eng.run_until_done()["a"]
    assert tokens_of(out) == reference(prompt(1, 10), 6)
    assert out[-1].finished and out[-1].finish_reason == "length"
    assert out[-1].usage.prompt_tokens == 10 and out[-1].usage.completion_tokens == 6


def pressed_engine() -> tuple[LLMEngine, list[list[int]], int]:
    """48 requests (a third sharing a prefix) in a pool that holds about four at once."""
    shared = prompt(99, 16)
    prompts = [(shared if i % 3 == 0 else []) + prompt(i, 3 + i % 17) for i in range(48)]
    per_seq = -(-(max(map(len, prompts)) + 8) // BS)
    blocks = 4 * per_seq
    eng = make_engine(num_blocks=blocks, swap_blocks=per_seq, max_batch_tokens=64)
    for i, p in enumerate(prompts):
        eng.add_request(Request(f"r{i}", p, greedy(8), owner=i % 2, priority=i % 3))
    return eng, prompts, blocks


def test_requests_in_a_pool_that_holds_a_few_generate_what_they_would_alone():
    eng, prompts, blocks = pressed_engine()
    results: dict[str, list[Delta]] = {}
    max_used = 0
    while eng.has_unfinished():
        for delta in eng.step():
            results.setdefault(delta.request_id, []).append(delta)
        max_used = max(max_used, blocks - eng.blocks.num_free)
        assert eng.scheduler.swap.used <= eng.scheduler.swap.capacity
    assert max_used <= blocks
    for i, p in enumerate(prompts):
        assert tokens_of(results[f"r{i}"]) == reference(p, 8), i
    pre = eng.scheduler.preemptions
    assert pre["swap"] > 0 and pre["recompute"] > 0, pre
    assert any(results[f"r{i}"][-1].usage.cached_tokens for i in range(0, 48, 3))
    assert eng.blocks.num_free == blocks and eng.scheduler.swap.used == 0


def test_the_prefix_cache_serves_the_same_tenant_only():
    eng = make_engine()
    p = prompt(5, 21)
    for rid, owner in (("first", 1), ("same-owner", 1), ("other-owner", 2)):
        eng.add_request(Request(rid, p, greedy(3), owner=owner))
        out = eng.run_until_done()[rid]
        assert tokens_of(out) == reference(p, 3)
        cached = out[-1].usage.cached_tokens
        assert cached == {"first": 0, "same-owner": 20, "other-owner": 0}[rid], rid


def test_a_high_priority_request_gets_its_first_token_in_the_next_step():
    eng = make_engine(max_batch_tokens=32, max_seqs=16)
    for i in range(20):
        eng.add_request(Request(f"low-{i}", prompt(i, 12), greedy(40)))
    for _ in range(4):
        eng.step()
    eng.add_request(Request("urgent", prompt(50, 20), greedy(3), priority=10))
    out = eng.step()
    assert [d.request_id for d in out] == ["urgent"], "a step of its own, with a token"
    while "urgent" in eng.requests:
        out += [d for d in eng.step() if d.request_id == "urgent"]
    assert tokens_of(out) == reference(prompt(50, 20), 3)
    assert out[-1].usage.steps_waited == 0


def test_a_kept_context_resumes_from_its_kv_even_after_a_trip_to_host_memory():
    eng = make_engine(num_blocks=64, swap_blocks=64)
    context, follow_up = prompt(3, 30), prompt(4, 5)
    eng.add_request(Request("ctx", context, greedy(2), keep_context=True))
    first = eng.run_until_done()["ctx"]
    assert first[-1].context_id == "ctx"
    assert eng.suspend_context("ctx")
    while eng.has_unfinished():
        eng.step()  # the swap-out goes with the next plan
    assert eng.scheduler.parked["ctx"].status is Status.SUSPENDED
    assert eng.runner.swapped, "the runner holds the context's KV"

    eng.add_request(Request("resume", follow_up, greedy(4), context="ctx"))
    resumed = eng.run_until_done()["resume"]
    full = context + tokens_of(first) + follow_up
    assert tokens_of(resumed) == reference(full, 4)
    assert resumed[-1].usage.cached_tokens == len(context) + 2 - 1
    assert eng.scheduler.swap.used == 0 and "ctx" not in eng.scheduler.parked


def test_a_stop_token_ends_a_request_early():
    p = prompt(8, 9)
    third = reference(p, 3)[2]
    eng = make_engine()
    eng.add_request(Request("s", p, greedy(10, stop_token_ids=(third,))))
    out = eng.run_until_done()["s"]
    assert tokens_of(out) == reference(p, 3) and out[-1].finish_reason == "stop"


def test_abort_frees_everything_the_request_held():
    eng = make_engine(num_blocks=32)
    eng.add_request(Request("a", prompt(1, 20), greedy(50)))
    eng.step()
    assert eng.blocks.num_free < 32
    delta = eng.abort("a")
    assert delta.finished and delta.finish_reason == "abort"
    assert eng.blocks.num_free == 32 and not eng.has_unfinished()
    with pytest.raises(NotFound, match="no request 'a' is running"):
        eng.abort("a")


@pytest.mark.parametrize("req, error, hint", [
    (Request("x", []), InvalidArgument, "prompt is empty"),
    (Request("x", [1, VOCAB]), InvalidArgument, rf"ints in \[0, {VOCAB}\)"),
    (Request("x", [1] * 100), ContextOverflow, "shorten it .* to at most 63 tokens"),
    (Request("x", [1] * 60, priority=True), InvalidArgument, "priority must be an int"),
    (Request("x", [1], context="gone"), NotFound, "no parked context 'gone'"),
])
def test_bad_requests_are_refused_with_a_typed_error_that_says_what_to_fix(req, error, hint):
    eng = make_engine(context_length=64)
    with pytest.raises(error, match=hint):
        eng.add_request(req)
    assert not eng.has_unfinished()


def test_a_prompt_larger_than_the_whole_pool_is_refused():
    eng = make_engine(num_blocks=8)
    with pytest.raises(QuotaExceeded, match="raise the kernel's --kv-budget"):
        eng.add_request(Request("big", [1] * 40, greedy(1)))
    eng.add_request(Request("ok", [1] * 8, greedy(1)))
    with pytest.raises(AlreadyExists, match="'ok' is already in use"):
        eng.add_request(Request("ok", [1] * 8, greedy(1)))


def test_releasing_a_suspended_context_when_idle_frees_the_runners_host_memory():
    eng = make_engine(num_blocks=64, swap_blocks=64)
    eng.add_request(Request("ctx", prompt(3, 30), greedy(1), keep_context=True))
    eng.run_until_done()
    eng.suspend_context("ctx")
    while eng.has_unfinished():
        eng.step()
    assert eng.runner.swapped
    eng.release_context("ctx")
    while eng.has_unfinished():
        eng.step()
    assert eng.runner.swapped == {}


def test_a_request_that_cannot_fit_the_pool_ends_instead_of_hanging():
    eng = make_engine(num_blocks=8, swap_blocks=8)  # 32 tokens of KV
    try:
        eng.add_request(Request("long", [1] * 8, greedy(100)))
    except LlmosError:
        return  # refusing it up front is fine too
    for _ in range(500):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished()


# -- several steps in flight, as LLMService drives a pipeline of stages ------------------
def run_pipelined(eng: LLMEngine, depth: int, abort_in_flight: str | None = None
                  ) -> tuple[dict[str, list[Delta]], int]:
    """Drive ``eng`` as LLMService._loop drives ``depth`` stages: up to ``depth`` steps in
    flight, each run by the fake runner (in submission order, as every stage runs them)
    only when it is the oldest and is awaited. Returns the deltas and the most steps that
    were in flight at once. ``abort_in_flight``: abort that request while a step of it is
    out, then check its blocks were not handed to anyone before the step landed."""
    in_flight: collections.deque = collections.deque()
    results: dict[str, list[Delta]] = {}
    most = 0
    while eng.has_unfinished() or in_flight:
        while len(in_flight) < depth and eng.scheduler.has_work():
            sched, plan = eng.schedule(depth)
            if not plan.seqs and not (plan.swap_out or plan.swap_in or plan.copies
                                      or plan.drop_swap):
                break
            out_now = {s.seq_id for _, p in in_flight for s in p.seqs}
            assert not out_now & {s.seq_id for s in plan.seqs}, "a sequence in two steps"
            in_flight.append((sched, plan))
            most = max(most, len(in_flight))
        assert in_flight, "work left, none in flight and none schedulable: a hang"
        if abort_in_flight in eng.requests and any(
                eng._seq_of[s.seq_id].request_id == abort_in_flight
                for _, p in in_flight for s in p.seqs if s.seq_id in eng._seq_of):
            held = {b for st in eng.requests[abort_in_flight].seqs for b in st.table.blocks}
            results.setdefault(abort_in_flight, []).append(eng.abort(abort_in_flight))
            assert not held & set(eng.blocks.free), "blocks freed while their step is out"
            abort_in_flight = None
        sched, plan = in_flight.popleft()
        for delta in eng.postprocess(sched, eng.runner.execute(plan)):
            results.setdefault(delta.request_id, []).append(delta)
    return results, most


@pytest.mark.parametrize("depth", [2, 3])
def test_steps_in_flight_under_memory_pressure_generate_what_each_would_alone(depth):
    eng, prompts, blocks = pressed_engine()
    results, most = run_pipelined(eng, depth, abort_in_flight="r7")
    assert most == depth
    assert results["r7"][-1].finish_reason == "abort"
    for i, p in enumerate(prompts):
        if i != 7:
            assert tokens_of(results[f"r{i}"]) == reference(p, 8), i
    pre = eng.scheduler.preemptions
    assert pre["swap"] > 0 and pre["recompute"] > 0, pre
    assert eng.blocks.num_free == blocks and eng.scheduler.swap.used == 0
    assert not eng.scheduler.in_flight
