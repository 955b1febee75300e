"""The worker's side of constrained decoding: grammars compiled off the MLX thread, and the
logits processor that masks what a grammar forbids.

mlx-lm's `BatchGenerator` takes logits processors per sequence, so a constrained request and
an unconstrained one share every decode step: only the constrained row's logits are masked.
A processor is called once per step of its row, with the row's tokens so far; the first call
(whose last token is the prompt's) starts the grammar, each later one first advances it by the
token sampled at the step before. Reading that token waits for the step before to finish:
the step's forward pass is already queued by then, but its mask and sampling are not, which is
the price of a grammar (benchmarks/bench_structured.py measures it).

`GrammarCompiler` builds llguidance matchers on a thread of its own (llguidance releases the
GIL while it compiles), cached by the grammar's hash: a request waits for its grammar before
it joins the batch, and the batch never waits for one.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import numpy as np

_CACHED_GRAMMARS = 64


class GrammarCompiler:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int], vocab_size: int):
        self.vocab_size = vocab_size
        self._hf_tokenizer = hf_tokenizer
        self._eos_token_ids = eos_token_ids
        self._tokenizer = None  # llguidance's view of the tokenizer, built at first use
        self._matchers: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    def compile(self, grammar: str) -> Future:
        """A future of a fresh matcher for the grammar; ValueError (in the future) if it does
        not compile."""
        key = hashlib.sha256(grammar.encode()).hexdigest()
        with self._lock:
            template = self._matchers.get(key)
            if template is not None:
                self._matchers.move_to_end(key)
                done: Future = Future()
                done.set_result(template.deep_copy())
                return done
        return self._executor.submit(self._build, key, grammar)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
        return self._tokenizer

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer().decode_bytes([token])

    def _build(self, key: str, grammar: str) -> Any:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        with self._lock:
            self._matchers[key] = matcher
            while len(self._matchers) > _CACHED_GRAMMARS:
                self._matchers.popitem(last=False)
        return matcher.deep_copy()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class GrammarProcessor:
    """Masks one sequence's logits to the tokens its grammar allows next."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: list[int]):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self._vocab_size = vocab_size
        self._mask = allocate_token_bitmask(1, vocab_size)
        self._eos = np.zeros(vocab_size, dtype=bool)
        self._eos[[t for t in eos_token_ids if t < vocab_size]] = True
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        if self._started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self._started = True
        if self.matcher.is_error():
            allowed = self._eos  # cannot happen with a sampled allowed token: end it
        else:
            fill_next_token_bitmask(self.matcher, self._mask)
            allowed = np.unpackbits(self._mask.view(np.uint8),
                                    bitorder="little")[:self._vocab_size].astype(bool)
            if not allowed.any():
                allowed = self._eos
        width = logits.shape[-1]
        if width != self._vocab_size:  # a model whose logits are wider than its vocabulary
            allowed = np.resize(np.concatenate([allowed, np.zeros(max(0, width - allowed.size),
                                                                  dtype=bool)]), width)
        return mx.where(mx.array(allowed)[None], logits, mx.array(-float("inf"), logits.dtype))
