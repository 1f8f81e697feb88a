"""The memory manager: what each device has, and how the kernel splits it.

Weights are sized from the model's shape; the KV pool gets a byte budget
(``--kv-budget``, or a share of what is free) that is turned into a whole
number of blocks once, so the pool can never outgrow it. Host swap space for
preempted and suspended contexts has its own budget.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.errors import InvalidArgument, QuotaExceeded

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB}


@dataclass
class Device:
    name: str  # "cpu" or "cuda:N"
    kind: str
    total_bytes: int
    free_bytes: int


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    weight_bytes: int
    kv_budget_bytes: int
    block_size: int
    num_blocks: int
    kv_bytes_per_block: int
    swap_blocks: int
    swap_bytes: int

    @property
    def kv_pool_bytes(self) -> int:
        return self.num_blocks * self.kv_bytes_per_block

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_pool_bytes": self.kv_pool_bytes}


def parse_bytes(value: str | int) -> int:
    """``4GiB``, ``512m``, ``1_000_000`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        if unit not in _UNITS or not num:
            raise InvalidArgument(f"cannot read {value!r} as a size; write e.g. 2GiB, 512MiB or 1000000")
        try:
            n = int(float(num) * _UNITS[unit])
        except ValueError:
            raise InvalidArgument(f"cannot read {value!r} as a size; write e.g. 2GiB") from None
    else:
        raise InvalidArgument(f"a size must be an int or a string like '2GiB', got {value!r}")
    if n <= 0:
        raise InvalidArgument(f"a size must be positive, got {value!r}")
    return n


def devices() -> list[Device]:
    """CPU RAM and every visible CUDA device on this node."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free = _available_ram() or pages
    found = [Device("cpu", "cpu", pages, free)]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free_b, total_b = torch.cuda.mem_get_info(i)
            found.append(Device(f"cuda:{i}", "cuda", total_b, free_b))
    return found


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_memory(cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                kv_budget: str | int = "auto", block_size: int = 16,
                swap_budget: str | int = "auto", found: list[Device] | None = None
                ) -> MemoryPlan:
    """Split a device between weights and a KV pool of whole blocks, or say why it can't.
    ``found``: the devices as the process that will hold the weights sees them (a CUDA
    device is seen only by a process Ray gave a GPU); default: this process's."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    weight_bytes = cfg.n_params * itemsize
    found = found if found is not None else devices()
    dev = next((d for d in found if d.name == device or (device == "cuda" and d.kind == "cuda")),
               None)
    if dev is None:
        raise InvalidArgument(f"device {device!r} is not available here (have: "
                              f"{', '.join(d.name for d in found)})")
    per_block = KVPool.bytes_per_block(cfg, block_size, dtype)
    headroom = dev.free_bytes - weight_bytes
    if kv_budget == "auto":
        budget = int(min(4 * GiB, max(headroom, 0) * 0.25))
    else:
        budget = parse_bytes(kv_budget)
        if budget > headroom:
            raise QuotaExceeded(
                f"a KV budget of {budget / GiB:.2f} GiB does not fit on {dev.name}: "
                f"{dev.free_bytes / GiB:.2f} GiB free, {weight_bytes / GiB:.2f} GiB go to weights")
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise QuotaExceeded(
            f"a KV budget of {budget} bytes holds fewer than 2 blocks of {per_block} bytes "
            f"({block_size} tokens each); raise --kv-budget")
    if swap_budget == "auto":
        swap = int(min(4 * GiB, max(_available_ram() or 0, 0) * 0.15))
    else:
        swap = 0 if swap_budget in (0, "0") else parse_bytes(swap_budget)
    return MemoryPlan(device=dev.name, dtype=str(dtype).removeprefix("torch."),
                      weight_bytes=weight_bytes, kv_budget_bytes=budget, block_size=block_size,
                      num_blocks=int(num_blocks), kv_bytes_per_block=per_block,
                      swap_blocks=int(swap // per_block), swap_bytes=swap)
