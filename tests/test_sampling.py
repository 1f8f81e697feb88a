"""The sampler: each stage keeps exactly the tokens it documents, seeds reproduce, stops cut.

Expected kept sets are computed here from their definitions, in float64 Python,
independently of the vectorized code under test.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import msgpack
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llmos_kernel.core.sampling import (
    TOP_P_CANDIDATES,
    SampleRow,
    SamplingParams,
    StopChecker,
    sample,
    sampling_logits,
)
from llmos_kernel.errors import InvalidArgument

MARGIN = 1e-5  # float32 vs float64: boundary cases closer than this are not judged


def logit_lists(min_vocab: int = 2, max_vocab: int = 40, ties: bool = False):
    """Rows of logits; with ties, small integers so that equal values are common."""
    value = st.integers(-4, 4).map(float) if ties else st.integers(-800, 800).map(lambda i: i / 64)
    return st.integers(min_vocab, max_vocab).flatmap(
        lambda v: st.lists(value, min_size=v, max_size=v)
    )


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def by_rank(values: list[float]) -> list[int]:
    """Token ids sorted best first, equal values by ascending id."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def softmax64(values: list[float]) -> list[float]:
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def warped(values: list[float], **params) -> torch.Tensor:
    row = SampleRow(SamplingParams(**params).validate(), output_ids=[])
    return sampling_logits(torch.tensor([values]), [row])[0]


# --- each stage keeps what it documents ---


@settings(max_examples=50, deadline=None)
@given(logit_lists(max_vocab=600, ties=True), st.data())
def test_top_k_keeps_exactly_the_k_largest_with_ties_to_lower_ids(values, data):
    k = data.draw(st.integers(1, len(values)))
    assert kept(warped(values, top_k=k)) == set(by_rank(values)[:k])


@settings(max_examples=50, deadline=None)
@given(logit_lists(max_vocab=700), st.floats(0.01, 0.99), st.integers(0, 40), st.data())
def test_top_p_keeps_the_smallest_prefix_reaching_p(values, p, k, data):
    scale = data.draw(st.sampled_from([1.0, 0.05]))  # 0.05: flat rows whose prefix is long
    values = [v * scale for v in values]
    order = by_rank(values)
    if k:
        order = order[:k]  # top_p renormalises over what top_k kept
    probs = softmax64([values[i] for i in order])
    mass, prefix = 0.0, []
    for i, prob in zip(order, probs, strict=True):
        assume(abs(mass - p) > MARGIN)
        if mass >= p:
            break
        prefix.append(i)
        mass += prob
    assert kept(warped(values, top_k=k, top_p=p)) == set(prefix)


def test_top_p_covers_rows_past_its_candidate_shortlist():
    vocab = 4 * TOP_P_CANDIDATES
    assert len(kept(warped([0.0] * vocab, top_p=0.3))) == math.ceil(0.3 * vocab)


