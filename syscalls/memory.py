"""memory: long-term memory per process, and keeping a conversation inside the context.

``add``/``search`` store and retrieve text by meaning (sentence embeddings,
cosine similarity); only the calling process sees its memories. ``fit`` and
``compact`` keep a long conversation inside the model's context window, as
MemGPT does: drop or summarize the oldest turns, archiving what they said.
"""

from __future__ import annotations

from typing import Any

from syscalls import _context, llm


async def add(text: str, metadata: dict | None = None) -> dict:
    return await _context.call("memory.add", text=text, metadata=metadata)


async def search(query: str, k: int = 5, *, where: dict | None = None) -> list[dict]:
    """The ``k`` memories closest in meaning to ``query``, best first (with ``score``)."""
    return await _context.call("memory.search", query=query, k=k, where=where)


async def get(item_id: str) -> dict:
    return await _context.call("memory.get", id=item_id)


async def delete(item_id: str) -> None:
    await _context.call("memory.delete", id=item_id)


async def count() -> int:
    return await _context.call("memory.count")


async def fit(messages: list[dict], *, reserve: int = 256, archive: bool = True) -> list[dict]:
    """Drop the oldest turns (keeping system messages) until the conversation plus
    ``reserve`` tokens for the answer fits the context; dropped turns go to memory."""
    limit = (await llm.info())["context_length"] - reserve
    kept = list(messages)
    dropped: list[dict] = []
    while await llm.count(messages=kept) > limit:
        turns = [i for i, m in enumerate(kept) if m.get("role") != "system"]
        if len(turns) > 1:
            dropped.append(kept.pop(turns[0]))
            continue
        if not turns or len(kept[turns[0]].get("content") or "") < 2:
            break  # only system text is left: nothing more to drop
        last = kept[turns[0]]
        kept[turns[0]] = {**last, "content": last["content"][len(last["content"]) // 2:]}
    if archive and dropped:
        for m in dropped:
            await add(f"{m.get('role')}: {m.get('content')}", {"kind": "archived_turn"})
    return kept


async def compact(messages: list[dict], *, keep_last: int = 4, max_tokens: int = 128,
                  **sampling: Any) -> list[dict]:
    """Replace all but the last ``keep_last`` turns with a model-written summary."""
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) <= keep_last:
        return list(messages)
    old, recent = turns[:-keep_last], turns[-keep_last:]
    transcript = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in old)
    summary = await llm.chat([{"role": "user", "content":
                               "Summarize this conversation in a few sentences, keeping names, "
                               f"numbers and decisions:\n{transcript}"}],
                             max_tokens=max_tokens, temperature=0, **sampling)
    await add(transcript, {"kind": "compacted_turns"})
    note = {"role": "system", "content": f"Summary of the earlier conversation: {summary.text}"}
    return system + [note] + recent
