"""The tokenizer and chat template of the Transformer core, built from a GGUF file's metadata.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary, merges, token types and special
token ids under llama.cpp's ``tokenizer.ggml.*`` keys. They are handed to Hugging Face
``tokenizers`` (its Rust BPE does the encoding), set up the way transformers sets up a tokenizer
loaded from the same GGUF, with the text splitting llama.cpp uses for the named pre-tokenizer.
The chat template is rendered in a sandboxed jinja2 environment configured as transformers does.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from llmos_kernel.errors import InvalidArgument, ModelFormatError, UnsupportedModel

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that get added tokens
SPM_SPACE = "\u2581"

# Split patterns of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`, as the models'
# own tokenizer.json files write them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_DIGIT_SPLIT = r"\p{N}"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")


@dataclass(frozen=True)
class _PreTokenizer:
    """How text is cut before BPE: regexes applied in turn, each isolating its matches."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole vocabulary entry is taken as is


_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
_DIGITS_GPT2 = _PreTokenizer((_DIGIT_SPLIT, _GPT2_SPLIT))
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True)
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,))
_GPT4O = _PreTokenizer((_GPT4O_SPLIT,))

PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "gpt-2": _GPT2, "phi-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "trillion": _GPT2, "exaone4": _GPT2, "mellum": _GPT2, "a.x-4.0": _GPT2, "gigachat": _GPT2,
    "granite-docling": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2,
    "command-r": _DIGITS_GPT2, "codeshell": _DIGITS_GPT2, "exaone": _DIGITS_GPT2,
    "minerva-7b": _DIGITS_GPT2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3, "pixtral": _LLAMA3, "midm-2.0": _LLAMA3, "lfm2": _LLAMA3,
    "dbrx": _PreTokenizer((_LLAMA3_SPLIT,)), "smaug-bpe": _PreTokenizer((_LLAMA3_SPLIT,)),
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2, "stablelm2": _QWEN2,
    "hunyuan": _QWEN2, "grok-2": _QWEN2,
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True),
    "gpt-4o": _GPT4O, "llama4": _GPT4O, "minimax-m2": _GPT4O,
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER_SPLITS),
}

