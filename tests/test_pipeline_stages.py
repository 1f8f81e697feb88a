"""A model split into layer-range stages computes what the whole model computes.

Model level, no Ray: the real model loaded whole (the reference) and as 2 and 3
stages, each stage with a KV pool of its own layers addressed by the same block ids;
the stages run one after another on the same step batches (prefills, a chunked
prefill's second chunk, decodes) and their logits must match the whole model's.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.weights import load_model
from llmos_kernel.engine.runner import ModelRunner, SeqStep

BLOCK = 16
BLOCKS = 16


def _runner(model_path, layers=None) -> ModelRunner:
    model, _ = load_model(model_path, dtype="fp32", layers=layers)
    kv = KVPool(model.config, BLOCKS, BLOCK, model.kv_dtype, layers=model.layers)
    return ModelRunner(model, kv)


def _steps() -> list[list[SeqStep]]:
    """Two steps of a mixed batch: prefills first, then decodes beside a prompt's second
    chunk and a new prompt (single-token steps first, as the scheduler orders them)."""
    a, b, c = (list(range(100 + k, 100 + k + n)) for k, n in ((0, 20), (50, 30), (200, 7)))
    first = [SeqStep(1, a, 0, [0, 1], sample=True), SeqStep(2, b[:12], 0, [2, 3])]
    second = [SeqStep(1, [42], 20, [0, 1], sample=True),
              SeqStep(2, b[12:], 12, [2, 3], sample=True),
              SeqStep(3, c, 0, [4], sample=True)]
    return [first, second]


def _logits(runners: list[ModelRunner], seqs: list[SeqStep]) -> torch.Tensor:
    hidden = None
    for runner in runners:
        batch, _ = runner.build_batch(seqs)
        hidden = runner.model(batch, runner.kv, hidden)
    return hidden


@pytest.fixture(scope="module")
def whole(model_path) -> ModelRunner:
    return _runner(model_path)


@pytest.mark.parametrize("bounds", [(0, 15, 30), (0, 7, 23, 30)], ids=["2-stage", "3-stage"])
def test_stages_run_in_turn_give_the_whole_models_logits(model_path, whole, bounds):
    stages = [_runner(model_path, (a, b)) for a, b in itertools.pairwise(bounds)]
    whole.kv.data.zero_()
    for seqs in _steps():
        expected = _logits([whole], seqs)
        got = _logits(stages, seqs)
        rows = sum(s.sample for s in seqs)
        assert got.shape == expected.shape == (rows, whole.model.config.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_each_stage_holds_only_its_own_weights_and_kv(model_path, whole):
    first, last = _runner(model_path, (0, 10)), _runner(model_path, (10, 30))
    names = [{n for n, _ in r.model.named_parameters()} for r in (first, last)]
    assert "embed" in names[0] and "output" not in names[0] and "norm.weight" not in names[0]
    assert "embed" not in names[1] and {"output", "norm.weight"} <= names[1]
    assert len(first.model.blocks) == 10 and len(last.model.blocks) == 20
    assert first.kv.nbytes + last.kv.nbytes == whole.kv.nbytes
    assert first.kv.nbytes * 2 == last.kv.nbytes
    with pytest.raises(ValueError, match="needs the previous stage"):
        batch, _ = last.build_batch(_steps()[0])
        last.model(batch, last.kv)


def test_the_stage_split_bench_times_both_splits_of_the_real_model(model_path):
    """``python bench/stage_split.py``: each split's stages timed on the real model, the
    work split being the one ``--shards`` asks for."""
    import json
    import os
    import subprocess
    import sys

    from llmos_kernel.core.gguf_file import GGUFFile
    from llmos_kernel.placement import split_layers

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "stage_split.py")
    done = subprocess.run([sys.executable, script, "--steps", "2", "--seqs", "4", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    cfg = GGUFFile.open(model_path).config()
    for by in ("bytes", "compute"):
        split = report["splits"][by]
        assert split["layers"] == [list(s.layers) for s in
                                   split_layers(cfg, torch.bfloat16, 2, 1, 16, by)]
        assert len(split["stage_s"]) == 2 and min(split["stage_s"]) > 0
        assert split["pace_tok_s"] == pytest.approx(4 / max(split["stage_s"]))
    assert report["splits"]["bytes"]["layers"] != report["splits"]["compute"]["layers"]
