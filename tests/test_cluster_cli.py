"""The README's two-machine quick start, run as written with two raylets on this machine.

The ``sh`` block under "On a cluster" runs line by line (``HEAD`` is 127.0.0.1): ``ray
start`` twice (a head and a second raylet, each with its own custom resource), then
``llmos kernel start``, ``status``, a demo agent pinned to the second node by its
resource, and ``llmos kernel stop``, each as its own process against that cluster. Ray's
files go to a temporary RAY_TMPDIR so nothing else on the machine finds this cluster;
``ray stop`` (which stops every Ray on a machine, this suite's too) is the one line run
differently: the processes of this cluster's sessions are stopped instead. Beside the
lines, the test checks what they claim: the kernel's placement (two nodes, the shared
hosts one on each, the pinned agent on the node with its resource) and that agents on
the two nodes' hosts exchange messages (``llmos bench ipc`` against that kernel).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmos_kernel.session_stop import stop_session

ROOT = Path(__file__).parents[1]


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    return [ln for ln in block.splitlines() if shlex.split(ln, comments=True)]


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit
    yield path
    stop_session(path, grace_s=10.0)  # every process naming it, whatever the test left
    shutil.rmtree(path, ignore_errors=True)


def test_the_two_node_quick_start_runs_as_written(ray_tmp, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LLMOS_DEBUG"))}
    env.update(RAY_TMPDIR=ray_tmp, LLMOS_STATE_DIR=str(tmp_path / "state"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    ray_cli = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
    llmos = [sys.executable, "-m", "llmos_kernel.cli"]

    def run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout}\n{done.stderr}"
        return done

    def status() -> dict:
        return json.loads(run([*llmos, "kernel", "status", "--json"]).stdout)

    checked = set()
    for line in quick_start():
        argv = [a.replace("HEAD", "127.0.0.1") for a in shlex.split(line, comments=True)]
        scoped = {}
        while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value before a command
            key, _, value = argv.pop(0).partition("=")
            scoped[key] = value
        saved = dict(env)
        env.update(scoped)
        if argv[0] == "export":
            key, _, value = argv[1].partition("=")
            env[key] = value
        elif argv[:2] == ["ray", "stop"]:
            stop_session(ray_tmp)
            checked.add("ray stop")
        elif argv[0] == "ray":
            run([*ray_cli, *argv[1:], "--disable-usage-stats"])
            if "--address" in argv:  # a joining raylet: wait until the cluster counts it
                _wait_for_nodes(argv[argv.index("--address") + 1], 2, env)
        elif argv[:3] == ["llmos", "kernel", "status"]:
            out = run([*llmos, *argv[1:]]).stdout
            st = status()
            nodes = {n["node"]: n for n in st["placement"]["nodes"]}
            assert len(nodes) == 2, st["placement"]
            shared = [h for h in st["placement"]["hosts"] if not h["isolated"]]
            assert len(shared) == 2 and {h["node"] for h in shared} == set(nodes), \
                "the shared agent hosts are not one on each node"
            for node in nodes:
                assert f"node {node[:12]}" in out
            if "--shards" in argv:  # the model's stages, one on each node
                assert {s["node"] for s in st["stages"]} == set(nodes), st["stages"]
            checked.add("status")
        elif argv[:2] == ["llmos", "run"]:
            node_b = next(n for n, info in nodes.items() if "node_b" in info["resources"])
            agent = subprocess.Popen([*llmos, *argv[1:]], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline, seen = time.monotonic() + 120, None
            while seen is None and agent.poll() is None:
                assert time.monotonic() < deadline, "the agent's own host never showed"
                own = [h for h in status()["placement"]["hosts"] if h["isolated"]]
                seen = own[0]["node"] if own else None
                time.sleep(0.2)
            out, err = agent.communicate(timeout=300)
            assert agent.returncode == 0, f"{out}\n{err}"
            assert json.loads(out.split("\n", 1)[1])["reason"] == "normal"
            assert seen == node_b, "the agent did not run on the node with its resource"
            # agents on the two nodes' hosts exchange messages (bench ipc's cross-host pairs)
            bench = run([*llmos, "bench", "ipc", "--kernel", "kernel", "--agents", "10",
                         "--pairs", "2", "--messages", "5", "--json"])
            report = json.loads(bench.stdout.strip().splitlines()[-1])
            # every call answered, each by the reply to it: 2 pairs x 5, on one host and across
            assert report["msgs_per_s_cross"] > 0 and report["round_trips"] == 2 * 2 * 5
            assert report["wrong_replies"] == 0
            checked.add("run")
        elif argv[0] == "llmos":
            run([*llmos, *argv[1:]])
            if argv[1:3] == ["kernel", "stop"]:
                gone = subprocess.run([*llmos, "kernel", "status"], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=120, check=False)
                assert gone.returncode != 0  # no kernel answers now
                checked.add("stop")
        else:
            raise AssertionError(f"the test does not know how to run {line!r}")
        if scoped:
            env.clear()
            env.update(saved)
    assert checked == {"status", "run", "stop", "ray stop"}
    assert not [pid for pid, line in _cmdlines().items() if ray_tmp in line], \
        "processes of the quick start's cluster are still running"


def _wait_for_nodes(address: str, n: int, env: dict) -> None:
    code = ("import ray, sys, time\n"
            f"ray.init(address={address!r}, logging_level='ERROR')\n"
            "deadline = time.time() + 60\n"
            f"while len([x for x in ray.nodes() if x['Alive']]) < {n}:\n"
            "    assert time.time() < deadline, 'the second raylet never joined'\n"
            "    time.sleep(0.2)\n")
    subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_MODE": "token"},
                   check=True, timeout=120, capture_output=True)


def _cmdlines() -> dict[str, str]:
    out = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            out[entry.name] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            pass
    return out
