"""``llmos eval``: perplexity and generation metrics, computed on the serving engine.

Both tasks run requests through an ``LLMEngine`` (in process, with the same runner the
kernel's model shard uses), so an adapter is evaluated exactly as agents are served by it:
perplexity from the engine's prompt logprobs over sliding windows, generation metrics from
its greedy outputs, scored with sacrebleu (BLEU) and rouge-score (ROUGE-L).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import LLMEngine, Request
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.train.data import messages_of, read_jsonl

METRICS = ("bleu", "rouge", "exact")


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored position)`` of each window over ``n`` tokens: every
    position from 1 on is scored once, in the first window that reaches it, with at least
    ``window - stride`` tokens of context (at least one) before it (Hugging Face's
    sliding-window perplexity, less the token it leaves unscored at each window's start)."""
    if window < 2 or not 0 < stride <= window:
        raise InvalidArgument(f"need window >= 2 and 0 < stride <= window (got {window}, "
                              f"{stride})")
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        begin = min(begin, prev_end - 1)
        end = min(begin + window, n)
        out.append((begin, end, prev_end))
        prev_end, begin = end, begin + stride
    return out


def perplexity(engine: LLMEngine, ids: list[int], window: int | None = None,
               stride: int | None = None, adapter: str | None = None) -> dict[str, Any]:
    """Perplexity of ``ids`` under the engine's model (with ``adapter``)."""
    if len(ids) < 2:
        raise InvalidArgument("perplexity needs a text of at least two tokens")
    window = min(window or engine.max_model_len - 1, engine.max_model_len - 1)
    stride = stride or window
    spans = windows(len(ids), window, stride)
    for i, (begin, end, _) in enumerate(spans):
        engine.add_request(Request(f"ppl-{i}", ids[begin:end], SamplingParams(
            max_tokens=1, temperature=0), adapter=adapter, prompt_logprobs=True))
    scored = {rid: [lp for d in ds if d.prompt_logprobs for lp in d.prompt_logprobs]
              for rid, ds in engine.run_until_done().items()}
    nll, count = 0.0, 0
    for i, (begin, end, first) in enumerate(spans):
        lps = scored[f"ppl-{i}"]  # positions begin+1 .. end-1
        taken = lps[first - begin - 1:]
        nll -= sum(taken)
        count += len(taken)
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count,
            "tokens": len(ids), "scored_tokens": count, "window": window, "stride": stride,
            "windows": len(spans)}


def normalize(text: str) -> str:
    """For exact match: case, surrounding space and punctuation do not count."""
    return re.sub(r"[\s\W]+$|^[\s\W]+", "", text.strip().lower())


def generation(engine: LLMEngine, path: str | Path, metrics: tuple[str, ...] = METRICS,
               adapter: str | None = None, max_tokens: int = 64) -> dict[str, Any]:
    """Greedy answers to each line's conversation (all but its last message), scored against
    the last (assistant) message."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise InvalidArgument(f"unknown metric(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(METRICS)}")
    path = Path(path)
    tok = engine.tokenizer
    refs = []
    for n, obj in read_jsonl(path):
        messages = messages_of(path, n, obj)
        ids = tok.encode(tok.apply_chat_template(messages[:-1], add_generation_prompt=True),
                         add_special_tokens=False)
        engine.add_request(Request(f"gen-{n}", ids, SamplingParams(
            max_tokens=max_tokens, temperature=0), adapter=adapter))
        refs.append((f"gen-{n}", messages[-1]["content"], len(ids)))
    done = engine.run_until_done()
    hyps = ["".join(d.text for d in done[rid]).strip() for rid, _, _ in refs]
    gold = [ref for _, ref, _ in refs]
    report: dict[str, Any] = {
        "examples": len(refs), "prompt_tokens": sum(n for _, _, n in refs),
        "generated_tokens": sum(len(d.token_ids) for rid, _, _ in refs for d in done[rid]),
        "max_tokens": max_tokens}
    if "bleu" in metrics:
        from sacrebleu.metrics import BLEU

        # effective order: short answers have no 4-grams, which would zero corpus BLEU
        report["bleu"] = BLEU(effective_order=True).corpus_score(hyps, [gold]).score
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        report["rouge_l"] = sum(scorer.score(r, h)["rougeL"].fmeasure
                                for r, h in zip(gold, hyps)) / len(refs)
    if "exact" in metrics:
        report["exact_match"] = sum(normalize(h) == normalize(r)
                                    for r, h in zip(gold, hyps)) / len(refs)
    report["samples"] = [{"reference": r, "output": h} for r, h in list(zip(gold, hyps))[:5]]
    return report
