"""The GGUF tokenizer and chat template against Hugging Face transformers loading the same file.

The reference is ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``. Where transformers' GGUF
loader splits text differently from the model's own published tokenizer (and from llama.cpp), the
reference is given the model's declared pre-tokenizer; see ``DECLARED_PRE_TOKENIZERS``.
"""

from __future__ import annotations

import copy
import random
import unicodedata

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from llmos_kernel.core.gguf_file import GGUFFile
from llmos_kernel.core.tokenizer import (
    CHATML_TEMPLATE,
    IncrementalDecoder,
    Tokenizer,
)
from llmos_kernel.errors import InvalidArgument, ModelFormatError, UnsupportedModel

# transformers' GGUF loader knows no "smollm" and splits with plain GPT-2 rules, so " ½" becomes
# "ĠÂ" + a stray byte. SmolLM's tokenizer.json isolates every digit first, as llama.cpp does.
DECLARED_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}

SPECIAL_FRAGMENTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "<|"]


def _handwritten() -> list[str]:
    code = [
        "def f(x):\n    return x ** 2  # square\n",
        "for (let i = 0; i < n; i++) { console.log(`i=${i}`); }",
        'fn main() {\n\tprintln!("{:?}", vec![1, 2, 3]);\n}',
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
        "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
        "<div class=\"x\">&nbsp;<a href='/p?q=1&r=2'>link</a></div>",
        "if [ -f ~/.bashrc ]; then source ~/.bashrc; fi | grep -v '^#' > /dev/null 2>&1",
        '{"key": [1, 2.5, null, true], "nested": {"é": "\\u00e9"}}',
        "x=>x?.y??z;a&&b||!c;i+=1;j-=2;k**=3;",
        "    indented\n\t\ttabbed\n        \n",
        "λx. λy. x y ≠ y x ∀ε>0 ∃δ",
        "class Foo<T extends Bar> implements Baz {}",
    ]
    unicode_text = [
        "café naïve résumé façade", "Ångström über straße", "ǅ ǈ ǋ ﬁ ﬂ ẞ",
        "e\u0301 a\u0308 o\u0302 n\u0303", "Zalgo: Z\u0336\u0353a\u0334l\u0337g\u0335o",
        "שלום עולם", "مرحبا بالعالم", "English then עברית then English",
        "\u202eRTL override\u202c", "हिन्दी भाषा", "ภาษาไทย", "Ελληνικά κείμενα", "Русский текст",
        "中文字符测试", "日本語のテキスト、カタカナ", "한국어 텍스트", "𠜎𠜱𠝹𠱓", "ｆｕｌｌｗｉｄｔｈ",
        "zero\u200bwidth\u200cjoiner\u200d", "\ufeffBOM at start", "soft\u00adhyphen",
        "\x00\x01\x7f",
        "\u2028line\u2029para",
    ]
    emoji = [
        "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "1️⃣#️⃣", "🧑🏿‍💻 codes", "❤️‍🔥", "😀😃😄😁",
        "text 🎉 more 🎉 text", "👩🏻‍🤝‍👨🏾",
    ]
    numbers = [
        "0", "42", "1234567890", "3.14159265358979", "1,000,000.00", "-273.15", "1e-9",
        "0xDEADBEEF",
        "2024-01-31T23:59:59Z", "+1 (555) 010-9999", " ½ ¼ ² ³", "٣٤٥ ۱۲۳ १२३", "Ⅻ ⅷ ①②",
        "x²+y²=z²", "99 bottles", "a1b2c3d4",
    ]
    urls = [
        "https://example.com/path?query=1&x=y#frag",
        "http://user:pass@host:8080/a/b/c.html",
        "ftp://files.example.org/pub/file.tar.gz",
        "mailto:someone@example.com",
        "see https://en.wikipedia.org/wiki/Byte_pair_encoding.",
    ]
    specials = [
        "<|im_start|>user\nHello<|im_end|>\n",
        "<|im_start|><|im_end|>",
        "text<|endoftext|>more",
        " <|im_end|> ",
        "<|im_start",
        "<|IM_START|>",
        "<<|im_start|>>",
        "<|im_start|>assistant\n🎉<|im_end|>",
        "<repo_name>x<file_sep>y",
    ]
    whitespace = [
        "", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \n \n", "\t \t", "   leading", "trailing   ",
        "  both  ", "a\u00a0b", "a\u3000b", "line1\nline2\r\nline3\rline4",
    ]
    long = [
        "a" * 1000,
        "supercalifragilisticexpialidocious" * 20,
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "x" * 257 + " " + "y" * 3,
        "🎉" * 100,
        "的" * 300,
    ]
    prose = [
        "Hello world!", "The quick brown fox jumps over the lazy dog.", "I'm, you're, it's, we'll",
        "Don't STOP me now!!!", "What?! Really... yes.", "\"Quoted\" and 'single' and `back`",
    ]
    return code + unicode_text + emoji + numbers + urls + specials + whitespace + long + prose


