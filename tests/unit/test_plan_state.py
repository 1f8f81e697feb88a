"""Step plans carry only what changed, and the runner rebuilds exactly the engine's lists.

Random histories of many sequences (tables growing, a block replaced, a table rebuilt,
ids appended or rewritten, sequences leaving) go through the engine's half and the
runner's half; after every plan the runner's lists equal the engine's. The engine's own
step loop on a runner that rebuilds them is tests/unit/test_engine.py.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.plan_state import PlanSender, PlanStateError, RunnerState
from llmos_kernel.engine.runner import SeqStep, StepPlan

EDITS = st.sampled_from(["grow", "append_block", "replace_last", "rebuild", "rewrite_output",
                         "new_params", "leave", "idle"])


def _step(sid: int, blocks: list[int], output: list[int], prompt: list[int],
          params: SamplingParams | None = None) -> SeqStep:
    return SeqStep(sid, [1], 0, list(blocks), sample=True, params=params or SamplingParams(),
                   output_ids=output, prompt_ids=prompt)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), EDITS, st.integers(0, 999)), max_size=80))
def test_the_runner_rebuilds_the_engines_lists_after_every_plan(history):
    sender, runner = PlanSender(), RunnerState()
    seqs: dict[int, dict] = {}
    for sid, edit, value in history:
        seq = seqs.setdefault(sid, {"blocks": [], "output": [], "prompt": [value, sid],
                                    "params": SamplingParams(seed=sid)})
        if edit == "grow":
            seq["output"].append(value)
        elif edit == "append_block":
            seq["blocks"].append(value)
        elif edit == "replace_last" and seq["blocks"]:
            seq["blocks"][-1] = value + 1000  # copy-on-write of a shared block
        elif edit == "rebuild":
            seq["blocks"][:] = [value, value + 1][: value % 3]  # preempted, then recomputed
        elif edit == "rewrite_output" and seq["output"]:
            seq["output"][0] = value + 5000  # beams reordered
        elif edit == "new_params":
            seq["params"] = SamplingParams(seed=value)
        elif edit == "leave":
            del seqs[sid]
        steps = [_step(i, s["blocks"], s["output"], s["prompt"], s["params"])
                 for i, s in seqs.items()]
        for step in steps:
            sender.encode(step)
        plan = StepPlan(steps, release=sender.release(set(seqs)))
        received = pickle.loads(pickle.dumps(plan))  # as a shard receives it
        runner.apply(received)
        for step, (i, s) in zip(received.seqs, seqs.items()):
            held = runner.held[i]
            assert (held.blocks, held.output, held.prompt) == (s["blocks"], s["output"],
                                                               s["prompt"])
            assert step.params == s["params"]
        assert set(runner.held) == set(seqs)


def test_a_steady_decode_step_carries_only_the_new_ids():
    sender, params = PlanSender(), SamplingParams()
    blocks, output = list(range(63)), list(range(500))
    sender.encode(_step(1, blocks, output, [], params))
    output.append(7)
    step = _step(1, blocks, output, [], params)
    sender.encode(step)
    assert (step.blocks_at, step.blocks) == (63, [])
    assert (step.output_at, step.output_ids) == (500, [7])
    assert step.params is None  # the runner holds them


def test_a_lost_plan_fails_loudly_rather_than_reading_wrong_blocks():
    sender, runner = PlanSender(), RunnerState()
    sender.encode(_step(1, [1, 2], [5], []))  # this plan never reaches the runner
    later = _step(1, [1, 2, 3], [5, 6], [])
    sender.encode(later)
    with pytest.raises(PlanStateError, match="sequence 1's blocks continue at 2, but this "
                                             "runner holds 0"):
        runner.apply(StepPlan([later]))


def test_a_cleared_sender_sends_everything_again():
    sender = PlanSender()
    sender.encode(_step(1, [1, 2], [5], []))
    sender.clear()
    step = _step(1, [1, 2], [5], [])
    sender.encode(step)
    assert (step.blocks_at, step.blocks, step.output_at, step.output_ids) == (0, [1, 2], 0, [5])
