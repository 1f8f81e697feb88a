"""The engine's scheduling under pressure, on the real model.

Reference outputs come from the same prompts run with ample memory and no
competition; the property under test is that memory pressure, preemption,
priorities and snapshots never change what a request generates.
"""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.bench.prompts import chat_prompts
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import EngineConfig, LLMEngine, Request
from llmos_kernel.engine.runner import ModelRunner
from llmos_kernel.engine.scheduler import SchedulerConfig
from llmos_kernel.engine.sequence import Status


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def small_engine(engine: LLMEngine, num_blocks: int, swap_blocks: int, **cfg) -> LLMEngine:
    """A second engine on the same weights with its own (small) KV pool."""
    model = engine.runner.model
    runner = ModelRunner(model, KVPool(model.config, num_blocks, 16))
    return LLMEngine(engine.tokenizer, runner, model.config.context_length,
                     EngineConfig(num_blocks=num_blocks, scheduler=SchedulerConfig(
                         swap_blocks=swap_blocks, **cfg)))


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    return [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
            for m in chat_prompts(64, min_words=4, max_words=40, seed=3)]


@pytest.fixture(scope="module")
def reference(engine, prompts) -> list[list[int]]:
    """8 greedy tokens per prompt, all at once with plenty of memory."""
    for i, ids in enumerate(prompts):
        engine.add_request(Request(f"ref-{i}", ids, greedy(8)))
    out = engine.run_until_done()
    return [tokens_of(out[f"ref-{i}"]) for i in range(len(prompts))]


def test_64_requests_complete_in_a_pool_that_holds_a_few(engine, prompts, reference):
    per_seq = -(-(max(len(p) for p in prompts) + 8) // 16)
    blocks = 4 * per_seq  # room for about four sequences at a time
    # host swap space for one sequence: later preemptions must fall back to recompute
    eng = small_engine(engine, num_blocks=blocks, swap_blocks=per_seq)
    for i, ids in enumerate(prompts):
        eng.add_request(Request(f"r{i}", ids, greedy(8)))
    max_used = 0
    results: dict[str, list] = {}
    while eng.has_unfinished():
        for delta in eng.step():
            results.setdefault(delta.request_id, []).append(delta)
        max_used = max(max_used, eng.blocks.num_blocks - eng.blocks.num_free)
        assert eng.scheduler.swap.used <= eng.scheduler.swap.capacity
    assert max_used <= blocks
    assert len(results) == len(prompts)
    for i in range(len(prompts)):
        assert tokens_of(results[f"r{i}"]) == reference[i], i
        assert results[f"r{i}"][-1].finish_reason == "length"
    pre = eng.scheduler.preemptions
    assert pre["swap"] > 0 and pre["recompute"] > 0, pre
    assert eng.blocks.num_free == blocks  # nothing leaked
    assert eng.scheduler.swap.used == 0


def test_high_priority_request_joins_the_very_next_step(engine, prompts):
    eng = small_engine(engine, num_blocks=512, swap_blocks=0, max_batch_tokens=128, max_seqs=32)
    for i in range(40):  # more low-priority work than one step can take
        eng.add_request(Request(f"low-{i}", prompts[i], greedy(64), priority=0))
    for _ in range(4):
        eng.step()
    eng.add_request(Request("urgent", prompts[50], greedy(4), priority=10))
    steps = 0
    first_token_step = usage = None
    while usage is None:
        steps += 1
        for delta in eng.step():
            if delta.request_id == "urgent" and delta.token_ids and first_token_step is None:
                first_token_step = steps
            if delta.request_id == "urgent" and delta.finished:
                usage = delta.usage
    assert first_token_step == 1
    assert usage.steps_waited == 0  # what the kernel reports (llmos bench serve prints it)
    waited = [eng.abort(rid).usage.steps_waited for rid in list(eng.requests)]
    assert max(waited) >= 4 + steps - 1  # the low-priority backlog did wait, and says so


def test_a_high_priority_prompt_gets_a_step_of_its_own(engine, prompts):
    """Its prompt is not computed beside everyone's decode rows, so its time to first token
    under load is the idle one plus at most the step in progress."""
    eng = small_engine(engine, num_blocks=512, swap_blocks=0, max_batch_tokens=256, max_seqs=32)
    for i in range(16):
        eng.add_request(Request(f"low-{i}", prompts[i], greedy(64), priority=0))
    while eng.scheduler.waiting or any(s.num_uncomputed > 1 for s in eng.scheduler.running):
        eng.step()  # until every low-priority prompt is in and they all decode
    eng.add_request(Request("urgent", prompts[50], greedy(4), priority=10))
    before = eng.scheduler.express_steps
    plan = eng.scheduler.schedule()
    assert [w.seq.priority for w in plan.works] == [10]
    urgent = plan.works[0].seq
    assert plan.works[0].num_tokens == len(prompts[50]) - urgent.num_cached  # all of it
    assert eng.scheduler.express_steps == before + 1
    for rid in list(eng.requests):
        eng.abort(rid)


def test_an_agent_flooding_the_queue_does_not_starve_another(engine, prompts):
    eng = small_engine(engine, num_blocks=512, swap_blocks=0, max_seqs=6)
    for i in range(30):
        eng.add_request(Request(f"a-{i}", prompts[i], greedy(24), owner=1))
    for i in range(3):
        eng.add_request(Request(f"b-{i}", prompts[40 + i], greedy(24), owner=2))
    served = {1: 0, 2: 0}
    while any(rid.startswith("b-") for rid in eng.requests):
        for delta in eng.step():
            served[1 if delta.request_id.startswith("a-") else 2] += len(delta.token_ids)
    for rid in list(eng.requests):
        eng.abort(rid)
    share = served[2] / (served[1] + served[2])
    assert share >= 0.25, served  # within 2x of an equal share while both had work


def test_suspended_context_resumes_without_recompute_and_identically(engine):
    tok = engine.tokenizer
    words = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(260))
    context = tok.encode(tok.apply_chat_template([{"role": "user", "content": words}]),
                         add_special_tokens=False)
    assert len(context) >= 1000
    follow_up = tok.encode("\nSo, what colour is item 7?", add_special_tokens=False)

    engine.add_request(Request("ctx", context, greedy(1), keep_context=True))
    first = engine.run_until_done()["ctx"]
    assert first[-1].context_id == "ctx"
    assert engine.suspend_context("ctx")
    while engine.has_unfinished():  # the swap-out runs with the next step
        engine.step()
    assert engine.scheduler.parked["ctx"].status is Status.SUSPENDED

    engine.add_request(Request("resume", follow_up, greedy(12), context="ctx"))
    resumed = engine.run_until_done()["resume"]
    kept = len(context) + 1 - 1  # context + its generated token, minus the one never computed
    assert resumed[-1].usage.cached_tokens == kept

    full = context + tokens_of(first) + follow_up
    engine.add_request(Request("fresh", full, greedy(12)))
    fresh = engine.run_until_done()["fresh"]
    assert tokens_of(resumed) == tokens_of(fresh)


