"""LoRA adapters as files in the model store: ``models/<name>/adapter.safetensors`` beside
``adapter.json`` (the base model by name and by GGUF sha256 and size, rank, alpha, targets).

``llmos train lora`` writes them; a runner loads them by name; ``llmos models list`` shows
them with their base.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from llmos_kernel.core.lora import LoraAdapter
from llmos_kernel.errors import InvalidArgument, ModelFormatError, NotFound
from llmos_kernel.paths import models_dir

WEIGHTS = "adapter.safetensors"
META = "adapter.json"


@dataclass
class AdapterMeta:
    """What ``adapter.json`` says."""

    base: str  # the base model's store name (or file name)
    base_sha256: str
    base_bytes: int
    rank: int
    alpha: float
    targets: list[str]
    n_layers: int


@dataclass
class LoadedAdapter:
    name: str
    path: Path  # the adapter's folder
    meta: AdapterMeta
    adapter: LoraAdapter


def names() -> list[str]:
    """The adapters in the store, by name."""
    return sorted(p.parent.name for p in models_dir().glob(f"*/{META}"))


def folder(name_or_dir: str | Path) -> Path:
    """An adapter's folder: a directory holding ``adapter.json``, or a name in the store
    (NotFound lists the adapters there)."""
    path = Path(name_or_dir).expanduser()
    if (path / META).is_file():
        return path
    stored = isinstance(name_or_dir, str) and "/" not in name_or_dir \
        and name_or_dir not in ("", ".", "..")
    if stored and (models_dir() / name_or_dir / META).is_file():
        return models_dir() / name_or_dir
    known = ", ".join(names()) or "none; train one with: llmos train lora"
    raise NotFound(f"no LoRA adapter {str(name_or_dir)!r}; adapters in the store: {known}")


def read_meta(name_or_dir: str | Path) -> AdapterMeta:
    path = folder(name_or_dir) / META
    try:
        return AdapterMeta(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ModelFormatError(f"{path} is not an adapter description: {e}") from e


def load(name_or_dir: str | Path) -> LoadedAdapter:
    from safetensors.torch import load_file

    path = folder(name_or_dir)
    meta = read_meta(path)
    weights = load_file(path / WEIGHTS)
    adapter = LoraAdapter(meta.rank, meta.alpha, tuple(meta.targets), weights, meta.n_layers)
    return LoadedAdapter(path.name, path, meta, adapter)


def save(adapter: LoraAdapter, out: Path, base_path: Path, base_name: str) -> Path:
    """Write the adapter's weights and description into ``out`` (created)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in adapter.weights.items()},
              out / WEIGHTS)
    meta = AdapterMeta(base_name, file_sha256(base_path), base_path.stat().st_size,
                       adapter.rank, adapter.alpha, list(adapter.targets), adapter.n_layers)
    (out / META).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return out


def check_base(meta: AdapterMeta, base_path: Path, name: str) -> None:
    """InvalidArgument unless ``base_path`` is the file the adapter was trained on (by size)."""
    if base_path.stat().st_size != meta.base_bytes:
        raise InvalidArgument(f"adapter {name!r} was trained on {meta.base} "
                              f"({meta.base_bytes} bytes), not on {base_path.name}")


def n_params(weights: Path) -> int:
    from safetensors import safe_open

    with safe_open(weights, framework="numpy") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
