"""Turn a step's logits into tokens: sampling parameters, the batched sampler, stop strings.

Each row of a batch goes through the same stages, in this order:

1. ``allowed_mask`` (a grammar's verdict) and ``no_repeat_ngram_size`` set
   forbidden tokens to -inf;
2. penalties: ``repetition_penalty`` over prompt + output tokens (CTRL / Hugging
   Face style: positive logits are divided by it, negative ones multiplied),
   then ``frequency_penalty`` x count and ``presence_penalty`` over output
   tokens (OpenAI style, subtracted);
3. greedy rows (``temperature`` 0) take the argmax here;
4. ``temperature`` divides the logits;
5. ``top_k`` keeps the k largest (ties go to the lower token id);
6. ``top_p`` keeps the smallest prefix of the sorted, renormalised distribution
   whose mass reaches p (at least one token);
7. ``min_p`` keeps tokens whose probability is at least min_p x the largest;
8. one token is drawn by inverting the cumulative distribution at a uniform u.
   A row with a seed takes u from (seed, number of tokens generated so far),
   so it gives the same token whatever else is in the batch, and again after a
   preempted sequence is recomputed; other rows use torch's global RNG.

Work is batched across rows: a batch of greedy rows costs one argmax; rows
that ask for top-k or top-p sort only their few hundred best candidates unless
their kept prefix is longer; the draw of a truncated row runs over what it kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from llmos_kernel.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20
# Temperatures below this are greedy: dividing fp32 logits by them overflows.
GREEDY_TEMPERATURE = 1e-5
# top-p looks for its prefix among this many most likely tokens before sorting a whole row.
TOP_P_CANDIDATES = 256
# Beam search is deterministic: these must keep their neutral values when num_beams > 1.
_NEUTRAL_FOR_BEAMS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                      "repetition_penalty": 1.0, "frequency_penalty": 0.0,
                      "presence_penalty": 0.0}
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens, and when it stops."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @property
    def greedy(self) -> bool:
        """Temperature 0 (anything below GREEDY_TEMPERATURE): take the argmax."""
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Check every field; return a copy with lists normalised to tuples and numbers typed."""
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, list | tuple):
            raise InvalidArgument(f"stop_token_ids must be a list of ints, got {ids!r}")
        id_limit = vocab_size if vocab_size is not None else 1 << 63
        ids = tuple(_int(f"stop_token_ids[{i}]", t, 0, id_limit - 1) for i, t in enumerate(ids))
        seed = self.seed if self.seed is None else _int("seed", self.seed, -(1 << 63), _MASK64)
        p = replace(
            self,
            max_tokens=_int("max_tokens", self.max_tokens, 1),
            temperature=_float("temperature", self.temperature, 0.0),
            top_k=_int("top_k", self.top_k, 0),
            top_p=_float("top_p", self.top_p, 0.0, 1.0, low_open=True),
            min_p=_float("min_p", self.min_p, 0.0, 1.0),
            repetition_penalty=_float("repetition_penalty", self.repetition_penalty, 0.0,
                                      low_open=True),
            frequency_penalty=_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
            presence_penalty=_float("presence_penalty", self.presence_penalty, -2.0, 2.0),
            seed=seed,
            stop=tuple(stop),
            stop_token_ids=ids,
            ignore_eos=_bool("ignore_eos", self.ignore_eos),
            logprobs=_bool("logprobs", self.logprobs),
            top_logprobs=_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS),
            num_beams=_int("num_beams", self.num_beams, 1),
            length_penalty=_float("length_penalty", self.length_penalty),
            no_repeat_ngram_size=_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0),
        )
        if p.top_logprobs and not p.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs=True")
        if p.num_beams > 1:
            changed = [k for k, neutral in _NEUTRAL_FOR_BEAMS.items() if getattr(p, k) != neutral]
            if changed:
                raise InvalidArgument(
                    f"num_beams > 1 is deterministic beam search; it cannot be combined with "
                    f"{', '.join(changed)} (set temperature=0 and leave the others at their "
                    f"defaults)"
                )
        return p

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples become lists), ready for msgpack or JSON."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build and validate from a dict; unknown keys are an error, missing keys take defaults."""
        if not isinstance(d, dict):
            raise InvalidArgument(f"sampling params must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise InvalidArgument(
                f"unknown sampling params {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**d).validate()


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
        high is not None and value > high
    ):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be an int {allowed}, got {value!r}")
    return int(value)


