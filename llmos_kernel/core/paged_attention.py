"""Decode attention straight from the paged KV pool (CPU), without gathering a copy.

Gathering every sequence's keys and values into a padded tensor before
``scaled_dot_product_attention`` moves the whole context through memory three
times per layer; at 64 sequences of a few hundred tokens that costs more than
the layer's matrix products. This small C kernel reads each key and value once,
straight from the sequence's blocks, for all query heads that share it (GQA).
For head size 64 on AVX-512 it works in tiles of 16 keys with an online softmax
and prefetches the next tile's rows (scattered blocks defeat the hardware
prefetcher), so the step is bound by streaming those keys and values once.

It is built on first use (see ``ckernel``); where it cannot be, ``available()``
is False and the model falls back to gather + SDPA.
"""

from __future__ import annotations

import ctypes

import torch

from llmos_kernel.core import ckernel

MAX_GROUP = 64  # query heads per KV head the kernel takes (bounds its stack scratch)


def _declare(lib: ctypes.CDLL) -> None:
    lib.paged_decode.restype = ctypes.c_int
    lib.paged_decode.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [
        ctypes.c_float, ctypes.c_int64, ctypes.c_int]


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("paged_attention", _declare, openmp=True)


def available() -> bool:
    return _lib() is not None


KV_DTYPES = (torch.float32, torch.bfloat16)  # what the pool may hold; queries are fp32


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
           lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Attention of one new token per sequence: q ``[B, H, D]`` (fp32) → ``[B, H, D]``,
    against a pool of fp32 or bf16 keys and values."""
    B, H, D = q.shape
    n_kv = k_cache.shape[1]
    if q.dtype != torch.float32 or k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"paged decode takes fp32 queries and an fp32 or bf16 pool, got "
                         f"{q.dtype} and {k_cache.dtype}/{v_cache.dtype}")
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = _lib().paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                          tables.data_ptr(), lens.data_ptr(), B, tables.shape[1], block_size,
                          n_kv, H // n_kv, D, scale, torch.get_num_threads(),
                          int(k_cache.dtype == torch.bfloat16))
    if rc != 0:
        raise RuntimeError(f"paged_decode failed ({rc})")
    return out
