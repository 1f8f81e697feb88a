"""The summarize demo on the real model: a short summary of the shipped article, about its
subject, with ROUGE-L above a floor against the shipped reference.

ROUGE is computed again here from the summary and ``demos/data/article_summary.txt``. The
demo measured ROUGE-L 0.22 (lead-3: 0.157) for a 53-word summary of a 422-word article; the
floor, 0.15, is under that with room for a sentence to change. Whether it beats lead-3 is
printed, not asserted. rouge-score runs in a child process: imported into this one, its
absl/nltk dependencies leave a stream bound to a test's closed capture, and a later test's
thread that logs (the HTTP server's) kills the session ("lost sys.stderr").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from demos import data_path
from syscalls import proc


def test_summary_is_short_on_topic_and_overlaps_the_reference(kernel):
    pid = kernel.run(proc.spawn("demos.summarize:main", {},
                                sandbox=True, scratch=True, name="demo-summarize"))
    exit_ = kernel.run(proc.wait(pid, timeout=600), timeout=660)
    assert exit_["reason"] == "normal", exit_
    result, metrics = exit_["result"], exit_["result"]["metrics"]
    print("\nsummarize metrics:", json.dumps(metrics))
    print(f"beats lead-3 on ROUGE-L: {metrics['summary_rougeL'] > metrics['lead3_rougeL']}")

    article = data_path("article.txt").read_text()
    paragraphs = [p for p in article.split("\n\n") if p.strip()][1:]  # after the title
    summary = result["summary"]
    assert summary.strip() and len(summary.split()) < len(article.split()) / 3
    assert "tree" in summary.lower()
    assert len(result["notes"]) == len(paragraphs)
    assert all(re.fullmatch(r"[A-Z][^.!?\n]+[.!?]", n) for n in result["notes"]), result["notes"]

    reference = data_path("article_summary.txt").read_text().strip()
    rouge_l = float(subprocess.run(
        [sys.executable, "-c", ("import sys; from rouge_score import rouge_scorer; "
         "print(rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)"
         ".score(sys.argv[1], sys.argv[2])['rougeL'].fmeasure)"), reference, summary],
        capture_output=True, text=True, check=True, timeout=120).stdout)
    assert round(rouge_l, 3) == metrics["summary_rougeL"]
    assert rouge_l > 0.15, rouge_l
