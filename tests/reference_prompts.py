"""Prompts the core is compared with the reference on (test_model, test_bf16)."""

from __future__ import annotations

import random


def _long_text(n_words: int) -> str:
    rng = random.Random(7)
    words = ["the", "kernel", "schedules", "agents", "that", "share", "one", "model", "while", "tools", "run", "and", "memory", "pages", "move", "between", "devices", "as", "requests", "arrive", "and", "finish"]
    return " ".join(rng.choice(words) for _ in range(n_words))


PROMPTS = {
    "english": "The history of the printing press begins in",
    "chinese": "请用一句话介绍长城的历史。",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "emoji": "My favourite emojis are 🎉🐍🚀 because",
    "long": _long_text(1040),
}


