"""The CUDA path, run wherever a CUDA device is present (elsewhere these tests are skipped
and the CPU path, which every other test covers, is the one that runs).

On the device: the engine's greedy tokens equal transformers' on the host (fp32 both,
the reference independent of our core), in a mixed batch of decodes and chunked prefills;
the weights and the KV pool live on the device and ``auto`` picks bf16 there; LoRA rows
and pipeline stages run split on the device; a kernel started with ``device="cuda"``
gets its GPU from Ray (its memory plan from a GPU worker's view) and serves a request.
"""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import Request
from tests.reference_prompts import PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(scope="module")
def cuda_engine(model_path):
    from llmos_kernel.engine.local import load_engine

    return load_engine(str(model_path), dtype="fp32", device="cuda", kv_budget="256MiB",
                       swap_budget="64MiB", max_batch_tokens=64)


def _chat_ids(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


def test_greedy_tokens_on_the_device_equal_transformers_on_the_host(cuda_engine, hf_model):
    tok = cuda_engine.tokenizer
    prompts = {name: _chat_ids(tok, PROMPTS[name]) for name in ("english", "long")}
    for rid, ids in prompts.items():  # a long prompt's chunks beside the other's decodes
        cuda_engine.add_request(Request(rid, ids, SamplingParams(max_tokens=16, temperature=0,
                                                                 ignore_eos=True)))
    ours = {rid: [t for d in ds for t in d.token_ids]
            for rid, ds in cuda_engine.run_until_done().items()}
    for rid, ids in prompts.items():
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    min_new_tokens=16)[0, len(ids):].tolist()
        assert ours[rid] == ref, rid


def test_weights_and_kv_live_on_the_device_and_auto_is_bf16(cuda_engine):
    from llmos_kernel.core.weights import resolve_dtype

    runner = cuda_engine.runner
    assert all(p.device.type == "cuda" for p in runner.model.parameters())
    assert runner.kv.data.device.type == "cuda"
    assert resolve_dtype("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported()
                                             else "fp32")


def test_stages_on_the_device_give_the_whole_models_logits(model_path):
    from llmos_kernel.core.kv_cache import KVPool
    from llmos_kernel.core.weights import load_model
    from llmos_kernel.engine.runner import ModelRunner, SeqStep, StepPlan

    whole, _ = load_model(model_path, device="cuda")
    cfg = whole.config
    cut = cfg.n_layers // 2
    parts = [load_model(model_path, device="cuda", layers=r)[0]
             for r in ((0, cut), (cut, cfg.n_layers))]
    ids = list(range(100, 140))

    def plan() -> StepPlan:
        return StepPlan([SeqStep(1, ids, 0, [0, 1, 2], sample=True,
                                 params=SamplingParams(temperature=0, logprobs=True))])

    ref = ModelRunner(whole, KVPool(cfg, 4, 16, whole.kv_dtype, "cuda")).execute(plan())
    first = ModelRunner(parts[0], KVPool(cfg, 4, 16, whole.kv_dtype, "cuda", layers=(0, cut)))
    last = ModelRunner(parts[1], KVPool(cfg, 4, 16, whole.kv_dtype, "cuda",
                                        layers=(cut, cfg.n_layers)))
    out = last.execute(plan(), first.execute(plan()))
    assert out.tokens == ref.tokens
    assert out.logprobs[1] == pytest.approx(ref.logprobs[1], abs=1e-4)


def test_a_cuda_kernel_gets_its_gpu_from_ray_and_serves(ray_session, model_path, tmp_path):
    import asyncio

    import ray

    from llmos_kernel.client import KernelClient
    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import start_kernel

    cfg = KernelConfig(state_dir=str(tmp_path), name="cuda-kernel", hosts=1, llm=LLMConfig.of(
        model=str(model_path), device="cuda", kv_budget="256MiB", swap_budget="64MiB"))
    handle = start_kernel(cfg, detached=False)
    client = KernelClient(handle, (tmp_path / "root.token").read_text())
    try:
        done = asyncio.run(client.generate(prompt="The capital of France is", max_tokens=4,
                                           temperature=0))
        status = asyncio.run(client.status())
        assert len(done.token_ids) == 4
        assert status["memory"]["device"].startswith("cuda")
        assert status["shard"]["device"] == "cuda"
    finally:
        ray.get(handle.shutdown.remote(client.token))
        ray.kill(handle)
