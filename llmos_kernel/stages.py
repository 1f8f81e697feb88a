"""The model's pipeline: its ModelShard stages, placed, started and driven step by step.

One stage (the default) is one ModelShard holding every layer, started as ever.
``LLMConfig.shards = "auto"`` (``--placement auto``) takes the fewest stages whose
heaviest fits a place: a node's memory, or a GPU (``placement.choose_stages``). With
``LLMConfig.shards = n > 1`` the layers are split into n ranges
(``placement.split_layers``); one bundle per stage is reserved in a Ray placement group
(strategy SPREAD when the cluster has several nodes, so stages land on different
nodes where it can); each stage's bytes (weights + its share of the KV pool) are
checked against the budget of the node its bundle got (``--stage-budget``, else that
node's Ray memory shared by the stages there) before any weights load; then each
stage starts in its bundle. A refused or failed start removes every stage actor and
the placement group before the error reaches the caller.

Stages split the layers so each does about the same work per token
(``placement.split_layers``), falling back to even bytes where that split does not fit
the places the stages got. Stages placed on the same node divide its cores between
them (ModelShard's ``share``).

A step submits every stage's call at once: the plan is put in the object store once,
and stage k's ObjectRef (its hidden states) is stage k+1's argument, so activations go
from stage to stage through Ray's object store, never through the kernel, and the
kernel awaits only the last stage's ``StepOutput``. Not a Ray compiled graph, which moves
a step a little faster but whose actors poll their channels while they wait, keeping
cores busy when the kernel has nothing to run (``bench/pipeline_transport.py`` measures
both). Everything the single shard does
(sampling, grammar masks, LoRA adapters, prompt logprobs, KV swaps, copies, warming)
works split: each stage applies the same plan to its own layers (see engine.runner).

``submit`` does not wait, so the kernel keeps up to ``depth`` steps in flight (one
per stage: while stage 1 computes one step, stage 0 computes the next). Each stage
runs its steps in the order they were submitted: a stage is a synchronous actor
with ``max_concurrency=1`` and no task retries, and Ray runs such an actor's calls
from one submitter (the kernel) in submission order even when an earlier call still
waits for its argument. So a plan's block moves (swaps, copies) and KV writes happen
on every stage after those of the steps scheduled before it.

Every stage before the last also returns a small acknowledgement, which the step's
future awaits beside the last stage's output (never the hidden states): a stage that
dies fails the step at once, where the next stage would wait forever on its lost
output. A dead stage (its actor, or its node) is re-placed alone (``replace_lost``:
in its bundle, which Ray places again on a node left); the other stages keep their
weights. Where that cannot be done, the whole pipeline restarts, re-placed on the
nodes left (LLMService). On CUDA each stage's bundle and actor ask Ray for one GPU;
hidden states cross stages through the host (engine.runner).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

import ray
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llmos_kernel import spawn_actors
from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.core.weights import parse_dtype
from llmos_kernel.engine.assembly import LLMConfig
from llmos_kernel.engine.runner import StepOutput, StepPlan
from llmos_kernel.errors import QuotaExceeded, Unavailable
from llmos_kernel.memory import MemoryPlan, parse_bytes
from llmos_kernel.placement import (
    Place,
    StagePlan,
    check_budgets,
    choose_stages,
    split_layers,
)


async def _first(done: Awaitable[list]) -> Any:
    return (await done)[0]


STAGE_CPUS = 1  # each stage's bundle: one CPU reserved on its node
PLACEMENT_TIMEOUT_S = 60.0
STAGE_CHECK_S = 10.0  # a stage that does not answer its info call within this is lost


class Pipeline:
    """``cfg.shards`` ModelShard stages of one model, and how a step runs through them."""

    def __init__(self, name: str, secret: str, cfg: LLMConfig, model_path: str,
                 model_config: ModelConfig, dtype: str, plan: MemoryPlan,
                 device_facts: dict | None = None):
        self.name, self.secret, self.cfg = name, secret, cfg
        self.model_path, self.dtype, self.plan = model_path, dtype, plan
        self.model_config, self.device_facts = model_config, device_facts
        self.stage_plans = [] if cfg.shards == "auto" else split_layers(
            model_config, parse_dtype(dtype), cfg.shards, plan.num_blocks, plan.block_size)
        self.stages: list[Any] = []
        self.infos: list[dict] = []
        self.places: list[Place] = []
        self.group = None  # the placement group (several stages only)

    async def start(self, on_phase=lambda phase: None) -> None:
        """Place, load and size every stage; on any failure leave nothing behind."""
        try:
            await self._start(on_phase)
        except BaseException:
            self.stop()
            raise

    async def _start(self, on_phase) -> None:
        if self.cfg.shards == "auto":
            on_phase("choosing the fewest pipeline stages the cluster's memory takes")
            self.stage_plans = choose_stages(
                self.model_config, parse_dtype(self.dtype), self.plan.num_blocks,
                self.plan.block_size, self._place_budgets(),
                f"the cluster's {'GPUs' if self._cuda else 'nodes'}")
        n = len(self.stage_plans)
        if n > 1:
            on_phase(f"reserving {n} pipeline stages in a Ray placement group")
            await self._place()
        on_phase(f"loading {self.model_config.n_params / 1e6:.0f}M weights ({self.dtype}) "
                 f"into {'the model shard' if n == 1 else f'{n} pipeline stages'}; C kernels "
                 "compile on first use")
        for stage in self.stage_plans:
            self.stages.append(self._spawn(stage.index))
        self.infos = list(await asyncio.gather(*(s.info.remote(self.secret)
                                                 for s in self.stages)))
        on_phase(f"allocating the KV pool ({self.plan.num_blocks} blocks of "
                 f"{self.plan.block_size} tokens in each of {n} stage(s))")
        await asyncio.gather(*(s.allocate_kv.remote(self.secret, self.plan.num_blocks,
                                                    self.plan.block_size)
                               for s in self.stages))

    def _sharing(self, index: int) -> int:
        """How many stages share stage ``index``'s node (1 without a placement group)."""
        nodes = [place.node for place in self.places]
        return nodes.count(nodes[index]) if nodes else 1

    def _spawn(self, index: int):
        """Stage ``index``'s actor, in its bundle where there is a placement group."""
        stage, n, threads = self.stage_plans[index], len(self.stage_plans), self.cfg.shard_threads
        share = self._sharing(index)
        options = {"name": f"{self.name}-shard-{index}", "namespace": "llmos",
                   "num_cpus": 0, "max_restarts": 0, "max_task_retries": 0,
                   "max_concurrency": 1,  # steps run in submission order (see above)
                   "num_gpus": 1 if self._cuda else 0,
                   "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads or 2)}}}
        if n > 1:  # a waiting stage's OpenMP threads sleep, not spin on the cores the
            # computing stage needs (stages share a node's cores where they share it)
            options["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] = "PASSIVE"
        if self.group is not None:
            options["num_cpus"] = STAGE_CPUS
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=index)
        layers = None if n == 1 else stage.layers
        return spawn_actors.model_shard(options, self.secret, self.model_path, self.dtype,
                                        self.cfg.device, layers, threads,
                                        self.cfg.kernels.to_dict(), share)

    async def replace_lost(self, on_phase=lambda phase: None) -> list[int]:
        """Re-place the stages that are gone (actor or node), each in its own bundle (Ray
        places again a bundle whose node died), loading its weights and a new KV pool,
        while the others keep theirs and forget only their sequences' lists (every
        sequence recomputes: the lost stage's KV is gone). Returns the stages re-placed;
        raises Unavailable when it cannot (one stage only, every stage lost, a bundle not
        placed in time, a new place too small), after which the caller restarts the
        whole pipeline."""
        if self.group is None or len(self.stages) < 2:
            raise Unavailable("a single stage is restarted whole")
        alive = await asyncio.gather(*(asyncio.wait_for(s.info.remote(self.secret),
                                                        STAGE_CHECK_S)
                                       for s in self.stages), return_exceptions=True)
        lost = [i for i, report in enumerate(alive) if isinstance(report, BaseException)]
        if not lost or len(lost) == len(self.stages):
            raise Unavailable(f"{len(lost)} of {len(self.stages)} stages lost")
        on_phase(f"re-placing pipeline stage(s) {', '.join(map(str, lost))}")
        for i in lost:
            with contextlib.suppress(ValueError):
                ray.kill(self.stages[i])
            try:
                self.stages[i] = self._spawn(i)
            except ValueError as e:  # its name is not free yet: Ray still counts it alive
                raise Unavailable(f"stage {i} cannot be started again yet: {e}") from None
        try:
            infos = await asyncio.wait_for(asyncio.gather(
                *(self.stages[i].info.remote(self.secret) for i in lost)), PLACEMENT_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(f"Ray did not place stage(s) {lost} again within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s") from None
        for i, info in zip(lost, infos):
            self.infos[i] = info
        self.places = self._bundle_places({n["NodeID"]: n for n in ray.nodes() if n.get("Alive")})
        check_budgets([self.stage_plans[i] for i in lost], [self.places[i] for i in lost])
        on_phase(f"loading {len(lost)} stage(s) again; the others keep their weights")
        await asyncio.gather(*(self.stages[i].allocate_kv.remote(
            self.secret, self.plan.num_blocks, self.plan.block_size) for i in lost),
            *(s.forget.remote(self.secret) for i, s in enumerate(self.stages)
              if i not in lost))
        if self.cfg.shard_threads is None:  # stages now sharing a node divide its cores
            self.infos = list(await asyncio.gather(*(
                s.share_cores.remote(self.secret, self._sharing(i))
                for i, s in enumerate(self.stages))))
        return lost

    @property
    def _cuda(self) -> bool:
        return self.cfg.device.startswith("cuda")

    def _place_budgets(self) -> list[int]:
        """What each place may hold, for ``--placement auto``: ``--stage-budget`` each, or
        on CPU each alive node's Ray memory, on CUDA each GPU's free memory (as a GPU
        worker saw its device; one per GPU Ray counts)."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if self._cuda:
            gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
            seen = [d for d in (self.device_facts or {}).get("devices", [])
                    if d["kind"] == "cuda"]
            per = parse_bytes(self.cfg.stage_budget) if self.cfg.stage_budget != "auto" \
                else (seen[0]["free_bytes"] if seen else 0)
            return [per] * gpus
        if self.cfg.stage_budget != "auto":
            return [parse_bytes(self.cfg.stage_budget)] * len(nodes)
        return [int(n["Resources"].get("memory", 0)) for n in nodes]

    async def _place(self) -> None:
        """Reserve one bundle per stage and check each stage fits its node's budget."""
        nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        strategy = "SPREAD" if len(nodes) > 1 else "PACK"
        n = len(self.stage_plans)
        bundle = {"CPU": STAGE_CPUS, **({"GPU": 1} if self.cfg.device.startswith("cuda") else {})}
        self.group = placement_group([bundle] * n, strategy=strategy,
                                     name=f"{self.name}-stages")
        try:
            await asyncio.wait_for(self.group.ready(), PLACEMENT_TIMEOUT_S)
        except TimeoutError:
            cpus = sum(node["Resources"].get("CPU", 0) for node in nodes.values())
            raise Unavailable(
                f"Ray could not reserve {n} pipeline stages of {STAGE_CPUS} CPU each within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (the cluster has {cpus:g} CPUs over "
                f"{len(nodes)} node(s), some of them in use); add nodes or ask for fewer "
                "--shards") from None
        self.places = self._bundle_places(nodes)
        try:
            check_budgets(self.stage_plans, self.places)
        except QuotaExceeded:  # even work does not fit these places: try even bytes
            by_bytes = split_layers(self.model_config, parse_dtype(self.dtype), n,
                                    self.plan.num_blocks, self.plan.block_size, by="bytes")
            check_budgets(by_bytes, self.places)
            self.stage_plans = by_bytes

    def _bundle_places(self, nodes: dict[str, dict]) -> list[Place]:
        """Where each stage's bundle is now, with its budget: ``--stage-budget``, else its
        node's Ray memory shared by the stages there (``nodes``: the alive ones by id)."""
        where = placement_group_table(self.group)["bundles_to_node_id"]
        on_node = [where.get(i) for i in range(len(self.stage_plans))]
        budget = self.cfg.stage_budget
        return [Place(node, self.cfg.device, parse_bytes(budget) if budget != "auto"
                      else int(nodes.get(node, {}).get("Resources", {}).get("memory", 0)
                               // on_node.count(node)))
                for node in on_node]

    @property
    def depth(self) -> int:
        """How many steps may be in flight at once: one per stage."""
        return len(self.stage_plans)

    def submit(self, plan: StepPlan) -> Awaitable[StepOutput]:
        """One step through every stage, now; the last stage's ``StepOutput`` to await
        (it raises if any stage is lost on the way)."""
        if len(self.stages) == 1:
            return self.stages[0].execute.remote(self.secret, plan)
        shared = ray.put(plan)  # one copy in the object store, read by every stage
        hidden, acks = None, []
        for stage in self.stages[:-1]:
            hidden, ack = stage.execute.options(num_returns=2).remote(self.secret, shared,
                                                                      hidden)
            acks.append(ack)
        out = self.stages[-1].execute.remote(self.secret, shared, hidden)
        landed = asyncio.ensure_future(_first(asyncio.gather(out, *acks)))
        landed.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, if dropped
        return landed

    async def warm_kv(self) -> bool:
        """Fault in a little more of every stage's pool; True while some is left."""
        left = await asyncio.gather(*(s.warm_kv.remote(self.secret) for s in self.stages))
        return any(left)

    async def info(self) -> list[dict]:
        """Each stage's own report (asked now) beside its plan: node, device, layers, bytes."""
        reports = await asyncio.gather(*(s.info.remote(self.secret) for s in self.stages),
                                       return_exceptions=True)
        return [self._describe(i, r if isinstance(r, dict) else {"error": str(r)})
                for i, r in enumerate(reports)]

    def described(self) -> list[dict]:
        """The stages as they reported at start, beside their plans."""
        return [self._describe(i, info) for i, info in enumerate(self.infos)]

    def _describe(self, i: int, info: dict) -> dict:
        stage: StagePlan = self.stage_plans[i]
        return {**stage.to_dict(), "node": info.get("node"), "device": info.get("device"),
                "pid": info.get("pid"), "threads": info.get("threads"),
                **({"error": info["error"]} if "error" in info else {}),
                **({"budget_bytes": self.places[i].budget_bytes} if self.places else {})}

    def stop(self) -> None:
        """Kill every stage and give back the placement group."""
        for stage in self.stages:
            with contextlib.suppress(ValueError):
                ray.kill(stage)
        self.stages = []
        if self.group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.group)
            self.group = None
