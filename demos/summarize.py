"""Summary of a shipped article by map-reduce, scored with ROUGE against a shipped reference.

    llmos run demos/summarize.py
    llmos run demos/summarize.py --arg sentences=2

``demos/data/article.txt`` is a 420-word feature article (written for this demo) on why
cities plant trees against heat; ``demos/data/article_summary.txt`` is a three-sentence
reference summary written by hand. The model summarizes each paragraph in one sentence, all
paragraphs at once (the kernel batches them), then writes the summary from those notes.

A grammar holds each paragraph note to one plain sentence (``response_format`` with a string
``pattern``): left free, the 135M model often comments on the writing instead ("The
paragraph conveys a crucial message...", "Here's a revised version"). The final summary is
free text, cut back to its last full sentence if it runs past max_tokens.

ROUGE-1, -2 and -L F1 (rouge-score, stemmed) are printed for the summary, for the
paragraph notes joined together, and for lead-3 (the article's first three sentences, a
famously strong baseline for news). Here the lead happens to set the scene (urban heat)
without mentioning trees, so the model's summary beats it; on a classic news lead it might not.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from rouge_score import rouge_scorer

from demos import data_path
from llmos_kernel.errors import InvalidArgument
from syscalls import llm

SYSTEM = "You are a helpful assistant that writes short, factual summaries."
# One sentence of plain ASCII text, at most 200 characters: each token is at least one of
# them, so max_tokens cannot cut a note short.
ONE_SENTENCE = "^[A-Z][A-Za-z0-9 ,;:'()%-]{15,200}[.!?]$"
NOTE_TOKENS = 210
SUMMARY_TOKENS = 160
_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def rouge(summary: str, reference: str) -> dict[str, float]:
    """ROUGE-1, -2 and -L F1 of ``summary`` against ``reference``."""
    return {name: round(s.fmeasure, 3) for name, s in _SCORER.score(reference, summary).items()}


async def note(paragraph: str) -> str:
    """The paragraph in one sentence, under a grammar that allows nothing else."""
    fmt = {"type": "json_schema",
           "json_schema": {"name": "note", "schema": {"type": "string", "pattern": ONE_SENTENCE}}}
    reply = await llm.chat(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": f"{paragraph}\n\nSummarize the paragraph above in one "
                                     f"sentence."}],
        response_format=fmt, max_tokens=NOTE_TOKENS, temperature=0)
    return json.loads(reply.text)


async def summary(title: str, notes: list[str], count: int) -> str:
    """``count`` sentences on the article, written from its paragraph notes."""
    listing = "\n".join(f"- {n}" for n in notes)
    reply = await llm.chat(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": f'Notes on the article "{title}":\n{listing}\n\n'
                                     f"Summarize the article in {count} sentences."}],
        max_tokens=SUMMARY_TOKENS, temperature=0)
    text = " ".join(reply.text.split())
    if reply.finish_reason == "length" and len(split_sentences(text)) > 1:
        text = " ".join(split_sentences(text)[:-1])  # the last sentence was cut off
    return text


async def main(sentences: int = 3) -> dict:
    """Summarize the shipped article in ``sentences`` sentences; print and return the
    summary and its ROUGE scores beside lead-3's."""
    if type(sentences) is not int or not 1 <= sentences <= 6:
        raise InvalidArgument(f"sentences must be 1 to 6, got {sentences!r}")
    started = time.monotonic()
    title, *paragraphs = [p.strip() for p in data_path("article.txt").read_text().split("\n\n")
                          if p.strip()]
    reference = data_path("article_summary.txt").read_text().strip()
    article_words = sum(len(p.split()) for p in paragraphs)
    print(f'"{title}": {len(paragraphs)} paragraphs, {article_words} words; '
          f"summarizing the paragraphs at once")

    notes = await asyncio.gather(*(note(p) for p in paragraphs))
    for n in notes:
        print(f"  - {n}")
    text = await summary(title, notes, sentences)
    print(f"\nsummary: {text}")

    lead = " ".join(split_sentences(" ".join(paragraphs))[:3])
    scores = {"summary": rouge(text, reference), "notes": rouge(" ".join(notes), reference),
              "lead3": rouge(lead, reference)}
    print(f"\nreference: {reference}\nlead-3: {lead}\n")
    for name, s in scores.items():
        print(f"  {name:8} ROUGE-1 {s['rouge1']:.3f}  ROUGE-2 {s['rouge2']:.3f}  "
              f"ROUGE-L {s['rougeL']:.3f}")

    metrics: dict = {f"{name}_{kind}": value for name, s in scores.items()
                     for kind, value in s.items()}
    metrics.update(article_words=article_words, summary_words=len(text.split()),
                   paragraphs=len(paragraphs), seconds=round(time.monotonic() - started, 1))
    print("\nmetrics:", json.dumps(metrics))
    return {"summary": text, "notes": notes, "lead3": lead, "reference": reference,
            "metrics": metrics}