def _float(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > low if low_open else value >= low) and value <= high):
        bounds = [f"{'>' if low_open else '>='} {low}"] if low > -math.inf else []
        bounds += [f"<= {high}"] if high < math.inf else []
        allowed = " ".join(["a finite number", " and ".join(bounds)]).strip()
        raise InvalidArgument(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r}")
    return value


@dataclass
class SampleRow:
    """What the engine knows about one row of the batch."""

    params: SamplingParams
    output_ids: Sequence[int]
    prompt_ids: Sequence[int] = ()
    allowed_mask: torch.Tensor | None = None  # bool [V]: False => the token gets -inf


@dataclass
class SampleResult:
    """The chosen token of each row, and logprobs for the rows that asked.

    ``logprobs[i]`` is log_softmax of row i's raw logits at its token (None for a
    row that did not ask); ``top_logprobs[i]`` its best alternatives as
    (token, logprob), best first. Both are None when no row asked.
    """

    tokens: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum, as ``argmax(dim=-1)``: torch's max reduction does the same
    work faster on CPU."""
    return scores.max(dim=-1).indices


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> SampleResult:
    """Choose one token per row of fp32 ``logits [B, V]``, following each row's params."""
    scores = _constrained(logits, rows)
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not drawn:
        tokens = _argmax(scores)
    else:
        tokens = torch.empty(len(rows), dtype=torch.long)
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if greedy:
            tokens[greedy] = _argmax(scores[greedy])
        for short in _shortlists(scores, rows, drawn):
            column = _draw(short.values, [rows[i] for i in short.rows])
            tokens[short.rows] = column if short.ids is None else short.ids.gather(
                1, column[:, None]).squeeze(1)
    return _with_logprobs(logits, rows, tokens)


def sampling_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """The logits each row's token is finally chosen from (stages 1-7; greedy rows 1-2).

    Removed tokens are -inf; ``sample`` takes the argmax of greedy rows and draws
    the others from the softmax of these.
    """
    scores = _constrained(logits, rows).clone()
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    for short in _shortlists(scores, rows, drawn):
        if short.ids is None:
            scores[short.rows] = short.values
        else:
            scores[short.rows] = torch.full_like(scores[short.rows], -math.inf).scatter_(
                1, short.ids, short.values)
    return scores


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``tokens`` (no_repeat_ngram_size)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    tokens = list(tokens)
    if n == 1:
        return sorted(set(tokens))
    prefix = tokens[len(tokens) - n + 1:]
    banned = []
    start = 0
    last_start = len(tokens) - n
    while True:
        try:
            start = tokens.index(prefix[0], start, last_start + 1)
        except ValueError:
            return banned
        if tokens[start:start + n - 1] == prefix:
            banned.append(tokens[start + n - 1])
        start += 1