def test_beam_search_matches_transformers(engine, hf_model):
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content":
                                               "Name three uses of copper."}]),
                     add_special_tokens=False)
    engine.add_request(Request("beam", ids, SamplingParams(max_tokens=12, temperature=0,
                                                           num_beams=3)))
    ours = tokens_of(engine.run_until_done()["beam"])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                max_new_tokens=12, num_beams=3, do_sample=False,
                                early_stopping=False, pad_token_id=0,
                                eos_token_id=sorted(tok.stop_token_ids))
    expected = ref[0, len(ids):].tolist()
    while expected and expected[-1] == 0 and 0 not in tok.stop_token_ids:
        expected.pop()
    assert ours == expected


class _BrokenConstraint:
    """A grammar matcher that fails, as a buggy or hostile grammar could."""

    def allowed_mask(self) -> bytes:
        raise RuntimeError("matcher exploded")

    def advance(self, token: int) -> None:
        raise RuntimeError("matcher exploded")

    def is_done(self) -> bool:
        return False


def test_a_failing_constraint_ends_only_its_own_request(engine, prompts, reference):
    engine.add_request(Request("broken", prompts[0], greedy(8), constraint=_BrokenConstraint()))
    engine.add_request(Request("fine", prompts[1], greedy(8)))
    out = engine.run_until_done()
    assert out["broken"][-1].finish_reason == "error"
    assert "matcher exploded" in out["broken"][-1].error["message"]
    assert tokens_of(out["fine"]) == reference[1]


def test_the_kernel_suspends_a_parked_context_when_others_need_its_memory(engine, prompts,
                                                                           reference):
    """A context kept for an agent waiting on a tool stays resident while memory allows; when
    running work needs its blocks, the scheduler moves it to host memory (before preempting
    anyone), and the follow-up still resumes it without recompute and identically."""
    eng = small_engine(engine, num_blocks=16, swap_blocks=64, max_seqs=8)
    context = prompts[10]
    eng.add_request(Request("ctx", context, greedy(4), keep_context=True))
    first = eng.run_until_done()["ctx"]
    assert eng.scheduler.parked["ctx"].status is Status.PARKED  # resident: nothing needed it
    for i in range(20, 28):  # together they need about twice the pool
        eng.add_request(Request(f"busy-{i}", prompts[i], greedy(8)))
    busy = eng.run_until_done()
    assert [tokens_of(busy[f"busy-{i}"]) for i in range(20, 28)] == reference[20:28]
    assert eng.scheduler.preemptions["suspend"] == 1
    assert eng.scheduler.parked["ctx"].status is Status.SUSPENDED

    follow_up = engine.tokenizer.encode("\nAnd then?", add_special_tokens=False)
    eng.add_request(Request("resume", follow_up, greedy(8), context="ctx"))
    resumed = eng.run_until_done()["resume"]
    assert resumed[-1].usage.cached_tokens == len(context) + 4 - 1
    eng.add_request(Request("fresh", context + tokens_of(first) + follow_up, greedy(8)))
    assert tokens_of(resumed) == tokens_of(eng.run_until_done()["fresh"])
