"""How a generation's streamed deltas fold into one result.

The kernel streams a request's output as deltas (new text, token ids and
logprobs; the last one also carries the finish reason, usage and kept
context). The driver-side client and the syscall layer both collect them the
same way; this module is that one way, and imports nothing else of llmos, so
agent programs pay nothing for it.
"""

from __future__ import annotations

from typing import Any

import msgspec


def fold_delta(out: Any, delta: Any) -> None:
    """Add one ``wire.TokenDelta`` to ``out`` (anything with text, token_ids, logprobs,
    finish_reason, usage and context_id fields; usage arrives as a plain dict)."""
    out.text += delta.text
    out.token_ids += delta.token_ids
    if delta.logprobs:
        out.logprobs = (out.logprobs or []) + delta.logprobs
    if getattr(delta, "prompt_logprobs", None) is not None and hasattr(out, "prompt_logprobs"):
        out.prompt_logprobs = delta.prompt_logprobs
    if delta.finished:
        out.finish_reason = delta.finish_reason
        out.usage = None if delta.usage is None else msgspec.structs.asdict(delta.usage)
        out.context_id = delta.context_id
