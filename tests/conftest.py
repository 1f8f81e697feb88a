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
    """One in-process engine on the real model, shared by the tests that need one: fp32, the
    precision the reference's outputs are matched in (bf16 has tests of its own)."""
    from llmos_kernel.engine.local import load_engine

    return load_engine(str(model_path), dtype="fp32", kv_budget="512MiB", swap_budget="256MiB")


@pytest.fixture(scope="session")
def prompt_ids(engine):
    from tests.reference_prompts import PROMPTS

    ids = {name: engine.tokenizer.encode(text) for name, text in PROMPTS.items()}
    assert len(ids["long"]) >= 1000
    return ids


@pytest.fixture(scope="session")
def reference_greedy(hf_model, prompt_ids):
    """The reference's 32 greedy tokens after each prompt."""
    import torch

    out = {}
    for name, ids in prompt_ids.items():
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                    max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    pad_token_id=0)
        out[name] = gen[0, len(ids):].tolist()
    return out


AGENTS_DIR = Path(__file__).parent / "agents"


class KernelHarness:
    """One kernel for the whole session, and one event loop (in a thread) to talk to it.

    ``run(coro)`` runs a coroutine on that loop as the attached test driver process,
    so tests can use the syscall layer (``from syscalls import ipc, proc, ...``).
    """

    def __init__(self, handle, state_dir: Path, name: str):
        import asyncio
        import threading

        self.handle, self.state_dir, self.name = handle, state_dir, name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pid = self.run(self._attach())

    async def _attach(self) -> int:
        import syscalls

        return await syscalls.attach("test-driver", kernel=self.name, state_dir=str(self.state_dir))

    def run(self, coro, timeout: float = 300.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, method: str, *args, timeout: float = 120.0):
        """A driver-API call with the root token, e.g. ``call("ps")``."""
        import ray

        from llmos_kernel.client import unwrap

        token = (self.state_dir / "root.token").read_text()
        return unwrap(ray.get(getattr(self.handle, method).remote(token, *args), timeout=timeout))

    async def actors(self) -> dict:
        """What the agent hosts and the model shard say of themselves, asked through the
        kernel (they answer no one else): ``{"hosts": {id: info}, "shard": info}``."""
        from llmos_kernel.client import unwrap

        token = (self.state_dir / "root.token").read_text()
        return unwrap(await self.handle.actors.remote(token))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def sandbox_available() -> None:
    """Skips a test of sandboxed processes where the kernel could not run one (no Landlock
    or libseccomp); the development machines and CI have both."""
    from actors.sandbox_policy import check_available
    from llmos_kernel.errors import LlmosError

    try:
        check_available()
    except LlmosError as e:  # pragma: no cover
        pytest.skip(f"no sandbox on this machine: {e}")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the session; agent hosts can import tests/agents/*."""
    import ray

    ray.init(address="local", namespace="llmos", include_dashboard=False,  # never a running one
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [str(AGENTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]),
                                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def kernel(ray_session, model_path, tmp_path_factory):
    """A kernel on the real model, shared by every test that needs one."""
    import ray

    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import start_kernel

    state = tmp_path_factory.mktemp("kernel-state")
    name = "test-kernel"
    handle = start_kernel(KernelConfig(
        state_dir=str(state), name=name, hosts=2,
        llm=LLMConfig(model=str(model_path), kv_budget="512MiB", swap_budget="256MiB")),
        detached=False)
    harness = KernelHarness(handle, state, name)
    yield harness
    harness.close()
    ray.kill(handle)
