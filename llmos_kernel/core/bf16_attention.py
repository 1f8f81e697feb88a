"""Attention from a bf16 KV pool, one computation per token whatever the batch, on AMX tiles
or AVX512-BF16 (the kernel bf16_gemm chose).

With bf16 products (see bf16_gemm) every new token of a step, prompt or decode,
attends from the pool to its sequence's keys up to its own position, and the
arithmetic a token gets depends only on that token: the same alone, in a busy
batch, in any chunking of its prompt, or recomputed after a preemption. (bf16
rounding of the activations would amplify the different fp32 sums of a
chunked flash attention into different tokens.)

Work is split by sequence and KV head. The rows of a sequence times the query
heads sharing a KV head are packed as "pairs" (row, head), 16 to a tile; for
each block of 16 keys (one pool block) the kernel computes, with two tile
products, the 16 × 16 scores Q·Kᵀ, then per pair an online softmax step in
fp32 (keys past the pair's position masked), rounds the probabilities to bf16
and adds P·V (four tile products) into the pair's fp32 output. A tile's rows
never mix, and a block wholly past a pair's position changes nothing of it, so
which pairs share a tile cannot change a pair's result. Queries and
probabilities are rounded to bf16, as flash attention does on GPUs. Without
AMX the two products are ``vdpbf16ps`` per dim pair (keys) or key pair
(values) for only the tile's real pairs, from the same transposed blocks; the
softmax and the rest are the same code.

Pool blocks must hold 16 keys and heads 64 dims; otherwise ``attend`` runs the
same per-row contract on the decode kernel (fp32 arithmetic, slower).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from llmos_kernel.core import bf16_gemm, ckernel, paged_attention


def _declare(lib: ctypes.CDLL) -> None:
    lib.bf16_attend.restype = ctypes.c_int
    lib.bf16_attend.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_void_p]
                                + [ctypes.c_int64] * 3 + [ctypes.c_float] + [ctypes.c_int] * 2)


def _lib(kernel: str = "") -> ctypes.CDLL | None:
    """The kernel where bf16 products asking for ``kernel`` have one (bf16_gemm chooses AMX
    tiles or AVX512-BF16, and asks Linux for the tile state)."""
    if not bf16_gemm.available(kernel):
        return None
    return ckernel.load("bf16_attention", _declare, openmp=True)


def available(kernel: str = "") -> bool:
    return _lib(kernel) is not None


def row_tables(groups: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's block table ``[T, width]`` and key count ``[T]`` (its position + 1), from
    the sequences' ``groups`` and ``tables``: the decode kernel's view of the same rows."""
    counts, firsts = groups[:, 1], groups[:, 0]
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(firsts - firsts[0], counts)
    lens = torch.repeat_interleave(groups[:, 2], counts) + within + 1
    return tables.repeat_interleave(counts, dim=0), lens


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           groups: torch.Tensor, tables: torch.Tensor, block_size: int, scale: float,
           per_row: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None, *,
           kernel: str = "") -> torch.Tensor:
    """Every row of ``q`` ``[T, H, D]`` (fp32) attends to its sequence's keys up to its own
    position in the bf16 pool. ``groups`` ``[n, 3]`` (int64): each sequence's first row,
    number of rows and first row's position; ``tables`` ``[n, width]`` its block table.
    ``kernel`` names the bf16 kernel as the model's products do (see bf16_gemm.kernel).
    Where it does not serve (no bf16 instructions, other block sizes or head dims) each
    row attends on the decode kernel, with ``per_row()`` (``row_tables`` of these groups,
    as StepBatch caches it once per step) where given."""
    _, H, D = q.shape
    n_kv = k_cache.shape[1]
    if k_cache.dtype != torch.bfloat16 or v_cache.dtype != torch.bfloat16:
        raise ValueError(f"bf16 attention reads a bf16 pool, got {k_cache.dtype}")
    q = q.float().contiguous()
    lib = _lib(kernel)
    if lib is not None and D == 64 and block_size == 16:
        out = torch.empty_like(q)
        rc = lib.bf16_attend(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                             out.data_ptr(), groups.data_ptr(), groups.shape[0],
                             tables.data_ptr(), tables.shape[1], n_kv, H // n_kv, scale,
                             int(bf16_gemm.amx_available(kernel)), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"bf16_attend failed ({rc})")
        return out
    rows = row_tables(groups, tables) if per_row is None else per_row()
    return paged_attention.decode(q, k_cache, v_cache, *rows, block_size, scale)
