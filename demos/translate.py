"""English <-> Chinese translation of short sentences, scored with chrF against shipped references.

    llmos run demos/translate.py
    llmos run demos/translate.py --arg directions=zh-en --arg show=8

``demos/data/translate.jsonl`` holds 24 everyday sentences with hand-written references in
both languages. Every sentence is translated both ways at once (the kernel batches the 48
requests), from a raw few-shot prompt (``llm.complete``) of 8 example pairs that are not in
the set. A grammar (``response_format`` with a string ``pattern``) keeps each answer one
sentence in the target script: Chinese characters ending in 。？！, or a Latin sentence ending
in .?! — so a reply can neither echo the source language nor run on past max_tokens. A
frequency penalty (0.5, on the reply's own tokens) breaks the character loops the model
otherwise falls into in Chinese.

chrF (sacrebleu, corpus level, character n-grams, so it scores Chinese without a word
segmenter) is printed beside two baselines computed in the same run: copying the source
sentence unchanged, and answering with the reference of a different sentence (fluent
target-language text that ignores the source). What a 135M model can do, honestly:
Chinese -> English is half usable (about 42 chrF; about half the sentences keep their
meaning); English -> Chinese is not (about 6 chrF): the model writes Chinese characters,
rarely the right ones, and beats the baselines only by a few points.
"""

from __future__ import annotations

import asyncio
import json
import time

from sacrebleu.metrics import CHRF

from demos import data_path
from llmos_kernel.errors import InvalidArgument
from syscalls import llm

LANGUAGES = {"en": "English", "zh": "Chinese"}
# One sentence in the target script. 24 Chinese characters fit max_tokens (at most 3 tokens
# each), so every answer is complete.
SENTENCE = {"zh": "^[\u4e00-\u9fff，]{1,24}[。？！]$", "en": "^[A-Z][A-Za-z0-9 ,']{0,80}[.?!]$"}
MAX_TOKENS = 96
FREQUENCY_PENALTY = 0.5
SHOTS = [("I am hungry.", "我饿了。"), ("Where is the bank?", "银行在哪里？"),
         ("This is my friend.", "这是我的朋友。"), ("The food is delicious.", "这个菜很好吃。"),
         ("He is reading a newspaper.", "他在看报纸。"), ("Goodbye!", "再见！"),
         ("We live in Shanghai.", "我们住在上海。"), ("Is the shop open today?", "商店今天开门吗？")]


def _prompt(source: str, target: str, text: str) -> str:
    pairs = [dict(zip(("en", "zh"), shot)) for shot in SHOTS] + [{source: text, target: ""}]
    return "\n\n".join(f"{LANGUAGES[source]}: {p[source]}\n{LANGUAGES[target]}: {p[target]}"
                       for p in pairs).rstrip()


async def translate(source: str, target: str, text: str) -> str:
    """``text`` in the ``target`` language, one sentence in that language's script."""
    schema = {"type": "string", "pattern": SENTENCE[target]}
    reply = await llm.complete(
        _prompt(source, target, text) + " ", max_tokens=MAX_TOKENS, temperature=0,
        frequency_penalty=FREQUENCY_PENALTY,
        response_format={"type": "json_schema", "json_schema": {"name": "translation",
                                                                "schema": schema}})
    return json.loads(reply.text)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    return round(CHRF().corpus_score(hypotheses, [references]).score, 1)


async def main(directions: str = "en-zh,zh-en", show: int = 4) -> dict:
    """Translate every sentence in each direction (``en-zh``, ``zh-en``) concurrently; print
    and return chrF beside the copy-source and unrelated-sentence baselines."""
    started = time.monotonic()
    pairs = [tuple(d.strip().split("-")) for d in directions.split(",") if d.strip()]
    if not pairs or any(p not in (("en", "zh"), ("zh", "en")) for p in pairs):
        raise InvalidArgument(f"directions must be en-zh and/or zh-en, got {directions!r}")
    rows = [json.loads(line) for line in data_path("translate.jsonl").read_text().splitlines()]
    print(f"translating {len(rows)} sentences {', '.join('->'.join(p) for p in pairs)}: "
          f"{len(rows) * len(pairs)} requests at once")
    outputs = await asyncio.gather(*(asyncio.gather(*(translate(s, t, r[s]) for r in rows))
                                     for s, t in pairs))

    metrics: dict = {"n": len(rows)}
    translations = {}
    for (source, target), hypotheses in zip(pairs, outputs):
        key = f"{source}_{target}"
        references = [r[target] for r in rows]
        metrics[f"{key}_chrf"] = chrf(hypotheses, references)
        metrics[f"{key}_copy_source_chrf"] = chrf([r[source] for r in rows], references)
        metrics[f"{key}_unrelated_chrf"] = chrf(references[1:] + references[:1], references)
        translations[key] = [{"source": r[source], "reference": r[target], "output": h}
                             for r, h in zip(rows, hypotheses)]
        print(f"\n{source} -> {target}: chrF {metrics[f'{key}_chrf']} vs copy-source "
              f"{metrics[f'{key}_copy_source_chrf']}, unrelated sentence "
              f"{metrics[f'{key}_unrelated_chrf']}")
        for t in translations[key][:show]:
            print(f"  {t['source']} -> {t['output']}   (reference: {t['reference']})")

    metrics["seconds"] = round(time.monotonic() - started, 1)
    print("\nmetrics:", json.dumps(metrics, ensure_ascii=False))
    return {"translations": translations, "metrics": metrics}
