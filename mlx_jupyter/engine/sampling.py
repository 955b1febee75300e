"""How one answer picks its tokens: its sampler, its logits processors, its log-probabilities.

Sampling: temperature 0 is argmax. Otherwise each answer samples with its own PRNG key chain,
started from its seed (the request's seed plus the answer's index, so that the n answers of one
request differ), after top-k, top-p and min-p, so an answer's random draws never depend on
which other requests share the batch.

Logits processors (mlx-lm's, per sequence): logit_bias, then the repetition, frequency and
presence penalties over the last PENALTY_CONTEXT_TOKENS tokens, then the grammar's mask last,
so that nothing a grammar forbids is raised back.

Log-probabilities are those the sampler saw (after the processors, before temperature), as
OpenAI reports them.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..limits import MAX_SEED, PENALTY_CONTEXT_TOKENS
from .protocol import GenerateCommand, TokenLogprob, TopLogprob


def argmax_sampler(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class SeededSampler:
    """Temperature sampling, after top-k, top-p and min-p, from a PRNG key chain owned by one
    answer.

    BatchGenerator calls an answer's sampler with only that answer's row of log-probabilities
    whenever the batch's samplers differ, so each answer draws from its own key sequence.
    """

    def __init__(self, temperature: float, seed: int, *, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0):
        self._inverse_temperature = 1.0 / temperature
        self._top_p, self._top_k, self._min_p = top_p, top_k, min_p
        self._key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        if 0 < self._top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, self._top_k)
        if 0.0 < self._top_p < 1.0:
            logprobs = apply_top_p(logprobs, self._top_p)
        if self._min_p > 0.0:
            logprobs = apply_min_p(logprobs, self._min_p)
        keys = mx.random.split(self._key)
        self._key = keys[0]
        return mx.random.categorical(logprobs * self._inverse_temperature, key=keys[1])


def make_sampler(command: GenerateCommand, index: int = 0):
    """The sampler of answer `index` of a request."""
    if command["temperature"] <= 0.0:
        return argmax_sampler  # shared, so an all-greedy batch samples in one call
    seed = command["seed"]
    assert seed is not None, "check_generate lets no sampled command without a seed through"
    return SeededSampler(float(command["temperature"]), (seed + index) % (MAX_SEED + 1),
                         top_p=float(command["top_p"]), top_k=int(command["top_k"]),
                         min_p=float(command["min_p"]))


def make_processors(command: GenerateCommand) -> list[Any]:
    """The request's logit_bias and penalties, as mlx-lm's logits processors."""
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        logit_bias={int(token): value for token, value in command["logit_bias"].items()}
        or None,
        repetition_penalty=command["repetition_penalty"],
        repetition_context_size=PENALTY_CONTEXT_TOKENS,
        presence_penalty=command["presence_penalty"] or None,
        presence_context_size=PENALTY_CONTEXT_TOKENS,
        frequency_penalty=command["frequency_penalty"] or None,
        frequency_context_size=PENALTY_CONTEXT_TOKENS)


class LogprobReader:
    """Turns sampled tokens and their rows of log-probabilities into OpenAI's entries, all the
    answers of one step evaluated together."""

    def __init__(self, token_bytes):
        """token_bytes(token id) -> the bytes it stands for."""
        self._token_bytes = token_bytes

    def read(self, asks: list[tuple[int, mx.array, int]]) -> list[TokenLogprob]:
        """asks: (sampled token, its step's log-probabilities, how many rivals)."""
        lazy = []
        for token, row, top in asks:
            row = row.reshape(-1)
            if top > 0:
                best = mx.argpartition(-row, kth=top - 1)[:top]
                lazy.append((row[token], best, row[best]))
            else:
                lazy.append((row[token], None, None))
        mx.eval([part for entry in lazy for part in entry if part is not None])
        entries = []
        for (token, _, _), (chosen, best, values) in zip(asks, lazy):
            rivals: list[TopLogprob] = []
            if best is not None:
                ranked = sorted(zip(values.tolist(), best.tolist()), reverse=True)
                rivals = [self._entry(t, v) for v, t in ranked if v != float("-inf")]
            entries.append(TokenLogprob(**self._entry(token, chosen.item()),
                                        top_logprobs=rivals))
        return entries

    def _entry(self, token: int, logprob: float) -> TopLogprob:
        raw = self._token_bytes(token)
        return TopLogprob(token=raw.decode("utf-8", "replace"), logprob=round(logprob, 6),
                          bytes=list(raw))
