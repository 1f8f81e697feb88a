"""Book picks from a reader's history by embeddings, each explained by the model from a liked book.

    llmos run demos/recommend.py
    llmos run demos/recommend.py --arg users=ada,ben --arg k=5

The catalogue (``demos/data/catalogue.json``: 56 fictional books) is embedded with
``llm.embed``, the kernel's MiniLM model; a book is its title and description, never its
category. A reader's profile is the mean of the books they liked
(``demos/data/user_histories.json``), and the books they have not read are ranked by cosine
similarity to it. Each pick is paired with the liked book closest to it, and the model
writes the reason under a grammar that makes the sentence begin "Because you liked <that
book>, you will enjoy <the pick>, another book about": the pairing is computed, the rest of
the sentence is the model's.

Every reader also liked one book that is hidden from the recommender, from the taste the
data labels them with; ``hit_rate_at_k`` is how often the top k recover it, beside the k
most popular unread books (most liked across the readers) and k unread books at random.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import numpy as np

from demos import data_path
from llmos_kernel.errors import InvalidArgument
from syscalls import llm

SYSTEM = ("You are a friendly bookseller. In one sentence, tell the reader what the new book "
          "has in common with the book they liked.")
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def _load(name: str) -> dict:
    return json.loads(data_path(name).read_text())


def _literal(text: str) -> str:
    """``text`` as a regex matching exactly it."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _describe(book: dict) -> str:
    return f"{book['title']}. {book['description']}"


def _picks(vectors: np.ndarray, index: dict[str, int], liked: list[str], k: int) -> list[str]:
    """The ``k`` unread books closest to the mean of the liked ones, best first."""
    profile = vectors[[index[b] for b in liked]].mean(axis=0)
    scores = vectors @ (profile / np.linalg.norm(profile))
    ids = list(index)
    return [ids[i] for i in np.argsort(-scores, kind="stable") if ids[i] not in liked][:k]


def _closest(vectors: np.ndarray, index: dict[str, int], pick: str, liked: list[str]) -> str:
    """The liked book most like ``pick``: what its explanation is grounded in."""
    return max(liked, key=lambda b: float(vectors[index[b]] @ vectors[index[pick]]))


async def _explain(source: dict, pick: dict) -> str:
    """One sentence, in the model's words after a fixed opening that names both books."""
    opening = (f"Because you liked {source['title']}, you will enjoy {pick['title']}, "
               "another book about ")
    schema = {"type": "string", "pattern": f"^{_literal(opening)}[A-Za-z0-9 ,'-]{{8,120}}[.]$"}
    reply = await llm.chat(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": f"Book they liked: {_describe(source)}\n"
                                     f"New book: {_describe(pick)}"}],
        response_format={"type": "json_schema", "json_schema": {"name": "why", "schema": schema}},
        max_tokens=160, temperature=0)
    return json.loads(reply.text)


async def main(users: str = "", k: int = 3) -> dict:
    """Recommend ``k`` books to each reader named in ``users`` (default: all), explain each
    pick, and measure how often the hidden liked book is among them."""
    started = time.monotonic()
    books = {b["id"]: b for b in _load("catalogue.json")["items"]}
    everyone = _load("user_histories.json")["users"]
    wanted = [u.strip() for u in users.split(",") if u.strip()]
    readers = [r for r in everyone if not wanted or r["user"] in wanted]
    if len(readers) != len(wanted or everyone):
        known = ", ".join(r["user"] for r in everyone)
        raise InvalidArgument(f"unknown reader in {users!r}; known: {known}")
    if type(k) is not int or not 1 <= k <= len(books) // 2:
        raise InvalidArgument(f"k must be a whole number from 1 to {len(books) // 2}, got {k!r}")
    vectors = np.asarray(await llm.embed([_describe(b) for b in books.values()]))
    index = {book_id: n for n, book_id in enumerate(books)}
    print(f"embedded {len(books)} books; recommending {k} to each of {len(readers)} readers")

    likes = Counter(b for r in everyone for b in r["liked"])
    plans = []
    for reader in readers:
        picks = _picks(vectors, index, reader["liked"], k)
        unread = [b for b in books if b not in reader["liked"]]
        popular = sorted(unread, key=lambda b: -likes[b])[:k]  # ties: catalogue order
        plans.append({"user": reader["user"], "liked": reader["liked"], "picks": picks,
                      "sources": [_closest(vectors, index, p, reader["liked"]) for p in picks],
                      "hit": reader["held_out"] in picks,
                      "popular_hit": reader["held_out"] in popular,
                      "random_hit": k / len(unread)})
    pairs = [(plan, pick, source) for plan in plans
             for pick, source in zip(plan["picks"], plan["sources"])]
    sentences = await asyncio.gather(*(_explain(books[source], books[pick])
                                       for _, pick, source in pairs))
    for plan in plans:
        plan["recommendations"] = []
    for (plan, pick, source), sentence in zip(pairs, sentences):
        plan["recommendations"].append({"id": pick, "title": books[pick]["title"],
                                        "because": source, "explanation": sentence})
    for plan, reader in zip(plans, readers):
        liked = ", ".join(books[b]["title"] for b in plan["liked"])
        hidden = books[reader["held_out"]]["title"]
        print(f"\n{plan['user']} liked {liked}\n  (hidden: {hidden}: "
              f"{'found' if plan['hit'] else 'not in the top ' + str(k)})")
        for rec in plan["recommendations"]:
            print(f"  - {rec['title']}: {rec['explanation']}")

    n = len(plans)
    metrics = {"n_users": n, "k": k, "catalogue": len(books),
               "hit_rate_at_k": round(sum(p["hit"] for p in plans) / n, 3),
               "popularity_hit_rate": round(sum(p["popular_hit"] for p in plans) / n, 3),
               "random_hit_rate": round(sum(p["random_hit"] for p in plans) / n, 3),
               "explanations": len(sentences),
               "seconds": round(time.monotonic() - started, 1)}
    print("\nmetrics:", json.dumps(metrics))
    return {"users": [{key: p[key] for key in ("user", "liked", "recommendations", "hit")}
                      for p in plans], "metrics": metrics}
