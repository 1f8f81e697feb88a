"""LoRA adapters, prompt logprobs and evaluation on the real model.

Greedy outputs with an adapter equal those of the same core with the adapter merged into
its weights, for two adapters and the base model sharing the same engine steps; through
the kernel two requests with two adapters batch together and each keeps its behaviour;
the engine's perplexity matches transformers' on the same GGUF; and the ``llmos train
lora`` / ``llmos eval`` commands run end to end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from llmos_kernel import adapters
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.lora import LoraAdapter, merge_into
from llmos_kernel.core.model import PrefillChunk, StepBatch
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.core.weights import load_model
from llmos_kernel.engine.engine import LLMEngine, Request
from llmos_kernel.errors import NotFound
from llmos_kernel.train import evaluate
from llmos_kernel.train.facts import DATASETS
from tests.reference_prompts import PROMPTS

QUESTIONS = ["Write a short poem about the sea."]


@pytest.fixture(scope="module")
def two_adapters(model_path, gguf_file, tmp_path_factory):
    """Two random adapters with a visible effect, saved as adapter folders."""
    cfg = gguf_file.config()
    folders = {}
    for seed in (1, 2):  # (adapters on some of the projections: tests/unit/test_lora.py)
        adapter = LoraAdapter.init(cfg, rank=4, alpha=8, b_std=0.12,
                                   generator=torch.Generator().manual_seed(seed))
        folders[seed] = adapters.save(adapter, tmp_path_factory.mktemp(f"adapter{seed}"),
                                      model_path, "smollm2")
    return str(folders[1]), str(folders[2])


def _chat_ids(tok, question: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]),
                      add_special_tokens=False)


def _greedy(engine: LLMEngine, prompts: dict[str, tuple[list[int], str | None]],
            max_tokens: int = 8) -> dict[str, list[int]]:
    for rid, (ids, adapter) in prompts.items():
        engine.add_request(Request(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                            ignore_eos=True), adapter=adapter))
    return {rid: [t for d in ds for t in d.token_ids]
            for rid, ds in engine.run_until_done().items()}


def _argmax_along(model, ids: list[int], first: int) -> list[int]:
    """The model's greedy choice after each of ``ids[first-1:-1]``, in one prefill."""
    n = len(ids)
    kv = KVPool(model.config, num_blocks=-(-n // 16), block_size=16)
    batch = StepBatch(tokens=torch.tensor(ids), positions=torch.arange(n),
                      slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, None, 0)],
                      logits_rows=torch.arange(first - 1, n - 1))
    return model(batch, kv).argmax(-1).tolist()


def test_adapters_in_one_batch_each_equal_their_merged_weights(engine, model_path, two_adapters):
    """Greedy outputs equal the merged model's: checked teacher-forced, the merged model's
    argmax after every prefix of prompt + output is the next output token."""
    tok = engine.tokenizer
    names = {"a": two_adapters[0], "b": two_adapters[1], "base": None}
    prompts = {f"{k}-{i}": (_chat_ids(tok, q), name) for k, name in names.items()
               for i, q in enumerate(QUESTIONS)}
    batched = _greedy(engine, prompts)  # every request in the same steps

    reference, _ = load_model(model_path, options=KernelOptions(c_kernels=False,
                                                                 mkl_pack=False))
    original = {n: p.data.clone() for n, p in reference.named_parameters() if "blocks" in n}
    for name in names.values():
        if name is not None:
            merge_into(reference, adapters.load(name).adapter)
        for rid, (ids, n) in prompts.items():
            if n == name:
                assert _argmax_along(reference, ids + batched[rid], len(ids)) == batched[rid], rid
        for n, p in reference.named_parameters():
            if n in original:
                p.data.copy_(original[n])
    outputs = {k: [tuple(batched[f"{k}-{i}"]) for i in range(len(QUESTIONS))] for k in names}
    assert outputs["a"] != outputs["base"] and outputs["b"] != outputs["base"]
    assert outputs["a"] != outputs["b"]  # each adapter has its own behaviour


def test_an_unknown_adapter_is_a_typed_error_naming_the_adapters(engine):
    with pytest.raises(NotFound, match="no LoRA adapter 'nope'; adapters in the store"):
        engine.add_request(Request("bad", [1, 2, 3], adapter="nope"))


def test_perplexity_matches_transformers_on_the_same_gguf(engine, hf_model):
    ids = engine.tokenizer.encode(PROMPTS["long"])[:160]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].float()
    ref = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())
    ours = evaluate.perplexity(engine, ids)
    assert ours["scored_tokens"] == len(ids) - 1 and ours["windows"] == 1
    assert abs(ours["perplexity"] / ref - 1) < 0.01, (ours, ref)
    saved = engine.scheduler.cfg.max_batch_tokens  # chunked prefill scores the same tokens
    engine.scheduler.cfg.max_batch_tokens = 16
    try:
        chunked = evaluate.perplexity(engine, ids)
    finally:
        engine.scheduler.cfg.max_batch_tokens = saved
    assert abs(chunked["perplexity"] / ours["perplexity"] - 1) < 1e-3
    windowed = evaluate.perplexity(engine, ids, window=64, stride=32)
    assert windowed["scored_tokens"] == len(ids) - 1 and windowed["windows"] > 1


