"""LoRA adapters on the core's projections, and their batched application in a step.

An adapter holds, for each layer and each targeted projection (q, k, v, o, gate, up,
down), a pair ``A [in, r]``, ``B [r, out]``; the projection becomes ``x @ W + (x @ A) @ B
* alpha / r``. The core's weights are fused (QKV, gate+up) and input-major, so LoRA on a
fused projection is its parts' A side by side and their B block-diagonal: the parts'
outputs, concatenated. A step may mix rows of several adapters (and rows of none): each
adapter's rows are gathered, multiplied and added back (a segment loop, which is what a
CPU runs best; vLLM's BGMV kernels do the same in one launch). A step without adapter rows
carries no ``LoraBatch`` and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmos_kernel.core.gguf_file import ModelConfig

# The model's projection attributes and the parts each one fuses, in output order.
FUSED = {"wqkv": ("q", "k", "v"), "wo": ("o",), "w_gate_up": ("gate", "up"), "w_down": ("down",)}
PARTS = tuple(p for parts in FUSED.values() for p in parts)


def part_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of every part a LoRA may target."""
    q, kv, d, ff = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.d_ff
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, ff),
            "up": (d, ff), "down": (ff, d)}


@dataclass
class LoraAdapter:
    """One adapter's tensors: ``weights["{layer}.{part}.A"]`` ``[in, r]`` and ``.B`` ``[r, out]``."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    weights: dict[str, torch.Tensor]
    n_layers: int
    _fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def init(cls, cfg: ModelConfig, rank: int = 8, alpha: float = 16.0,
             targets: tuple[str, ...] = PARTS, generator: torch.Generator | None = None,
             b_std: float = 0.0) -> LoraAdapter:
        """A new adapter: A Kaiming-uniform as in peft, B zero (``b_std`` > 0: random, for
        tests that want an adapter with an effect)."""
        unknown = set(targets) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {', '.join(PARTS)}")
        shapes, weights = part_shapes(cfg), {}
        for layer in range(cfg.n_layers):
            for part in targets:
                n_in, n_out = shapes[part]
                bound = (3 / n_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) on a [r, in] weight
                weights[f"{layer}.{part}.A"] = (torch.rand(n_in, rank, generator=generator)
                                                * 2 - 1) * bound
                weights[f"{layer}.{part}.B"] = torch.randn(rank, n_out, generator=generator) \
                    * b_std
        return cls(rank, float(alpha), tuple(targets), weights, cfg.n_layers)

    def fused(self, layer: int, attr: str, shapes: dict[str, tuple[int, int]],
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused projection's ``A [in, k*r]`` and block-diagonal ``B [k*r, out]`` with the
        scale folded in (None when no part of it is targeted); built once, in float64: its
        row sums are then the same whatever the step's rows (fp32 GEMMs block differently by
        row count, and bf16 products would amplify those last bits into other tokens, as
        between a prompt computed whole and one resumed from the prefix cache). On another
        ``device`` than the host, a copy made there once."""
        if device is not None and device.type != "cpu":
            key = (layer, attr, str(device))
            if key not in self._fused:
                host = self.fused(layer, attr, shapes)
                self._fused[key] = None if host is None else tuple(t.to(device) for t in host)
            return self._fused[key]
        key = (layer, attr)
        if key not in self._fused:
            parts = FUSED[attr]
            if not set(parts) & set(self.targets):
                self._fused[key] = None
                return None
            r, n_in = self.rank, shapes[parts[0]][0]
            outs = [shapes[p][1] for p in parts]
            a = torch.zeros(n_in, r * len(parts), dtype=torch.float64)
            b = torch.zeros(r * len(parts), sum(outs), dtype=torch.float64)
            col = 0
            for i, (part, n_out) in enumerate(zip(parts, outs)):
                if part in self.targets:
                    a[:, i * r:(i + 1) * r] = self.weights[f"{layer}.{part}.A"]
                    b[i * r:(i + 1) * r, col:col + n_out] = \
                        self.weights[f"{layer}.{part}.B"].double() * self.scale
                col += n_out
            self._fused[key] = (a, b)
        return self._fused[key]


