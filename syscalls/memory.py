"""memory: long-term memory per process, and keeping a conversation inside the context.

``add``/``search`` store and retrieve text by meaning (sentence embeddings,
cosine similarity); only the calling process sees its memories. ``fit`` and
``compact`` keep a long conversation inside the model's context window, as
MemGPT does: drop or summarize the oldest turns, archiving what they said.
"""

from __future__ import annotations

from typing import Any

from llmos_kernel.errors import ContextOverflow, InvalidArgument
from llmos_kernel.syscall_table import MAX_TEXT_CHARS
from syscalls import _context, llm

ARCHIVE_CHARS = 16_000  # of one archived turn; the embedding reads only its first few hundred
ARCHIVE_BATCH = 256  # memories per add_many call


async def add(text: str, metadata: dict | None = None) -> dict:
    """Remember ``text`` (with JSON ``metadata`` to filter on); returns the stored item."""
    return await _context.call("memory.add", text=text, metadata=metadata)


async def add_many(items: list[tuple[str, dict | None]]) -> list[dict]:
    """Remember several texts at once: one embedding batch, all stored or none."""
    return await _context.call("memory.add_many",
                               items=[{"text": text, "metadata": meta} for text, meta in items])


async def search(query: str, k: int = 5, *, where: dict | None = None) -> list[dict]:
    """The ``k`` memories closest in meaning to ``query``, best first (with ``score``)."""
    return await _context.call("memory.search", query=query, k=k, where=where)


async def get(item_id: str) -> dict:
    return await _context.call("memory.get", id=item_id)


async def delete(item_id: str) -> None:
    await _context.call("memory.delete", id=item_id)


async def count() -> int:
    return await _context.call("memory.count")


async def fit(messages: list[dict], *, reserve: int = 256, limit: int | None = None,
              archive: bool = True) -> list[dict]:
    """The conversation cut to fit the context with ``reserve`` tokens left for the answer
    (and for tool descriptions, if the next turn offers tools).

    System messages stay (moved to the front); the oldest other turns are dropped, and
    archived to memory unless ``archive`` is False; if the last turn alone is too long,
    its beginning is cut. ``limit`` caps the prompt tokens further. ContextOverflow if the
    system messages alone do not fit.
    """
    _check_conversation(messages)
    _check_count("reserve", reserve)
    if limit is not None:
        _check_count("limit", limit)
    if not isinstance(archive, bool):
        raise InvalidArgument(f"archive must be True or False, got {archive!r:.40}")
    budget = (await llm.info())["context_length"] - reserve
    if limit is not None:
        budget = min(budget, limit)
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    recent = _newest_within(turns, MAX_TEXT_CHARS // 2)
    if len(recent) == len(turns) and recent[-1:] == turns[-1:] \
            and await llm.count(messages=messages) <= budget:
        return list(messages)

    async def fits(kept: list[dict]) -> bool:
        return await llm.count(messages=system + kept) <= budget

    if not recent or not await fits([{**recent[-1], "content": ""}]):
        raise ContextOverflow(f"the system messages alone need more than {budget} tokens; "
                              "shorten them")
    newest = await _largest(len(recent), lambda n: fits(recent[len(recent) - n:]))
    if newest == 0:  # the last turn alone is too long: keep its end
        last, text = recent[-1], recent[-1].get("content") or ""
        chars = await _largest(len(text), lambda n: fits([{**last, "content": text[len(text) - n:]}]))
        kept = [{**last, "content": text[len(text) - chars:]}]
    else:
        kept = recent[len(recent) - newest:]
        while len(kept) > 1 and kept[0]["role"] == "tool":
            kept = kept[1:]  # a tool result must not outlive the turn that called the tool
    if archive:
        await _archive(turns[:len(turns) - len(kept)], "archived_turn")
    return system + kept


async def compact(messages: list[dict], *, keep_last: int = 4, max_tokens: int = 128,
                  reserve: int = 256, **sampling: Any) -> list[dict]:
    """All but the last ``keep_last`` turns replaced by a model-written summary (the old
    turns are archived to memory); the result is fitted to the context like ``fit``."""
    _check_conversation(messages)
    for name, value in (("keep_last", keep_last), ("max_tokens", max_tokens),
                        ("reserve", reserve)):
        _check_count(name, value)
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) <= keep_last:
        return await fit(messages, reserve=reserve)
    old, recent = turns[:-keep_last], turns[-keep_last:]
    request = await fit([
        {"role": "system", "content": "Summarize the conversation the user gives you in a few "
                                      "sentences. Keep names, numbers and decisions."},
        {"role": "user", "content": "\n".join(_line(m) for m in old)}],
        reserve=max_tokens, archive=False)
    summary = await llm.chat(request, max_tokens=max_tokens, **{"temperature": 0, **sampling})
    await _archive(old, "compacted_turn")
    note = {"role": "system", "content": f"Summary of the earlier conversation: {summary.text}"}
    return await fit(system + [note] + recent, reserve=reserve)


def _check_conversation(messages: Any) -> None:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content") or "", str) for m in messages):
        raise InvalidArgument("messages must be a list of {'role': str, 'content': str} dicts")


def _check_count(name: str, value: Any) -> None:
    if type(value) is not int or value < 0:
        raise InvalidArgument(f"{name} must be a whole number of tokens >= 0, got {value!r:.40}")


def _newest_within(turns: list[dict], chars: int) -> list[dict]:
    """The newest turns holding at most ``chars`` characters, the oldest of them cut to its
    end: no context holds that many tokens (a token is rarely 64 characters), so what is
    older could never be kept."""
    kept: list[dict] = []
    for turn in reversed(turns):
        text = turn.get("content") or ""
        if len(text) >= chars:
            kept.append({**turn, "content": text[len(text) - chars:]})
            break
        kept.append(turn)
        chars -= len(text)
    return kept[::-1]


async def _largest(high: int, ok) -> int:
    """The largest n in [0, high] with ``await ok(n)``, for ``ok`` true at 0 and monotone."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if await ok(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _line(message: dict) -> str:
    """One turn as a line of a transcript (tool calls included)."""
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        text += f" [called {function.get('name')}({function.get('arguments')})]"
    return f"{message.get('role')}: {text.strip()}"


async def _archive(turns: list[dict], kind: str) -> None:
    items = [(_line(m)[:ARCHIVE_CHARS], {"kind": kind}) for m in turns]
    items = [(text, meta) for text, meta in items if text.split(":", 1)[1].strip()]
    for start in range(0, len(items), ARCHIVE_BATCH):
        await add_many(items[start:start + ARCHIVE_BATCH])
