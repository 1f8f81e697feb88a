"""The tensors side of a step: move KV blocks, run the model, sample.

A ``StepPlan`` is plain data (it crosses a Ray call when the runner lives in a
ModelShard actor): the sequences' new tokens and block tables, the block
copies and swaps to do first, and how each row samples. The runner keeps no
per-sequence state but swapped-out KV and the lists the plans sent it (block
tables, ids: plan_state), which the engine forgets together with the KV when a
runner dies, so the kernel can always rebuild everything by recomputation.

On a CUDA device the weights and the KV pool live there; a step is built on the host
and moved there once (``StepBatch.to``), and what leaves the device (the next-token
logits for the host's sampler, a stage's hidden states for the next stage through
Ray's object store) is copied to the host: one device-to-host copy per step.

A runner over one pipeline stage (a ``Transformer`` holding layers ``[a, b)`` and a
KV pool of those layers) executes the same plan as every other stage: the same
block moves on its own layers' KV, the same step batch; a stage before the last
returns its hidden states, which the next stage's ``execute`` takes, and only the
last samples. So everything a plan asks for (swaps, copies, grammar masks, LoRA
adapters, prompt logprobs, beams) works the same split or whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.lora import LoraSet
from llmos_kernel.core.model import PrefillChunk, StepBatch, Transformer
from llmos_kernel.core.sampling import SampleRow, SamplingParams, banned_ngram_tokens, sample
from llmos_kernel.engine.plan_state import RunnerState


@dataclass
class SeqStep:
    """One sequence's share of a step. ``blocks``, ``output_ids`` and ``prompt_ids`` hold
    the lists from index ``blocks_at`` / ``output_at`` / ``prompt_at`` on: the runner keeps
    the rest from earlier steps (see plan_state); all three 0 is the whole list."""

    seq_id: int
    tokens: list[int]  # new tokens whose KV this step computes
    start: int  # position of tokens[0]
    blocks: list[int]  # the sequence's block table (from blocks_at)
    sample: bool = False  # sample a next token after the last of ``tokens``
    params: SamplingParams | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # only for repetition_penalty
    allowed: bytes | None = None  # packed little-endian bitmask of grammar-allowed tokens
    beam_width: int = 0  # >0: return this many best (token, logprob) instead of sampling
    adapter: str | None = None  # the LoRA adapter its rows run with (a model store name)
    prompt_targets: list[int] | None = None  # prompt tokens after each of ``tokens``: score them
    blocks_at: int = 0
    output_at: int = 0
    prompt_at: int = 0


@dataclass
class StepPlan:
    seqs: list[SeqStep] = field(default_factory=list)  # single-token steps first
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)
    swap_in: list[tuple[int, list[int]]] = field(default_factory=list)
    drop_swap: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # sequences the runner may forget


@dataclass
class StepOutput:
    tokens: dict[int, int] = field(default_factory=dict)  # seq_id -> sampled token
    logprobs: dict[int, float] = field(default_factory=dict)
    top_logprobs: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    beams: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # of prompt_targets
    seconds: float = 0.0


def unpack_mask(packed: bytes, vocab: int) -> torch.Tensor:
    return _unpack_masks([packed], vocab)[0]


def _unpack_masks(packed: list[bytes | None], vocab: int) -> list[torch.Tensor | None]:
    """Grammar bitmasks to bool rows, all rows in one unpackbits call."""
    present = [p for p in packed if p is not None]
    if not present:
        return [None] * len(packed)
    width = max(len(p) for p in present)
    raw = np.frombuffer(b"".join(p.ljust(width, b"\0") for p in present), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(present), width), axis=1, bitorder="little")
    table = torch.from_numpy(bits[:, :vocab].astype(bool))
    rows = iter(table)
    return [None if p is None else next(rows) for p in packed]


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVPool):
        self.model, self.kv = model, kv
        self.block_size = kv.block_size
        self.swapped: dict[int, torch.Tensor] = {}
        self.lora = LoraSet(model.config)  # adapters, loaded by name on first use
        self.state = RunnerState()  # each sequence's lists between steps (plan_state)

    def load_adapter(self, name: str) -> None:
        """Serve adapter ``name`` from the model store (a no-op once loaded)."""
        if name not in self.lora:
            from llmos_kernel import adapters

            self.lora.add(name, adapters.load(name).adapter)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, hidden: torch.Tensor | None = None
                ) -> StepOutput | torch.Tensor | None:
        """Run the plan: a ``StepOutput`` from the last stage (or the whole model); from a
        stage before it, the hidden states ``[T, d]`` the next stage takes as ``hidden``
        (None when the plan computes no tokens)."""
        started = time.perf_counter()
        self.state.apply(plan)
        for handle, blocks in plan.swap_out:
            self.swapped[handle] = self.kv.read_blocks(blocks)
        for handle in plan.drop_swap:
            self.swapped.pop(handle, None)
        for handle, blocks in plan.swap_in:
            self.kv.write_blocks(blocks, self.swapped.pop(handle))
        if plan.copies:
            src, dst = zip(*plan.copies)
            self.kv.copy_blocks(list(src), list(dst))
        out = StepOutput()
        if not plan.seqs and not self.model.last:
            return None
        if plan.seqs:
            for name in {s.adapter for s in plan.seqs} - {None}:
                self.load_adapter(name)
            batch, sampled = self.build_batch(plan.seqs)
            logits = self.model(batch.to(self.kv.data.device), self.kv, hidden)
            if logits.device.type != "cpu":  # hidden states cross to the next stage, and
                logits = logits.cpu()  # logits are sampled, on the host
            if not self.model.last:
                return logits  # this stage's hidden states
            self._score_prompts(logits[len(sampled):], plan.seqs, out)
            self._sample(logits[:len(sampled)], sampled, out)
        out.seconds = time.perf_counter() - started
        return out

    def build_batch(self, seqs: list[SeqStep]) -> tuple[StepBatch, list[SeqStep]]:
        """The step's tensors. With bf16 products every row, prompt rows too, attends from
        the pool by one computation per token whatever the batch or chunking
        (StepBatch.groups, see bf16_attention): bf16 rounding of the activations would
        amplify a chunked prefill attention's different sums into different tokens."""
        bs = self.block_size
        pooled = self.model.bf16_products and self.kv.paged_kernel
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampled: list[SeqStep] = []
        decode: list[SeqStep] = []
        groups: list[tuple[int, int, int]] = []  # (first row, rows, first position)
        prefills: list[PrefillChunk] = []
        scored: list[int] = []  # rows whose logits score the next prompt token
        adapted: list[tuple[str, int, int]] = []  # (adapter, first row, rows)
        for s in seqs:
            row = len(tokens)
            n = len(s.tokens)
            tokens.extend(s.tokens)
            pos = range(s.start, s.start + n)
            positions.extend(pos)
            slots.extend(s.blocks[p // bs] * bs + p % bs for p in pos)
            if pooled:
                groups.append((row, n, s.start))
            elif n == 1:
                assert not prefills, "single-token steps must come first"
                decode.append(s)
            else:
                ctx = _context_slots(s.blocks, s.start + n, bs) if s.start else None
                prefills.append(PrefillChunk(row, n, ctx, s.start))
            if s.sample or s.beam_width:
                logits_rows.append(row + n - 1)
                sampled.append(s)
            if s.prompt_targets:
                scored.extend(range(row, row + len(s.prompt_targets)))
            if s.adapter is not None:
                adapted.append((s.adapter, row, n))
        if slots:
            self.kv.ensure_resident(max(slots) // bs + 1)
        batch = StepBatch(
            tokens=torch.tensor(tokens), positions=torch.tensor(positions),
            slot_mapping=torch.tensor(slots), n_decode=len(decode), prefills=prefills,
            logits_rows=torch.tensor(logits_rows + scored, dtype=torch.long), block_size=bs,
            lora=self.lora.batch(adapted) if adapted else None)
        if decode:
            batch.decode_tables = _tables([s.blocks for s in decode], bs, [s.start + 1 for s in decode])
            batch.decode_lens = torch.tensor([s.start + 1 for s in decode], dtype=torch.long)
        if groups:
            batch.groups = torch.tensor(groups, dtype=torch.long)
            batch.group_tables = _tables([s.blocks for s in seqs], bs,
                                         [start + n for _, n, start in groups])
        return batch, sampled

    @staticmethod
    def _score_prompts(logits: torch.Tensor, seqs: list[SeqStep], out: StepOutput) -> None:
        """The log-probability of each prompt target under the logits of the row before it
        (the rows after the sampled ones, in sequence order)."""
        first = 0
        for s in seqs:
            if not s.prompt_targets:
                continue
            n = len(s.prompt_targets)
            rows = logits[first:first + n]
            lp = rows.gather(1, torch.tensor(s.prompt_targets)[:, None])[:, 0] \
                - torch.logsumexp(rows, dim=-1)
            out.prompt_logprobs[s.seq_id] = lp.tolist()
            first += n

    def _sample(self, logits: torch.Tensor, sampled: list[SeqStep], out: StepOutput) -> None:
        vocab = logits.shape[-1]
        beam_idx = [i for i, s in enumerate(sampled) if s.beam_width]
        for i in beam_idx:
            s = sampled[i]
            lp = torch.log_softmax(logits[i], dim=-1)
            if s.params and s.params.no_repeat_ngram_size:
                banned = banned_ngram_tokens(s.prompt_ids + s.output_ids,
                                             s.params.no_repeat_ngram_size)
                lp[banned] = float("-inf")
            top = torch.topk(lp, s.beam_width)
            out.beams[s.seq_id] = list(zip(top.indices.tolist(), top.values.tolist()))
        idx = [i for i, s in enumerate(sampled) if not s.beam_width]
        if not idx:
            return
        masks = _unpack_masks([sampled[i].allowed for i in idx], vocab)
        rows = [SampleRow(params=sampled[i].params, output_ids=sampled[i].output_ids,
                          prompt_ids=sampled[i].prompt_ids, allowed_mask=masks[j])
                for j, i in enumerate(idx)]
        res = sample(logits if len(idx) == len(sampled) else logits[idx], rows)
        for j, i in enumerate(idx):
            sid = sampled[i].seq_id
            out.tokens[sid] = res.tokens[j]
            if res.logprobs is not None and res.logprobs[j] is not None:
                out.logprobs[sid] = res.logprobs[j]
            if res.top_logprobs is not None and res.top_logprobs[j]:
                out.top_logprobs[sid] = res.top_logprobs[j]


def _tables(tables: list[list[int]], bs: int, lengths: list[int]) -> torch.Tensor:
    """Block tables padded to one width (the longest of ``lengths`` tokens), int64."""
    width = -(-max(lengths) // bs)
    return torch.tensor([(blocks + [blocks[0]] * width)[:width] for blocks in tables],
                        dtype=torch.long)


def _context_slots(blocks: list[int], length: int, bs: int) -> torch.Tensor:
    n_blocks = -(-length // bs)
    table = torch.tensor(blocks[:n_blocks])
    return (table[:, None] * bs + torch.arange(bs)).flatten()[:length]
