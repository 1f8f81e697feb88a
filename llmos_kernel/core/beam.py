"""Beam search as an algorithm: which beams live on, which hypotheses are finished.

The engine owns the sequences and their KV blocks and runs the model; each step
it hands ``BeamSearch.step`` the live beams' next-token log-probabilities and
gets back (parent beam, token) pairs, forking a parent's KV copy-on-write when
it appears more than once. The rules follow Hugging Face transformers'
``_beam_search`` with ``early_stopping=False``:

- each step looks at the best ``(1 + number of EOS ids, at least 2) x num_beams``
  continuations by accumulated log-probability;
- a continuation that ends in EOS or reaches ``max_tokens`` becomes a finished
  hypothesis only if it is among the best ``num_beams`` of them, scored
  ``sum_logprobs / length ** length_penalty`` (length counts generated tokens,
  EOS included); the best ``num_beams`` unfinished ones live on;
- at most ``num_beams`` finished hypotheses are kept, and the search is done
  once it holds ``num_beams`` of them and the best live beam, scored at its
  current length, cannot beat the worst; or when no beam can continue;
- ``no_repeat_ngram_size`` bans any token that would repeat an n-gram of the
  prompt plus the beam's tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from llmos_kernel.core.sampling import banned_ngram_tokens
from llmos_kernel.errors import InvalidArgument


class BeamSearch:
    """The beam-search state of one request, stepped once per engine step.

    ``candidates`` is how many continuations a step weighs in all, so each beam's
    ``candidates`` best log-probs are all it needs; the rest may be -inf.
    """

    def __init__(
        self,
        num_beams: int,
        eos_token_ids: Collection[int],
        max_tokens: int,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        for name, value, low in (("num_beams", num_beams, 1), ("max_tokens", max_tokens, 1),
                                 ("no_repeat_ngram_size", no_repeat_ngram_size, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidArgument(f"{name} must be an int >= {low}, got {value!r}")
        self.num_beams = num_beams
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_tokens = max_tokens
        self.length_penalty = float(length_penalty)
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.prompt_ids = list(prompt_ids)
        self.candidates = max(2, 1 + len(self.eos_token_ids)) * num_beams
        self._live: list[list[int]] = [[]]
        self._live_scores = torch.zeros(1)  # summed log-probs, fp32, best first
        self._finished: list[tuple[list[int], float]] = []  # best first, at most num_beams
        self._done = False

    @property
    def done(self) -> bool:
        """No live beam can improve on the finished hypotheses (or none is left)."""
        return self._done

    def step(self, beams: Sequence[Sequence[int]], logprobs: torch.Tensor) -> list[tuple[int, int]]:
        """Extend the live ``beams`` by their ``logprobs [len(beams), V]`` (log_softmax rows).

        Returns the next live beams as (index into ``beams``, appended token), best
        first; empty once the search is done.
        """
        self._check_step(beams, logprobs)
        vocab = logprobs.shape[1]
        logprobs = logprobs.float()
        if self.no_repeat_ngram_size:
            logprobs = logprobs.clone()
            for i, beam in enumerate(beams):
                banned = banned_ngram_tokens([*self.prompt_ids, *beam], self.no_repeat_ngram_size)
                logprobs[i, banned] = -torch.inf
        totals = (logprobs + self._live_scores[:, None]).view(-1)
        scores, flat = totals.topk(min(self.candidates, totals.numel()))
        length = len(self._live[0]) + 1
        live: list[tuple[int, int]] = []
        live_scores: list[torch.Tensor] = []
        for rank, (score, index) in enumerate(zip(scores, flat.tolist(), strict=True)):
            if score.isneginf():
                break
            parent, token = divmod(index, vocab)
            if token in self.eos_token_ids or length >= self.max_tokens:
                if rank < self.num_beams:
                    self._add_finished([*beams[parent], token], score / length**self.length_penalty)
            elif len(live) < self.num_beams:
                live.append((parent, token))
                live_scores.append(score)
        self._live = [[*beams[parent], token] for parent, token in live]
        self._live_scores = torch.stack(live_scores) if live else torch.zeros(0)
        self._done = not live or not self._can_improve(length)
        return live

    def best(self) -> tuple[list[int], float]:
        """The highest-scoring finished hypothesis, or the best live beam if none finished."""
        if self._finished:
            tokens, score = self._finished[0]
            return list(tokens), score
        if not self._live:
            raise InvalidArgument("beam search ended with no hypothesis: every token was banned")
        length = max(len(self._live[0]), 1)
        return list(self._live[0]), float(self._live_scores[0] / length**self.length_penalty)

    def finished(self) -> list[tuple[list[int], float]]:
        """Finished hypotheses (tokens, score), best first."""
        return [(list(tokens), score) for tokens, score in self._finished]

    def _check_step(self, beams: Sequence[Sequence[int]], logprobs: torch.Tensor) -> None:
        if self._done:
            raise InvalidArgument("beam search is done; read best() instead of stepping it")
        if logprobs.dim() != 2 or logprobs.shape[0] != len(beams):
            raise InvalidArgument(
                f"logprobs must be [len(beams), vocab]; got {tuple(logprobs.shape)} for "
                f"{len(beams)} beams"
            )
        if [list(b) for b in beams] != self._live:
            raise InvalidArgument(
                "beams must be the live beams the previous step returned, in that order"
            )

    def _add_finished(self, tokens: list[int], score: torch.Tensor) -> None:
        self._finished.append((tokens, float(score)))
        self._finished.sort(key=lambda hypothesis: -hypothesis[1])
        del self._finished[self.num_beams:]

    def _can_improve(self, length: int) -> bool:
        """Hugging Face's early_stopping=False heuristic: the best live beam at its length."""
        if len(self._finished) < self.num_beams:
            return True
        best_live = float(self._live_scores[0] / length**self.length_penalty)
        return best_live > self._finished[-1][1]