def _generated(rng: random.Random) -> list[str]:
    texts = []
    for ws in [" ", "\t", "\n", "\r\n", " \n", "\t ", "\u00a0"]:
        for n in (1, 2, 3, 5, 8):
            texts += [ws * n, f"a{ws * n}b", f"{ws * n}x", f"x{ws * n}"]
    for n in (1, 2, 3, 4, 7, 16):
        texts += ["7" * n, " " + "9" * n, f"v{'1' * n}.{'0' * n}"]
    for word in ["Crème brûlée", "Ñandú", "Åre", "Điện Biên Phủ", "Ǆemal"]:
        texts += [unicodedata.normalize("NFC", word), unicodedata.normalize("NFD", word)]
    pool = _handwritten() + SPECIAL_FRAGMENTS + [" ", "\n", "é", "👍🏽", "12", "中"]
    for _ in range(60):
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(2, 5)))[:2000])
    for _ in range(20):
        texts.append("".join(chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x370, 0xFFFF),
                                               rng.randint(0x1F300, 0x1FAFF)]))
                             for _ in range(rng.randint(1, 40))).replace("\ud800", ""))
    return [t for t in texts if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]


CORPUS = _handwritten() + _generated(random.Random(20240531))

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\nTwo lines."},
    ],
    [{"role": "user", "content": "Ünïcödé 中文 👨‍👩‍👧‍👦 שלום"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaced  \n\n"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": '{"result": 4}'}],
]


@pytest.fixture(scope="module")
def tokenizer(gguf_file) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_file.metadata)


@pytest.fixture(scope="module")
def reference(hf_tokenizer, gguf_file):
    pre = gguf_file.metadata.get("tokenizer.ggml.pre")
    if pre not in DECLARED_PRE_TOKENIZERS:
        return hf_tokenizer
    declared = copy.deepcopy(hf_tokenizer)
    declared.backend_tokenizer.pre_tokenizer = DECLARED_PRE_TOKENIZERS[pre]()
    return declared


def test_corpus_is_broad():
    assert len(CORPUS) >= 200 and "" in CORPUS


def test_encode_matches_reference(tokenizer, reference):
    for add_special in (True, False):
        ours = [tokenizer.encode(text, add_special_tokens=add_special) for text in CORPUS]
        theirs = [reference.encode(text, add_special_tokens=add_special) for text in CORPUS]
        mismatches = [(t, o, r) for t, o, r in zip(CORPUS, ours, theirs) if o != r]
        assert not mismatches, mismatches[:3]
        assert tokenizer.encode_batch(CORPUS, add_special_tokens=add_special) == ours


def test_special_token_strings_encode_as_one_token(tokenizer, reference):
    for token_id in tokenizer.special_token_ids:
        text = tokenizer.id_to_token(token_id)
        assert tokenizer.encode(f"a{text}b", add_special_tokens=False)[1] == token_id
    assert tokenizer.special_token_ids == frozenset(
        i for i, t in reference.added_tokens_decoder.items() if t.special
    )


def test_decode_matches_reference(tokenizer, reference):
    for text in CORPUS:
        ids = reference.encode(text)
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