# Special tokens that end a turn wherever they appear (llama.cpp's end-of-generation spellings).
_END_OF_TURN = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_UNSPELL = {ord(c): b for c, b in CHAR_TO_BYTE.items()}  # str.translate table to latin-1 bytes


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and stop tokens.

    ``stop_token_ids`` holds EOS, the file's end-of-turn/end-of-message ids and every special
    token spelled as an end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``...), as llama.cpp
    stops on them. ``backend`` is the ``tokenizers.Tokenizer`` doing the work.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        tokens: Sequence[str],
        token_bytes: list[bytes],
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        unk_token_id: int | None,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self._tokens = list(tokens)
        self._token_bytes = token_bytes
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.special_token_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        end_of_turn = {i for i in self.special_token_ids if self._tokens[i] in _END_OF_TURN}
        self.stop_token_ids = frozenset(
            {i for i in (eos_token_id, *extra_stop_ids) if i is not None} | end_of_turn
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (``GGUFFile.metadata``)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ModelFormatError(
                "GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)"
            )
        tokens = [str(t) for t in tokens]
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", ())]
        if types and len(types) != len(tokens):
            raise ModelFormatError(
                f"GGUF tokenizer lists {len(tokens)} tokens but {len(types)} token types"
            )

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                raise ModelFormatError(
                    f"tokenizer.ggml.{key} = {value} is outside the vocabulary "
                    f"(0..{len(tokens) - 1})"
                )
            return int(value)

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        unk, pad = token_id("unknown_token_id"), token_id("padding_token_id")
        end_of_turn = (token_id("eot_token_id"), token_id("eom_token_id"))
        if kind == "gpt2":
            backend, token_bytes = _byte_level_backend(metadata, tokens, types)
        elif kind == "llama":
            backend, token_bytes = _sentencepiece_backend(metadata, tokens, types)
        else:
            raise UnsupportedModel(
                f"tokenizer.ggml.model {kind!r} is not supported "
                "(llmos reads 'gpt2' byte-level BPE and 'llama' sentencepiece BPE)"
            )
        # A named token is special even when not marked as control, as in transformers.
        backend.add_special_tokens([
            AddedToken(tokens[i], normalized=False, special=True)
            for i in dict.fromkeys((bos, eos, unk, pad))
            if i is not None and backend.id_to_token(i) is not None
            and i not in backend.get_added_tokens_decoder()
        ])
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        _set_bos_eos(backend, tokens, bos if add_bos else None, eos if add_eos else None)
        return cls(
            backend, tokens, token_bytes,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, unk_token_id=unk,
            extra_stop_ids=end_of_turn,
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    # -- text <-> ids ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their tokens."""
        if not isinstance(text, str):
            raise InvalidArgument(f"text to encode must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Token ids of many texts at once (encoded in parallel by the backend)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidArgument(f"texts[{i}] must be a str, got {type(text).__name__}")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes that do not form UTF-8 come out as U+FFFD."""
        return self.backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder for one stream of generated tokens."""
        return IncrementalDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The token's spelling in the vocabulary (byte-level characters for BPE tokens)."""
        self._checked_ids([token_id])
        return self.backend.id_to_token(token_id) or self._tokens[token_id]

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for; special tokens as their UTF-8 text."""
        return list(self._token_bytes)

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as e:
            raise InvalidArgument(f"token ids must be integers: {e}") from e
        if ids and not 0 <= min(ids) <= max(ids) < len(self._tokens):
            bad = next(i for i in ids if not 0 <= i < len(self._tokens))
            raise InvalidArgument(
                f"token id {bad} is not in the vocabulary (0..{len(self._tokens) - 1})"
            )
        return ids

    # -- chat --------------------------------------------------------------------------------

    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens a chat template may refer to, like ``bos_token``."""
        named = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id,
                 "unk_token": self.unk_token_id, "pad_token": self.pad_token_id}
        return {name: self._tokens[i] for name, i in named.items() if i is not None}

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was tuned on.

        ``extra`` gives more template variables (``documents``, ``enable_thinking``...), which
        override the named special tokens, as in transformers.
        """
        conversation = validate_messages(messages)
        if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
        ):
            raise InvalidArgument("tools must be a list of JSON-schema dicts")
        try:
            return self._compiled_template.render(
                messages=conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                **{"documents": None, **self.special_tokens_map(), **extra},
            )
        except jinja2.TemplateError as e:
            raise InvalidArgument(f"the chat template rejected the conversation: {e}") from e

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        try:
            return _chat_environment().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFormatError(f"the model's chat template does not parse: {e}") from e


class IncrementalDecoder:
    """Turns a stream of token ids into text, releasing only complete characters.

    A multi-byte character split across tokens is held back until the token that completes it
    arrives, so the pieces returned by ``push`` plus ``flush`` concatenate to ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this have had their text released

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never a partial character)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Return what is still held back, e.g. an incomplete character at the end of a stream."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._prefix:self._read], self._skip)
        text = decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen):]


