"""The step loop: schedule → run → postprocess, for many requests at once.

``LLMEngine`` is used in-process (``llmos generate``, ``llmos bench core``) and
inside the kernel actor, where its runner is a ModelShard actor instead of a
local ``ModelRunner``. It owns everything that is not tensors: requests,
sequences, the scheduler and block manager, detokenization, stop conditions,
beam bookkeeping, grammar constraints and usage accounting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llmos_kernel import adapters
from llmos_kernel.core.beam import BeamSearch
from llmos_kernel.core.sampling import SamplingParams, StopChecker
from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.engine.block_manager import BlockManager
from llmos_kernel.engine.plan_state import PlanSender
from llmos_kernel.engine.runner import SeqStep, StepOutput, StepPlan
from llmos_kernel.engine.scheduler import Schedule, Scheduler, SchedulerConfig
from llmos_kernel.engine.sequence import Sequence, Status
from llmos_kernel.errors import (
    AlreadyExists,
    ContextOverflow,
    InvalidArgument,
    LlmosError,
    NotFound,
    QuotaExceeded,
)
from llmos_kernel.wire import Usage


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    owner: int = 0
    cache_salt: str = ""
    keep_context: bool = False  # park the KV after finishing, for a follow-up request
    context: str | None = None  # continue this parked context; prompt_ids are appended
    constraint: Any = None  # a grammar matcher (llmos_kernel.engine.grammar)
    adapter: str | None = None  # a LoRA adapter in the model store (None: the base model)
    prompt_logprobs: bool = False  # score the prompt: log p(token i | tokens < i), i >= 1


@dataclass
class Delta:
    """What one step produced for one request (tokens are new since the last delta)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[list]] | None = None  # per token: [token id, logprob] best first
    context_id: str | None = None
    error: dict | None = None  # {"type", "message"} when finish_reason is "error"
    prompt_logprobs: list[float] | None = None  # with the first token: prompt tokens 1..n-1


class Runner(Protocol):
    def execute(self, plan: StepPlan) -> StepOutput: ...


