"""Training and evaluation data: JSONL files of chat conversations or plain text.

``chat`` lines are ``{"messages": [{"role", "content"}, ...]}``: rendered with the model's
chat template, the loss counts only the assistant turns. ``text`` lines are
``{"text": ...}``: every token counts. Each bad line (not JSON, missing fields, longer than
the context) is an InvalidArgument naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.errors import InvalidArgument

IGNORE = -100  # label of a token the loss skips


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where the loss counts, else IGNORE
    line: int


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: no such data file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{path}:{n}: not valid JSON ({e.msg} at column "
                                      f"{e.colno})") from e
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{path}:{n}: each line must be a JSON object, got "
                                      f"{type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise InvalidArgument(f"{path}: the file has no examples (it is empty)")
    return rows


def messages_of(path: Path, n: int, obj: dict) -> list[dict]:
    messages = obj.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise InvalidArgument(f"{path}:{n}: a chat line needs \"messages\": a list of "
                              "{\"role\": ..., \"content\": ...} objects")
    if messages[-1]["role"] != "assistant":
        raise InvalidArgument(f"{path}:{n}: the last message must be the assistant's (the "
                              "turn the model learns or is scored on)")
    return messages


def chat_example(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation; labels only on the assistant turns."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.encode(tok.apply_chat_template(messages[:i], add_generation_prompt=True),
                            add_special_tokens=False)
        upto = tok.encode(tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False),
                          add_special_tokens=False)
        labels += [IGNORE] * (len(prefix) - len(ids)) + upto[len(prefix):]
        ids = upto
    return ids, labels[:len(ids)]


def load_examples(path: str | Path, tok: Tokenizer, fmt: str = "chat",
                  max_len: int = 2048) -> list[Example]:
    """Every line of ``path`` tokenized for training (``fmt``: chat or text)."""
    path = Path(path)
    if fmt not in ("chat", "text"):
        raise InvalidArgument(f"unknown data format {fmt!r}; use chat or text")
    examples = []
    for n, obj in read_jsonl(path):
        if fmt == "chat":
            ids, labels = chat_example(tok, messages_of(path, n, obj))
        else:
            if not isinstance(obj.get("text"), str) or not obj["text"]:
                raise InvalidArgument(f"{path}:{n}: a text line needs \"text\": a non-empty "
                                      "string")
            ids = tok.encode(obj["text"])
            labels = list(ids)
        if len(ids) > max_len:
            raise InvalidArgument(f"{path}:{n}: the sample has {len(ids)} tokens, longer than "
                                  f"the context of {max_len}; shorten or split it")
        examples.append(Example(ids, labels, n))
    return examples
