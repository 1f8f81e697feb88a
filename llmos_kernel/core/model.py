"""A Llama-family Transformer that reads and writes a paged KV cache.

One forward call runs one engine step: the new tokens of many sequences,
flattened into a single ``[T]`` batch, some decoding one token and some
prefilling a chunk of their prompt. The linear layers see all ``T`` tokens at
once; attention runs per group (all single-token decodes together, each
prefill chunk on its own) against keys gathered from the paged pool through
the sequences' slot lists. Weights are stored input-major (``[in, out]``) and
fused (QKV, gate+up), which is what small CPU batches run fastest on. Which
kernels serve it is the model's ``KernelOptions``, given at construction.

A ``Transformer`` may hold only layers ``[a, b)`` (a pipeline stage): the embedding
comes with the first stage, the final norm and the head with the last, and nothing
else is built or loaded. A stage takes the previous stage's hidden states ``[T, d]``
and returns its own, or (the last) the logits; the same ``StepBatch`` describes the
step in every stage, so running the stages one after another computes exactly what
the whole model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmos_kernel.core import (
    bf16_attention,
    bf16_gemm,
    fused_ops,
    packed_gemm,
    paged_attention,
    panel_gemm,
    quant_matmul,
)
from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.lora import LoraBatch
from llmos_kernel.core.options import KernelOptions

DEFAULT_OPTIONS = KernelOptions()


@dataclass
class PrefillChunk:
    """Rows ``[start, start+length)`` of the step are one sequence's prompt chunk."""

    start: int
    length: int
    context_slots: torch.Tensor  # [ctx] KV slots of every key the chunk attends to, in order
    past: int  # keys before this chunk (ctx = past + length)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[length, ctx]`` mask for a chunk with a past: row i sees keys up to
        ``past + i``. The same in every layer, so built once per step."""
        if self._mask is None or self._mask.dtype != dtype:
            device = self.context_slots.device
            q_pos = torch.arange(self.past, self.past + self.length, device=device)[:, None]
            later = torch.arange(self.past + self.length, device=device)[None, :] > q_pos
            self._mask = torch.zeros(later.shape, dtype=dtype, device=device).masked_fill_(
                later, float("-inf"))
        return self._mask


@dataclass
class StepBatch:
    """Tensors describing one engine step (built once, shared by every layer).

    Rows ``[0, n_decode)`` are single-token decodes; prefill chunks follow. With bf16
    products every row attends from the pool instead, by sequence (``groups``).
    """

    tokens: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    n_decode: int = 0
    decode_tables: torch.Tensor | None = None  # [Bd, max_blocks] block tables (int64)
    decode_lens: torch.Tensor | None = None  # [Bd] keys each decode attends to (int64)
    groups: torch.Tensor | None = None  # [S, 3] each sequence's first row, rows, first position
    group_tables: torch.Tensor | None = None  # [S, max_blocks] their block tables
    block_size: int = 16
    prefills: list[PrefillChunk] = field(default_factory=list)
    logits_rows: torch.Tensor | None = None  # [N] rows whose next-token logits are wanted
    lora: LoraBatch | None = None  # rows that run with a LoRA adapter (None: none do)
    _gather: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _rows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def to(self, device: torch.device) -> StepBatch:
        """The same step with every tensor on ``device`` (the model's): the runner builds a
        step on the host and moves it once, before any layer runs."""
        if device.type == "cpu":
            return self
        moved = {name: (value.to(device, non_blocking=True)
                        if isinstance(value, torch.Tensor) else value)
                 for name, value in self.__dict__.items() if not name.startswith("_")}
        moved["prefills"] = [PrefillChunk(p.start, p.length, None if p.context_slots is None
                                          else p.context_slots.to(device), p.past)
                             for p in self.prefills]
        if self.lora is not None:
            moved["lora"] = self.lora.to(device)
        return StepBatch(**moved)

    def row_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``bf16_attention.row_tables`` of ``groups``, built once per step for every layer."""
        if self._rows is None:
            self._rows = bf16_attention.row_tables(self.groups, self.group_tables)
        return self._rows

    def decode_gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded slot indices ``[Bd, max_ctx]`` and key mask (for the non-kernel path)."""
        if self._gather is None:
            max_ctx = int(self.decode_lens.max())
            bs = self.block_size
            device = self.decode_tables.device
            slots = (self.decode_tables[:, :, None] * bs
                     + torch.arange(bs, device=device)).flatten(1)
            mask = torch.arange(max_ctx, device=device)[None, :] < self.decode_lens[:, None]
            self._gather = slots[:, :max_ctx], mask[:, None, None, :]
        return self._gather


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.fused = eps, fused  # fused: may take fused_ops' C kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and fused_ops.usable(x) and fused_ops.available():
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """RoPE on adjacent pairs (2i, 2i+1) as complex rotations by position * base^(-2i/d).

    GGUF stores llama Q/K rows in exactly this pair order (llama.cpp permutes Hugging
    Face's half-split layout at conversion), so the weights are used as stored.
    """

    def __init__(self, head_dim: int, base: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rows of the table: cos and sin, ``[T, head_dim / 2]`` each."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, heads, D]`` with each pair (2i, 2i+1) turned by its row's angle i."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


Packed = (quant_matmul.QuantWeight | panel_gemm.PanelWeight | packed_gemm.PackedWeight
          | bf16_gemm.TileWeight)


def project(x: torch.Tensor, weight: torch.Tensor, packed: dict[str, Packed],
            name: str, residual: torch.Tensor | None = None,
            options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """``x @ weight`` (plus ``residual``, whose memory may be reused), read from the file's
    quantized bytes where streaming fp32 weights would set the pace:
    ``packed[name + "/panels"]`` for steps of two rows or more (see panel_gemm),
    ``packed[name]`` for one row (see quant_matmul); else (other weight types, no AVX-512)
    from MKL's packed copy of the fp32 weight, ``packed[name + "/fp32"]``. A model loaded
    for bf16 products has ``packed[name + "/bf16"]`` and takes bf16_gemm for every step
    (see bf16_gemm), summing into the residual in place. ``options`` are the model's: the
    bf16 kernel and the step sizes each path serves."""
    bf16 = packed.get(name + "/bf16")
    if bf16 is not None:
        return bf16_gemm.matmul(x, bf16, out=residual, kernel=options.bf16_kernel)
    y = _product(x, weight, packed, name, options)
    return y if residual is None else residual + y


def _product(x: torch.Tensor, weight: torch.Tensor, packed: dict[str, Packed],
             name: str, options: KernelOptions) -> torch.Tensor:
    rows = x.shape[0]
    panels = packed.get(name + "/panels")
    if panels is not None and panel_gemm.serves(rows, options):
        return panel_gemm.matmul(x, panels)
    if name in packed and rows <= options.quant_max_rows:
        return quant_matmul.matmul(x, packed[name])
    fp32 = packed.get(name + "/fp32")
    if fp32 is not None:
        return packed_gemm.matmul(x, fp32)
    return x @ weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, options: KernelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.options = options
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Parameter(torch.empty(cfg.d_model, q_dim + 2 * kv_dim), requires_grad=False)
        self.wo = nn.Parameter(torch.empty(q_dim, cfg.d_model), requires_grad=False)
        self.packed: dict[str, Packed] = {}  # the loader's copies of the weights (see project)
        self.split = (q_dim, kv_dim, kv_dim)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                batch: StepBatch, kv: KVPool, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` plus the attention of ``x`` (the normed residual)."""
        T, H, KV = x.shape[0], self.n_heads, self.n_kv
        qkv = project(x, self.wqkv, self.packed, "wqkv", options=self.options)
        if batch.lora is not None:
            batch.lora.add(self.layer, "wqkv", x, qkv)
        qk = qkv[:, :(H + KV) * self.hd].view(T, H + KV, self.hd)
        if self.options.c_kernels and fused_ops.usable(qkv) and fused_ops.available():
            fused_ops.rope_(qkv, *rope, H + KV, self.hd)  # in place: qk sees the result
        else:
            qk = apply_rotary(qk, *rope)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + KV) * self.hd:].view(T, KV, self.hd)
        k_cache, v_cache = kv.layer(self.layer)
        # A pool of another dtype (bf16 under fp32 activations) keeps the rounded keys and
        # values; attention reads those everywhere, so a prompt's chunking never matters.
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v)

        if batch.groups is not None:  # every row from the pool, one computation per token
            out = bf16_attention.attend(q, k_cache, v_cache, batch.groups, batch.group_tables,
                                       batch.block_size, self.scale, batch.row_tables,
                                       kernel=self.options.bf16_kernel)
            return self._out(out.reshape(T, -1), batch, residual)
        parts = []
        nd = batch.n_decode
        if nd and kv.paged_kernel and self.options.c_kernels:
            out = paged_attention.decode(q[:nd].float(), k_cache, v_cache, batch.decode_tables,
                                         batch.decode_lens, batch.block_size, self.scale)
            parts.append(out.reshape(nd, -1).to(x.dtype))
        elif nd:
            slots, mask = batch.decode_gather()
            kd = k_cache[slots].transpose(1, 2).to(q.dtype)  # [Bd, kvh, ctx, hd]
            vd = v_cache[slots].transpose(1, 2).to(q.dtype)
            out = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kd, vd, attn_mask=mask,
                                                 scale=self.scale, enable_gqa=True)
            parts.append(out.reshape(nd, -1))
        for chunk in batch.prefills:  # fp32 over the pool's values: chunking cannot matter
            rows = slice(chunk.start, chunk.start + chunk.length)
            qp = q[rows].transpose(0, 1)[None]  # [1, H, n, hd]: 4-D takes torch's fused CPU kernel
            if chunk.past == 0:
                kp, vp, causal, mask = k[rows], v[rows], True, None
            else:  # later chunks see every earlier key: causal, offset by the past
                kp, vp = k_cache[chunk.context_slots], v_cache[chunk.context_slots]
                mask, causal = chunk.mask(q.dtype), False
            out = F.scaled_dot_product_attention(qp, kp.transpose(0, 1)[None].to(q.dtype),
                                                 vp.transpose(0, 1)[None].to(q.dtype),
                                                 attn_mask=mask, is_causal=causal,
                                                 scale=self.scale, enable_gqa=True)
            parts.append(out[0].transpose(0, 1).reshape(chunk.length, -1))
        return self._out(parts[0] if len(parts) == 1 else torch.cat(parts), batch, residual)

    def _out(self, attn: torch.Tensor, batch: StepBatch, residual: torch.Tensor) -> torch.Tensor:
        y = project(attn, self.wo, self.packed, "wo", residual, self.options)
        if batch.lora is not None:
            batch.lora.add(self.layer, "wo", attn, y)
        return y


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, options: KernelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.options, self.layer, self.d_ff = options, layer, cfg.d_ff
        self.w_gate_up = nn.Parameter(torch.empty(cfg.d_model, 2 * cfg.d_ff), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(cfg.d_ff, cfg.d_model), requires_grad=False)
        self.packed: dict[str, Packed] = {}

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                lora: LoraBatch | None = None) -> torch.Tensor:
        """``residual`` plus the feed-forward of ``x`` (the normed residual)."""
        tiles = self.packed.get("w_gate_up/bf16")
        if tiles is not None:  # gate, up, silu(gate) * up in one pass over the tiles
            if lora is None:
                hidden = bf16_gemm.matmul_silu(x, tiles, kernel=self.options.bf16_kernel)
            else:  # base rows as ever; adapter rows with their LoRA on gate and up
                rows, base = lora.rows, lora.base_rows(x.shape[0])
                hidden = x.new_empty(x.shape[0], self.d_ff)
                hidden[rows] = self._gate_up(x[rows], lora.compact())
                if base.numel():
                    hidden[base] = bf16_gemm.matmul_silu(x[base], tiles,
                                                         kernel=self.options.bf16_kernel)
        else:
            hidden = self._gate_up(x, lora)
        y = project(hidden, self.w_down, self.packed, "w_down", residual, self.options)
        if lora is not None:
            lora.add(self.layer, "w_down", hidden, y)
        return y

    def _gate_up(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """``silu(gate) * up`` of ``x``, gate and up with ``lora``'s rows' adapters."""
        gate_up = project(x, self.w_gate_up, self.packed, "w_gate_up", options=self.options)
        if lora is not None:
            lora.add(self.layer, "w_gate_up", x, gate_up)
        fused = self.options.c_kernels and fused_ops.usable(gate_up) and fused_ops.available()
        hidden = fused_ops.silu_mul(gate_up) if fused else None
        if hidden is None:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        return hidden


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, options: KernelOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, fused=options.c_kernels)
        self.attn = Attention(cfg, layer, options)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, fused=options.c_kernels)
        self.ffn = FeedForward(cfg, layer, options)

    def forward(self, x, rope, batch: StepBatch, kv: KVPool) -> torch.Tensor:
        x = self.attn(self.attn_norm(x), rope, batch, kv, residual=x)
        return self.ffn(self.ffn_norm(x), residual=x, lora=batch.lora)


