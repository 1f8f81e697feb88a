"""Grammar-constrained decoding: JSON Schema, regex, Lark and choice grammars via llguidance.

A ``GrammarCompiler`` (one per tokenizer) turns a schema or grammar into a ``Grammar``; each
sequence that must follow it gets its own ``Constraint`` from ``Grammar.matcher()``. The engine
asks a constraint for ``allowed_mask()`` before sampling, ``advance``s it with the sampled token
and finishes the sequence once ``is_done()``. The mask is a packed little-endian bitmask (bit i
set = token i allowed), the form ``runner.unpack_mask`` reads.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import llguidance
import numpy as np

from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.errors import InvalidArgument

# JSON with fixed separators: whitespace is a place where small models ramble, and these are the
# separators of ``json.dumps``, the form models saw most. A schema's own "x-guidance" overrides.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors name the problem, not the state


class Constraint:
    """One sequence's position in a grammar: which tokens may come next, and whether it is over."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._words = np.zeros(-(-vocab_size // 32), dtype=np.int32)
        self._address = self._words.ctypes.data
        self._mask: bytes | None = None  # the mask of the current position, once computed

    def allowed_mask(self) -> bytes:
        """The packed bitmask of the tokens the grammar allows next (stop tokens when complete)."""
        if self._mask is None:
            self._matcher.unsafe_compute_mask_ptr(self._address, self._words.nbytes)
            if self._matcher.is_error():
                raise InvalidArgument(f"the grammar failed: {self._matcher.get_error()}")
            self._mask = self._words.tobytes()
        return self._mask

    def advance(self, token: int) -> None:
        """Move past ``token``; InvalidArgument if the grammar does not allow it here."""
        if not self._matcher.consume_token(token):
            raise InvalidArgument(
                f"token {token} is not allowed by the grammar at this point "
                f"(the sampler must apply allowed_mask): {self._matcher.get_error()}")
        self._mask = None

    def is_done(self) -> bool:
        """True when the grammar admits nothing more: the output is complete."""
        return self._matcher.is_stopped()

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` tokens, e.g. when a sequence's output is cut back."""
        if not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"rollback takes a token count >= 0, got {n!r}")
        if not self._matcher.rollback(n):
            raise InvalidArgument(f"cannot roll the grammar back by {n} tokens: "
                                  f"{self._matcher.get_error() or 'fewer were consumed'}")
        self._mask = None


class Grammar:
    """A compiled grammar; ``matcher()`` starts a fresh Constraint for one sequence, cheaply."""

    def __init__(self, text: str, start: llguidance.LLMatcher, vocab_size: int) -> None:
        self.text = text  # llguidance's grammar definition (what LLMatcher takes)
        self._start = start  # never advanced: copied for each sequence
        self._vocab_size = vocab_size

    def matcher(self) -> Constraint:
        """A Constraint at the start of the grammar, for one sequence."""
        return Constraint(self._start.deep_copy(), self._vocab_size)


class GrammarCompiler:
    """Compiles grammars for one tokenizer, keeping the most recently used ones."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 128) -> None:
        self.tokenizer = tokenizer
        # Every stop token (EOS first) ends a grammar's output, e.g. ChatML's <|im_end|>.
        stops = sorted(tokenizer.stop_token_ids, key=lambda t: (t != tokenizer.eos_token_id, t))
        self.lltokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=stops or None)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """Output exactly one JSON value that validates against ``schema``."""
        if not isinstance(schema, dict):
            raise InvalidArgument(f"a JSON schema must be a dict, got {type(schema).__name__}")
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"the JSON schema is not valid JSON: {e}") from None
        return self._compile(text, "JSON schema")

    def regex(self, pattern: str) -> Grammar:
        """Output one full match of ``pattern`` (Rust regex syntax)."""
        _check_str(pattern, "regex pattern")
        return self._compile(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    def lark(self, grammar: str) -> Grammar:
        """Output a sentence of a Lark grammar (llguidance's dialect, with ``%json`` rules)."""
        _check_str(grammar, "Lark grammar")
        return self._compile(llguidance.LLMatcher.grammar_from_lark(grammar), "Lark grammar")

    def choice(self, options: list[str]) -> Grammar:
        """Output exactly one of ``options``."""
        if not isinstance(options, list | tuple) or not options or not all(
                isinstance(o, str) and o for o in options):
            raise InvalidArgument(f"choice takes a non-empty list of non-empty strings, "
                                  f"got {options!r}")
        return self.lark("start: " + " | ".join(json.dumps(o) for o in options))

    def _compile(self, text: str, what: str) -> Grammar:
        grammar = self._cache.get(text)
        if grammar is not None:
            self._cache.move_to_end(text)
            return grammar
        start = llguidance.LLMatcher(self.lltokenizer, text, log_level=0, limits=_LIMITS)
        if start.is_error():
            raise InvalidArgument(f"the {what} cannot be used: {start.get_error()}")
        grammar = Grammar(text, start, self.tokenizer.vocab_size)
        self._cache[text] = grammar
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return grammar


def _check_str(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"the {what} must be a non-empty string, got {value!r}")
