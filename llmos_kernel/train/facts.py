"""The shipped fine-tuning task: capitals of fictional countries.

The base model cannot know them, so its exact-match accuracy starts near zero; the
held-out file asks the same facts in phrasings the training file never uses, so a rise
there is learning the facts, not the sentences. ``python -m llmos_kernel.train.facts``
rewrites ``datasets/capitals_{train,heldout}.jsonl`` (seeded: the same files every time).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATASETS = Path(__file__).parent / "datasets"
TRAIN_TEMPLATES = ("What is the capital of {c}?", "What's the capital city of {c}?",
                   "Name the capital of {c}.", "Which city is the capital of {c}?",
                   "Tell me the capital of {c}.", "I need the capital of {c}. What is it?")
HELDOUT_TEMPLATES = ("Which city serves as the capital of {c}?",
                     "What is {c}'s capital?")
N_FACTS = 40


def _name(rng: random.Random, syllables: int) -> str:
    onsets = ["b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "qu"]
    vowels = ["a", "e", "i", "o", "u", "ae", "ou"]
    return "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)).title()


def facts(seed: int = 17) -> list[tuple[str, str]]:
    """``N_FACTS`` (country, capital) pairs with distinct names."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs = []
    while len(pairs) < N_FACTS:
        country = _name(rng, 2) + rng.choice(["ia", "land", "stan", "ania"])
        city = _name(rng, 2) + rng.choice(["port", "burg", "ville", "ton", "mere"])
        if country not in seen and city not in seen:
            seen |= {country, city}
            pairs.append((country, city))
    return pairs


def lines(templates: tuple[str, ...]) -> list[str]:
    return [json.dumps({"messages": [{"role": "user", "content": t.format(c=country)},
                                     {"role": "assistant", "content": f"{city}."}]})
            for country, city in facts() for t in templates]


def write(folder: Path = DATASETS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        (folder / f"capitals_{name}.jsonl").write_text("\n".join(lines(templates)) + "\n")


if __name__ == "__main__":
    write()
