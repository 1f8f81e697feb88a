"""The embedder against an independent reference on the same files: transformers' BertModel.

The model is pulled through the store, as a user would (``llmos models pull minilm``). The
reference does what sentence-transformers does for all-MiniLM-L6-v2 with transformers' own
tokenizer and BertModel: truncate to the model's ``max_seq_length``, mean-pool the token
states under the attention mask, L2-normalise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel import store
from llmos_kernel.core.embedder import Embedder
from llmos_kernel.errors import InvalidArgument, ModelFormatError, NotFound, UnsupportedModel

LONG = " ".join(f"Paragraph {i} of a report on soil erosion, crop rotation and rainfall in the "
                f"highlands." for i in range(60))
SENTENCES = [
    "The cat sat on the mat.",
    "A feline rested on the rug.",
    "How do I reset my router's admin password?",
    "Quarterly revenue grew 12% year over year, beating analyst estimates.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Ich habe heute keine Zeit, weil ich arbeiten muss.",
    "Le café est très chaud ce matin — fais attention !",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "🚀🔥 launch day 🎉",
    "naïve coöperation façade Ångström",
    "e\u0301le\u0300ve (combining accents)",
    "",
    " ",
    "\t\n\r",
    "?!",
    "a",
    "1 2 3 4 5 6 7 8 9 10",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 20,
    "Remember: the meeting with Dr. Okafor moved to Thursday at 3 pm.",
    "tab\tseparated\tvalues\x00with a NUL and a \x07 bell",
    LONG,
    LONG + " This sentence lies past the truncation point.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return store.resolve_model("minilm")
    except NotFound:
        return store.pull("minilm")


@pytest.fixture(scope="module")
def embedder(model_dir) -> Embedder:
    return Embedder.load("minilm")


@pytest.fixture(scope="module")
def max_seq_length(model_dir) -> int:
    return json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]


@pytest.fixture(scope="module")
def reference(model_dir, max_seq_length) -> Callable[[list[str]], np.ndarray]:
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = BertModel.from_pretrained(model_dir, local_files_only=True).eval()

    def embed(texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:  # one at a time: no padding, and no wasted work on a 2-core box
            batch = tokenizer([text], truncation=True, max_length=max_seq_length,
                              return_tensors="pt")
            with torch.no_grad():
                states = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            rows.append(F.normalize((states * mask).sum(1) / mask.sum(1), p=2, dim=1))
        return torch.cat(rows).numpy()

    embed.tokenizer = tokenizer
    return embed


def test_embeddings_equal_the_reference(embedder, reference):
    ours = embedder.embed(SENTENCES, batch_size=5)
    expected = reference(SENTENCES)
    delta = float(np.abs(ours - expected).max())
    print(f"\nmax |ours - transformers| over {len(SENTENCES)} sentences: {delta:.2e}")
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), embedder.dim)
    assert delta <= 1e-4


def test_long_texts_are_cut_at_the_truncation_length(embedder, reference, max_seq_length):
    assert max_seq_length == 256
    assert len(reference.tokenizer(LONG)["input_ids"]) > 2 * max_seq_length
    short, long, longer = embedder.embed([LONG[:200], LONG, SENTENCES[-1]])
    assert np.abs(long - longer).max() <= 1e-6
    assert np.abs(long - short).max() > 1e-3


def test_each_row_is_the_text_embedded_alone_in_any_order(embedder):
    alone = np.stack([embedder.embed([text])[0] for text in SENTENCES[:8]])
    batched = embedder.embed(SENTENCES[:8][::-1], batch_size=3)[::-1]
    assert np.abs(alone - batched).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_any_unicode_text_embeds_like_the_reference(embedder, reference, texts):
    assert np.abs(embedder.embed(texts) - reference(texts)).max() <= 1e-4


def test_no_texts_give_an_empty_matrix(embedder, model_dir):
    dim = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    assert embedder.dim == dim
    empty = embedder.embed([])
    assert empty.shape == (0, dim) and empty.dtype == np.float32


@pytest.mark.parametrize(
    "texts, batch_size, complaint",
    [
        ("one string", 32, "list of str, got str"),
        (["fine", 3], 32, "item 1 is a int"),
        ([b"bytes"], 32, "item 0 is a bytes"),
        (["fine", "lone \ud800 surrogate"], 32, "item 1 is not valid Unicode: surrogates "),
        (None, 32, "list of str, got NoneType"),
        (["fine"], 0, "batch_size must be an int >= 1"),
        (["fine"], 2.0, "batch_size must be an int >= 1"),
    ],
)
def test_bad_input_is_a_typed_error(embedder, texts, batch_size, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        embedder.embed(texts, batch_size=batch_size)


def model_copy(folder: Path, model_dir: Path, config_changes: dict, weights: bytes | None) -> Path:
    """A model directory like the real one, with config.json changed and maybe other weights."""
    folder.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | config_changes))
    (folder / "tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    if weights is None:
        (folder / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    else:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_load_says_what_is_wrong_with_a_model(model_dir, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelFormatError, match="lacks config.json, model.safetensors"):
        Embedder.load(gguf)
    llama = model_copy(tmp_path / "llama", model_dir, {"model_type": "llama"}, None)
    with pytest.raises(UnsupportedModel, match="runs BERT models"):
        Embedder.load(llama)
    wider = model_copy(tmp_path / "wider", model_dir, {"hidden_size": 512}, None)
    with pytest.raises(ModelFormatError, match=r"does not fit its config.json: layers.0.attn_norm"
                                               r".bias is \(384,\) in the file but \(512,\)"):
        Embedder.load(wider)
    noise = model_copy(tmp_path / "noise", model_dir, {}, b"\x08" + bytes(7) + b"{}garbage")
    with pytest.raises(ModelFormatError, match="cannot load the embedder"):
        Embedder.load(noise)
    with pytest.raises(NotFound, match="unknown model 'bert-9000'"):
        Embedder.load("bert-9000")
