"""The paged KV pool: fixed-size blocks of key/value slots for every layer.

The pool is only memory. Which blocks belong to which sequence is decided by
the kernel's block manager (``llmos_kernel.engine.block_manager``), which never
touches a tensor; the model reads and writes slots ``block * block_size + i``.
"""

from __future__ import annotations

import numpy as np
import torch

from llmos_kernel.core import paged_attention
from llmos_kernel.core.gguf_file import ModelConfig


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one slot")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.paged_kernel = (torch.device(device).type == "cpu" and dtype == torch.float32
                             and cfg.n_heads // cfg.n_kv_heads <= paged_attention.MAX_GROUP
                             and paged_attention.available())
        shape = (cfg.n_layers, 2, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        if torch.device(device).type == "cpu" and dtype == torch.float32:
            # calloc'd pages: zero (so padding slots never hold NaN) yet only resident once used
            self.data = torch.from_numpy(np.zeros(shape, dtype=np.float32))
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``[slots, kv_heads, head_dim]`` key and value views of layer ``i``."""
        return self.data[i, 0], self.data[i, 1]

    def _slots(self, blocks: list[int]) -> torch.Tensor:
        b = torch.as_tensor(blocks, dtype=torch.long)
        return (b[:, None] * self.block_size + torch.arange(self.block_size)).reshape(-1)

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """A host copy of the given blocks (for swap-out and context snapshots)."""
        return self.data[:, :, self._slots(blocks)].to("cpu", copy=True)

    def write_blocks(self, blocks: list[int], saved: torch.Tensor) -> None:
        """Put a copy made by ``read_blocks`` back into (possibly other) blocks."""
        self.data[:, :, self._slots(blocks)] = saved.to(self.data.device, self.data.dtype)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write support: duplicate ``src`` blocks into ``dst`` blocks."""
        self.data[:, :, self._slots(dst)] = self.data[:, :, self._slots(src)]
