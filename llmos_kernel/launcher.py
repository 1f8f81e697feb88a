"""Start, find and stop kernels on a local or existing Ray cluster.

``llmos kernel start`` without ``--address`` starts a local Ray head (``ray
start --head``) so the detached kernel outlives the command, and records that
in the state dir so ``llmos kernel stop`` can take it down again.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ray

from llmos_kernel import wire
from llmos_kernel.errors import AlreadyExists, Unavailable
from llmos_kernel.kernel import KernelConfig, RemoteKernel
from llmos_kernel.paths import (
    NAMESPACE,
    ROOT_TOKEN_FILE,
    default_state_dir,
    published_state_dir,
)
from llmos_kernel.session_stop import stop_session

HEAD_FILE = "ray_head.json"


def connect_ray(address: str | None = None, *, start_head: bool = False,
                state_dir: Path | None = None) -> None:
    """Join a Ray cluster (``address``, or a local one), starting a local head if asked."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        return
    except ConnectionError:
        if address:
            raise Unavailable(f"no Ray cluster at {address}; start one there "
                              "(ray start --head) or leave out --address") from None
        if not start_head:
            raise Unavailable("no Ray cluster (and so no kernel) is running here; "
                              "start one with: llmos kernel start") from None
    _start_local_head(state_dir)
    ray.init(address="auto", namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    if state_dir is not None:  # what stop_kernel stops: this head, not other Ray instances
        (state_dir / HEAD_FILE).write_text(json.dumps({
            "started_by": "llmos", "gcs_address": ray.get_runtime_context().gcs_address,
            "session_dir": _session_dir()}))


def _session_dir() -> str | None:
    """The Ray session directory of the cluster this driver joined (every process of that
    cluster names it on its command line)."""
    try:
        return ray._private.worker.global_worker.node.get_session_dir_path()
    except AttributeError:  # a Ray without that private path: stop falls back to ray stop
        return None


def _ray_cli(*args: str) -> subprocess.CompletedProcess:
    code = "from ray.scripts.scripts import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=False)


def _start_local_head(state_dir: Path | None) -> None:
    done = _ray_cli("start", "--head", "--disable-usage-stats", "--include-dashboard=false",
                    f"--num-cpus={os.cpu_count() or 1}")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise Unavailable(f"could not start a local Ray head: {tail[0]}")
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / HEAD_FILE).write_text(json.dumps({"started_by": "llmos"}))  # until joined


def find_kernel(name: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def start_kernel(cfg: KernelConfig, *, detached: bool = True,
                 on_phase: Callable[[str], None] | None = None) -> ray.actor.ActorHandle:
    """Create the named kernel actor, load its model, and wait until it serves.

    ``on_phase`` is told what the kernel is doing whenever that changes (model metadata,
    weights, KV pool, agent hosts), polled twice a second while it starts."""
    if find_kernel(cfg.name) is not None:
        raise AlreadyExists(f"a kernel named {cfg.name!r} is already running "
                            "(llmos kernel status; llmos kernel stop)")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    handle = RemoteKernel.options(
        name=cfg.name, namespace=NAMESPACE, lifetime="detached" if detached else None,
        num_cpus=0, max_concurrency=10_000, max_restarts=-1,  # back from its state dir
        # on this node, where its state dir is (SQLite, the root token): on another node
        # it would find none, and restarted elsewhere it would lose them
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(cfg)
    if on_phase is not None:
        on_phase("creating the kernel actor")
    try:  # the constructor writes the root token that every kernel method asks for
        ray.get(handle.__ray_ready__.remote())
    except ray.exceptions.RayActorError as e:
        ray.kill(handle)
        raise Unavailable(f"the kernel actor failed to start: {e}") from None
    token = (Path(cfg.state_dir) / ROOT_TOKEN_FILE).read_text().strip()
    ready = handle.ready.remote(token)
    if on_phase is not None:
        _follow_boot(handle, ready, token, on_phase)
    reply = ray.get(ready)
    if reply.error is not None:
        ray.kill(handle)
        wire.unwrap(reply)
    return handle


def _follow_boot(handle, ready: ray.ObjectRef, token: str,
                 on_phase: Callable[[str], None]) -> None:
    last = "creating the kernel actor"
    while not ray.wait([ready], timeout=0.5)[0]:
        try:
            phase = ray.get(handle.boot_status.remote(token), timeout=5)["phase"]
        except (ray.exceptions.RayError, TimeoutError):
            phase = last
        if phase != last:
            on_phase(phase)
            last = phase


def stop_kernel(name: str, state_dir: Path | None = None) -> bool:
    """Stop the kernel (and its shard); stop the local Ray head if llmos started it."""
    handle = find_kernel(name)
    if handle is not None:
        try:  # its hosts and shard first; without the token, killing the kernel takes them
            where = state_dir or published_state_dir(name) or default_state_dir()
            token = (where / ROOT_TOKEN_FILE).read_text().strip()
            ray.get(handle.shutdown.remote(token), timeout=30)
        except (OSError, ray.exceptions.RayError, TimeoutError):
            pass
        ray.kill(handle, no_restart=True)
    head = state_dir / HEAD_FILE if state_dir else None
    if head is not None and head.exists():
        ray.shutdown()
        try:
            session = json.loads(head.read_text()).get("session_dir")
        except ValueError:
            session = None
        if session:
            stop_session(session)
            _forget_address(json.loads(head.read_text()).get("gcs_address"))
        else:  # a head recorded before its session was: every Ray instance of this user
            _ray_cli("stop")
        head.unlink()
    return handle is not None


def _forget_address(gcs_address: str | None) -> None:
    """Remove the note that makes ``ray.init(address="auto")`` on this machine join the
    instance just stopped (``ray stop`` removes it too), if it still names that one."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):
        if gcs_address and path.read_text().strip() == gcs_address:
            path.unlink()
