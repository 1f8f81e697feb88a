"""Read a GGUF file: metadata, the model's shape, and dequantized tensors.

The header is parsed here (it is a few kilobytes of length-prefixed records,
and doing it by hand keeps opening a model well under a second with exact
errors for truncated files); dequantization of each tensor type is delegated
to the ``gguf`` package, the format's own reference code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmos_kernel.errors import ModelFormatError, NotFound, UnsupportedModel

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

# GGML tensor types llmos can load: name -> (type id, values per block, bytes per block)
TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}

# Scalar value types of GGUF metadata: id -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                  7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (GGUF stores it reversed)
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        known = TENSOR_TYPES.get(self.type_id)
        return known[0] if known else _ggml_type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family Transformer, as its GGUF declares it."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    context_length: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int = 0
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

    @property
    def n_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_ff
        embed = self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.d_model) + embed + self.d_model

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes


@dataclass
class GGUFFile:
    """An opened GGUF file: its metadata and tensor directory (data stays on disk)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _data: np.memmap = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        if not path.exists():
            raise NotFound(f"model file not found: {path}")
        if not path.is_file():
            raise ModelFormatError(f"not a file: {path}")
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"cannot read {path}: {e}") from e
        reader = _HeaderReader(data, path)
        return reader.read(cls)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def config(self) -> ModelConfig:
        """The Transformer shape; raises UnsupportedModel for non-Llama files."""
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"{self.path.name}: architecture {arch!r} is not supported "
                f"(llmos runs: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        md = self.metadata

        def need(key: str) -> Any:
            full = f"{arch}.{key}"
            if full not in md:
                raise ModelFormatError(f"{self.path.name}: metadata key {full!r} is missing")
            return md[full]

        n_heads = int(need("attention.head_count"))
        vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            embed = self.tensors.get("token_embd.weight")
            if embed is None:
                raise ModelFormatError(f"{self.path.name}: vocabulary size unknown (no "
                                       f"{arch}.vocab_size, tokenizer or token_embd.weight)")
            vocab = embed.shape[0]
        d_model = int(need("embedding_length"))
        return ModelConfig(
            n_layers=int(need("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(md.get(f"{arch}.attention.head_count_kv", n_heads)),
            d_ff=int(need("feed_forward_length")),
            vocab_size=int(vocab),
            context_length=int(md.get(f"{arch}.context_length", 2048)),
            rope_base=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            head_dim=int(md.get(f"{arch}.attention.key_length", d_model // n_heads)),
            tied_embeddings="output.weight" not in self.tensors,
        )

    def check_tensor_types(self) -> None:
        """Raise UnsupportedModel naming the first tensor of a type llmos cannot load."""
        for info in self.tensors.values():
            if info.type_id not in TENSOR_TYPES:
                supported = ", ".join(name for name, _, _ in TENSOR_TYPES.values())
                raise UnsupportedModel(
                    f"{self.path.name}: tensor {info.name!r} has type {info.type_name}, "
                    f"which llmos cannot load (supported: {supported})"
                )

    def raw(self, name: str) -> np.ndarray:
        """One tensor's bytes as stored (a read-only view of the file)."""
        info = self.tensors[name]
        return self._data[info.offset: info.offset + info.nbytes]

    def load(self, name: str) -> np.ndarray:
        """One tensor, dequantized to float32 in numpy order."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path.name}: tensor {name!r} is missing")
        if info.type_id not in TENSOR_TYPES:
            self.check_tensor_types()
        raw = self._data[info.offset: info.offset + info.nbytes]
        type_name = TENSOR_TYPES[info.type_id][0]
        if type_name == "F32":
            flat = raw.view(np.float32)
        elif type_name == "F16":
            flat = raw.view(np.float16).astype(np.float32)
        elif type_name == "BF16":
            flat = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            flat = dequantize(raw, GGMLQuantizationType(info.type_id)).reshape(-1)
        return np.asarray(flat, dtype=np.float32).reshape(info.shape)

    def tensor_type_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for info in self.tensors.values():
            hist[info.type_name] = hist.get(info.type_name, 0) + 1
        return hist


class _HeaderReader:
    """Walks the GGUF header with bounds checks so truncation gives a clear error."""

    def __init__(self, data: np.memmap, path: Path):
        self.data, self.path, self.pos = data, path, 0
        # reads go through a memoryview of the mapping: slicing the memmap itself makes a
        # numpy object per read, and a tokenizer's vocabulary is ~10^5 strings
        self.view = memoryview(data)

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path.name}: {what} (is the file truncated or corrupt?)")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"unexpected end of file at byte {self.pos} while reading the header")
        out = self.view[self.pos: self.pos + n].tobytes()
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row (an array's items), each bounds-checked as ``string``."""
        view, pos, end, out = self.view, self.pos, len(self.view), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"unexpected end of file at byte {pos} while reading the header")
            (n,) = length(view, pos)
            if n > 1 << 30:
                self.pos = pos
                raise self.fail(f"string length {n} is implausible")
            if pos + 8 + n > end:
                self.pos = pos + 8
                raise self.fail(f"unexpected end of file at byte {pos + 8} while reading the "
                                "header")
            out.append(str(view[pos + 8: pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        self.pos = pos
        return out

    def string(self) -> str:
        return self.strings(1)[0]

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if count > 1 << 28:
                raise self.fail(f"array length {count} is implausible")
            if itype in _NUMPY_SCALARS:
                dt = np.dtype(_NUMPY_SCALARS[itype])
                arr = np.frombuffer(self.take(dt.itemsize * count), dtype=dt)
                return [bool(x) for x in arr] if itype == 7 else arr.tolist()
            if itype == _STRING:
                return self.strings(count)
            return [self.value(itype) for _ in range(count)]
        raise self.fail(f"unknown metadata value type {vtype}")

    def read(self, cls: type[GGUFFile]) -> GGUFFile:
        if len(self.data) < 4 or self.data[:4].tobytes() != GGUF_MAGIC:
            raise ModelFormatError(f"{self.path.name}: not a GGUF file (bad magic bytes)")
        self.pos = 4
        version = self.scalar("<I")
        if version not in (2, 3):
            raise UnsupportedModel(f"{self.path.name}: GGUF version {version} is not supported")
        n_tensors, n_kv = self.scalar("<Q"), self.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise self.fail("tensor or key count is implausible")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.scalar("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = self.string()
            n_dims = self.scalar("<I")
            if n_dims > 8:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [self.scalar("<Q") for _ in range(n_dims)]
            raw_infos.append((name, tuple(reversed(dims)), self.scalar("<I"), self.scalar("<Q")))
        align = int(metadata.get("general.alignment", 32))
        data_start = (self.pos + align - 1) // align * align
        tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, rel in raw_infos:
            n_el = int(np.prod(shape)) if shape else 1
            block, block_bytes = _block_geometry(type_id)
            nbytes = n_el // block * block_bytes if block else 0
            info = TensorInfo(name, shape, type_id, data_start + rel, nbytes)
            if block and info.offset + nbytes > len(self.data):
                raise self.fail(
                    f"tensor {name!r} ends at byte {info.offset + nbytes} but the file has "
                    f"{len(self.data)} bytes"
                )
            tensors[name] = info
        return cls(self.path, version, metadata, tensors, self.data)


def _block_geometry(type_id: int) -> tuple[int, int]:
    if type_id in TENSOR_TYPES:
        _, block, nbytes = TENSOR_TYPES[type_id]
        return block, nbytes
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return 0, 0


def _ggml_type_name(type_id: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type#{type_id}"
