"""Every C kernel in llmos_kernel/core/csrc compiles with the flags ckernel builds it with,
and exports every function its Python module declares. No model, no Ray, no cache: each
library is built into a temporary directory."""

from __future__ import annotations

import ctypes
import importlib

import pytest

from llmos_kernel.core import ckernel

needs_compiler = pytest.mark.skipif(ckernel.compiler() is None, reason="no C compiler here")


def test_every_kernel_module_has_its_source():
    assert ckernel.sources() == sorted(["bf16_attention", "bf16_gemm", "fused_ops",
                                        "paged_attention", "panel_gemm", "quant_matmul"])
    assert (ckernel.CSRC / "vecmath.h").is_file()


@needs_compiler
@pytest.mark.parametrize("name", ckernel.sources())
def test_the_kernel_builds_and_exports_what_python_declares(name, tmp_path):
    target = tmp_path / f"{name}.so"
    ckernel.build(name, target, openmp=True)  # BuildError, with the compiler's messages
    declare = importlib.import_module(f"llmos_kernel.core.{name}")._declare
    declare(ctypes.CDLL(str(target)))  # AttributeError where a declared function is missing


@needs_compiler
def test_a_source_that_does_not_compile_is_an_error(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.c").write_text("int broken(void) { return 1 }\n")
    monkeypatch.setattr(ckernel, "CSRC", csrc)
    with pytest.raises(ckernel.BuildError, match="broken"):
        ckernel.build("broken", tmp_path / "broken.so")


def test_the_cache_tag_follows_the_shared_headers(tmp_path, monkeypatch):
    """Editing a header rebuilds the kernels (the tag names the library in the cache)."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "k.c").write_text('#include "shared.h"\nint k(void) { return K; }\n')
    (csrc / "shared.h").write_text("#define K 1\n")
    monkeypatch.setattr(ckernel, "CSRC", csrc)
    before = ckernel._tag("k", openmp=False)
    (csrc / "shared.h").write_text("#define K 2\n")
    assert ckernel._tag("k", openmp=False) != before
    assert ckernel._tag("k", openmp=True) != ckernel._tag("k", openmp=False)


@needs_compiler
def test_prebuild_builds_what_is_missing_once(tmp_path, monkeypatch):
    """``llmos kernel start`` builds missing kernels up front (its own progress line): a
    kernel is missing until built, and a second prebuild finds nothing to do."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in ("a", "b", "c"):
        (csrc / f"{name}.c").write_text(f"int {name}(void) {{ return 1; }}\n")
    monkeypatch.setattr(ckernel, "CSRC", csrc)
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    assert ckernel.missing() == ["a", "b", "c"]
    seen = []
    assert sorted(ckernel.prebuild(lambda name, ok: seen.append((name, ok)))) == ["a", "b", "c"]
    assert sorted(seen) == [("a", True), ("b", True), ("c", True)]
    assert ckernel.missing() == [] and ckernel.prebuild() == []
    assert ctypes.CDLL(str(ckernel._target("b", True))).b() == 1
