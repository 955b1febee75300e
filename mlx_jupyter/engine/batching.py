"""mlx-lm's `BatchGenerator`, with requests that join the running batch's next decode step.

In mlx-lm, a request whose prompt has been prefilled (all but its last token) becomes a small
generation batch of its own, and that batch at once runs a forward pass over the last prompt
token to sample the first completion token; only then is it merged into the running batch. Every
join thus costs one extra forward pass. A decode step is bound by reading the weights, so that
pass costs about as much as a decode step of the whole batch: on a 100M-parameter model, each
group of joiners stalled the batch for ~45 ms.

Here the joiners skip that pass: they are merged with their last prompt token as their next
input, so the running batch's next decode step computes their first token alongside everyone
else's next one, in one forward pass. That step yields no token for a joiner (its input was a
prompt token, not a generated one); its first token comes with the step after, exactly when
mlx-lm's own path would have delivered it. Everything else (prefill, caches, sampling, stop
sequences, removal) is mlx-lm's.

The classes below rely on attributes of mlx-lm's batch classes that are not public API;
`supported()` checks for them, and the worker uses the plain `BatchGenerator` where they are
missing.
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
import mlx_lm.generate  # noqa: F401  (the module; the package exports a function of that name)

_generate = sys.modules["mlx_lm.generate"]
BatchGenerator = _generate.BatchGenerator
GenerationBatch = _generate.GenerationBatch
PromptProcessingBatch = _generate.PromptProcessingBatch

_PLACEHOLDER = mx.zeros((1,))


class _NeverStops:
    """Stands in for a joiner's stop matcher while its prompt token goes through the step."""

    @staticmethod
    def advance(token: int) -> bool:
        return False


class JoiningGenerationBatch(GenerationBatch):
    """A generation batch whose newly joined rows carry their last prompt token as input.

    ``_joining[i]`` is true while row i's pending input is its last prompt token: the next step
    computes its first completion token, and reports nothing for it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._joining: list[bool] = []
        self._constructing = True  # mlx-lm's constructor runs a step; a joiner must not
        super().__init__(*args, **kwargs)
        self._constructing = False
        self._joining = [True] * len(self.uids)
        # What the first step reads as the joiners' "current" log-probabilities (never used).
        self._next_logprobs = [_PLACEHOLDER] * len(self.uids)

    def _step(self):
        if self._constructing:
            return None
        return super()._step()

    def extend(self, batch: GenerationBatch) -> None:
        joining = getattr(batch, "_joining", [False] * len(batch.uids))
        super().extend(batch)
        self._joining.extend(joining)

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        self._joining = [self._joining[i] for i in keep]

    def next(self) -> list[Any]:
        if not any(self._joining):
            return super().next()
        # The joiners' input is a prompt token: neither counted nor matched against stop
        # sequences; their rows cannot finish in this step, so the indexes below stay valid
        # until mlx-lm filters out the rows that do.
        joiners = {self.uids[i]: self._matchers[i]
                   for i, joining in enumerate(self._joining) if joining}
        for i, joining in enumerate(self._joining):
            if joining:
                self._num_tokens[i] -= 1
                self._matchers[i] = _NeverStops()
        self._joining = [False] * len(self.uids)
        responses = super().next()
        for i, uid in enumerate(self.uids):
            if uid in joiners:
                self._matchers[i] = joiners[uid]
        return [response for response in responses if response.uid not in joiners]


class JoiningPromptBatch(PromptProcessingBatch):
    """Hands prefilled prompts over as joiners instead of running their first step itself."""

    def generate(self, tokens: list[list[int]]) -> JoiningGenerationBatch:
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        batch = JoiningGenerationBatch(
            self.model, self.uids, mx.array([t[-1] for t in tokens], dtype=mx.uint32),
            self.prompt_cache, self.tokens, self.samplers, self.fallback_sampler,
            self.logits_processors, self.stop_sequences, self.max_tokens)
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        self.stop_sequences = []
        return batch


class JoiningBatchGenerator(BatchGenerator):
    """`BatchGenerator` whose joining requests share the running batch's next decode step."""

    def __init__(self, model: Any, **kwargs: Any):
        super().__init__(model, **kwargs)
        self._prompt_batch = JoiningPromptBatch.empty(
            self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        self._generation_batch = JoiningGenerationBatch.empty(self.model, self.sampler)


def supported() -> bool:
    """Whether this mlx-lm's batch classes have the private parts the joining batch uses."""
    try:
        batch = GenerationBatch.empty(None, None)  # no rows: the model is never called
    except Exception:
        return False
    return (all(hasattr(batch, name) for name in
                ("uids", "_num_tokens", "_matchers", "_next_tokens", "_next_logprobs"))
            and all(callable(getattr(GenerationBatch, name, None))
                    for name in ("_step", "extend", "filter", "next"))
            and callable(getattr(PromptProcessingBatch, "empty", None)))
