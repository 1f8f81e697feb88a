"""Beam search: finds what brute force finds on toy models, and what transformers finds on a Llama.

The toy models are transition tables: the next-token distribution depends only
on the last token. References are computed at test time, by enumerating every
sequence or by running ``transformers``' own ``generate(num_beams=...)``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel.core.beam import BeamSearch
from llmos_kernel.errors import InvalidArgument

EOS = 0


def run(search: BeamSearch, next_logprobs) -> tuple[list[int], float]:
    """Drive a search the way the engine does; ``next_logprobs(beams)`` plays the model."""
    beams: list[list[int]] = [[]]
    while not search.done:
        chosen = search.step(beams, next_logprobs(beams))
        assert len(chosen) <= search.num_beams
        beams = [[*beams[parent], token] for parent, token in chosen]
    return search.best()


def table_model(table: torch.Tensor, start: int):
    """Next-token log-probs as a function of the last token (``start`` before any)."""
    return lambda beams: torch.stack([table[beam[-1] if beam else start] for beam in beams])


def brute_force(table: torch.Tensor, start: int, max_tokens: int, length_penalty: float):
    """Score of every complete sequence: ended by EOS, or cut at max_tokens."""
    scores = {}
    vocab = table.shape[1]
    for length in range(1, max_tokens + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if EOS in seq[:-1] or (seq[-1] != EOS and length < max_tokens):
                continue
            logprob, last = 0.0, start
            for token in seq:
                logprob += float(table[last, token])
                last = token
            scores[seq] = logprob / length**length_penalty
    return scores


def test_two_or_three_beams_find_the_sequence_greedy_misses():
    # tokens: 0 = EOS, 1..3 = words, 4 = start (never generated)
    probs = torch.tensor([
        [1.00, 0.00, 0.00, 0.00, 0.0],
        [0.25, 0.15, 0.32, 0.28, 0.0],
        [0.90, 0.04, 0.03, 0.03, 0.0],
        [0.60, 0.20, 0.10, 0.10, 0.0],
        [0.00, 0.50, 0.40, 0.10, 0.0],
    ])
    table = probs.log()
    scores = brute_force(table, start=4, max_tokens=4, length_penalty=1.0)
    best = max(scores, key=scores.get)

    greedy, last = [], 4
    while not greedy or (greedy[-1] != EOS and len(greedy) < 4):
        last = int(table[last].argmax())
        greedy.append(last)
    assert tuple(greedy) != best

    for num_beams in (2, 3):
        search = BeamSearch(num_beams, {EOS}, max_tokens=4, length_penalty=1.0)
        tokens, score = run(search, table_model(table, start=4))
        assert tuple(tokens) == best
        assert score == pytest.approx(scores[best])


def test_eos_ranked_below_the_top_num_beams_is_dropped_even_if_it_would_win():
    # Hugging Face's rule: the extra candidates only keep enough beams alive.
    probs = torch.tensor([
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.5, 0.3, 0.2, 0.0],
        [0.0, 0.5, 0.3, 0.2, 0.0],
        [0.0, 0.5, 0.3, 0.2, 0.0],
        [0.2, 0.5, 0.3, 0.0, 0.0],  # start: EOS is third, after two words
    ])
    table = probs.log()
    scores = brute_force(table, start=4, max_tokens=3, length_penalty=0.0)
    assert max(scores, key=scores.get) == (EOS,)
    tokens, score = run(BeamSearch(2, {EOS}, max_tokens=3, length_penalty=0.0),
                        table_model(table, start=4))
    assert tokens == [1, 1, 1]
    assert score == pytest.approx(3 * math.log(0.5))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.data())
def test_a_beam_as_wide_as_the_tree_is_exhaustive(vocab, max_tokens, data):
    # With length_penalty 0 scores only fall as beams grow, so the stopping rule is exact.
    logits = data.draw(st.lists(st.floats(-4, 4), min_size=(vocab + 1) * vocab,
                                max_size=(vocab + 1) * vocab))
    table = torch.tensor(logits).view(vocab + 1, vocab).log_softmax(dim=-1)
    table = torch.cat([table, torch.full((vocab + 1, 1), -math.inf)], dim=1)
    scores = brute_force(table, start=vocab, max_tokens=max_tokens, length_penalty=0.0)
    search = BeamSearch(vocab**max_tokens, {EOS}, max_tokens, length_penalty=0.0)
    tokens, score = run(search, table_model(table, start=vocab))
    assert score == pytest.approx(max(scores.values()), abs=1e-5)
    assert scores[tuple(tokens)] == pytest.approx(score, abs=1e-5)
    finished = search.finished()
    assert [s for _, s in finished] == sorted((s for _, s in finished), reverse=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.sets(st.integers(0, 5), min_size=1, max_size=2),
       st.sampled_from([0.5, 1.0, 2.0]), st.data())
def test_each_beams_best_candidates_are_all_a_step_needs(num_beams, eos, length_penalty, data):
    logits = data.draw(st.lists(st.integers(-64, 64), min_size=36, max_size=36, unique=True))
    table = (torch.tensor(logits) / 16).view(6, 6).log_softmax(dim=-1)  # no ties
    dense = BeamSearch(num_beams, eos, max_tokens=5, length_penalty=length_penalty)
    sparse = BeamSearch(num_beams, eos, max_tokens=5, length_penalty=length_penalty)

    def best_only(beams):
        full = table_model(table, start=5)(beams)
        top = full.topk(min(sparse.candidates, full.shape[1]), dim=-1)
        return torch.full_like(full, -math.inf).scatter_(1, top.indices, top.values)

    assert run(sparse, best_only) == run(dense, table_model(table, start=5))


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked distributions: beams end with EOS, or not
    return model


@pytest.mark.parametrize("no_repeat_ngram_size", [0, 2])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_same_best_sequence_as_transformers(
    tiny_llama, num_beams, length_penalty, no_repeat_ngram_size
):
    prompt, max_tokens = [3, 5, 7, 9], 8
    with torch.no_grad():
        reference = tiny_llama.generate(
            torch.tensor([prompt]), num_beams=num_beams, do_sample=False, early_stopping=False,
            max_new_tokens=max_tokens, length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=1, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )

    def next_logprobs(beams):
        with torch.no_grad():
            logits = tiny_llama(torch.tensor([prompt + beam for beam in beams])).logits
        return logits[:, -1].float().log_softmax(dim=-1)

    search = BeamSearch(num_beams, {1}, max_tokens, length_penalty, no_repeat_ngram_size, prompt)
    tokens, score = run(search, next_logprobs)
    assert tokens == reference.sequences[0, len(prompt):].tolist()
    assert score == pytest.approx(float(reference.sequences_scores[0]), abs=1e-4)


def test_no_repeat_ngram_size_bans_repeats_across_prompt_and_beam():
    table = torch.full((3, 3), math.log(0.05))
    table[:, 2] = math.log(0.9)  # the model loves token 2
    search = BeamSearch(2, {EOS}, max_tokens=3, no_repeat_ngram_size=2, prompt_ids=[2, 2])
    run(search, table_model(table, start=2))
    for tokens, _ in search.finished():
        seq = [2, 2, *tokens]
        bigrams = list(itertools.pairwise(seq))
        assert len(bigrams) == len(set(bigrams))


def test_step_checks_its_inputs():
    search = BeamSearch(2, {EOS}, max_tokens=1)
    with pytest.raises(InvalidArgument, match="live beams"):
        search.step([[5]], torch.zeros(1, 4).log_softmax(dim=-1))
    with pytest.raises(InvalidArgument, match="logprobs"):
        search.step([[]], torch.zeros(2, 4))
    assert search.step([[]], torch.zeros(1, 4).log_softmax(dim=-1)) == []
    assert search.done and len(search.finished()) == 2
    with pytest.raises(InvalidArgument, match="done"):
        search.step([], torch.zeros(0, 4))
    with pytest.raises(InvalidArgument, match="num_beams"):
        BeamSearch(0, {EOS}, max_tokens=4)
