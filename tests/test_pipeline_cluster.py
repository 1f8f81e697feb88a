"""Pipeline stages on a real 2-node Ray cluster, and a split the CLI refuses.

The cluster runs in a process of its own (tests/pipeline_cluster.py: this suite's
process already holds a Ray session). The reference is the single-shard kernel on
the same cluster, in the same run: the 2- and 3-stage kernels must give exactly its
greedy tokens, and its logprobs, on a concurrent batch that mixes long prompts'
chunked prefills with other requests' decodes, with their stages on both nodes and as
many steps in flight as there are stages.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def cluster_run(model_path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "pipeline_cluster.py"),
                           str(model_path)], capture_output=True, text=True, env=_env(),
                          timeout=900, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("shards", [2, 3])
def test_stages_give_the_single_shards_greedy_tokens_from_different_nodes(cluster_run, shards):
    whole, split = cluster_run["1"], cluster_run[str(shards)]
    assert split["tokens"] == whole["tokens"]
    for got, want in zip(split["logprobs"], whole["logprobs"]):
        assert got == pytest.approx(want, abs=1e-3)
    stages = split["stages"]
    assert [s["index"] for s in stages] == list(range(shards))
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 30
    assert all(a["layers"][1] == b["layers"][0] for a, b in itertools.pairwise(stages))
    nodes = [s["node"] for s in stages]
    assert set(nodes) == set(cluster_run["nodes"])  # both nodes of the cluster serve stages
    assert all(s["device"] == "cpu" and s["bytes"] == s["weight_bytes"] + s["kv_bytes"]
               for s in stages)
    cores = len(os.sched_getaffinity(0))  # the cluster's nodes are this machine's processes
    # stages that share a node divide its cores (3 stages on 2 nodes: two share one)
    assert [s["threads"] for s in stages] == [max(1, cores // nodes.count(n)) for n in nodes]


def test_auto_placement_takes_two_stages_where_one_does_not_fit(cluster_run):
    """With a stage budget below the whole model's bytes but above each half's, ``--placement
    auto`` splits in two (on both nodes) and gives the single shard's tokens."""
    auto = cluster_run["auto"]
    assert len(auto["stages"]) == 2
    assert all(s["bytes"] <= s["budget_bytes"] for s in auto["stages"])
    assert {s["node"] for s in auto["stages"]} == set(cluster_run["nodes"])
    assert auto["tokens"] == cluster_run["1"]["tokens"]


@pytest.mark.parametrize("shards", [2, 3])
def test_stages_overlap_with_one_step_in_flight_per_stage(cluster_run, shards):
    """The same tokens as above came from steps that were in flight together: the kernel
    kept as many steps out as it has stages, and one shard only ever one."""
    assert cluster_run["1"]["steps_in_flight"]["max"] == 1
    assert cluster_run["1"]["steps_in_flight"]["overlapped_steps"] == 0
    in_flight = cluster_run[str(shards)]["steps_in_flight"]
    assert in_flight["max"] == shards and in_flight["overlapped_steps"] > 0
    assert in_flight["now"] == 0, "every step landed"


@pytest.mark.parametrize("how", ["killed", "node_removed"])
def test_a_stage_lost_mid_load_costs_latency_not_requests(cluster_run, how):
    """Every request completes with the single shard's tokens; the lost stage alone was
    re-placed (on the node left, when its node went), the other kept its process and
    weights, and the lost work was recomputed."""
    run = cluster_run[how]
    assert run["mid_load"], "the stage was lost after the batch had finished"
    assert run["tokens"] == cluster_run["1"]["tokens"]
    assert run["restarts"] >= 1 and run["replaced"] >= 1
    assert all("error" not in s for s in run["stages_after"])
    before, after = run["stages_before"], run["stages_after"]
    lost = run["lost_stage"]
    assert after[lost]["pid"] != before[lost]["pid"]
    assert [s["pid"] for s in after if s["index"] != lost] == \
        [s["pid"] for s in before if s["index"] != lost]
    cores = len(os.sched_getaffinity(0))
    nodes = [s["node"] for s in after]  # both on the node left, when the other went
    assert [s["threads"] for s in after] == [max(1, cores // nodes.count(n)) for n in nodes]
    if how == "node_removed":
        assert run["lost_node"] not in {s["node"] for s in run["stages_after"]}


def test_a_split_over_its_budget_is_refused_and_leaves_nothing(cluster_run):
    refused = cluster_run["refused"]
    assert refused["error"]["type"] == "QuotaExceeded"
    assert "bytes missing" in refused["error"]["message"]
    assert "stage 0" in refused["error"]["message"]
    assert refused["alive_actors"] == [] and refused["placement_groups"] == []


def test_more_shards_than_layers_is_refused_by_the_cli_before_anything_starts(
        model_path, tmp_path):
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-m", "llmos_kernel.cli", "kernel", "start",
                           "--model", str(model_path), "--shards", "99",
                           "--state-dir", str(state)],
                          capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert done.returncode != 0
    assert "30 layers splits into at most 30 stages" in done.stderr
    assert done.stderr.count("error") == 1
    assert not (state / "ray_head.json").exists()  # no Ray head was started for it


def test_the_transport_bench_runs_both_chains():
    """``python bench/pipeline_transport.py`` (its own Ray session): the object-store chain
    the stages use beside a compiled graph, each at a rate the ideal bounds, and the CPU
    the stages use idle after each."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline_transport.py"),
                           "--steps", "10", "--repeat", "1", "--work", "0.01", "--idle", "0.2",
                           "--json"],
                          capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ideal"] == pytest.approx(100.0)
    for how in ("object_store", "compiled_graph"):
        assert 0 < report[how] <= report["ideal"] * 1.05, report
        assert 0 <= report["idle_cpu_per_s"][how] <= 1.1 * os.cpu_count(), report
