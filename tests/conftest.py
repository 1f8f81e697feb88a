"""Shared fixtures: one real model file, one reference implementation, per test session.

The model comes from the llmos model store (``llmos models pull smollm2`` puts
it there; the fixture pulls it if it is missing). The reference is Hugging
Face transformers loading the same GGUF file, loaded once because it takes
about half a minute on a 2-core machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Timings on a shared 2-core machine are erratic: hypothesis must not fail a test for slowness.
settings.register_profile("llmos", deadline=None)
settings.load_profile("llmos")

DEFAULT_TEST_MODEL = os.environ.get("LLMOS_TEST_MODEL", "smollm2")


@pytest.fixture(scope="session")
def model_path() -> Path:
    from llmos_kernel import store
    from llmos_kernel.errors import NotFound

    try:
        return store.resolve_model(DEFAULT_TEST_MODEL)
    except NotFound:
        return store.pull(DEFAULT_TEST_MODEL)


@pytest.fixture(scope="session")
def gguf_file(model_path):
    from llmos_kernel.core.gguf_file import GGUFFile

    return GGUFFile.open(model_path)


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.fixture(scope="session")
def hf_model(model_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def engine(model_path):
    """One in-process engine on the real model, shared by the tests that need one."""
    from llmos_kernel.engine.local import load_engine

    return load_engine(str(model_path), kv_budget="512MiB", swap_budget="256MiB")
