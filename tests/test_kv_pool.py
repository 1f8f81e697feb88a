"""The KV pool's memory: calloc'd, faulted in ahead of first use, contents untouched."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import torch

from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.core.kv_cache import KVPool

CFG = ModelConfig(n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, vocab_size=100,
                  context_length=512)


def _resident_fraction(t: torch.Tensor) -> float:
    """Which share of a tensor's pages are in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = t.data_ptr() & ~(mmap.PAGESIZE - 1)
    pages = -(-(t.data_ptr() + t.numel() * t.element_size() - start) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * mmap.PAGESIZE), vec) == 0
    return sum(v & 1 for v in vec) / pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_faulting_in_ahead_keeps_the_contents_and_makes_the_pages_resident(dtype):
    blocks = 1024 * 4 // dtype.itemsize  # 64 MiB: more than one chunk ahead
    pool = KVPool(CFG, num_blocks=blocks, block_size=16, dtype=dtype)
    assert pool.data.dtype == dtype and pool.data.count_nonzero() == 0
    k, v = pool.layer(2)
    k[5 * 16 + 3] = 1.5
    v[900 * 16] = -2.0
    if pool._madvise is None:  # a kernel without MADV_POPULATE_WRITE: nothing to do
        assert pool.resident_blocks == pool.num_blocks
        return
    pool.ensure_resident(10)
    assert 10 <= pool.resident_blocks < pool.num_blocks
    assert _resident_fraction(pool.data[0, 0, : 10 * 16]) == 1.0
    pool.ensure_resident(pool.num_blocks + 50)
    assert pool.resident_blocks == pool.num_blocks
    assert _resident_fraction(pool.data) == 1.0  # the pages are really there
    assert k[5 * 16 + 3].eq(1.5).all() and v[900 * 16].eq(-2.0).all()
    assert pool.data.count_nonzero() == 2 * CFG.n_kv_heads * CFG.head_dim
    pool.ensure_resident(3)  # already resident: nothing changes
    assert pool.resident_blocks == pool.num_blocks


def test_a_pool_in_another_dtype_counts_as_resident_from_the_start():
    pool = KVPool(CFG, num_blocks=8, block_size=16, dtype=torch.float16)
    assert pool.resident_blocks == pool.num_blocks
    pool.ensure_resident(8)



def _vm_flags(t: torch.Tensor) -> set[str]:
    """The VmFlags of the mapping that holds tensor ``t``'s second page (from
    /proc/self/smaps; advice starts at the first page boundary inside the tensor)."""
    address, found = t.data_ptr() + mmap.PAGESIZE, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError("no mapping holds the pool")


def test_the_pool_opts_out_of_transparent_huge_pages():
    """numpy advises huge pages for large arrays; on first touch the Linux kernel then
    compacts memory looking for them (3-4x slower to populate here), so the pool opts out
    unless asked to keep them (``KernelOptions.kv_hugepages``)."""
    pool = KVPool(CFG, num_blocks=1024, block_size=16)  # 64 MiB
    if pool._madvise is None:
        return
    assert "nh" in _vm_flags(pool.data) and "hg" not in _vm_flags(pool.data)
    assert "nh" not in _vm_flags(KVPool(CFG, num_blocks=1024, block_size=16, hugepages=True).data)