class LoraSet:
    """The adapters a runner serves, by name."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.shapes = part_shapes(cfg)
        self.adapters: dict[str, LoraAdapter] = {}

    def add(self, name: str, adapter: LoraAdapter) -> None:
        if adapter.n_layers != self.cfg.n_layers:
            raise ValueError(f"adapter {name!r} has {adapter.n_layers} layers, the model "
                             f"{self.cfg.n_layers}")
        self.adapters[name] = adapter

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def batch(self, rows: list[tuple[str | None, int, int]]) -> LoraBatch | None:
        """A step's LoRA plan from ``(adapter name or None, first row, rows)`` per sequence;
        None when no row uses an adapter (the model's plain path)."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for name, first, n in rows:
            if name is not None:
                by_name.setdefault(name, []).append(torch.arange(first, first + n))
        if not by_name:
            return None
        return LoraBatch(self, [(self.adapters[n], torch.cat(r)) for n, r in by_name.items()])


@dataclass
class LoraBatch:
    """Which rows of a step use which adapter; ``add`` applies them after a projection."""

    lora: LoraSet
    groups: list[tuple[LoraAdapter, torch.Tensor]]  # adapter, its rows (int64)
    _cache: dict = field(default_factory=dict, repr=False)  # the same in every layer

    def to(self, device: torch.device) -> LoraBatch:
        """The same groups with their row indices on ``device``."""
        return LoraBatch(self.lora, [(adapter, rows.to(device)) for adapter, rows in self.groups])

    @property
    def rows(self) -> torch.Tensor:
        """Every adapter row, group after group."""
        if "rows" not in self._cache:
            self._cache["rows"] = torch.cat([rows for _, rows in self.groups])
        return self._cache["rows"]

    def base_rows(self, n: int) -> torch.Tensor:
        """The rows of an ``n``-row step that no adapter touches."""
        if "base" not in self._cache:
            base = torch.ones(n, dtype=torch.bool, device=self.rows.device)
            base[self.rows] = False
            self._cache["base"] = base.nonzero()[:, 0]
        return self._cache["base"]

    def compact(self) -> LoraBatch:
        """The same groups over ``x[self.rows]`` (rows renumbered from 0)."""
        if "compact" not in self._cache:
            sizes = [rows.numel() for _, rows in self.groups]
            self._cache["compact"] = LoraBatch(self.lora, [
                (adapter, idx) for (adapter, _), idx in
                zip(self.groups, torch.arange(sum(sizes), device=self.rows.device).split(sizes))])
        return self._cache["compact"]

    def add(self, layer: int, attr: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[rows] += (x[rows] @ A) @ B`` for each adapter's rows, in place."""
        for adapter, rows in self.groups:
            ab = adapter.fused(layer, attr, self.lora.shapes, x.device)
            if ab is None:
                continue
            a, b = ab
            xr = x if rows.numel() == x.shape[0] else x[rows]
            delta = ((xr.to(a.dtype) @ a) @ b).to(y.dtype)
            if rows.numel() == y.shape[0]:
                y.add_(delta)
            else:
                y.index_add_(0, rows, delta)


def merge_into(model, adapter: LoraAdapter) -> None:
    """Add ``A @ B * scale`` into a model's fp32 weights (loaded without packed copies):
    the merged-weights reference an adapter's outputs are checked against."""
    shapes = part_shapes(model.config)
    for layer, block in enumerate(model.blocks):
        for module in (block.attn, block.ffn):
            for attr in FUSED:
                param = getattr(module, attr, None)
                ab = adapter.fused(layer, attr, shapes) if param is not None else None
                if ab is not None:
                    param.data += (ab[0] @ ab[1]).to(param.dtype)