@settings(deadline=None)
@given(logit_lists(), st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_with_at_least_min_p_times_the_top_probability(values, min_p):
    probs = softmax64(values)
    floor = min_p * max(probs)
    assume(all(abs(p - floor) > MARGIN * floor for p in probs if p != max(probs)))
    assert kept(warped(values, min_p=min_p)) == {i for i, p in enumerate(probs) if p >= floor}


@settings(deadline=None)
@given(logit_lists(), st.floats(0.05, 5.0))
def test_temperature_divides_the_logits(values, temperature):
    torch.testing.assert_close(
        warped(values, temperature=temperature), torch.tensor(values) / temperature
    )


@settings(deadline=None)
@given(
    logit_lists(),
    st.lists(st.integers(0, 39), max_size=12),
    st.lists(st.integers(0, 39), max_size=12),
    st.floats(0.5, 2.0),
    st.floats(-2.0, 2.0),
    st.floats(-2.0, 2.0),
)
def test_penalties_touch_only_seen_tokens_in_the_documented_direction(
    values, prompt, output, repetition, frequency, presence
):
    vocab = len(values)
    prompt = [t % vocab for t in prompt]
    output = [t % vocab for t in output]
    params = SamplingParams(temperature=0.0, repetition_penalty=repetition,
                            frequency_penalty=frequency, presence_penalty=presence)
    got = sampling_logits(torch.tensor([values]), [SampleRow(params, output, prompt)])[0]
    counts = Counter(output)
    expected = []
    for token, x in enumerate(values):
        if token in prompt or token in counts:
            x = x / repetition if x > 0 else x * repetition
        if token in counts:
            x -= frequency * counts[token] + presence
        expected.append(x)
    torch.testing.assert_close(got, torch.tensor(expected))
    unseen = [t for t in range(vocab) if t not in prompt and t not in counts]
    assert got[unseen].tolist() == [values[t] for t in unseen]
    if repetition > 1 and frequency >= 0 and presence >= 0:
        assert all(got[t] <= values[t] for t in range(vocab))


# --- the chosen token ---


@st.composite
def batches(draw, vocab: int = 24):
    """A batch of rows with assorted params, masks and histories."""
    n = draw(st.integers(1, 6))
    logits = torch.tensor(draw(st.lists(
        st.lists(st.integers(-400, 400).map(lambda i: i / 50), min_size=vocab, max_size=vocab),
        min_size=n, max_size=n,
    )))
    rows = []
    for _ in range(n):
        params = SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            top_k=draw(st.integers(0, vocab)),
            top_p=draw(st.sampled_from([1.0, 0.9, 0.5, 0.1])),
            min_p=draw(st.sampled_from([0.0, 0.05, 0.5])),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
            presence_penalty=draw(st.sampled_from([0.0, 1.0])),
            seed=draw(st.none() | st.integers(0, 2**32)),
            logprobs=True,
            top_logprobs=draw(st.integers(0, 5)),
        ).validate()
        mask = None
        if draw(st.booleans()):
            allowed = draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab))
            assume(any(allowed))
            mask = torch.tensor(allowed)
        output = draw(st.lists(st.integers(0, vocab - 1), max_size=6))
        rows.append(SampleRow(params, output, prompt_ids=[1, 2], allowed_mask=mask))
    return logits, rows


@settings(max_examples=50, deadline=None)
@given(batches())
def test_the_token_lies_in_the_kept_set_and_the_mask_is_never_violated(batch):
    logits, rows = batch
    final = sampling_logits(logits, rows)
    result = sample(logits, rows)
    for row, token, scores in zip(rows, result.tokens, final, strict=True):
        assert token in kept(scores)
        if row.allowed_mask is not None:
            assert bool(row.allowed_mask[token])
        if row.params.greedy:
            assert token == int(scores.argmax())


@settings(max_examples=50, deadline=None)
@given(batches())
def test_logprobs_are_the_raw_log_softmax_at_the_token(batch):
    logits, rows = batch
    result = sample(logits, rows)
    raw = logits.double().log_softmax(dim=-1)
    for i, row in enumerate(rows):
        assert result.logprobs[i] == pytest.approx(float(raw[i, result.tokens[i]]), abs=1e-5)
        best = sorted(range(raw.shape[1]), key=lambda t: -float(raw[i, t]))
        expected = [float(raw[i, t]) for t in best[:row.params.top_logprobs]]
        got = result.top_logprobs[i]
        assert [lp for _, lp in got] == pytest.approx(expected, abs=1e-5)
        assert all(float(raw[i, t]) == pytest.approx(lp, abs=1e-5) for t, lp in got)


@settings(deadline=None)
@given(st.lists(logit_lists(min_vocab=30, max_vocab=30), min_size=1, max_size=8))
def test_greedy_is_argmax(rows_of_values):
    logits = torch.tensor(rows_of_values)
    rows = [SampleRow(SamplingParams(temperature=0.0), [5]) for _ in rows_of_values]
    result = sample(logits, rows)
    assert result.tokens == logits.argmax(dim=-1).tolist()
    assert result.logprobs is None and result.top_logprobs is None