def test_vocabulary_and_named_tokens_match_reference(tokenizer, reference):
    ids = list(range(tokenizer.vocab_size))
    assert tokenizer.vocab_size == len(reference)
    assert [tokenizer.id_to_token(i) for i in ids] == reference.convert_ids_to_tokens(ids)
    assert all(tokenizer.token_to_id(tokenizer.id_to_token(i)) == i for i in ids[:2000])
    assert tokenizer.token_to_id("no such token \u2603") is None
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id
    )


text_with_fragments = st.lists(
    st.one_of(st.text(max_size=20),
              st.sampled_from([*SPECIAL_FRAGMENTS, " ", "  ", "\n", "1", "²"])),
    max_size=8,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=text_with_fragments)
def test_random_text_matches_reference_and_round_trips(tokenizer, reference, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False)
    decoded = tokenizer.decode(ids)
    assert decoded == reference.decode(ids)
    # Lossless unless the text has a byte the vocabulary lacks (e.g. lead bytes of unused planes).
    assert (decoded == text) == (reference.decode(reference.encode(text)) == text)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_ids_decode_like_reference_and_stream_the_same(tokenizer, reference, data):
    special = sorted(tokenizer.special_token_ids)
    # tokens of one non-ASCII byte: pieces of multi-byte characters
    lone_bytes = [i for i, b in enumerate(tokenizer.token_bytes()) if len(b) == 1 and b[0] >= 0x80]
    ids = data.draw(st.lists(st.one_of(
        st.integers(0, tokenizer.vocab_size - 1), st.sampled_from(special),
        st.sampled_from(lone_bytes),
    ), max_size=30))
    for skip in (False, True):
        expected = reference.decode(ids, skip_special_tokens=skip)
        assert tokenizer.decode(ids, skip_special_tokens=skip) == expected
        assert _stream(tokenizer.incremental_decoder(skip), ids) == expected


def _stream(decoder: IncrementalDecoder, ids: list[int]) -> str:
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def test_incremental_decoder_streams_exactly_decode(tokenizer):
    held_back = 0
    for text in CORPUS:
        ids = tokenizer.encode(text)
        for skip in (False, True):
            decoder = tokenizer.incremental_decoder(skip_special_tokens=skip)
            pieces = [decoder.push(i) for i in ids]
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip), text
            assert decoder.flush() == ""
            assert not any("\ufffd" in p for p in pieces), text
            held_back += pieces.count("")
    assert held_back > 0  # the corpus does split characters across tokens


def test_token_bytes_spell_the_text(tokenizer):
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    for text in CORPUS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8"), text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_reference(
    tokenizer, hf_tokenizer, conversation, add_generation_prompt
):
    expected = hf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt) == expected


CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant', 'system', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}\n"
    "  <{{ m['role'] }}>{% generation %}{{ m.get('content', '') }}{% endgeneration %}"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}{{ greeting | default('') }}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers – «fast»",
                                           "parameters": {"type": "object", "properties": {}}}}]


def test_custom_template_with_tools_and_extras_matches_reference(gguf_file, hf_tokenizer):
    custom = Tokenizer.from_gguf({**gguf_file.metadata, "tokenizer.chat_template": CUSTOM_TEMPLATE})
    conversation = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "3"},
    ]
    for tools in (None, TOOLS):
        expected = hf_tokenizer.apply_chat_template(
            conversation, chat_template=CUSTOM_TEMPLATE, tools=tools, tokenize=False,
            add_generation_prompt=True, greeting="hé",
        )
        assert custom.apply_chat_template(conversation, tools=tools, greeting="hé") == expected
    with pytest.raises(InvalidArgument, match="unknown role narrator"):
        custom.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_missing_template_falls_back_to_chatml(gguf_file, hf_tokenizer):
    metadata = {k: v for k, v in gguf_file.metadata.items() if k != "tokenizer.chat_template"}
    plain = Tokenizer.from_gguf(metadata)
    for conversation in CONVERSATIONS:
        assert plain.apply_chat_template(conversation) == hf_tokenizer.apply_chat_template(
            conversation, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
        )


