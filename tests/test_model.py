"""The Transformer core against Hugging Face transformers loading the same GGUF file.

Both sides get the same token ids (from our tokenizer), so these tests compare
the models, not the tokenizers.
"""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.model import PrefillChunk, StepBatch
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
