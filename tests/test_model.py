"""The Transformer core against Hugging Face transformers loading the same GGUF file.

Both sides get the same token ids (from our tokenizer), so these tests compare
the models, not the tokenizers.
"""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.model import PrefillChunk, StepBatch
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import Request
from tests.reference_prompts import PROMPTS


def _hf_last_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].float()


def _our_last_logits(engine, ids: list[int]) -> torch.Tensor:
    model = engine.runner.model
    kv = KVPool(model.config, num_blocks=-(-len(ids) // 16), block_size=16)
    n = len(ids)
    batch = StepBatch(tokens=torch.tensor(ids), positions=torch.arange(n),
                      slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, None, 0)],
                      logits_rows=torch.tensor([n - 1]))
    return model(batch, kv)[0]


@pytest.mark.parametrize("name", list(PROMPTS))
def test_last_position_logits_match_reference(engine, hf_model, prompt_ids, name):
    ours = _our_last_logits(engine, prompt_ids[name])
    ref = _hf_last_logits(hf_model, prompt_ids[name])
    assert (ours - ref).abs().max().item() <= 1e-3


def _greedy(max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def test_greedy_continuations_match_reference_one_at_a_time(engine, prompt_ids, reference_greedy):
    for name, ids in prompt_ids.items():
        engine.add_request(Request(f"alone-{name}", ids, _greedy()))
        deltas = engine.run_until_done()[f"alone-{name}"]
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == reference_greedy[name], name


def test_batching_mixed_prefill_and_decode_keeps_greedy_tokens(engine, prompt_ids,
                                                               reference_greedy):
    """Requests join while others decode; small steps force chunked prefill beside decodes."""
    saved = engine.scheduler.cfg.max_batch_tokens
    engine.scheduler.cfg.max_batch_tokens = 96
    try:
        names = list(prompt_ids)
        tokens: dict[str, list[int]] = {n: [] for n in names}
        pending = list(names)
        steps = 0
        while pending or engine.has_unfinished():
            if pending and steps % 3 == 0:  # a new request every third step
                name = pending.pop(0)
                engine.add_request(Request(f"mixed-{name}", prompt_ids[name], _greedy()))
            for d in engine.step():
                tokens[d.request_id.removeprefix("mixed-")].extend(d.token_ids)
            steps += 1
        assert engine.stats["last_step_tokens"] >= 1
    finally:
        engine.scheduler.cfg.max_batch_tokens = saved
    for name in names:
        assert tokens[name] == reference_greedy[name], name


def _logits_decoding_the_last_token(model, ids: list[int]) -> torch.Tensor:
    """The prompt but its last token as one prefill step, then that token as a decode."""
    n = len(ids)
    kv = KVPool(model.config, num_blocks=-(-n // 16), block_size=16)
    model(StepBatch(tokens=torch.tensor(ids[:-1]), positions=torch.arange(n - 1),
                    slot_mapping=torch.arange(n - 1),
                    prefills=[PrefillChunk(0, n - 1, None, 0)]), kv)
    return model(StepBatch(tokens=torch.tensor(ids[-1:]), positions=torch.tensor([n - 1]),
                           slot_mapping=torch.tensor([n - 1]), n_decode=1,
                           decode_tables=torch.arange(kv.num_blocks)[None],
                           decode_lens=torch.tensor([n]), logits_rows=torch.tensor([0])), kv)[0]


def test_without_c_kernels_the_model_runs_on_torch_alone(model_path, hf_model, prompt_ids,
                                                         monkeypatch):
    """``KernelOptions(c_kernels=False)``: no quantized copies or panels at load, and no C
    kernel in a prefill or a decode step (even beside a pool the decode kernel reads); the
    logits still match the reference."""
    from llmos_kernel.core import fused_ops, paged_attention, panel_gemm, quant_matmul
    from llmos_kernel.core.weights import load_model, projections

    model, _ = load_model(model_path, options=KernelOptions(c_kernels=False))
    for module, attr, _ in projections(model, model.config):
        assert not set(module.packed) & {attr, attr + "/panels", attr + "/bf16"}
    for kernels, name in [(fused_ops, "rms_norm"), (fused_ops, "rope_"), (fused_ops, "silu_mul"),
                          (paged_attention, "decode"), (quant_matmul, "matmul"),
                          (panel_gemm, "matmul")]:
        monkeypatch.setattr(kernels, name, lambda *a, name=name, **k: pytest.fail(name))
    ids = prompt_ids["english"]
    ours = _logits_decoding_the_last_token(model, ids)
    assert (ours - _hf_last_logits(hf_model, ids)).abs().max().item() <= 1e-3


def test_kernel_options_are_read_from_the_environment_in_one_place():
    env = {"LLMOS_NO_C_KERNELS": "1", "LLMOS_BF16_KERNEL": "avx512", "LLMOS_NO_PANELS": "1",
           "LLMOS_NO_MKL_PACK": "1", "LLMOS_KV_HUGEPAGES": "1", "LLMOS_QUANT_MAX_ROWS": "0",
           "LLMOS_PANEL_MIN_ROWS": "3", "LLMOS_PANEL_MAX_ROWS": "64"}
    options = KernelOptions.from_env(env)
    assert options == KernelOptions(c_kernels=False, bf16_kernel="avx512", panels=False,
                                    mkl_pack=False, kv_hugepages=True, quant_max_rows=0,
                                    panel_min_rows=3, panel_max_rows=64)
    assert KernelOptions.from_env({}) == KernelOptions()
    assert KernelOptions.from_dict(options.to_dict()) == options
    with pytest.raises(ValueError, match="LLMOS_QUANT_MAX_ROWS"):
        KernelOptions.from_env({"LLMOS_QUANT_MAX_ROWS": "four"})
    with pytest.raises(ValueError, match="unknown kernel options: hugepages"):
        KernelOptions.from_dict({"hugepages": True})
