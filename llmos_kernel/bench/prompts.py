"""Deterministic workloads of chat prompts of different lengths."""

from __future__ import annotations

import random

TOPICS = [
    "the water cycle", "how vaccines work", "the French revolution", "sorting algorithms",
    "black holes", "photosynthesis", "the history of the internet", "compound interest",
    "plate tectonics", "how a CPU executes instructions", "the Roman empire",
    "climate change", "machine learning", "the human immune system", "renewable energy",
    "the printing press", "quantum computing", "the stock market", "DNA replication",
    "the theory of evolution", "how airplanes fly", "the Great Wall of China",
    "volcanoes", "the solar system", "blockchains", "the Renaissance", "coral reefs",
    "electric cars", "the Silk Road", "neural networks", "ocean tides", "jazz music",
]
FILLER = ["Please", "be", "precise", "and", "give", "concrete", "examples,", "explain", "the", "key", "terms", "a", "student", "might", "not", "know,", "mention", "one", "common", "misconception", "and", "why", "it", "is", "wrong,", "and", "end", "with", "a", "short", "summary", "that", "a", "ten", "year", "old", "could", "follow."]


def chat_prompts(n: int, *, seed: int = 0, min_words: int = 8, max_words: int = 200,
                 system: str | None = None) -> list[list[dict]]:
    """``n`` conversations whose user message lengths spread from min to max words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = min_words + (max_words - min_words) * i // max(n - 1, 1)
        extra = " ".join(rng.choice(FILLER) for _ in range(max(words - 8, 0)))
        text = f"Explain {TOPICS[i % len(TOPICS)]} to me. {extra}".strip()
        messages = [{"role": "system", "content": system}] if system else []
        out.append(messages + [{"role": "user", "content": text}])
    rng.shuffle(out)
    return out


def shared_system_prompt(n_tokens: int, tokenizer) -> str:
    """A system prompt of about ``n_tokens`` tokens (agents sharing tool schemas, rules...)."""
    rng = random.Random(1)
    words = ["You are an agent in llmos. Follow the rules below."]
    while len(tokenizer.encode(" ".join(words))) < n_tokens:
        words.append(f"Rule {len(words)}: always {rng.choice(FILLER)} {rng.choice(FILLER)}.")
    return " ".join(words)
