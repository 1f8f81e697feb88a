"""The paged KV pool: fixed-size blocks of key/value slots for every layer.

The pool is only memory. Which blocks belong to which sequence is decided by
the kernel's block manager (``llmos_kernel.engine.block_manager``), which never
touches a tensor; the model reads and writes slots ``block * block_size + i``.
A pipeline stage's pool holds only its own layers ``[a, b)``, with as many blocks as
every other stage's: the kernel's one block manager hands out block ids that mean the
same slots in every stage.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import torch

from llmos_kernel.core import paged_attention
from llmos_kernel.core.gguf_file import ModelConfig

POPULATE_CHUNK_BYTES = 32 << 20
"""How much of the pool ``ensure_resident`` faults in at a time, ahead of first use."""
WARM_CHUNK_BYTES = 8 << 20
"""How much ``warm`` faults in per call: the most a request arriving at an idle kernel waits
for it."""
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_MADV_NOHUGEPAGE = 15
_HOST_DTYPES = {torch.float32: np.float32, torch.bfloat16: np.uint16}  # numpy has no bf16


def _madvise() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


class KVPool:
    """Keys and values of layers ``[a, b)`` (``layers``; None: every layer) in
    ``num_blocks`` blocks of ``block_size`` slots.

    ``hugepages`` (``KernelOptions.kv_hugepages``) lets a host pool keep the transparent
    huge pages numpy asks for; by default it opts out (see below)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                 hugepages: bool = False, layers: tuple[int, int] | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one slot")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.first_layer, end = layers or (0, cfg.n_layers)
        on_cpu = torch.device(device).type == "cpu"
        self.paged_kernel = (on_cpu and dtype in paged_attention.KV_DTYPES
                             and cfg.n_heads // cfg.n_kv_heads <= paged_attention.MAX_GROUP
                             and paged_attention.available())
        shape = (end - self.first_layer, 2, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        if on_cpu and dtype in _HOST_DTYPES:
            # calloc'd pages: zero (so padding slots never hold NaN) yet only resident once used.
            # numpy asks for transparent huge pages on large arrays; the Linux kernel then
            # compacts memory to find them on first touch, which makes populating a fresh
            # pool several times slower than in 4 KiB pages, so the pool opts out unless
            # ``hugepages`` (a little faster once warm).
            self.data = torch.from_numpy(np.zeros(shape, dtype=_HOST_DTYPES[dtype])).view(dtype)
            self._madvise = _madvise()
            if self._madvise is not None and not hugepages:
                start = -(-self.data.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
                end = self.data.data_ptr() + self.nbytes
                self._madvise(start, end - start, _MADV_NOHUGEPAGE)
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
            self._madvise = None
        self.resident_blocks = 0 if self._madvise else num_blocks

    def ensure_resident(self, blocks: int) -> None:
        """Fault in the pages of blocks ``[0, blocks)``, and a chunk beyond, before a step
        first writes them. The pool is calloc'd, so a page costs nothing until it is used;
        but a step's scattered first writes each take a page fault, where one
        MADV_POPULATE_WRITE call per slab does the same pages many times faster. Blocks are
        handed out lowest first until every one has been used once, so the resident part
        grows from the front."""
        if blocks > self.resident_blocks:
            ahead = self.resident_blocks + self._blocks_in(POPULATE_CHUNK_BYTES)
            self._populate(max(blocks, ahead))

    def warm(self, max_bytes: int = WARM_CHUNK_BYTES) -> bool:
        """Fault in up to ``max_bytes`` more of the pool ahead of any step (the kernel calls
        this while it is idle, so a busy spell later pays no page faults); True while some of
        the pool is not yet resident."""
        if self.resident_blocks < self.num_blocks:
            self._populate(self.resident_blocks + self._blocks_in(max_bytes))
        return self.resident_blocks < self.num_blocks

    def _blocks_in(self, nbytes: int) -> int:
        return max(1, nbytes // self.bytes_per_block_here)

    def _populate(self, blocks: int) -> None:
        slab = self.data[0, 0]
        per_block = self.block_size * slab[0].numel() * slab.element_size()  # in one slab
        target = min(self.num_blocks, blocks)
        for layer in range(self.data.shape[0]):
            for kv in (0, 1):
                base = self.data[layer, kv].data_ptr()
                start = (base + self.resident_blocks * per_block) & ~(mmap.PAGESIZE - 1)
                end = base + target * per_block
                if self._madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
                    self._madvise, self.resident_blocks = None, self.num_blocks  # old kernel
                    return
        self.resident_blocks = target

    @property
    def bytes_per_block_here(self) -> int:
        """Bytes of one block over every layer, keys and values."""
        return self.nbytes // self.num_blocks

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                        n_layers: int | None = None) -> int:
        """Bytes of one block over ``n_layers`` layers (None: the model's every layer)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * (cfg.n_layers if n_layers is None else n_layers) * block_size * cfg.n_kv_heads * cfg.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``[slots, kv_heads, head_dim]`` key and value views of layer ``i`` (the
        model's numbering: a stage's pool starts at its first layer)."""
        i -= self.first_layer
        return self.data[i, 0], self.data[i, 1]

    def _slots(self, blocks: list[int]) -> torch.Tensor:
        b = torch.as_tensor(blocks, dtype=torch.long, device=self.data.device)
        return (b[:, None] * self.block_size
                + torch.arange(self.block_size, device=b.device)).reshape(-1)

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """A host copy of the given blocks (for swap-out and context snapshots)."""
        return self.data[:, :, self._slots(blocks)].to("cpu", copy=True)

    def write_blocks(self, blocks: list[int], saved: torch.Tensor) -> None:
        """Put a copy made by ``read_blocks`` back into (possibly other) blocks."""
        self.data[:, :, self._slots(blocks)] = saved.to(self.data.device, self.data.dtype)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write support: duplicate ``src`` blocks into ``dst`` blocks."""
        self.data[:, :, self._slots(dst)] = self.data[:, :, self._slots(src)]