@dataclass
class _RequestState:
    req: Request
    seqs: list[Sequence]
    arrival: float
    detok: Any
    stop: StopChecker
    beam: BeamSearch | None = None
    text_len: int = 0
    emitted_tokens: int = 0
    beam_candidates: dict[int, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 1024  # the KV pool (the memory plan sizes it)
    prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's context length
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


class LLMEngine:
    def __init__(self, tokenizer: Tokenizer, runner: Runner, context_length: int,
                 cfg: EngineConfig | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        self.tokenizer, self.runner = tokenizer, runner
        self.max_model_len = min(cfg.max_model_len or context_length, context_length)
        # A sequence stops ("length") before it outgrows the whole pool, where it would be
        # preempted forever.
        self.max_seq_tokens = min(self.max_model_len, cfg.num_blocks * cfg.block_size)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        self.plan_sender = PlanSender()  # what the runner holds of each sequence's lists
        self.requests: dict[str, _RequestState] = {}
        self._seq_of: dict[int, Sequence] = {}
        self._next_seq = 0
        self.steps_planned = 0  # steps scheduled so far (a request's steps_waited counts from it)
        self._failed: list[Delta] = []  # requests ended by an error while scheduling
        self.stats = {"steps": 0, "tokens_computed": 0, "tokens_generated": 0,
                      "step_seconds": 0.0, "last_step_s": 0.0, "last_step_tokens": 0}

    # -- requests -----------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise AlreadyExists(f"request id {req.request_id!r} is already in use")
        params = req.params.validate(self.tokenizer.vocab_size)
        if not isinstance(req.priority, int) or isinstance(req.priority, bool):
            raise InvalidArgument(f"priority must be an int, got {req.priority!r}")
        prompt = list(req.prompt_ids)
        parked = None
        if req.context is not None:
            parked = self.scheduler.parked.get(req.context)
            if parked is None:
                raise NotFound(f"no parked context {req.context!r} (it was released or never kept)")
            prompt = parked.token_ids + prompt
        if not prompt:
            raise InvalidArgument("the prompt is empty: give at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.tokenizer.vocab_size for t in prompt):
            raise InvalidArgument(f"prompt token ids must be ints in [0, {self.tokenizer.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens but the model's context holds "
                f"{self.max_model_len}; shorten it (or trim the conversation) to at most "
                f"{self.max_model_len - 1} tokens")
        blocks_needed = -(-len(prompt) // self.cfg.block_size) + 1
        if blocks_needed > self.cfg.num_blocks:
            raise QuotaExceeded(
                f"the prompt needs {blocks_needed} KV blocks but the whole pool has "
                f"{self.cfg.num_blocks}; raise the kernel's --kv-budget or shorten the prompt")
        if req.adapter is not None:
            adapters.read_meta(req.adapter)  # NotFound names the adapters there are
        if req.prompt_logprobs and req.context is not None:
            raise InvalidArgument("prompt_logprobs scores a whole prompt; it cannot continue "
                                  "a kept context")
        if parked is not None:
            self.scheduler.unpark(req.context)
        seq = self._new_seq(req, prompt, params)
        if parked is not None:
            seq.table, seq.num_computed, seq.swap_handle = parked.table, parked.num_computed, parked.swap_handle
            seq.num_cached = parked.num_computed
        state = _RequestState(req, [seq], time.monotonic(),
                              self.tokenizer.incremental_decoder(skip_special_tokens=True),
                              StopChecker(params.stop))
        if params.num_beams > 1 and req.constraint is not None:
            raise InvalidArgument("beam search cannot be combined with a grammar "
                                  "(tools or response_format); use num_beams=1")
        if params.num_beams > 1:
            state.beam = BeamSearch(params.num_beams, self._stop_ids(params), params.max_tokens,
                                    params.length_penalty, params.no_repeat_ngram_size, prompt)
        self.requests[req.request_id] = state
        self.scheduler.add(seq)

    def _new_seq(self, req: Request, prompt: list[int], params: SamplingParams) -> Sequence:
        self._next_seq += 1
        salt = req.cache_salt or f"owner:{req.owner}"
        if req.adapter is not None:  # another adapter's KV is another model's
            salt += f"\0adapter:{req.adapter}"
        if req.prompt_logprobs:  # every prompt row computed: no cached prefix
            salt += f"\0scored:{req.request_id}:{self._next_seq}"
        seq = Sequence(self._next_seq, req.request_id, prompt, params, req.priority, req.owner,
                       salt, arrival_step=self.steps_planned)
        seq.constraint, seq.adapter = req.constraint, req.adapter
        if req.prompt_logprobs:
            seq.prompt_logprobs = []
        self._seq_of[seq.seq_id] = seq
        return seq

    def abort(self, request_id: str) -> Delta:
        state = self.requests.get(request_id)
        if state is None:
            raise NotFound(f"no request {request_id!r} is running (finished, cancelled or unknown)")
        return self._finish(state, "abort", keep=False)

    def suspend_context(self, context_id: str) -> bool:
        """Snapshot a kept context to host memory now (the kernel also does it under pressure)."""
        if context_id not in self.scheduler.parked:
            raise NotFound(f"no parked context {context_id!r}")
        return self.scheduler.suspend(context_id)

    def release_context(self, context_id: str) -> None:
        if context_id not in self.scheduler.parked:
            raise NotFound(f"no parked context {context_id!r}")
        self.scheduler.drop_parked(context_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.scheduler.has_work()

    def forget_kv(self) -> None:
        """After a runner restart: nothing computed survives; every request recomputes."""
        self.blocks = BlockManager(self.cfg.num_blocks, self.cfg.block_size, self.cfg.prefix_caching)
        self.scheduler.forget_kv(self.blocks)
        self.plan_sender.clear()  # the new runner holds no sequence's lists either
        for state in self.requests.values():
            state.beam_candidates.clear()  # the beams recompute them

    # -- the step -----------------------------------------------------------
    def schedule(self, parts: int = 1) -> tuple[Schedule, StepPlan]:
        """The next step's plan; its sequences are in flight until ``postprocess`` (with
        ``parts`` > 1, one of that many steps in flight at once: Scheduler.schedule)."""
        sched = self.scheduler.schedule(parts)
        plan = StepPlan(swap_out=sched.swap_out, swap_in=sched.swap_in,
                        drop_swap=sched.drop_swap, copies=sched.copies)
        now = time.monotonic()
        if sched.works:
            self.steps_planned += 1
        for work in sched.works:
            seq = work.seq
            if seq.first_scheduled is None:
                seq.first_scheduled, seq.first_step = now, self.steps_planned
            start = seq.num_computed
            step = SeqStep(seq.seq_id, seq.token_ids[start:start + work.num_tokens], start,
                           list(seq.table.blocks), adapter=seq.adapter)
            if seq.prompt_logprobs is not None and start + 1 < len(seq.prompt_ids):
                step.prompt_targets = seq.prompt_ids[
                    start + 1:min(start + work.num_tokens + 1, len(seq.prompt_ids))]
            if start + work.num_tokens == seq.num_tokens:
                try:
                    self._sampling_fields(seq, step)
                except Exception as e:  # noqa: BLE001 - a broken constraint fails its request only
                    self._fail(seq.request_id, e)
                    self.scheduler.landed([seq])  # no step computes it: its blocks go now
                    continue
            self.plan_sender.encode(step)
            plan.seqs.append(step)
        if plan.seqs:  # a plan without steps may not be run: release with the next one
            s = self.scheduler
            plan.release = self.plan_sender.release(
                {q.seq_id for q in (*s.running, *s.swapped, *s.waiting, *s.parked.values())})
        return sched, plan

    def _fail(self, request_id: str, error: Exception) -> None:
        """End one request with an error delta; everyone else's step goes on."""
        state = self.requests.get(request_id)
        if state is None:
            return
        delta = self._finish(state, "error", keep=False)
        wire = error.to_wire() if isinstance(error, LlmosError) else {
            "type": "LlmosError", "message": f"{type(error).__name__}: {error}"}
        delta.error = wire
        self._failed.append(delta)

    def _sampling_fields(self, seq: Sequence, step: SeqStep) -> None:
        params = seq.params
        step.params = params
        step.output_ids = seq.output_ids
        if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size:
            step.prompt_ids = seq.prompt_ids
        if params.num_beams > 1:
            step.beam_width = self.requests[seq.request_id].beam.candidates
        else:
            step.sample = True
        if seq.constraint is not None:
            step.allowed = seq.constraint.allowed_mask()

    def step(self) -> list[Delta]:
        sched, plan = self.schedule()
        if not plan.seqs and not (plan.swap_out or plan.swap_in or plan.copies
                                  or plan.drop_swap):
            return []
        return self.postprocess(sched, self.runner.execute(plan))

    def postprocess(self, sched: Schedule, out: StepOutput) -> list[Delta]:
        """Apply one step's output; steps in flight together are postprocessed in the order
        they were scheduled."""
        self.scheduler.landed(w.seq for w in sched.works)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += out.seconds
        self.stats["last_step_s"] = out.seconds
        self.stats["last_step_tokens"] = sched.num_tokens
        self.stats["tokens_computed"] += sched.num_tokens
        deltas: dict[str, Delta] = {d.request_id: d for d in self._failed}
        self._failed.clear()
        beam_rounds: set[str] = set()
        now = time.monotonic()
        for work in sched.works:
            seq = work.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step ran
            scored = out.prompt_logprobs.get(seq.seq_id)
            if scored is not None and len(seq.prompt_logprobs) == seq.num_computed:
                seq.prompt_logprobs.extend(scored)  # (a recomputed chunk is scored once)
            self.scheduler.computed(seq, work.num_tokens)
            state = self.requests.get(seq.request_id)
            if state is None:
                continue
            if seq.seq_id in out.beams:
                state.beam_candidates[seq.seq_id] = out.beams[seq.seq_id]
                beam_rounds.add(seq.request_id)
                continue
            token = out.tokens.get(seq.seq_id)
            if token is None:
                continue
            delta = deltas.setdefault(seq.request_id, Delta(seq.request_id))
            if seq.first_token_at is None:
                seq.first_token_at = now
                delta.prompt_logprobs = seq.prompt_logprobs
            seq.output_ids.append(token)
            if seq.seq_id in out.logprobs:
                seq.logprobs.append(out.logprobs[seq.seq_id])
            if seq.seq_id in out.top_logprobs:
                seq.top_logprobs.append(out.top_logprobs[seq.seq_id])
            self.stats["tokens_generated"] += 1
            self._on_token(state, seq, token, delta)
        for request_id in beam_rounds:
            state = self.requests.get(request_id)
            if state is not None:
                delta = self._beam_round(state)
                if delta is not None:
                    deltas[request_id] = delta
        return list(deltas.values())

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= set(self.tokenizer.stop_token_ids)
        return ids

    def _on_token(self, state: _RequestState, seq: Sequence, token: int, delta: Delta) -> None:
        params = seq.params
        delta.token_ids.append(token)
        if seq.logprobs and params.logprobs:
            delta.logprobs = (delta.logprobs or []) + [seq.logprobs[-1]]
        if params.top_logprobs:
            top = seq.top_logprobs[-1] if len(seq.top_logprobs) == len(seq.output_ids) else []
            delta.top_logprobs = (delta.top_logprobs or []) + [[list(t) for t in top]]
        reason = None
        if seq.constraint is not None:
            try:
                seq.constraint.advance(token)
            except Exception as e:  # noqa: BLE001 - a broken constraint fails its request only
                self._fail(seq.request_id, e)
                failed = self._failed.pop()
                delta.finished, delta.finish_reason, delta.error = True, "error", failed.error
                delta.usage = failed.usage
                return
        if token in self._stop_ids(params):
            reason = "stop"
        else:
            text, stopped = state.stop.push(state.detok.push(token))
            delta.text += text
            if stopped or seq.constraint is not None and seq.constraint.is_done():
                reason = "stop"
        if reason is None and (len(seq.output_ids) >= params.max_tokens
                               or seq.num_tokens >= self.max_seq_tokens):
            reason = "length"
        if reason is not None:
            if reason == "length":
                delta.text += state.stop.push(state.detok.flush())[0] + state.stop.flush()
            final = self._finish(state, reason, keep=state.req.keep_context)
            delta.finished, delta.finish_reason = True, reason
            delta.usage, delta.context_id = final.usage, final.context_id

    def _beam_round(self, state: _RequestState) -> Delta | None:
        """All live beams of a request have next-token candidates (from this step or
        earlier ones, when a step's budget split them): advance the search."""
        live = [s for s in state.seqs if s.status is Status.RUNNING]
        if any(s.seq_id not in state.beam_candidates for s in live):
            return None  # some beam was not in this step; wait for it
        vocab = self.tokenizer.vocab_size
        logprobs = torch.full((len(live), vocab), float("-inf"))
        for i, s in enumerate(live):
            ids, vals = zip(*state.beam_candidates[s.seq_id])
            logprobs[i, list(ids)] = torch.tensor(vals)
        state.beam_candidates.clear()
        chosen = state.beam.step([s.output_ids for s in live], logprobs)
        if live[0].first_token_at is None:
            for s in live:
                s.first_token_at = time.monotonic()
        before = [list(s.output_ids) for s in live]
        new_seqs: list[Sequence] = []
        used: set[int] = set()
        for parent_idx, token in chosen:
            parent = live[parent_idx]
            if parent_idx in used:
                seq = self._new_seq(state.req, parent.prompt_ids, parent.params)
                seq.output_ids = list(before[parent_idx])
                seq.table = self.blocks.fork(parent.table)
                seq.num_computed, seq.status = parent.num_computed, Status.RUNNING
                seq.first_scheduled, seq.first_token_at = parent.first_scheduled, parent.first_token_at
                seq.arrival_step, seq.first_step = parent.arrival_step, parent.first_step
                self.scheduler.running.append(seq)
            else:
                seq = parent
                used.add(parent_idx)
            seq.output_ids.append(token)
            new_seqs.append(seq)
        for i, s in enumerate(live):
            if i not in used:
                self.scheduler.remove(s)
                s.status = Status.FINISHED
                self._seq_of.pop(s.seq_id, None)
        state.seqs = new_seqs or live[:1]  # keep one for the usage record
        if state.beam.done or not new_seqs:
            best, _ = state.beam.best()
            delta = self._finish(state, "length" if len(best) >= state.req.params.max_tokens
                                 else "stop", keep=False)
            delta.token_ids = list(best)
            delta.text = self.tokenizer.decode(
                [t for t in best if t not in self._stop_ids(state.req.params)],
                skip_special_tokens=True)
            return delta
        return None

    def _finish(self, state: _RequestState, reason: str, keep: bool) -> Delta:
        req = state.req
        self.requests.pop(req.request_id, None)
        main = state.seqs[0]
        now = time.monotonic()
        usage = Usage(
            prompt_tokens=len(main.prompt_ids), cached_tokens=main.num_cached,
            completion_tokens=len(main.output_ids),
            queue_s=(main.first_scheduled or now) - state.arrival,
            ttft_s=(main.first_token_at or now) - state.arrival,
            steps_waited=max((main.first_step or self.steps_planned) - main.arrival_step - 1, 0),
            total_s=now - state.arrival, preemptions=sum(s.preemptions for s in state.seqs))
        delta = Delta(req.request_id, finished=True, finish_reason=reason, usage=usage)
        for seq in state.seqs:
            self._seq_of.pop(seq.seq_id, None)
            if keep and seq is main and seq.status is Status.RUNNING:
                self.scheduler.park(req.request_id, seq)
                delta.context_id = req.request_id
            else:
                self.scheduler.remove(seq)
                seq.status = Status.FINISHED
        return delta

    # -- convenience --------------------------------------------------------
    def run_until_done(self) -> dict[str, list[Delta]]:
        """Step until every request finishes; every delta, grouped by request."""
        collected: dict[str, list[Delta]] = {}
        while self.has_unfinished():
            for delta in self.step():
                collected.setdefault(delta.request_id, []).append(delta)
        return collected
