"""Where a model's pipeline stages go: layer boundaries and each stage's bytes.

``split_layers`` cuts the model into ``n`` layer ranges, and gives each stage its share
of the KV pool: the kernel's one block manager hands out block ids, and every stage
holds that many blocks of its own layers. It balances one of two things:

- ``by="compute"`` (what ``--shards N`` asks first): each token's work, so that in a
  pipeline no stage idles waiting on a slower one. A layer costs its parameters; the
  embedding costs nothing (a row lookup); the output head costs half its parameters
  (``HEAD_WORK``): on a CPU its one wide GEMM does about twice a layer's narrow GEMMs'
  work per second (`python bench/stage_split.py` times both on this machine). Split by
  bytes, SmolLM2's first stage would get the 28M-parameter embedding and so fewer
  layers, and its last stage the head's real work on top of as many layers: the
  pipeline would run at the pace of the last stage.
- ``by="bytes"``: weight bytes (the embedding on the first stage, the final norm and
  head on the last), where fitting memory is the point: ``choose_stages`` and any split
  whose compute-balanced stages do not fit the places they got.
``check_budgets`` compares each stage's bytes (weights + KV) with the budget of the
place it was given, and refuses the whole split in one message naming every stage
that does not fit, by how many bytes and where. Nothing here touches Ray: the LLM
service reserves the places (``llmos_kernel.stages``) and asks this module whether
the stages fit them.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.errors import InvalidArgument, QuotaExceeded

MiB = 1 << 20


@dataclass
class StagePlan:
    """One stage: its layers ``[first, end)`` and the bytes it holds."""

    index: int
    layers: tuple[int, int]
    weight_bytes: int
    kv_bytes: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "bytes": self.bytes}


@dataclass
class Place:
    """Where a stage runs and how many bytes it may hold there."""

    node: str
    device: str
    budget_bytes: int


def stage_weight_bytes(cfg: ModelConfig, itemsize: int, layers: tuple[int, int]) -> int:
    """Weight bytes of layers ``[a, b)``, with the embedding on the first stage and the
    final norm and output head on the last (the head is a copy of a tied embedding)."""
    first, end = layers
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    per_layer = attn + 3 * cfg.d_model * cfg.d_ff + 2 * cfg.d_model
    params = (end - first) * per_layer
    if first == 0:
        params += cfg.vocab_size * cfg.d_model
    if end == cfg.n_layers:
        params += cfg.d_model + cfg.d_model * cfg.vocab_size
    return params * itemsize


HEAD_WORK = 0.5  # the output head's per-token work per parameter, a layer's being 1


def stage_work(cfg: ModelConfig, layers: tuple[int, int]) -> float:
    """Per-token work of layers ``[a, b)`` in layer-parameter units (see ``HEAD_WORK``)."""
    first, end = layers
    work = (end - first) * stage_weight_bytes(cfg, 1, (1, 2))  # a middle layer's parameters
    if end == cfg.n_layers:
        work += HEAD_WORK * cfg.d_model * cfg.vocab_size
    return work


def split_layers(cfg: ModelConfig, dtype: torch.dtype, n_stages: int, num_blocks: int,
                 block_size: int, by: str = "compute") -> list[StagePlan]:
    """``n_stages`` contiguous layer ranges minimizing the heaviest stage's per-token work
    (``by="compute"``) or weight bytes (``by="bytes"``), each with a KV pool of
    ``num_blocks`` blocks of its own layers (in ``dtype``, as the memory plan sizes the
    whole pool)."""
    if by not in ("compute", "bytes"):
        raise ValueError(f"split by 'compute' or 'bytes', not {by!r}")
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 1:
        raise InvalidArgument(f"--shards must be a positive number of stages, got {n_stages!r}")
    if n_stages > cfg.n_layers:
        raise InvalidArgument(f"a model of {cfg.n_layers} layers splits into at most "
                              f"{cfg.n_layers} stages (one layer each); ask for --shards "
                              f"{cfg.n_layers} or fewer, not {n_stages}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = cfg.n_layers

    def weight(a: int, b: int) -> int:
        return stage_weight_bytes(cfg, itemsize, (a, b))

    def load(a: int, b: int) -> float:
        return weight(a, b) if by == "bytes" else stage_work(cfg, (a, b))

    # best[k][b]: the lightest heaviest stage over layers [0, b) cut into k stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for b in range(k, n - (n_stages - k) + 1):
            for a in range(k - 1, b):
                cost = max(best[k - 1][a], load(a, b))
                if cost < best[k][b]:
                    best[k][b], cut[k][b] = cost, a
    ends = [n]
    for k in range(n_stages, 1, -1):
        ends.append(cut[k][ends[-1]])
    bounds = [0, *reversed(ends)]
    return [StagePlan(i, (a, b), weight(a, b),
                      num_blocks * KVPool.bytes_per_block(cfg, block_size, dtype, b - a))
            for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def choose_stages(cfg: ModelConfig, dtype: torch.dtype, num_blocks: int, block_size: int,
                  budgets: list[int], where: str = "the cluster") -> list[StagePlan]:
    """The fewest stages that fit (``--placement auto``): ``budgets`` are the bytes each
    place (a node's RAM, or a GPU) may hold, one stage per place; a split into ``n`` fits
    when its heaviest stage fits the ``n``-th largest budget, so any ``n`` of the largest
    places take it (balanced by compute where that fits, else by bytes). None fits:
    QuotaExceeded saying how many bytes were missing where."""
    if not budgets:
        raise QuotaExceeded(f"{where} offers no place for a model stage")
    largest = sorted(budgets, reverse=True)
    most = min(cfg.n_layers, len(largest))
    for n in range(1, most + 1):
        for by in ("compute", "bytes"):  # even work where it fits, else even bytes
            stages = split_layers(cfg, dtype, n, num_blocks, block_size, by)
            if max(s.bytes for s in stages) <= largest[n - 1]:
                return stages
    heaviest = max(s.bytes for s in stages)
    raise QuotaExceeded(
        f"the model fits nowhere in {where}: split into {most} stage(s) (one per place), the "
        f"heaviest needs {heaviest / MiB:.1f} MiB (weights + KV) but the smallest of the "
        f"{most} largest places has {largest[most - 1] / MiB:.1f} MiB: "
        f"{heaviest - largest[most - 1]} bytes missing; add memory or nodes, or lower "
        "--kv-budget")


def check_budgets(stages: list[StagePlan], places: list[Place]) -> None:
    """Raise QuotaExceeded naming every stage that does not fit its place's budget."""
    short = [(s, p) for s, p in zip(stages, places) if s.bytes > p.budget_bytes]
    if not short:
        return
    lines = [f"stage {s.index} (layers {s.layers[0]}-{s.layers[1] - 1}) needs "
             f"{s.bytes / MiB:.1f} MiB ({s.weight_bytes / MiB:.1f} MiB weights + "
             f"{s.kv_bytes / MiB:.1f} MiB KV) on {p.device} of node {p.node[:12]}, which "
             f"has a budget of {p.budget_bytes / MiB:.1f} MiB: "
             f"{s.bytes - p.budget_bytes} bytes missing" for s, p in short]
    raise QuotaExceeded("the model's stages do not fit where they were placed: "
                        + "; ".join(lines) + ". Give each stage more memory (--stage-budget), "
                        "use more stages (--shards), or lower --kv-budget")
