"""Which kernels a model may use, chosen once by whoever starts it.

The core never reads the environment: ``KernelOptions.from_env()`` is the one place the
``LLMOS_*`` kernel switches are read, by the edge (CLI, engine builder, Ray actor), which
then passes the options to ``load_model`` (and ``resolve_dtype``, ``KVPool``). A frozen
dataclass of plain values, so it crosses process boundaries as ``to_dict()`` /
``from_dict()`` or pickled as is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

BF16_KERNELS = ("amx", "avx512", "torch")
"""What ``bf16_kernel`` may name ("" picks the fastest this CPU has; torch: no bf16 products)."""


@dataclass(frozen=True)
class KernelOptions:
    c_kernels: bool = True  # False: torch code only (no compiled C kernel is asked for)
    bf16_kernel: str = ""  # bf16 products on "amx" or "avx512", "torch" for none, "" fastest
    panels: bool = True  # quantized projections of 2+ rows from panels (see panel_gemm)
    mkl_pack: bool = True  # fp32 projections on MKL's packed weights (see packed_gemm)
    kv_hugepages: bool = False  # let the KV pool take transparent huge pages (see KVPool)
    quant_max_rows: int = 4  # steps of up to this many rows read quantized bytes (quant_matmul)
    panel_min_rows: int = 2  # panels serve steps of panel_min_rows to panel_max_rows rows
    panel_max_rows: int = 1 << 16

    def __post_init__(self) -> None:
        _check_bf16_kernel(self.bf16_kernel, "bf16_kernel")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelOptions:
        """The options the ``LLMOS_*`` switches ask for; defaults for those not set.

        ``LLMOS_NO_C_KERNELS=1``, ``LLMOS_BF16_KERNEL=amx|avx512|torch``,
        ``LLMOS_NO_PANELS``, ``LLMOS_NO_MKL_PACK`` (any non-empty value),
        ``LLMOS_KV_HUGEPAGES=1``, ``LLMOS_QUANT_MAX_ROWS``, ``LLMOS_PANEL_MIN_ROWS`` and
        ``LLMOS_PANEL_MAX_ROWS`` (integers)."""
        bf16_kernel = environ.get("LLMOS_BF16_KERNEL", "")
        _check_bf16_kernel(bf16_kernel, "LLMOS_BF16_KERNEL")
        default = cls()
        return cls(
            c_kernels=environ.get("LLMOS_NO_C_KERNELS") != "1",
            bf16_kernel=bf16_kernel,
            panels=not environ.get("LLMOS_NO_PANELS"),
            mkl_pack=not environ.get("LLMOS_NO_MKL_PACK"),
            kv_hugepages=environ.get("LLMOS_KV_HUGEPAGES") == "1",
            quant_max_rows=_int(environ, "LLMOS_QUANT_MAX_ROWS", default.quant_max_rows),
            panel_min_rows=_int(environ, "LLMOS_PANEL_MIN_ROWS", default.panel_min_rows),
            panel_max_rows=_int(environ, "LLMOS_PANEL_MAX_ROWS", default.panel_max_rows),
        )

    def to_dict(self) -> dict[str, bool | str | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, bool | str | int]) -> KernelOptions:
        """The inverse of ``to_dict``; a name that is not a field is an error."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown kernel options: {', '.join(sorted(unknown))}")
        return cls(**values)


def _check_bf16_kernel(value: str, what: str) -> None:
    if value and value not in BF16_KERNELS:
        raise ValueError(f"{what}={value!r}: use one of {', '.join(BF16_KERNELS)} "
                         "(or leave it empty for the fastest this CPU has)")


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None