def _check_batch(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    if logits.dim() != 2 or not logits.is_floating_point() or logits.shape[0] != len(rows):
        raise InvalidArgument(
            f"logits must be a float tensor [rows, vocab] with one row per SampleRow; got "
            f"{logits.dtype} {tuple(logits.shape)} for {len(rows)} rows"
        )


def _constrained(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Stages 1-2: masks, n-gram bans and penalties; returns ``logits`` itself if none apply."""
    _check_batch(logits, rows)
    vocab = logits.shape[1]
    masked = [i for i, row in enumerate(rows) if row.allowed_mask is not None]
    bans = {
        i: banned_ngram_tokens([*row.prompt_ids, *row.output_ids], row.params.no_repeat_ngram_size)
        for i, row in enumerate(rows)
        if row.params.no_repeat_ngram_size
    }
    bans = {i: tokens for i, tokens in bans.items() if tokens}
    repeat = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    counted = [
        i for i, row in enumerate(rows)
        if (row.params.frequency_penalty or row.params.presence_penalty) and row.output_ids
    ]
    if not (masked or bans or repeat or counted):
        return logits
    scores = logits.clone()
    if masked:
        allowed = torch.stack([_mask_of(rows[i], i, vocab) for i in masked])
        _check_some_left(masked, allowed, "allowed_mask leaves")
        if len(masked) == len(rows):
            scores.masked_fill_(~allowed, -math.inf)
        else:
            scores[masked] = scores[masked].masked_fill(~allowed, -math.inf)
    if bans:
        ban_rows = [i for i, tokens in bans.items() for _ in tokens]
        ban_tokens = [t for tokens in bans.values() for t in tokens]
        scores[ban_rows, ban_tokens] = -math.inf
        at_risk = [i for i, tokens in bans.items()
                   if rows[i].allowed_mask is not None or len(set(tokens)) >= vocab]
        if at_risk:
            _check_some_left(at_risk, ~torch.isneginf(scores[at_risk]),
                             "allowed_mask and no_repeat_ngram_size leave")
    if repeat:
        owner, toks, _ = _token_counts(
            [[*rows[i].prompt_ids, *rows[i].output_ids] for i in repeat], repeat, vocab
        )
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in repeat])[owner]
        owner = torch.tensor(repeat)[owner]
        values = scores[owner, toks]
        scores[owner, toks] = torch.where(values > 0, values / penalty, values * penalty)
    if counted:
        owner, toks, counts = _token_counts([rows[i].output_ids for i in counted], counted, vocab)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in counted])[owner]
        presence = torch.tensor([rows[i].params.presence_penalty for i in counted])[owner]
        owner = torch.tensor(counted)[owner]
        scores[owner, toks] -= freq * counts + presence
    return scores


def _check_some_left(row_ids: list[int], allowed: torch.Tensor, what: str) -> None:
    empty = ~allowed.any(dim=-1)
    if empty.any():
        row = row_ids[int(empty.nonzero()[0])]
        raise InvalidArgument(f"row {row}: {what} no token to sample")


def _mask_of(row: SampleRow, index: int, vocab: int) -> torch.Tensor:
    mask = row.allowed_mask
    if mask.dtype != torch.bool or tuple(mask.shape) != (vocab,):
        raise InvalidArgument(
            f"row {index}: allowed_mask must be a bool tensor [{vocab}], "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask


def _token_counts(
    token_lists: list[Sequence[int]], row_ids: list[int], vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (position in token_lists, token) pairs and how often each occurs."""
    parts = [torch.as_tensor(list(tokens), dtype=torch.long) for tokens in token_lists]
    ids = torch.cat(parts)
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise InvalidArgument(f"rows {row_ids}: token ids must lie in [0, {vocab})")
    owner = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([len(p) for p in parts]))
    pairs, counts = torch.unique(owner * vocab + ids, return_counts=True)
    return pairs // vocab, pairs % vocab, counts.to(torch.float32)


@dataclass
class _Shortlist:
    """Rows that draw, with their final logits over some columns (-inf: removed)."""

    rows: list[int]  # positions in the batch
    values: torch.Tensor  # [len(rows), width]
    ids: torch.Tensor | None  # token id of each column; None when column j is token j


def _shortlists(
    scores: torch.Tensor, rows: Sequence[SampleRow], drawn: list[int]
) -> list[_Shortlist]:
    """Stages 4-7 for the rows that draw: temperature, top-k, top-p, min-p.

    Rows cut by top-k or top-p keep only their sorted leading candidates, so
    temperature, min-p and the draw run over those instead of the vocabulary.
    """
    vocab = scores.shape[1]
    cut = [i for i in drawn if 0 < rows[i].params.top_k < vocab or rows[i].params.top_p < 1.0]
    cut_set = set(cut)
    uncut = [i for i in drawn if i not in cut_set]
    shorts = []
    if uncut:
        x = scores if len(uncut) == len(rows) else scores[uncut]
        shorts.append(_Shortlist(uncut, x / _temperatures(rows, uncut)[:, None], None))
    if cut:
        x = scores if len(cut) == len(rows) else scores[cut]
        params = [rows[i].params for i in cut]
        for part, values, ids in _truncated(x, _temperatures(rows, cut), params):
            shorts.append(_Shortlist([cut[j] for j in part], values, ids))
    for short in shorts:
        floored = [j for j, i in enumerate(short.rows) if rows[i].params.min_p > 0.0]
        if floored:
            min_p = torch.tensor([rows[short.rows[j]].params.min_p for j in floored])
            short.values[floored] = _min_p(short.values[floored], min_p)
    return shorts


def _temperatures(rows: Sequence[SampleRow], chosen: list[int]) -> torch.Tensor:
    return torch.tensor([rows[i].params.temperature for i in chosen])


def _truncated(
    x: torch.Tensor, temperature: torch.Tensor, params: Sequence[SamplingParams]
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Top-k then top-p: per group of rows, (row positions, kept logits sorted, their token ids).

    Candidates are the row's largest logits (ties ordered by token id); a row
    whose kept prefix may run past them is sorted in full instead.
    """
    vocab = x.shape[1]
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params])
    width = max([p.top_k + 1 for p in params if 0 < p.top_k < vocab]
                + [TOP_P_CANDIDATES for p in params if p.top_p < 1.0])
    values, ids = _sorted(x, min(width, vocab))
    kept, kept_ids, count = _prefix(x, temperature, values, ids, k, top_p)
    covered = (values.gather(1, count[:, None] - 1) > values[:, -1:]).squeeze(1)
    if width >= vocab or covered.all():
        return [(list(range(len(params))), kept, kept_ids)]
    done, rest = covered.nonzero().squeeze(1), (~covered).nonzero().squeeze(1)
    x, temperature = x[rest], temperature[rest]
    groups = [(rest.tolist(),
               *_prefix(x, temperature, *_sorted(x, vocab), k[rest], top_p[rest])[:2])]
    if len(done):
        groups.append((done.tolist(), kept[done], kept_ids[done]))
    return groups


def _sorted(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``width`` largest logits, descending, equal ones by ascending token id."""
    if width >= x.shape[1]:
        return x.sort(dim=-1, descending=True, stable=True)
    values, ids = x.topk(width, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    values, by_value = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, by_value)


def _prefix(
    x: torch.Tensor,
    temperature: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    k: torch.Tensor,
    top_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first k sorted candidates, then the shortest prefix of them with mass >= p.

    Returns the kept logits divided by temperature and their ids (both trimmed to
    the longest row), and each row's kept count.
    """
    values = values / temperature[:, None]
    removed = torch.arange(values.shape[1])[None, :] >= k[:, None]
    topped = ~top_p.isinf()
    if topped.any():
        kept = values.masked_fill(removed, -math.inf)
        log_z = kept.logsumexp(dim=-1)
        whole = (topped & (k >= x.shape[1])).nonzero().squeeze(1)
        if len(whole) and values.shape[1] < x.shape[1]:
            whole_x = x if len(whole) == len(x) else x[whole]
            log_z[whole] = _logsumexp(whole_x / temperature[whole, None])
        probs = (kept - log_z[:, None]).exp()
        removed |= probs.cumsum(dim=-1) - probs >= top_p[:, None]
    removed |= values.isneginf()
    count = (~removed).sum(dim=-1)
    width = int(count.max())
    return values[:, :width].masked_fill(removed[:, :width], -math.inf), ids[:, :width], count


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp via the fused log_softmax, faster than torch's logsumexp on CPU."""
    return x.amax(dim=-1) - x.log_softmax(dim=-1).amax(dim=-1)


def _min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the row's largest."""
    floor = x.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    return x.masked_fill(x < floor, -math.inf)


def _draw(x: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """One column per row from softmax(x), by inverting the cumulative distribution."""
    cdf = x.softmax(dim=-1).cumsum_(dim=-1)
    u = 1.0 - torch.rand(len(rows))  # (0, 1]: the first cdf entry >= u * total has p > 0
    for i, row in enumerate(rows):
        if row.params.seed is not None:
            bits = _mix_seed(row.params.seed, len(row.output_ids)) >> 40
            u[i] = (bits + 1) / (1 << 24)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)


def _mix_seed(seed: int, step: int) -> int:
    """The step-th output of SplitMix64 seeded with ``seed``: independent streams per step."""
    z = ((seed & _MASK64) + (step + 1) * _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _with_logprobs(
    logits: torch.Tensor, rows: Sequence[SampleRow], tokens: torch.Tensor
) -> SampleResult:
    token_list = tokens.tolist()
    asked = [i for i, row in enumerate(rows) if row.params.logprobs]
    if not asked:
        return SampleResult(token_list)
    raw = (logits if len(asked) == len(rows) else logits[asked]).log_softmax(dim=-1)
    chosen = raw.gather(1, tokens[asked, None]).squeeze(1).tolist()
    logprobs: list[float | None] = [None] * len(rows)
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    k = min(max(rows[i].params.top_logprobs for i in asked), raw.shape[1])
    if k:
        best_values, best_ids = (part.tolist() for part in raw.topk(k, dim=-1))
    for j, i in enumerate(asked):
        logprobs[i] = chosen[j]
        n = rows[i].params.top_logprobs
        if n:
            top[i] = list(zip(best_ids[j][:n], best_values[j][:n], strict=True))
    return SampleResult(token_list, logprobs, top)


class StopChecker:
    """Cut streamed text before the first stop string, holding back what may start one.

    The first stop string to complete wins (the longest one if several complete
    at the same character), so the result does not depend on how the text was
    split into deltas.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument(f"stop strings must be non-empty strings, got {stop!r}")
        self._stop = stop
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        cut = self._first_match(text)
        if cut is not None:
            self._held = ""
            self.stopped = True
            return text[:cut], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation: the held-back text (empty after a stop)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> int | None:
        found = []
        for s in self._stop:
            at = text.find(s)
            if at >= 0:
                found.append((at + len(s), at))
        return min(found)[1] if found else None

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
