"""LoRA without the real model: a tiny random-weight core, checked against merged weights.

Rows of two adapters and rows of none share one step and each row gets what its own merged
model gives; the differentiable training forward gives the inference core's logits; the
schedule, the sliding windows and the data checks behave as documented.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.lora import LoraAdapter, LoraSet, merge_into
from llmos_kernel.core.model import PrefillChunk, StepBatch, Transformer
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.train.data import IGNORE, chat_example, load_examples
from llmos_kernel.train.evaluate import normalize, windows
from llmos_kernel.train.forward import LoraModel
from llmos_kernel.train.trainer import schedule

TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=50,
                   context_length=64)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TINY, KernelOptions(c_kernels=False))
    for p in model.parameters():
        p.data = torch.randn(p.shape) * 0.2
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.1 * torch.randn(p.shape)
    return model.eval()


def adapter(seed: int, targets=("q", "k", "v", "o", "gate", "up", "down")) -> LoraAdapter:
    return LoraAdapter.init(TINY, rank=4, alpha=8, targets=targets,
                            generator=torch.Generator().manual_seed(seed), b_std=0.5)


def prefill_logits(model: Transformer, seqs: list[list[int]], names: list[str | None],
                   lora: LoraSet | None = None) -> list[torch.Tensor]:
    """Every row's logits for several sequences prefilled in one step."""
    tokens, chunks, rows, start = [], [], [], 0
    for ids, name in zip(seqs, names):
        chunks.append(PrefillChunk(start, len(ids), None, 0))
        rows.append((name, start, len(ids)))
        tokens += ids
        start += len(ids)
    kv = KVPool(TINY, num_blocks=-(-start // 16) + 1, block_size=16)
    batch = StepBatch(tokens=torch.tensor(tokens),
                      positions=torch.cat([torch.arange(len(s)) for s in seqs]),
                      slot_mapping=torch.arange(start), prefills=chunks,
                      logits_rows=torch.arange(start),
                      lora=lora.batch(rows) if lora is not None else None)
    return list(model(batch, kv).split([len(s) for s in seqs]))


def test_two_adapters_and_the_base_in_one_step_each_match_their_merged_model():
    model, seqs = tiny_model(), [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    a, b = adapter(1), adapter(2, targets=("q", "v", "down"))
    lora = LoraSet(TINY)
    lora.add("a", a)
    lora.add("b", b)
    mixed = prefill_logits(model, seqs, ["a", None, "b"], lora)
    for i, (ad, name) in enumerate([(a, "a"), (None, None), (b, "b")]):
        merged = tiny_model()
        if ad is not None:
            merge_into(merged, ad)
        ref = prefill_logits(merged, [seqs[i]], [None])[0]
        assert (mixed[i] - ref).abs().max() < 1e-4, name
    base = prefill_logits(model, seqs, [None] * 3)
    assert (mixed[0] - base[0]).abs().max() > 1e-2  # the adapters do something


def test_a_step_without_adapter_rows_carries_no_lora_batch():
    lora = LoraSet(TINY)
    lora.add("a", adapter(1))
    assert lora.batch([(None, 0, 3), (None, 3, 1)]) is None


def test_the_training_forward_gives_the_inference_cores_logits_and_gradients():
    model, ids = tiny_model(), [3, 1, 4, 1, 5, 9, 2, 6]
    ad = adapter(3)
    lora = LoraSet(TINY)
    lora.add("a", ad)
    infer = prefill_logits(model, [ids], ["a"], lora)[0]
    lm = LoraModel(model, ad)
    train = lm.logits(lm.hidden(torch.tensor([ids])))[0]
    assert (train - infer).abs().max() < 1e-4
    loss, n = lm.loss(torch.tensor([ids]), torch.tensor([ids]))
    loss.backward()
    assert n == len(ids) - 1
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in lm.parameters())


def test_padding_does_not_change_a_rows_loss():
    model, ids = tiny_model(), [3, 1, 4, 1, 5]
    lm = LoraModel(model, adapter(4))
    alone, _ = lm.loss(torch.tensor([ids]), torch.tensor([ids]))
    padded = torch.tensor([ids + [0, 0, 0]])
    labels = torch.tensor([ids + [IGNORE] * 3])
    with_pad, n = lm.loss(padded, labels)
    assert n == 4 and abs(alone.item() - with_pad.item()) < 1e-4


def test_the_schedule_warms_up_then_decays_by_cosine():
    f = schedule(total=100, warmup=10)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] == 1.0
    decay = [f(s) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True) and abs(decay[-1] - 0.1) < 1e-9


@pytest.mark.parametrize("n,window,stride", [(10, 10, 10), (100, 16, 16), (100, 16, 5),
                                             (17, 16, 8), (2, 8, 8)])
def test_sliding_windows_score_every_token_once_with_context(n, window, stride):
    seen = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        seen += range(first, end)
    assert seen == list(range(1, n))


class FakeTokenizer:
    """Characters as tokens; a ChatML-like template."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_chat_examples_count_the_loss_on_assistant_turns_only():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "x"}, {"role": "assistant", "content": "ok"}]
    ids, labels = chat_example(FakeTokenizer(), messages)
    learned = "".join(chr(t) for t in labels if t != IGNORE)
    assert learned == "yo|ok|" and len(ids) == len(labels)


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize("lines,message", [
    ([GOOD, "{not json"], r"data.jsonl:2: not valid JSON"),
    ([GOOD, GOOD, json.dumps({"messages": [{"role": "user"}]})], r"data.jsonl:3: a chat line"),
    ([json.dumps({"messages": [{"role": "user", "content": "q"}]})],
     r"data.jsonl:1: the last message must be the assistant's"),
    (["[1, 2]"], r"data.jsonl:1: each line must be a JSON object"),
    ([GOOD, json.dumps({"messages": [{"role": "user", "content": "q" * 100},
                                     {"role": "assistant", "content": "a"}]})],
     r"data.jsonl:2: the sample has \d+ tokens, longer than the context of 64"),
    ([""], r"data.jsonl: the file has no examples \(it is empty\)"),
])
def test_bad_data_gets_an_error_naming_the_line(tmp_path, lines, message):
    with pytest.raises(InvalidArgument, match=message):
        load_examples(_write(tmp_path, lines), FakeTokenizer(), "chat", max_len=64)


def test_text_lines_need_text(tmp_path):
    with pytest.raises(InvalidArgument, match=r"data.jsonl:1: a text line needs"):
        load_examples(_write(tmp_path, [GOOD]), FakeTokenizer(), "text")


def test_exact_match_ignores_case_space_and_end_punctuation():
    assert normalize("  Quellport. ") == normalize("quellport") == "quellport"
    assert normalize("Quell port") != normalize("Quellport")


def test_adapters_live_in_the_model_store_with_their_base(tmp_path, monkeypatch):
    from llmos_kernel import adapters, store
    from llmos_kernel.errors import NotFound

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + bytes(60))
    ad = adapter(5)
    adapters.save(ad, tmp_path / "models" / "tiny-lora", base, "tiny")
    [entry] = store.list_models()
    assert (entry.name, entry.base, entry.arch) == ("tiny-lora", "tiny", "lora r4")
    assert entry.params == sum(t.numel() for t in ad.weights.values())
    loaded = adapters.load("tiny-lora")
    assert all(torch.equal(loaded.adapter.weights[k], ad.weights[k]) for k in ad.weights)
    with pytest.raises(NotFound, match="no LoRA adapter 'other'; adapters in the store: "
                                       "tiny-lora"):
        adapters.load("other")
    with pytest.raises(InvalidArgument, match="was trained on tiny"):
        adapters.check_base(loaded.meta, tmp_path / "models" / "tiny-lora" / "adapter.json",
                            "tiny-lora")


def test_the_shipped_task_is_what_its_generator_writes_and_splits_by_phrasing():
    from llmos_kernel.train import facts

    for name, templates in (("train", facts.TRAIN_TEMPLATES),
                            ("heldout", facts.HELDOUT_TEMPLATES)):
        shipped = (facts.DATASETS / f"capitals_{name}.jsonl").read_text().splitlines()
        assert shipped == facts.lines(templates)
    assert not set(facts.TRAIN_TEMPLATES) & set(facts.HELDOUT_TEMPLATES)
