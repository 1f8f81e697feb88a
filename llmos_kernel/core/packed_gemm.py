"""fp32 projections through MKL's packed-weight GEMM, for steps of more than a few rows.

``x @ W`` hands MKL a plain row-major weight, which it repacks into its own
panel layout on every call; at 32 to 64 rows, the decode steps of a busy
kernel, that repacking is a fifth of the product's time. torch exposes MKL's
``cblas_sgemm_pack`` / ``cblas_sgemm_compute`` (``torch.ops.mkl``), so each
weight is packed once at load and used for every row count. The arithmetic is
MKL's own fp32 kernel either way; only the layout it reads changes.

Where torch has no MKL (ARM, some builds) ``pack`` returns None and the model
keeps ``x @ W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedWeight:
    packed: torch.Tensor  # MKL's panel layout of W^T (an opaque mkldnn tensor)
    shape: torch.Tensor  # a zero-stride [out, in] stand-in: MKL reads only its sizes


def available() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> PackedWeight | None:
    """Pack an input-major ``[in, out]`` fp32 CPU weight; None where MKL cannot."""
    if not available() or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.t().contiguous(), 32)
    except RuntimeError:
        return None
    return PackedWeight(packed, torch.zeros(()).expand(weight.shape[1], weight.shape[0]))


def matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x @ W`` for ``x`` ``[rows, in]``, any number of rows."""
    x = x.contiguous()
    return torch.ops.mkl._mkl_linear(x, weight.packed, weight.shape, None, x.shape[0])
