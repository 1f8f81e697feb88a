"""Sentence embeddings for agent memory: all-MiniLM-L6-v2 as a small BERT encoder in torch.

It computes what sentence-transformers computes for that model: word pieces truncated to
``max_seq_length`` (256), a post-LN BERT encoder, the mean of the token states under the
attention mask, and L2 normalisation, so a dot product of two embeddings is their cosine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from llmos_kernel import store
from llmos_kernel.errors import InvalidArgument, ModelFormatError, UnsupportedModel

DEFAULT_EMBEDDER = "minilm"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    norm_eps: float

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """From a Hugging Face ``config.json``; UnsupportedModel for what this encoder lacks."""
        found = (config.get("model_type"), config.get("hidden_act"),
                 config.get("position_embedding_type", "absolute"))
        if found != ("bert", "gelu", "absolute"):
            raise UnsupportedModel(f"the embedder runs BERT models with GELU and absolute "
                                   f"positions; config.json says {found}")
        return cls(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config["intermediate_size"],
                   config["max_position_embeddings"], config["type_vocab_size"],
                   config["layer_norm_eps"])


class BertLayer(nn.Module):
    """Self-attention then a GELU MLP, each added to its input and layer-normed after."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.n_heads = c.n_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.attn_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=c.norm_eps)
        self.up, self.down = nn.Linear(d, c.intermediate_size), nn.Linear(c.intermediate_size, d)
        self.mlp_norm = nn.LayerNorm(d, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(attended.transpose(1, 2).reshape(b, t, d)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class BertEncoder(nn.Module):
    """Token, position and segment embeddings, then the layers; returns every token's state."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_positions, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.n_layers))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions) + self.token_type.weight[0])
        mask = attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        return x


_EMBEDDING_NAMES = {"embeddings.word_embeddings": "word",
                    "embeddings.position_embeddings": "position",
                    "embeddings.token_type_embeddings": "token_type",
                    "embeddings.LayerNorm": "norm"}
_LAYER_NAMES = {"attention.self.query": "query", "attention.self.key": "key",
                "attention.self.value": "value", "attention.output.dense": "attn_out",
                "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "up",
                "output.dense": "down", "output.LayerNorm": "mlp_norm"}


def _our_name(hf_name: str) -> str | None:
    """The encoder's name for a ``BertModel`` weight; None for what it does not use (pooler)."""
    module, param = hf_name.rsplit(".", 1)
    if layer := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module):
        return f"layers.{layer[1]}.{_LAYER_NAMES.get(layer[2], layer[2])}.{param}"
    name = _EMBEDDING_NAMES.get(module)
    return name and f"{name}.{param}"


def _fitted(weights: dict[str, torch.Tensor], encoder: BertEncoder,
            path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under the encoder's names; ModelFormatError unless each one fits."""
    ours = {name: t.float() for hf_name, t in weights.items()
            if (name := _our_name(hf_name)) is not None}
    want = {name: tuple(p.shape) for name, p in encoder.state_dict().items()}
    have = {name: tuple(t.shape) for name, t in ours.items()}
    if misfit := sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n)):
        raise ModelFormatError(
            f"{path} does not fit its config.json: {misfit[0]} is {have.get(misfit[0], 'missing')} "
            f"in the file but {want.get(misfit[0], 'unused')} in the model "
            f"({len(misfit)} tensors differ)")
    return ours


class Embedder:
    """Turns texts into unit vectors whose dot products are their cosine similarities."""

    def __init__(self, encoder: BertEncoder, tokenizer: Tokenizer, dim: int) -> None:
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.dim = dim

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_EMBEDDER) -> Embedder:
        """Load a sentence-transformers BERT model directory, by store name or path."""
        folder = store.resolve_model(name_or_path)
        missing = [name for name in _NEEDED if not (folder / name).is_file()]
        if missing:
            raise ModelFormatError(f"{folder} lacks {', '.join(missing)}; the embedder needs a "
                                   f"model directory such as: llmos models pull {DEFAULT_EMBEDDER}")
        _check_mean_pooling(folder)
        try:
            config = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
            weights = load_file(folder / "model.safetensors")
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except UnsupportedModel:
            raise
        except Exception as e:  # json, safetensors and tokenizers each raise their own
            raise ModelFormatError(f"cannot load the embedder from {folder}: {e}") from e
        encoder = BertEncoder(config)
        encoder.load_state_dict(_fitted(weights, encoder, folder / "model.safetensors"))
        tokenizer.enable_truncation(min(_max_seq_length(folder), config.max_positions))
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(encoder, tokenizer, config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """A float32 ``[len(texts), dim]`` array of unit vectors, one row per text.

        No texts give a ``[0, dim]`` array; an empty string embeds like any other (it is
        ``[CLS] [SEP]``). Texts are batched by length, so padding stays small.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidArgument(f"embed takes a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if type(text) is not str:
                raise InvalidArgument(f"embed takes a list of str; item {i} is a "
                                      f"{type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidArgument(f"item {i} is not valid Unicode: {e.reason} at "
                                      f"{e.start}") from None
        if type(batch_size) is not int or batch_size < 1:
            raise InvalidArgument(f"batch_size must be an int >= 1, got {batch_size!r}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._embed_batch([texts[i] for i in rows]).numpy()
        return out

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.float32)
        states = self.encoder(ids, mask)
        mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)


def _max_seq_length(folder: Path) -> int:
    """sentence-transformers' truncation length for this model (512 where it gives none)."""
    path = folder / "sentence_bert_config.json"
    return json.loads(path.read_text()).get("max_seq_length", 512) if path.is_file() else 512


def _check_mean_pooling(folder: Path) -> None:
    path = folder / "1_Pooling" / "config.json"
    if path.is_file() and not json.loads(path.read_text()).get("pooling_mode_mean_tokens"):
        raise UnsupportedModel(f"{path} asks for a pooling other than the mean of the tokens; "
                               "the embedder does mean pooling only")
