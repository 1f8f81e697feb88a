"""``llmos bench ipc --sandbox``'s measure, small, on the shared kernel: sandboxed and
plain agents in rounds, each round's ratio reported, every ping-pong call answered by the
reply to it (the command fails otherwise)."""

from __future__ import annotations

from llmos_kernel.bench import ipc as bench
from llmos_kernel.client import KernelClient


def test_the_sandbox_measure_takes_both_in_rounds_and_checks_every_reply(
        kernel, sandbox_available):
    client = KernelClient(kernel.handle, (kernel.state_dir / "root.token").read_text())
    out, checked = kernel.run(bench.sandboxed_vs_not(
        client, agents=2, messages=5, pairs=1, rounds=2, progress=lambda m: None, settle_s=0),
        timeout=300)
    # two rounds of each kind: 1 pair x 5 round trips each, every reply its own
    assert checked == {"round_trips": 2 * 2 * 5, "wrong_replies": 0}
    assert len(out["syscall_p50_ratios"]) == len(out["pingpong_p50_ratios"]) == 2
    for key in ("sbx", "plain"):
        assert out[f"{key}_spawn_per_s"] > 0
        for what in ("syscall", "pingpong"):
            assert 0 < out[f"{key}_{what}_p50_s"] <= out[f"{key}_{what}_p99_s"]
