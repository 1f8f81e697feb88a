"""The kernel's LLM service: one engine loop over a supervised pipeline of ModelShards.

Requests from every client (agent hosts, the CLI, benchmarks) join one engine.
Each step the kernel schedules, sends the pipeline one plan (one shard, or
``shards`` stages chained through the object store: llmos_kernel.stages), and fans
the results out to per-client outboxes that clients long-poll, so a client gets
one delivery per step however many of its requests advanced.

One shard: one step in flight at a time. ``shards`` stages: up to that many steps in
flight over disjoint sequences (the scheduler never schedules, preempts or frees a
sequence whose step is out), so each stage computes one while the next stage
computes another; steps land and are postprocessed in the order they were
scheduled. If a shard dies the kernel drops every step in flight, starts the
pipeline again and recomputes every request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from llmos_kernel import adapters, wire
from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.core.tokenizer import validate_messages
from llmos_kernel.engine.assembly import LLMConfig, assemble
from llmos_kernel.engine.engine import Delta, Request
from llmos_kernel.engine.scheduler import Schedule
from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from llmos_kernel.latency import Latency
from llmos_kernel.outbox import Outboxes
from llmos_kernel.stages import Pipeline

log = logging.getLogger("llmos.llm")

TOOL_STRING_LIMIT = 128  # chars per unbounded string argument, so a call always closes
MAX_SHARD_RESTARTS = 5  # within SHARD_RESTART_WINDOW_S, then the service gives up
SHARD_RESTART_WINDOW_S = 60.0


class LLMService:
    def __init__(self, cfg: LLMConfig, name: str, outboxes: Outboxes,
                 on_usage: Callable[[int, Any], None] | None = None):
        self.cfg, self.name, self.outboxes = cfg, name, outboxes
        self.device_facts: dict | None = None  # a GPU worker's view of a CUDA device
        self.on_usage = on_usage or (lambda owner, usage: None)
        self.client_of: dict[str, tuple[str, int]] = {}  # request id -> (client, owner pid)
        self.pipeline: Pipeline | None = None
        self._shard_secret = secrets.token_hex(16)  # what the shard's methods ask of callers
        self.shard_restarts: collections.deque[float] = collections.deque()
        self.total_shard_restarts = 0
        self.stage_replacements = 0  # stages re-placed alone, the others kept
        self.failed: str | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._meter: collections.deque[tuple[float, int]] = collections.deque()
        self._grammars = None  # GrammarCompiler, built on first constrained request
        self._steps: collections.deque[float] = collections.deque(maxlen=256)  # step seconds
        self.latency = Latency()
        # steps submitted and not yet landed: now, the most at once, and how many steps
        # were submitted while another was in flight (stages overlapping)
        self.in_flight = {"now": 0, "max": 0, "overlapped_steps": 0}
        self.phase = "not started"  # what start() is doing, for a starting kernel's progress

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        facts = None
        if self.cfg.device.startswith("cuda"):
            self.phase = "asking a GPU worker what its CUDA device holds"
            facts = await cuda_facts()
        self.phase = f"reading {Path(self.cfg.model).name}'s metadata and tokenizer"
        built = assemble(self.cfg, device_facts=facts)  # steps run in the shard, not here
        self.device_facts = facts
        self.engine, self.tokenizer, self.plan = built.engine, built.tokenizer, built.plan
        self.model_path, self.model_config, self.dtype = str(built.model_path), \
            built.model_config, built.dtype
        await self._start_shard()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _start_shard(self) -> None:
        self.pipeline = Pipeline(self.name, self._shard_secret, self.cfg, self.model_path,
                                 self.model_config, self.dtype, self.plan,
                                 self.device_facts)

        def on_phase(phase: str) -> None:
            self.phase = phase

        await self.pipeline.start(on_phase)
        self.shard_info = self.pipeline.infos[0]
        self.phase = "ready"
        self._kv_cold = True  # a new pool: faulted in while the kernel is idle (see _loop)

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        if self.pipeline is not None:
            self.pipeline.stop()

    # -- requests -------------------------------------------------------------
    def submit(self, client: str, spec: dict, *, owner: int = 0, priority: int = 0,
               salt: str = "", kv_bytes_limit: int | None = None,
               token_budget: int | None = None) -> str:
        """Queue one generation; returns its request id (results go to the client's outbox)."""
        if self.failed:
            raise Unavailable(f"the LLM service is down: {self.failed}")
        if not isinstance(spec, dict):
            raise InvalidArgument(f"a request must be a dict, got {type(spec).__name__}")
        unknown = set(spec) - REQUEST_FIELDS
        if unknown:
            raise InvalidArgument(f"unknown request field(s): {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(sorted(REQUEST_FIELDS))}")
        request_id = spec.get("request_id") or uuid.uuid4().hex[:16]
        if not isinstance(request_id, str) or len(request_id) > 128:
            raise InvalidArgument("request_id must be a string of at most 128 characters")
        if request_id in self.engine.requests:
            raise AlreadyExists(f"request id {request_id!r} is already running")
        params = SamplingParams.from_dict(spec.get("params") or {})
        prompt_ids = self._prompt_ids(spec)
        context = spec.get("context")
        if context is not None:
            parked = self.engine.scheduler.parked.get(context) if isinstance(context, str) else None
            if parked is None or parked.owner != owner:
                raise NotFound(f"no kept context {context!r} of yours (released, never kept, "
                               "or dropped by a kernel restart)")
            prompt_len = parked.num_tokens + len(prompt_ids)
        else:
            prompt_len = len(prompt_ids)
        if token_budget is not None:
            if prompt_len >= token_budget:
                raise QuotaExceeded(f"this request needs {prompt_len} prompt tokens but only "
                                    f"{token_budget} remain in the process's token quota")
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens,
                                                                token_budget - prompt_len))
        if kv_bytes_limit is not None:
            need = (prompt_len + params.max_tokens) * self.plan.kv_bytes_per_block \
                // self.plan.block_size
            if need > kv_bytes_limit:
                raise QuotaExceeded(f"this request may hold {need} KV bytes, over the "
                                    f"process's kv_bytes quota of {kv_bytes_limit}; lower "
                                    "max_tokens or shorten the prompt")
        adapter = spec.get("adapter")
        if adapter is not None:
            if not isinstance(adapter, str):
                raise InvalidArgument("adapter must be the name of a LoRA adapter")
            adapters.check_base(adapters.read_meta(adapter), Path(self.model_path), adapter)
        constraint = self.constraint_for(spec)
        req = Request(request_id, prompt_ids, params, priority=priority, owner=owner,
                      cache_salt=salt, keep_context=bool(spec.get("keep_context", False)),
                      context=context, constraint=constraint, adapter=adapter,
                      prompt_logprobs=bool(spec.get("prompt_logprobs", False)))
        self.engine.add_request(req)
        self.client_of[request_id] = (client, owner)
        self._wake.set()
        return request_id

    def _prompt_ids(self, spec: dict) -> list[int]:
        given = [k for k in ("prompt", "messages", "prompt_ids") if spec.get(k) is not None]
        if len(given) != 1:
            raise InvalidArgument("give exactly one of prompt (text), messages (chat) or "
                                  "prompt_ids (tokens)")
        if "messages" in given:
            messages = spec["messages"]
            if spec.get("tools"):
                from llmos_kernel.engine.tool_calls import messages_with_tools

                messages = messages_with_tools(messages, spec["tools"],
                                               spec.get("tool_choice", "auto"))
            messages = validate_messages(messages)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if "prompt" in given:
            if not isinstance(spec["prompt"], str):
                raise InvalidArgument("prompt must be a string")
            return self.tokenizer.encode(spec["prompt"])
        ids = spec["prompt_ids"]
        if not isinstance(ids, list | tuple):
            raise InvalidArgument("prompt_ids must be a list of ints")
        return list(ids)

    def constraint_for(self, spec: dict):
        """A grammar matcher for ``tools`` / ``response_format`` (None when unconstrained)."""
        tools, response_format = spec.get("tools"), spec.get("response_format")
        if not tools and response_format is None:
            return None
        from llmos_kernel.engine.grammar import GrammarCompiler
        from llmos_kernel.engine.tool_calls import response_format_grammar, tool_call_grammar

        if tools and response_format is not None:
            raise InvalidArgument("give tools or response_format, not both")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer)
        grammar = (tool_call_grammar(self._grammars, tools, spec.get("tool_choice", "auto"),
                                     max_string_length=TOOL_STRING_LIMIT)
                   if tools else response_format_grammar(self._grammars, response_format))
        return grammar.matcher() if grammar is not None else None

    def cancel(self, client: str, request_id: str, owner: int | None = None) -> None:
        target = self.client_of.get(request_id)
        if target is None or target[0] != client or (owner is not None and target[1] != owner):
            raise NotFound(f"no request {request_id!r} of yours is running")
        delta = self.engine.abort(request_id)
        self._deliver([delta])

    def release_context(self, context_id: str, owner: int | None = None) -> None:
        parked = self.engine.scheduler.parked.get(context_id)
        if parked is None or (owner is not None and parked.owner != owner):
            raise NotFound(f"no kept context {context_id!r} of yours")
        self.engine.release_context(context_id)
        self._wake.set()  # its swapped bytes are dropped by the next plan

    def tokenize(self, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgument("tokenize takes a string")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, text: Any = None, messages: Any = None) -> int:
        if (text is None) == (messages is None):
            raise InvalidArgument("count takes text or messages, not both")
        if text is not None:
            return len(self.tokenize(text))
        rendered = self.tokenizer.apply_chat_template(validate_messages(messages),
                                                      add_generation_prompt=True)
        return len(self.tokenizer.encode(rendered, add_special_tokens=False))

    def info(self) -> dict:
        return {"model": Path(self.model_path).name, "context_length": self.engine.max_model_len,
                "vocab_size": self.tokenizer.vocab_size, "params": self.model_config.n_params}

    # -- the loop -------------------------------------------------------------
    async def _loop(self) -> None:
        in_flight: collections.deque[tuple[Schedule, Any, float]] = collections.deque()
        while True:
            depth = self.pipeline.depth  # 1 unsplit: one step at a time, as ever
            while len(in_flight) < depth and self.engine.scheduler.has_work():
                sched, plan = self.engine.schedule(depth)
                if not plan.seqs and not (plan.swap_out or plan.swap_in or plan.copies
                                          or plan.drop_swap):
                    break  # the rest is in flight, or waits on memory it or parked work holds
                in_flight.append((sched, self.pipeline.submit(plan), time.perf_counter()))
                self.in_flight["max"] = max(self.in_flight["max"], len(in_flight))
                self.in_flight["overlapped_steps"] += len(in_flight) > 1
            self.in_flight["now"] = len(in_flight)
            if not in_flight:
                if self.engine.scheduler.has_work():
                    await asyncio.sleep(0.005)  # everything waits on memory held by parked work
                elif self._kv_cold:  # idle: fault in a little more of the pool, then look again
                    try:
                        self._kv_cold = await self.pipeline.warm_kv()
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                        self._kv_cold = False  # the next step finds it dead and restarts it
                else:
                    self._wake.clear()
                    await self._wake.wait()
                continue
            sched, result, started = in_flight[0]
            try:
                out = await result
            except ray.exceptions.RayError as e:
                if not _stage_lost(e):
                    raise
                # every step in flight is lost with the pipeline: _recover_shard recomputes
                # their sequences (forget_kv), or aborts them when it gives up
                self.engine.scheduler.landed(w.seq for step in in_flight for w in step[0].works)
                in_flight.clear()
                self.in_flight["now"] = 0
                await self._recover_shard(e)
                continue
            in_flight.popleft()  # the oldest lands first, so steps postprocess in order
            deltas = self.engine.postprocess(sched, out)
            self._meter.append((time.monotonic(), len(out.tokens)))
            self._steps.append(time.perf_counter() - started)
            self._deliver(deltas)
            await asyncio.sleep(0)  # let submissions and polls in between steps

    async def _recover_shard(self, error: Exception) -> None:
        now = time.monotonic()
        self.shard_restarts.append(now)
        self.total_shard_restarts += 1
        while self.shard_restarts and now - self.shard_restarts[0] > SHARD_RESTART_WINDOW_S:
            self.shard_restarts.popleft()
        log.warning("model shard died (%s); restart %d", error, self.total_shard_restarts)
        if len(self.shard_restarts) > MAX_SHARD_RESTARTS:
            self.failed = f"the model shard died {len(self.shard_restarts)} times in a minute"
            for request_id in list(self.engine.requests):
                self._deliver([self.engine.abort(request_id)], error=self.failed)
            return
        self.engine.forget_kv()
        try:
            lost = await self.pipeline.replace_lost(lambda phase: setattr(self, "phase", phase))
        except (Unavailable, QuotaExceeded, ray.exceptions.RayError) as e:
            log.warning("restarting the whole pipeline: %s", e)
            self.pipeline.stop()
            await self._start_shard()
        else:
            self.stage_replacements += len(lost)
            self.shard_info = self.pipeline.infos[0]
            self.phase = "ready"
            self._kv_cold = True  # the new stages' pools: faulted in while idle

    def _deliver(self, deltas: list[Delta], error: str | None = None) -> None:
        for delta in deltas:
            target = self.client_of.get(delta.request_id)
            if delta.finished:
                self.client_of.pop(delta.request_id, None)
                if delta.usage is not None:
                    self.latency.record(delta.usage)
                if target is not None and delta.usage is not None:
                    self.on_usage(target[1], delta.usage)
            if target is not None:
                self.outboxes.put(target[0], token_delta(target[1], delta, error))

    def configure(self, options: Any) -> dict:
        if not isinstance(options, dict):
            raise InvalidArgument("configure takes a dict of options")
        sched = self.engine.scheduler.cfg
        for key, value in options.items():
            if key == "prefix_caching" and isinstance(value, bool):
                self.engine.blocks.prefix_caching = value
            elif key in ("max_batch_tokens", "max_seqs") and isinstance(value, int) and value > 0:
                setattr(sched, key, value)
            else:
                raise InvalidArgument(f"cannot set {key}={value!r}; settable: prefix_caching "
                                      "(bool), max_batch_tokens, max_seqs (positive ints)")
        return {"prefix_caching": self.engine.blocks.prefix_caching,
                "max_batch_tokens": sched.max_batch_tokens, "max_seqs": sched.max_seqs}

    # -- status ---------------------------------------------------------------
    async def shard_status(self) -> dict:
        """The first shard's own report, asked now (its pid changes when it is restarted)."""
        if self.pipeline is None or not self.pipeline.stages:
            return {"error": "no model shard yet"}
        try:
            return await self.pipeline.stages[0].info.remote(self._shard_secret)
        except ray.exceptions.RayError as e:
            return {"error": str(e)}

    async def stage_status(self) -> list[dict]:
        """Every stage, asked now: node, device, layers, bytes (one entry when unsplit)."""
        if self.pipeline is None:
            return []
        return await self.pipeline.info()

    def throughput(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        while self._meter and now - self._meter[0][0] > window_s:
            self._meter.popleft()
        return sum(n for _, n in self._meter) / window_s

    def status(self) -> dict:
        sched, blocks, stats = self.engine.scheduler, self.engine.blocks, self.engine.stats
        used = blocks.num_blocks - blocks.num_free
        return {
            "model": {"path": self.model_path, "dtype": self.dtype, "device": self.cfg.device,
                      "params": self.model_config.n_params,
                      "context_length": self.model_config.context_length},
            "memory": {**self.plan.to_dict(), "devices": self.shard_info["devices"],
                       "kv_blocks_used": used, "kv_blocks_free": blocks.num_free,
                       "kv_bytes_used": used * self.plan.kv_bytes_per_block,
                       "kv_blocks_cached": len(blocks.cached),
                       "swap_blocks_used": sched.swap.used},
            "queues": {"running": len(sched.running), "waiting": len(sched.waiting),
                       "swapped": len(sched.swapped), "parked": len(sched.parked)},
            "preemptions": dict(sched.preemptions), "express_steps": sched.express_steps,
            "prefix_cache": {"hit_tokens": blocks.hits, "query_tokens": blocks.queries,
                             "hit_rate": blocks.hits / blocks.queries if blocks.queries else 0.0},
            "throughput_tok_s": self.throughput(),
            "latency": self.latency.to_dict(),
            "step_p50_s": sorted(self._steps)[len(self._steps) // 2] if self._steps else None,
            "engine": dict(stats),
            "shard": {"restarts": self.total_shard_restarts, "failed": self.failed,
                      "stages_replaced": self.stage_replacements,
                      **{k: v for k, v in self.shard_info.items() if k != "devices"}},
            "stages": self.pipeline.described() if self.pipeline is not None else [],
            "steps_in_flight": dict(self.in_flight),
        }


def _stage_lost(error: BaseException) -> bool:
    """Whether a step failed because a stage (its actor, or the node under it) is gone:
    the stage's own call, or the next stage's, whose input died with it."""
    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.ObjectLostError)
    while error is not None:
        if isinstance(error, lost):
            return True
        error = getattr(error, "cause", None) if isinstance(
            error, ray.exceptions.RayTaskError) else None
    return False


CUDA_PROBE_TIMEOUT_S = 60.0


def _cuda_facts() -> dict:
    """In a Ray worker given a GPU: the devices it sees, and whether it has bf16."""
    import dataclasses

    import torch

    from llmos_kernel.memory import devices

    return {"devices": [dataclasses.asdict(d) for d in devices()],
            "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}


async def cuda_facts() -> dict:
    """The CUDA device as a GPU worker sees it. The kernel actor asks Ray for no GPU (it
    computes nothing), so Ray hides every CUDA device from it; its memory plan and ``auto``
    dtype need one seen by a process that holds it, as the model shards will."""
    probe = ray.remote(num_gpus=1, num_cpus=0)(_cuda_facts)
    try:
        facts = await asyncio.wait_for(probe.remote(), CUDA_PROBE_TIMEOUT_S)
    except TimeoutError:
        raise Unavailable(f"no Ray worker with a free GPU within {CUDA_PROBE_TIMEOUT_S:.0f} s; "
                          "start the kernel on a cluster with GPUs, or use --device cpu"
                          ) from None
    if not any(d["kind"] == "cuda" for d in facts["devices"]):
        raise Unavailable("Ray gave a worker a GPU but torch sees no CUDA device there "
                          "(a torch build without CUDA?); use --device cpu")
    return facts


def token_delta(pid: int, delta: Delta, error: str | None = None) -> wire.TokenDelta:
    """The engine's delta as it crosses to the client that asked."""
    failed = wire.failure(Unavailable(error)).error if error else \
        wire.ErrorInfo(**delta.error) if delta.error else None
    return wire.TokenDelta(pid, delta.request_id, delta.token_ids, delta.text, delta.finished,
                           delta.finish_reason, delta.usage, delta.logprobs, delta.context_id,
                           failed, delta.top_logprobs, delta.prompt_logprobs)


REQUEST_FIELDS = {"request_id", "prompt", "messages", "prompt_ids", "params", "keep_context",
                  "context", "tools", "tool_choice", "response_format", "adapter",
                  "prompt_logprobs"}