@pytest.mark.parametrize("messages, where", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "no role"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "ok"}, {"role": 7, "content": "x"}], r"messages\[1\]\['role'\]"),
    ([{"role": "user", "content": ["a", "list"]}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": "ok"}, {"role": "assistant"}], r"messages\[1\] \(assistant\)"),
])
def test_bad_messages_are_rejected(tokenizer, messages, where):
    with pytest.raises(InvalidArgument, match=where):
        tokenizer.apply_chat_template(messages)


def test_turn_closing_token_is_a_stop_token(tokenizer, hf_tokenizer):
    marker = "MARKER-7f3a"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
        add_generation_prompt=False,
    )
    after = rendered[rendered.index(marker) + len(marker):]
    assert tokenizer.encode(after, add_special_tokens=False)[0] in tokenizer.stop_token_ids
    assert hf_tokenizer.eos_token_id in tokenizer.stop_token_ids
    assert tokenizer.stop_token_ids <= tokenizer.special_token_ids


def test_add_bos_token_puts_bos_first(gguf_file):
    with_bos = Tokenizer.from_gguf({**gguf_file.metadata, "tokenizer.ggml.add_bos_token": True})
    for text in CORPUS[:50]:
        assert with_bos.encode(text) == [with_bos.bos_token_id] + with_bos.encode(text, False)
    assert with_bos.encode_batch(["a", ""]) == [with_bos.encode("a"), with_bos.encode("")]


@pytest.mark.parametrize("change, error, message", [
    ({"tokenizer.ggml.model": "bert"}, UnsupportedModel, "'bert' is not supported"),
    ({"tokenizer.ggml.pre": "mystery-pre"}, UnsupportedModel, "'mystery-pre' is not supported"),
    ({"tokenizer.ggml.tokens": []}, ModelFormatError, "no tokenizer"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, ModelFormatError, "outside the vocabulary"),
])
def test_unusable_metadata_is_reported(gguf_file, change, error, message):
    with pytest.raises(error, match=message):
        Tokenizer.from_gguf({**gguf_file.metadata, **change})


def test_bad_inputs_raise_invalid_argument(tokenizer):
    with pytest.raises(InvalidArgument):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="not in the vocabulary"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(InvalidArgument, match="must be integers"):
        tokenizer.decode([0, "1"])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match=r"texts\[1\]"):
        tokenizer.encode_batch(["ok", None])  # type: ignore[list-item]


# -- a sentencepiece ("llama") vocabulary, written to a small GGUF file ---------------------------

SPM_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "they", "think",
    "about", "these", "other", "things", "in", "their", "own", "way", "hello", "world",
)


def _write_sentencepiece_gguf(path) -> None:
    """A small llama-style vocabulary: byte fallback tokens, scored pieces, control tokens."""
    counts: dict[str, int] = {}
    for word in SPM_WORDS:
        word = "\u2581" + word
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + 5) + 1):
                counts[word[i:j]] = counts.get(word[i:j], 0) + 1
    pieces = sorted(counts, key=lambda p: (-counts[p] * len(p), p))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces,
              "<|im_start|>", "<|im_end|>", "<think>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3, 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * 3
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_vocabulary_matches_reference(tmp_path):
    from transformers import AutoTokenizer

    _write_sentencepiece_gguf(tmp_path / "spm.gguf")
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    tokenizer = Tokenizer.from_gguf(GGUFFile.open(tmp_path / "spm.gguf").metadata)
    table = tokenizer.token_bytes()
    texts = CORPUS + [" ".join(SPM_WORDS), "<s>the</s> <think>they<|im_end|>"]
    for text in texts:
        for add_special in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=add_special)
            assert ids == reference.encode(text, add_special_tokens=add_special), text
        for skip in (False, True):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert tokenizer.decode(ids, skip_special_tokens=skip) == expected
            assert _stream(tokenizer.incremental_decoder(skip), ids) == expected
        spelled = b"".join(table[i] for i in tokenizer.encode(text, add_special_tokens=False))
        assert spelled in (text.encode(), b" " + text.encode())  # sentencepiece's prefix space
