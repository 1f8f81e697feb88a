"""Load GGUF tensors into the Transformer: dequantize, fuse, transpose to input-major.

A pipeline stage (``layers=(a, b)``) reads only its own tensors from the file: its
blocks, the embedding if it is the first, the final norm and head if it is the last.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from llmos_kernel.core import bf16_gemm, packed_gemm, panel_gemm, quant_matmul
from llmos_kernel.core.gguf_file import GGUFFile, ModelConfig
from llmos_kernel.core.model import Transformer
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.errors import InvalidArgument

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; use one of: auto, fp32, bf16, fp16")
    return DTYPES[name]


def resolve_dtype(name: str, device: str = "cpu", options: KernelOptions | None = None,
                  cuda_bf16: bool | None = None) -> str:
    """``auto``: bf16 where it is the fast path (a CPU with bf16 products under ``options``,
    on AMX tiles or AVX512-BF16; a CUDA device with bf16), else fp32; any other name is
    checked and returned. ``cuda_bf16``: whether the CUDA device that will run the model
    has bf16, as a process holding it saw (default: ask this process's)."""
    if name != "auto":
        parse_dtype(name)
        return name
    if torch.device(device).type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    return "bf16" if bf16_products_available(options) else "fp32"


# The model's projections and the GGUF tensors each one fuses, rows in this order.
FUSED = {"attn": {"wqkv": ("attn_q", "attn_k", "attn_v"), "wo": ("attn_output",)},
         "ffn": {"w_gate_up": ("ffn_gate", "ffn_up"), "w_down": ("ffn_down",)}}


def _owned(array: np.ndarray) -> torch.Tensor:
    """A tensor of ``array``: its memory where that is writable (a dequantized tensor), a
    copy where it is a view of the file, which is mapped read-only (an F32 tensor)."""
    if array.flags.writeable and array.flags.c_contiguous:
        return torch.from_numpy(array)
    return torch.from_numpy(np.array(array, order="C", copy=True))


def _input_major(parts: list[np.ndarray]) -> torch.Tensor:
    """``parts`` (each out x in, as stored) fused along out and transposed to in x out, in
    one pass: each part is written straight into its columns (torch copies a transposed
    view in blocks and on every core; numpy's strided copy, after a concatenate, took
    most of a load)."""
    width = parts[0].shape[1]
    out = torch.empty(width, sum(p.shape[0] for p in parts))
    column = 0
    for part in parts:
        out[:, column: column + part.shape[0]].copy_(torch.from_numpy(part).t())
        column += part.shape[0]
    return out


def _state_dict(gguf: GGUFFile, cfg: ModelConfig, layers: tuple[int, int]
                ) -> dict[str, torch.Tensor]:
    """The stage's tensors, fp32, contiguous and input-major, named as the model names them."""
    first, end = layers
    head = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    names = (["token_embd.weight"] if first == 0 else []) \
        + (["output_norm.weight", head] if end == cfg.n_layers else [])
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"]
    names += [f"blk.{i}.{n}.weight" for i in range(first, end) for n in per_layer]
    names = list(dict.fromkeys(names))  # a tied head is the embedding: read once
    with ThreadPoolExecutor(max_workers=2) as pool:
        raw = dict(zip(names, pool.map(gguf.load, names)))

    sd: dict[str, torch.Tensor] = {}
    if first == 0:
        sd["embed"] = _owned(raw["token_embd.weight"])
    if end == cfg.n_layers:
        sd["norm.weight"], sd["output"] = _owned(raw["output_norm.weight"]), _input_major([raw[head]])
    for i in range(first, end):
        def t(name: str, i: int = i) -> np.ndarray:
            return raw[f"blk.{i}.{name}.weight"]

        p = f"blocks.{i - first}."
        sd[p + "attn_norm.weight"] = _owned(t("attn_norm"))
        sd[p + "ffn_norm.weight"] = _owned(t("ffn_norm"))
        # fused, input-major; Q/K rows stay in GGUF's RoPE pair order (see model.Rotary)
        for module, projections in FUSED.items():
            for attr, parts in projections.items():
                sd[f"{p}{module}.{attr}"] = _input_major([t(part) for part in parts])
    return sd


def projections(model: Transformer, cfg: ModelConfig):
    """(module, attribute, the GGUF tensors it fuses) for every projection the model (or
    stage) holds, the head last."""
    for block in model.blocks:
        i = block.attn.layer
        for module_name, fused in FUSED.items():
            for attr, parts in fused.items():
                yield getattr(block, module_name), attr, [f"blk.{i}.{p}.weight" for p in parts]
    if model.last:
        yield model, "output", ["token_embd.weight" if cfg.tied_embeddings else "output.weight"]


def _attach_quantized(model: Transformer, gguf: GGUFFile, cfg: ModelConfig,
                      options: KernelOptions) -> None:
    """Give each projection the file stores in a kind quant_matmul reads a copy in that form,
    and its panel layout (see panel_gemm) unless ``options`` turn panels off."""
    panels = options.panels and panel_gemm.available()
    for module, attr, names in projections(model, cfg):
        kinds = {gguf.tensors[n].type_name for n in names}
        if len(kinds) == 1 and kinds.pop() in quant_matmul.QuantWeight.KINDS:
            quant = module.packed[attr] = quant_matmul.QuantWeight.cat([
                quant_matmul.QuantWeight.from_gguf(gguf.tensors[n].type_name, gguf.raw(n),
                                                   *gguf.tensors[n].shape) for n in names])
            panel = panel_gemm.PanelWeight.from_quant(quant) if panels else None
            if panel is not None:
                module.packed[attr + "/panels"] = panel


def _attach_mkl_packed(model: Transformer, cfg: ModelConfig, options: KernelOptions) -> None:
    """Pack every fp32 projection once for MKL (see packed_gemm), where torch has MKL, and
    let the row-major copy go: nothing reads it once the packed one is there. Projections
    with panels skip it: panels serve every step MKL would (and packing takes load time
    and, for a while, twice the weights' memory)."""
    if not options.mkl_pack or not packed_gemm.available():
        return
    for module, attr, _ in projections(model, cfg):
        if attr + "/panels" in module.packed and panel_gemm.serves_every_step(options):
            continue
        param = getattr(module, attr)
        weight = packed_gemm.pack(param)
        if weight is not None:
            module.packed[attr + "/fp32"] = weight
            param.data = torch.empty(0, dtype=param.dtype)


def _attach_bf16_products(model: Transformer, cfg: ModelConfig) -> bool:
    """Serve every projection with bf16 products (see bf16_gemm), laid out from its fp32 weights,
    and let those go; False (nothing changed) unless every projection's shape fits."""
    served = [(module, attr) for module, attr, _ in projections(model, cfg)]
    tiles = [bf16_gemm.TileWeight.from_weight(getattr(module, attr)) for module, attr in served]
    if any(t is None for t in tiles):
        return False
    for (module, attr), t in zip(served, tiles):
        module.packed[attr + "/bf16"] = t
        getattr(module, attr).data = torch.empty(0)
    model.bf16_products = True
    return True


def bf16_products_available(options: KernelOptions | None = None) -> bool:
    """Whether ``dtype="bf16"`` on this CPU means bf16 products (AMX tiles or AVX512-BF16)
    under fp32 activations (else the whole model runs in torch's bf16;
    ``bf16_kernel="torch"`` or ``c_kernels=False`` forces that)."""
    options = options or KernelOptions()
    return options.c_kernels and bf16_gemm.available(options.bf16_kernel)


def load_model(path: str | Path, dtype: str | torch.dtype = "fp32",
               device: str | torch.device = "cpu", options: KernelOptions | None = None,
               layers: tuple[int, int] | None = None) -> tuple[Transformer, GGUFFile]:
    """Open a GGUF file and build its Transformer with dequantized weights.

    ``bf16`` on a CPU with bf16 instructions (AMX or AVX512-BF16) keeps fp32 activations
    (norms, residuals, attention) and multiplies bf16-rounded operands in every projection,
    summed in fp32, with a bf16 KV pool (``model.kv_dtype``); elsewhere it is the whole
    model in torch's bf16. ``options`` choose the kernels (None: the defaults, not the
    environment; the caller reads that with ``KernelOptions.from_env()``); the model keeps
    them as ``model.options``. ``layers=(a, b)``: only that pipeline stage (see
    model.Transformer), only its tensors read."""
    options = options or KernelOptions()
    started = time.perf_counter()
    dtype = parse_dtype(dtype)
    gguf = GGUFFile.open(path)
    cfg = gguf.config()
    gguf.check_tensor_types()
    model = Transformer(cfg, options, layers)
    sd = _state_dict(gguf, cfg, model.layers)
    on_cpu = torch.device(device).type == "cpu"
    products = dtype == torch.bfloat16 and on_cpu and bf16_products_available(options)
    values = torch.float32 if products else dtype
    tensors = {k: v.to(device=device, dtype=values) for k, v in sd.items()}
    model.load_state_dict(tensors, assign=True, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.rotary.to(device)
    if products and not _attach_bf16_products(model, cfg):  # a shape the panels do not take:
        for p in model.parameters():  # the whole model in torch's bf16, then
            p.data = p.data.to(dtype)
    elif values == torch.float32 and on_cpu and not products:
        if options.c_kernels and quant_matmul.available():
            _attach_quantized(model, gguf, cfg, options)
        _attach_mkl_packed(model, cfg, options)
    model.eval()
    model.load_seconds = time.perf_counter() - started
    return model, gguf
