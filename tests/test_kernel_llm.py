"""The kernel's LLM service through Ray: concurrency, bad input, a dying shard, status."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from llmos_kernel.bench.prompts import chat_prompts
from llmos_kernel.client import KernelClient
from llmos_kernel.errors import ContextOverflow, InvalidArgument, LlmosError, NotFound


@pytest.fixture(scope="module")
def client(kernel):
    token = (kernel.state_dir / "root.token").read_text()

    async def make():
        return KernelClient(kernel.handle, token)

    return kernel.run(make())


MESSAGES = chat_prompts(8, min_words=4, max_words=120, seed=11)


def greedy(n: int = 16) -> dict:
    return {"max_tokens": n, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def alone(kernel, client):
    """Each prompt run by itself, one after another."""
    async def run():
        return [(await client.generate(messages=m, **greedy())).token_ids for m in MESSAGES]

    return kernel.run(run())


def test_concurrent_mixed_load_gives_the_same_greedy_tokens(kernel, client, alone):
    async def run():
        return await asyncio.gather(*[client.generate(messages=m, **greedy())
                                      for m in MESSAGES])

    together = kernel.run(run())
    assert [c.token_ids for c in together] == alone
    assert all(c.finish_reason == "length" for c in together)


@pytest.mark.parametrize("spec, error", [
    ({"prompt": 42}, InvalidArgument),
    ({"prompt": "hi", "bogus": 1}, InvalidArgument),
    ({"prompt": "hi", "params": {"temperature": "hot"}}, InvalidArgument),
    ({"prompt": "hi", "params": {"max_tokens": 0}}, InvalidArgument),
    ({"prompt": "hi", "messages": []}, InvalidArgument),
    ({"messages": [{"role": "user"}]}, InvalidArgument),
    ({"prompt_ids": [10**9]}, InvalidArgument),
    ({"prompt": "word " * 9000}, ContextOverflow),
    ({"prompt": "hi", "context": "never-kept"}, NotFound),
])
def test_bad_requests_get_typed_errors_and_the_kernel_keeps_serving(kernel, client, spec, error):
    async def run():
        reply = await client.handle.submit.remote(client.token, client.client_id, spec)
        with pytest.raises(error):
            from llmos_kernel.client import unwrap
            unwrap(reply)
        return await client.generate(prompt="The sky is", **greedy(2))

    assert len(kernel.run(run()).token_ids) == 2


def test_cancelling_an_unknown_request_is_a_typed_error(kernel, client):
    with pytest.raises(NotFound):
        kernel.run(client.cancel("no-such-request"))


def test_kernel_restarts_a_killed_shard_and_finishes_every_request(kernel, client, alone):
    async def run():
        pid = (await kernel.actors())["shard"]["pid"]
        generated = (await client.status())["engine"]["tokens_generated"]
        tasks = [asyncio.ensure_future(client.generate(messages=m, **greedy()))
                 for m in MESSAGES]
        while (await client.status())["engine"]["tokens_generated"] == generated:
            await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)  # mid-run: the first tokens are out, most are not
        assert not all(t.done() for t in tasks)
        return await asyncio.gather(*tasks)

    before = kernel.run(client.status())["shard"]["restarts"]
    results = kernel.run(run())
    assert [c.token_ids for c in results] == alone
    assert kernel.run(client.status())["shard"]["restarts"] == before + 1


def test_status_shows_the_memory_map_queues_and_throughput(kernel, client):
    st = kernel.run(client.status())
    mem = st["memory"]
    assert mem["kv_pool_bytes"] <= mem["kv_budget_bytes"]
    assert mem["kv_blocks_used"] + mem["kv_blocks_free"] == mem["num_blocks"]
    assert {d["name"] for d in mem["devices"]} >= {"cpu"}
    assert set(st["queues"]) == {"running", "waiting", "swapped", "parked"}
    assert set(st["preemptions"]) >= {"swap", "recompute"}
    assert st["throughput_tok_s"] >= 0
    assert st["engine"]["tokens_generated"] > 0
    # the kernel, its hosts and its shard each kept their start-up objects out of later
    # garbage collections, and time the collections they run
    actors = kernel.run(kernel.actors())
    for who, gc in [("kernel", st["gc"]), ("shard", actors["shard"]["gc"]),
                    *[(h, info["gc"]) for h, info in actors["hosts"].items()]]:
        assert gc["frozen_objects"] > 10_000, who
        assert len(gc["collections"]) == len(gc["longest_pause_ms"]) == 3, who
        assert all(p >= 0 for p in gc["longest_pause_ms"]), who
    assert st["gc"]["collections"][0] > 0  # a kernel that has served allocates


def test_an_error_reaches_the_caller_not_the_kernel(kernel, client):
    with pytest.raises(LlmosError):
        kernel.run(client.generate(prompt="hi", temperature=-1))
    assert kernel.run(client.generate(prompt="Hello", **greedy(1))).token_ids


def test_bench_serve_reports_every_figure(kernel):
    """``llmos bench serve`` against a running kernel (a small workload, no baseline): each
    run under its own cache salt, prompt tokens counted in the processed rate, and the
    high-priority probe's wait as the kernel accounts it."""
    from llmos_kernel.bench import serve

    out = serve.run(kernel_name=kernel.name, concurrency=4, requests=6, max_tokens=4,
                    repeat=2, max_words=30, baseline=False)
    assert len(out["runs_agg_tok_s"]) == 2 and out["agg_tok_s"] == max(out["runs_agg_tok_s"])
    assert out["tokens"] == 6 * 4 and out["max_words"] == 30
    assert out["processed_tok_s"] > out["agg_tok_s"] > 0
    assert out["compute_bound_tok_s"] > 0 and 0 <= out["prefix_hit_rate"] < 1
    # The fp32 peak is the best of torch's GEMM and ours, each reported.
    rates = [out[k] for k in ("gemm_peak_torch_gflops", "gemm_peak_llmos_gflops") if k in out]
    assert out["gemm_peak_torch_gflops"] > 0 and out["gemm_peak_gflops"] == max(rates)
    assert out["high_priority_steps_waited"] == 0  # the probe ran in the very next step
    assert 0 <= out["high_priority_queue_s"] < out["ttft_high_priority_busy_s"]


def test_bench_serve_runs_the_baseline_in_fp32_and_beside_bf16_in_bf16(kernel, capsys):
    """The reference runs in fp32 (as the issue measures it) and, when the kernel computes in
    bf16, in transformers' own bf16 as well; the report prints each beside ours."""
    from llmos_kernel.bench import serve
    from llmos_kernel.cli.bench import serve_report

    out = serve.run(kernel_name=kernel.name, concurrency=4, requests=4, max_tokens=4,
                    max_words=12)
    assert out["ref_agg_tok_s"] > 0 and out["ref_processed_tok_s"] > out["ref_agg_tok_s"]
    assert ("ref_bf16_agg_tok_s" in out) == (out["dtype"] == "bf16")
    serve_report(out)
    text = capsys.readouterr().out
    assert "baseline: transformers fp32" in text and f"llmos in {out['dtype']}" in text
    assert text.count("aggregate tok/s") == (2 if out["dtype"] == "bf16" else 1)