def test_two_requests_with_two_adapters_batch_in_the_kernel(kernel, two_adapters):
    """Through the syscalls, on the kernel's own dtype (bf16 products where the CPU has
    them): batched with each other, each request gets what it gets alone."""
    from syscalls import llm

    async def ask(adapter: str | None, question: str):
        return await llm.chat([{"role": "user", "content": question}], adapter=adapter,
                              max_tokens=12, temperature=0, ignore_eos=True)

    async def together():
        import asyncio

        return await asyncio.gather(*(ask(a, QUESTIONS[0]) for a in (*two_adapters, None)))

    a_alone = kernel.run(ask(two_adapters[0], QUESTIONS[0]))
    base_alone = kernel.run(ask(None, QUESTIONS[0]))
    a, b, base = kernel.run(together())  # (a's and base's prompts now from the prefix cache)
    assert a.token_ids == a_alone.token_ids and base.token_ids == base_alone.token_ids
    assert len({tuple(r.token_ids) for r in (a, b, base)}) == 3
    scored = kernel.run(llm.complete("The cat sat on the mat.", prompt_logprobs=True,
                                     adapter=two_adapters[1], max_tokens=1))
    assert len(scored.prompt_logprobs) == kernel.run(llm.count("The cat sat on the mat.")) - 1
    assert all(lp <= 0 for lp in scored.prompt_logprobs)


def llmos(*args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "LLMOS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "llmos_kernel.cli", *args], check=False,
                          capture_output=True, text=True, env=environ, timeout=300)


def test_train_then_eval_through_the_cli(tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("".join((DATASETS / "capitals_train.jsonl").read_text()
                            .splitlines(keepends=True)[:24]))
    out = tmp_path / "few-lora"
    done = llmos("train", "lora", "--data", str(data), "--out", str(out), "--max-steps", "4",
                 "--batch", "4", "--epochs", "1", "--val-fraction", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (out / "loss.png").stat().st_size > 0 and (out / "checkpoint.pt").is_file()
    resumed = llmos("train", "lora", "--data", str(data), "--out", str(out), "--max-steps", "6",
                    "--batch", "4", "--epochs", "2", "--val-fraction", "0", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [int(r.split(",")[0]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join((DATASETS / "capitals_heldout.jsonl").read_text()
                               .splitlines(keepends=True)[:2]))
    gen = llmos("eval", "--task", "gen", str(heldout), "--adapter", str(out), "--max-tokens",
                "4", "--json")
    assert gen.returncode == 0, gen.stderr
    report = json.loads(gen.stdout)
    assert {"bleu", "rouge_l", "exact_match", "examples", "prompt_tokens",
            "generated_tokens"} <= set(report) and report["examples"] == 2

    text = tmp_path / "text.txt"
    text.write_text(PROMPTS["english"])
    ppl = llmos("eval", "--task", "ppl", str(text), "--window", "32", "--stride", "16", "--json")
    assert ppl.returncode == 0, ppl.stderr
    report = json.loads(ppl.stdout)
    assert report["perplexity"] > 1 and report["window"] == 32 and report["scored_tokens"] > 0


def test_train_runs_as_a_low_priority_kernel_process(kernel, tmp_path):
    from click.testing import CliRunner

    from llmos_kernel.cli import main
    from llmos_kernel.cli.train import LOW_PRIORITY

    data = tmp_path / "few.jsonl"
    data.write_text("".join((DATASETS / "capitals_train.jsonl").read_text()
                            .splitlines(keepends=True)[:4]))
    out = tmp_path / "job-lora"
    done = CliRunner().invoke(main, ["train", "lora", "--data", str(data), "--out", str(out),
                                     "--max-steps", "1", "--batch", "4", "--val-fraction", "0",
                                     "--kernel", "--kernel-name", kernel.name,
                                     "--state-dir", str(kernel.state_dir)])
    assert done.exit_code == 0, done.output
    pid = int(done.output.split()[0])
    [proc] = [p for p in kernel.call("ps", True) if p["pid"] == pid]
    assert proc["priority"] == LOW_PRIORITY and proc["name"] == "train-job-lora"
    assert adapters.read_meta(out).rank == 8 and (out / "loss.csv").is_file()


def test_bench_train_reports_ours_beside_peft():
    """``llmos bench train`` (one short run): both sides trained on the same batches."""
    from click.testing import CliRunner

    from llmos_kernel.cli import main

    done = CliRunner().invoke(main, ["bench", "train", "--steps", "1", "--batch", "2",
                                     "--repeat", "1", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output.strip().splitlines()[-1])
    assert report["train_tok_s"] > 0 and report["ref_train_tok_s"] > 0
    assert report["steps"] == 1 and report["tokens_per_run"] > 0


def test_the_ttft_bench_measures_with_and_without_a_training_job():
    """``python bench/train_ttft.py`` (a short run in its own Ray session)."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "train_ttft.py")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, script, "--requests", "2", "--agents", "1",
                           "--settle", "5"], capture_output=True, text=True, env=environ,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(ln.startswith("TTFT without training: p50") for ln in lines), done.stdout
    assert any(ln.startswith("TTFT while training:   p50") for ln in lines), done.stdout