def validate_messages(messages: Any) -> list[dict]:
    """Check a conversation's shape and return copies without None values (as transformers does)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {'role', 'content'} dicts")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidArgument(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        if content is None and not message.get("tool_calls"):
            raise InvalidArgument(
                f"messages[{i}] ({role}) needs a string 'content' (or 'tool_calls' with no content)"
            )
        if content is not None and not isinstance(content, str):
            raise InvalidArgument(
                f"messages[{i}]['content'] must be a string, got {type(content).__name__}"
            )
        conversation.append({k: v for k, v in message.items() if v is not None})
    return conversation


# -- building the backend ------------------------------------------------------------------------


def _byte_level_backend(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int]
) -> tuple[BackendTokenizer, list[bytes]]:
    """GPT-2 style byte-level BPE with the split rules of ``tokenizer.ggml.pre`` (GPT-2's own
    when the file names none, as transformers does)."""
    pre_name = metadata.get("tokenizer.ggml.pre", "gpt-2")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedModel(
            f"tokenizer.ggml.pre {pre_name!r} is not supported; llmos knows: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    # Tokens written outside the byte alphabet (raw text, e.g. "<think> ") are respelled.
    spelled = [t if set(t) <= CHAR_TO_BYTE.keys() else _byte_spelling(t.encode()) for t in tokens]
    backend = BackendTokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(spelled)}, merges=_merges(metadata),
        ignore_merges=pre.ignore_merges, fuse_unk=False,
    ))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a conversion mislabel; it stays plain.
    _add_typed_tokens(backend, tokens, types, keep=lambda t: set(t) <= CHAR_TO_BYTE.keys())
    token_bytes = [
        t.encode() if types and types[i] == CONTROL else _unspell(spelled[i])
        for i, t in enumerate(tokens)
    ]
    return backend, token_bytes


def _sentencepiece_backend(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int]
) -> tuple[BackendTokenizer, list[bytes]]:
    """Llama/sentencepiece BPE: "▁" for spaces, byte fallback, merges ranked by token score."""
    scores = metadata.get("tokenizer.ggml.scores")
    if "tokenizer.ggml.merges" not in metadata and scores is None:
        raise ModelFormatError("sentencepiece tokenizer has neither merges nor token scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = (_merges(metadata) if "tokenizer.ggml.merges" in metadata
              else _merges_from_scores(vocab, dict(zip(tokens, map(float, scores)))))
    backend = BackendTokenizer(models.BPE(
        vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
    ))
    prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPM_SPACE, prepend_scheme="first" if prefix_space else "never", split=False
    )
    backend.decoder = decoders.Sequence([
        decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(content=" ", left=1)] if prefix_space else []),
    ])
    _add_typed_tokens(backend, tokens, types, keep=lambda t: True)
    token_bytes = [_sentencepiece_bytes(t, types[i] if types else 1) for i, t in enumerate(tokens)]
    return backend, token_bytes


def _add_typed_tokens(
    backend: BackendTokenizer, tokens: list[str], types: list[int], keep: Callable[[str], bool]
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so
    both are matched whole in text (for those ``keep`` accepts)."""
    typed = [(t, kind) for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)]
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True) for t, kind in typed
        if kind == CONTROL and keep(t)
    ])
    backend.add_tokens([
        AddedToken(t, normalized=False, special=False) for t, kind in typed
        if kind == USER_DEFINED and keep(t)
    ])


def _set_bos_eos(
    backend: BackendTokenizer, tokens: list[str], bos: int | None, eos: int | None
) -> None:
    """Make ``add_special_tokens=True`` put BOS in front and/or EOS at the end."""
    if bos is None and eos is None:
        return

    def template(sequence: str, type_id: int) -> list[str]:
        return [*([f"{tokens[bos]}:{type_id}"] if bos is not None else []),
                f"${sequence}:{type_id}",
                *([f"{tokens[eos]}:{type_id}"] if eos is not None else [])]

    backend.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1),
        special_tokens=[(tokens[i], i) for i in dict.fromkeys((bos, eos)) if i is not None],
    )


def _merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges = []
    for n, merge in enumerate(metadata.get("tokenizer.ggml.merges", ())):
        left, sep, right = str(merge).partition(" ")
        if not sep:
            raise ModelFormatError(f"tokenizer.ggml.merges[{n}] = {merge!r} is not 'left right'")
        merges.append((left, right))
    return merges


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a sentencepiece vocabulary implies: every split of a token into two tokens,
    best-scored token first (the ordering transformers uses for GGUF files without merges)."""
    ranked = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((score, left, right) for left, right in pairs)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _byte_spelling(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def _unspell(token: str) -> bytes:
    return token.translate(_UNSPELL).encode("latin-1")


def _sentencepiece_bytes(token: str, kind: int) -> bytes:
    if kind == 6 and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])  # a byte-fallback token, <0xNN>
    if kind == CONTROL:
        return token.encode()
    return token.replace(SPM_SPACE, " ").encode()


# -- chat templates ------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used to mark assistant text in training
    templates) and renders its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """A sandbox set up like transformers' chat-template environment."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