@settings(max_examples=50, deadline=None)
@given(batches(), st.data())
def test_a_seed_gives_the_same_token_whatever_else_is_in_the_batch(batch, data):
    logits, others = batch
    params = SamplingParams(seed=data.draw(st.integers(0, 2**63)), top_p=0.9, min_p=0.01)
    history = data.draw(st.lists(st.integers(0, 23), max_size=5))
    mine = torch.linspace(-3, 3, 24)[torch.randperm(24, generator=torch.Generator().manual_seed(7))]
    alone = sample(mine[None, :], [SampleRow(params, history)]).tokens[0]
    at = data.draw(st.integers(0, len(others)))
    recomputed = [t ^ 1 for t in history]  # same length, other tokens: a recompute after preemption
    rows = [*others[:at], SampleRow(params, recomputed), *others[at:]]
    batch_logits = torch.cat([logits[:at], mine[None, :], logits[at:]])
    assert sample(batch_logits, rows).tokens[at] == alone


def test_seeded_and_unseeded_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :].expand(4000, 4).contiguous()
    seeded = [SampleRow(SamplingParams(seed=seed), []) for seed in range(4000)]
    torch.manual_seed(0)
    unseeded = [SampleRow(SamplingParams(), []) for _ in range(4000)]
    for rows in (seeded, unseeded):
        counts = Counter(sample(logits, rows).tokens)
        freq = torch.tensor([counts[t] / 4000 for t in range(4)])
        torch.testing.assert_close(freq, probs, atol=0.025, rtol=0)


def test_a_seed_draws_afresh_at_each_step():
    logits = torch.zeros(1, 1000)
    params = SamplingParams(seed=3)
    tokens = {sample(logits, [SampleRow(params, [0] * n)]).tokens[0] for n in range(20)}
    assert len(tokens) > 15


def test_no_repeat_ngram_bans_the_token_that_would_repeat():
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0]])
    params = SamplingParams(temperature=0.0, no_repeat_ngram_size=2)
    assert sample(logits, [SampleRow(params, [1, 2, 1])]).tokens == [1]
    assert sample(logits, [SampleRow(params, [1, 3, 1])]).tokens == [2]


def test_a_row_with_nothing_left_to_sample_is_an_error():
    empty = SampleRow(SamplingParams(), [], allowed_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(InvalidArgument, match="row 0"):
        sample(torch.zeros(1, 4), [empty])
    wrong = SampleRow(SamplingParams(), [], allowed_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(InvalidArgument, match="allowed_mask"):
        sample(torch.zeros(1, 4), [wrong])
    with pytest.raises(InvalidArgument, match="one row per SampleRow"):
        sample(torch.zeros(2, 4), [SampleRow(SamplingParams(), [])])


# --- SamplingParams ---


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True),
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
        ("temperature", "1"), ("top_k", -1), ("top_k", False), ("top_p", 0.0), ("top_p", 1.01),
        ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf), ("frequency_penalty", 2.5), ("presence_penalty", -3.0),
        ("seed", 1.0), ("seed", True), ("seed", 2**64), ("stop", [""]), ("stop", [3]),
        ("stop", 7), ("stop_token_ids", [-1]), ("stop_token_ids", [True]),
        ("stop_token_ids", 5), ("ignore_eos", 1), ("logprobs", "yes"), ("top_logprobs", 21),
        ("num_beams", 0), ("length_penalty", math.nan), ("no_repeat_ngram_size", -1),
    ],
)
def test_validate_rejects_each_bad_field(field, bad):
    params = SamplingParams(**{field: bad, **({"logprobs": True} if field == "top_logprobs" else {})})
    with pytest.raises(InvalidArgument, match=field):
        params.validate()