def check_layers(cfg: ModelConfig, layers: tuple[int, int] | None) -> tuple[int, int]:
    """``layers`` as a valid ``[a, b)`` range of ``cfg``'s blocks (None: all of them)."""
    if layers is None:
        return 0, cfg.n_layers
    first, end = (int(v) for v in layers)
    if not 0 <= first < end <= cfg.n_layers:
        raise ValueError(f"layers {tuple(layers)} is not a non-empty range of the model's "
                         f"{cfg.n_layers} layers")
    return first, end


class Transformer(nn.Module):
    """Embedding, ``n_layers`` blocks, final norm and output head, served by the kernels
    ``options`` allow (None: the defaults); or, given ``layers=(a, b)``, one pipeline
    stage: blocks ``[a, b)``, with the embedding only if ``a == 0`` and the final norm
    and head only if ``b == n_layers``."""

    def __init__(self, cfg: ModelConfig, options: KernelOptions | None = None,
                 layers: tuple[int, int] | None = None):
        super().__init__()
        self.config, self.options = cfg, options or DEFAULT_OPTIONS
        self.layers = check_layers(cfg, layers)
        self.first, self.last = self.layers[0] == 0, self.layers[1] == cfg.n_layers
        if self.first:
            self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg, i, self.options) for i in range(*self.layers))
        if self.last:
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, fused=self.options.c_kernels)
            # The output head, input-major like every projection (a copy of the embedding
            # when the model ties them: x @ W runs small batches faster than F.linear on CPU).
            self.output = nn.Parameter(torch.empty(cfg.d_model, cfg.vocab_size),
                                       requires_grad=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.context_length)
        self.packed: dict[str, Packed] = {}
        self.bf16_products = False  # set by the loader with every projection on bf16_gemm

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (every stage has blocks, and so their norms)."""
        return self.blocks[0].attn_norm.weight.dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        """What the KV pool holds: the activations' dtype, or bf16 where the loader gave the
        projections bf16 products (see weights.load_model)."""
        return torch.bfloat16 if self.bf16_products else self.dtype

    @torch.inference_mode()
    def hidden_states(self, batch: StepBatch, kv: KVPool,
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's output ``[T, d]`` for every new token (its layers' KV written):
        after the final norm on the last stage. ``hidden`` is the previous stage's output
        (None on the first stage, which embeds ``batch.tokens``)."""
        if self.first:
            x = F.embedding(batch.tokens, self.embed)
        elif hidden is None:
            raise ValueError(f"stage {self.layers} needs the previous stage's hidden states")
        else:  # (from the host, when the stages are on CUDA devices: see engine.runner)
            x = hidden.to(device=batch.positions.device, dtype=self.dtype)
        rope = self.rotary.table(batch.positions)
        for block in self.blocks:
            x = block(x, rope, batch, kv)
        return self.norm(x) if self.last else x

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVPool,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 next-token logits ``[N, vocab]`` for ``batch.logits_rows``; a stage before
        the last returns its hidden states ``[T, d]`` for the next stage instead."""
        h = self.hidden_states(batch, kv, hidden)
        if not self.last:
            return h
        if batch.logits_rows is not None:
            h = h[batch.logits_rows]
        return project(h, self.output, self.packed, "output", options=self.options).float()