def test_validate_rejects_inconsistent_combinations():
    with pytest.raises(InvalidArgument, match="top_logprobs needs logprobs"):
        SamplingParams(top_logprobs=3).validate()
    with pytest.raises(InvalidArgument, match="temperature"):
        SamplingParams(num_beams=4).validate()
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(num_beams=4, temperature=0, top_p=0.9).validate()
    with pytest.raises(InvalidArgument, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(100,)).validate(vocab_size=100)


def test_validate_normalises_lists_and_strings():
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3], temperature=1).validate(10)
    assert params.stop == ("a", "b") and params.stop_token_ids == (3,)
    assert type(params.temperature) is float
    assert SamplingParams(stop="x").validate().stop == ("x",)
    assert SamplingParams(num_beams=3, temperature=0).validate().num_beams == 3


valid_params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 4096),
    temperature=st.floats(0, 2),
    top_k=st.integers(0, 100),
    top_p=st.floats(0.01, 1),
    min_p=st.floats(0, 1),
    repetition_penalty=st.floats(0.1, 2),
    frequency_penalty=st.floats(-2, 2),
    presence_penalty=st.floats(-2, 2),
    seed=st.none() | st.integers(0, 2**63),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 1000), max_size=3).map(tuple),
    ignore_eos=st.booleans(),
    logprobs=st.just(True),
    top_logprobs=st.integers(0, 20),
    length_penalty=st.floats(-2, 2),
    no_repeat_ngram_size=st.integers(0, 4),
)


@settings(deadline=None)
@given(valid_params)
def test_to_dict_from_dict_round_trips_through_msgpack(params):
    params = params.validate()
    wire = msgpack.unpackb(msgpack.packb(params.to_dict()))
    assert SamplingParams.from_dict(wire) == params


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(InvalidArgument, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


# --- stop strings ---


def cut_at_first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: scan end positions; the first stop string to complete wins, longest first."""
    for end in range(len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[:end - len(stop)], True
    return text, False


def stream(text: str, cuts: list[int], stops: list[str]) -> tuple[str, bool]:
    checker = StopChecker(stops)
    bounds = [0, *sorted(cuts), len(text)]
    emitted = []
    for start, end in itertools.pairwise(bounds):
        out, stopped = checker.push(text[start:end])
        emitted.append(out)
        if stopped:
            return "".join(emitted) + checker.flush(), True
    return "".join(emitted) + checker.flush(), False


small_text = st.text(alphabet="abc", max_size=14)


@settings(deadline=None)
@given(small_text, st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1,
                            max_size=3), st.data())
def test_stop_strings_cut_the_same_way_however_the_text_is_split(text, stops, data):
    expected = cut_at_first_stop(text, stops)
    for cut in range(len(text) + 1):
        assert stream(text, [cut], stops) == expected
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert stream(text, cuts, stops) == expected
    assert stream(text, list(range(len(text))), stops) == expected


@settings(deadline=None)
@given(small_text, st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3))
def test_held_back_text_is_only_a_possible_stop_start(text, stops):
    checker = StopChecker(stops)
    emitted = ""
    for i, char in enumerate(text):
        out, stopped = checker.push(char)
        emitted += out
        if stopped:
            return
        held = text[len(emitted):i + 1]
        assert text[:i + 1].startswith(emitted)
        assert held == "" or any(s.startswith(held) for s in stops)


def test_overlapping_stop_strings():
    checker = StopChecker(["abcdef", "cd"])
    assert [checker.push(d) for d in ("xab", "c", "de")] == [("x", False), ("", False),
                                                             ("ab", True)]
    assert StopChecker(["cde", "bcd"]).push("abcde") == ("a", True)
    assert StopChecker(["bc", "abc"]).push("abc") == ("", True)


def test_without_stop_strings_everything_is_emitted_at_once():
    checker = StopChecker([])
    assert checker.push("hello ") == ("hello ", False)
    assert checker.push("world") == ("world", False)
    assert checker.flush() == ""


def test_flush_releases_held_back_text():
    checker = StopChecker(["</end>"])
    assert checker.push("done </e") == ("done ", False)
    assert checker.flush() == "</e"
    assert checker.push("x") == ("x", False)
