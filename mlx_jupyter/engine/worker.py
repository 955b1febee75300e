"""The model worker: one process per loaded model, doing all of that model's MLX work.

Started by the server as
``python -m mlx_jupyter.engine.worker MODEL_PATH [--max-batch-size N] [--prompt-cache-bytes N] ...``
(``--help`` lists the options).
Commands arrive as JSON lines on stdin; messages leave on the process's original stdout (see
`protocol`, which types both). fd 1 is then pointed at stderr, so a library that prints cannot
corrupt the protocol. A generate command carries every parameter resolved by the server (its
defaults, its seed): the worker checks them and applies none of its own.

Threads: a reader thread only parses commands and queues them; a heartbeat thread sends a
heartbeat every ``--heartbeat-interval`` seconds (the server takes a worker that stops beating
for hung; MLX releases the GIL while it computes, so a long prefill still beats); every MLX
computation runs on the main thread (MLX streams are thread-local).

Continuous batching: the main thread runs one `mlx_lm.generate.BatchGenerator` (the
`batching.JoiningBatchGenerator` variant, whose joiners share the batch's next decode step
instead of paying a forward pass of their own). Requests that arrive while others are
generating join the running batch between two decode steps. How many a worker holds at once is
the server's to decide: its queue admits at most ``--max-batch-size`` requests per model (the
same figure sizes the batch and the KV reservation here); the worker itself only checks that
the KV reservation holds them (below). Each request keeps its own max_tokens, sampler,
streaming detokenizer and `StopMatcher`. A cancel
is handled between two decode steps and removes only its request; shutdown ends every request
(as "cancelled") at the next step. When no request is active the main thread blocks on the
command queue; while generating it drains the queue without blocking.

Answers: a request for n answers takes n rows of the batch; its prompt is prefilled once and
each row starts from a copy of that state. Each row samples with its own sampler and logits
processors (`sampling`: seeded per answer, so a request's draws never depend on which others
share the batch; same seed, parameters and prompt give the same text, alone or batched, up to
floating-point differences in the logits caused by the batch's composition, which can only
change a token at a near tie) and, for a constrained request, its grammar's mask
(`grammar.processor`; a request waits for its grammar to compile before it joins). Its text is
split into answer text, thinking and tool calls (`grammar.syntax.OutputRouter`) as it streams.

Prompt cache: the KV cache of every request that finishes on its own ("stop" or "length",
including a stop string) is kept in mlx-lm's `LRUPromptCache`, keyed by the tokens it holds
(the prompt and the completion). A new request starts from a copy of the cached state for the
longest prefix of its prompt (a longer cached sequence is trimmed back to the shared prefix where
the cache type allows) and only the rest of its prompt is prefilled; its done message's
usage reports that prefix as ``cached_tokens``. At least the last prompt token is always
computed afresh, as its logits give the first completion token. The stored caches together hold at most
``--prompt-cache-bytes`` (default 256 MiB; 0 turns the cache off): least recently stored
entries are evicted first. An entry is evaluated when it is stored, so it owns exactly the bytes
it counts: a lazy slice of the batch's KV buffer would keep the whole buffer alive.

KV reservation: the batch holds KV state for at most ``--max-batch-size`` ×
``--kv-reserve-tokens`` positions, and the server counts the model for that much. A request
needs its prompt plus its max_tokens; as the batch pads every row to its longest, a batch of n
rows whose longest needs L positions holds n × L. A request that needs more than the whole
reservation is refused as it arrives; one that fits only with fewer companions waits (in
arrival order) until enough of them have finished.

Memory: `memory_guard.MemoryGuard` reports the worker's live memory after requests end, and
when it passes ``--memory-limit-bytes`` (the server's estimate for this worker) trims the
prompt cache first and says so.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import IO, Any

from ..limits import (
    DEFAULT_KV_RESERVE_TOKENS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_PROMPT_CACHE_BYTES,
    MAX_TOKENS,
    kv_capacity,
    kv_refusal,
)
from .protocol import (
    CancelCommand,
    ChoiceEnd,
    DoneMessage,
    Ending,
    ErrorMessage,
    FatalEvent,
    GenerateCommand,
    HeartbeatEvent,
    Message,
    ReadyEvent,
    Refusal,
    TextMessage,
    ToolCall,
    WorkerTimings,
    check_generate,
    decode_command,
    encode,
)
from .context import context_length
from .grammar.constraints import compiled_grammar
from .grammar.syntax import OutputRouter, ToolSyntax
from .sampling import LogprobReader, argmax_sampler, make_processors, make_sampler
from .stops import StopMatcher

_PROMPT_CACHE_ENTRIES = 1 << 30  # entries are bounded by bytes, not by count
_PREFILL_CHUNK = 2048  # prompt tokens per forward pass where the worker prefills by itself


@dataclass
class _Request:
    """One generate command: its prompt, once tokenized, and its n answers."""

    id: str
    command: GenerateCommand
    tokens: list[int] = field(default_factory=list)
    max_tokens: int = 0  # the command's, or less: what the model's context leaves room for
    kv_tokens: int = 0  # KV positions each answer needs: prompt plus max_tokens
    thinking: bool = False  # its prompt ended inside a thinking block (its template opened it)
    answers: list[_Answer] = field(default_factory=list)
    shared_prefix: tuple[Any, list[int]] | None = None  # n > 1: the prompt's state, once
    admitted_at: float = 0.0
    failed: bool = False  # an error was sent for it: it is over

    def over(self) -> bool:
        return self.failed or all(answer.ending is not None for answer in self.answers)


@dataclass
class _Answer:
    """One of a request's n answers: one row of the batch."""

    request: _Request
    index: int
    grammar: Any = None  # a Future of its grammar's matcher, for a constrained request
    uid: int | None = None
    detokenizer: Any = None
    stops: StopMatcher | None = None
    router: OutputRouter | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    ending: Ending | None = None


class Worker:
    def __init__(self, model_path: str, events: IO[bytes], *,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
                 memory_limit_bytes: int = 0, mlx_cache_limit_bytes: int | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if kv_reserve_tokens < 1:
            raise ValueError("kv_reserve_tokens must be at least 1")
        if min(prompt_cache_bytes, memory_limit_bytes, mlx_cache_limit_bytes or 0) < 0:
            raise ValueError("byte sizes must not be negative")
        self.model_path = model_path
        self.max_batch_size = max_batch_size
        self.prompt_cache_bytes = prompt_cache_bytes
        self.kv_reserve_tokens = kv_reserve_tokens
        self.kv_capacity = kv_capacity(max_batch_size, kv_reserve_tokens)
        self.context_tokens: int | None = None  # the model's, from its config, once loaded
        self.memory_limit_bytes = memory_limit_bytes  # 0: no limit
        self.mlx_cache_limit_bytes = mlx_cache_limit_bytes  # None: MLX's own default
        self._prompt_cache = None  # an mlx_lm LRUPromptCache once the model is loaded, if enabled
        self._memory = None  # a MemoryGuard once the model is loaded
        self._events = events
        # None stands for the shutdown (asked for, or the server's end of stdin closed).
        self._commands: queue.Queue[GenerateCommand | CancelCommand | None] = queue.Queue()
        self._shutting_down = threading.Event()
        self.model = self.tokenizer = None
        self.tool_parser: str | None = None  # the family's tool-call syntax, once loaded
        self._tool_syntax = ToolSyntax()  # its markers (the JSON syntax's when it has none)
        self._think: tuple[str, str] | None = None  # its thinking markers, if it has them
        self._vocab_size = 0  # the width of its logits
        self._compiler = None  # a GrammarCompiler, built at the first need
        self._logprobs: LogprobReader | None = None
        self._generator = None
        self._eos_stops = None
        self._waiting: collections.deque[_Request] = collections.deque()
        self._active: dict[int, _Request] = {}  # BatchGenerator uid -> request
        self._in_step = False
        self._memory_changed = False  # a request ended since the last memory check

    # -- commands -------------------------------------------------------------------------

    def read_commands(self, stream: IO[bytes]) -> None:
        """Reader thread: queue generate and cancel commands in order; stop on shutdown or EOF.
        It runs from the start, so that a worker whose server is gone (killed: stdin ends)
        exits in the middle of loading its model too, instead of loading it for nobody."""
        for line in stream:
            try:
                command = decode_command(line)
            except ValueError as exc:
                print(f"mlx-jupyter worker: ignoring malformed command: {exc}", file=sys.stderr)
                continue
            if command["op"] == "shutdown":
                break
            self._commands.put(command)
        # EOF too: the server is gone or asked us to go.
        if self.model is None:
            # Still loading (the main thread is inside mlx-lm, which cannot be interrupted):
            # nothing runs yet and nothing is owed to anyone.
            os._exit(0)
        self._shutting_down.set()
        self._commands.put(None)

    def send(self, message: Message) -> None:
        self._events.write(encode(message))
        if not self._in_step:  # a step's events leave together, in one write (see _step)
            self._events.flush()

    def beat(self, interval: float) -> None:
        """Heartbeat thread: says it is alive every `interval` seconds until shutdown. It
        flushes at once, even in the middle of a step (the stream's writes are locked, so
        lines never interleave)."""
        line = encode(HeartbeatEvent(event="heartbeat"))
        while not self._shutting_down.wait(interval):
            try:
                self._events.write(line)
                self._events.flush()
            except (OSError, ValueError):
                return  # the server is gone

    # -- model ----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        from mlx_lm import load  # the costly import (~3 s) happens here, never in the server

        self.model, self.tokenizer = load(self.model_path)
        with open(os.path.join(self.model_path, "config.json"), encoding="utf-8") as config:
            config = json.load(config)
        self.context_tokens = context_length(config)
        self._vocab_size = _vocab_size(config, self.tokenizer)
        tokenizer = self.tokenizer
        if tokenizer.has_tool_calling:
            self.tool_parser = tokenizer.tool_parser.__module__.rsplit(".", 1)[-1]
            self._tool_syntax = ToolSyntax(tokenizer.tool_call_start, tokenizer.tool_call_end)
        if tokenizer.has_thinking:
            self._think = (tokenizer.think_start, tokenizer.think_end)
        if self.prompt_cache_bytes > 0:
            from mlx_lm.models.cache import LRUPromptCache

            self._prompt_cache = LRUPromptCache(max_size=_PROMPT_CACHE_ENTRIES,
                                                max_bytes=self.prompt_cache_bytes)
        from .memory_guard import MemoryGuard

        self._memory = MemoryGuard(self.memory_limit_bytes, self.mlx_cache_limit_bytes,
                                   self._prompt_cache)
        self.send(ReadyEvent(event="ready", pid=os.getpid(),
                             load_ms=round((time.perf_counter() - started) * 1000, 1),
                             context_tokens=self.context_tokens,
                             max_token_bytes=max_token_bytes(self.tokenizer),
                             tool_parser=self.tool_parser, thinking=self._think is not None,
                             vocab_size=self._vocab_size))
        self._check_memory(force_report=True)

    def _grammars(self):
        """The grammar compiler (and llguidance's tokenizer), built at first use."""
        if self._compiler is None:
            from .grammar.processor import GrammarCompiler

            self._compiler = GrammarCompiler(self.tokenizer._tokenizer,
                                             sorted(self.tokenizer.eos_token_ids),
                                             self._vocab_size)
        return self._compiler

    # -- the main loop --------------------------------------------------------------------

    def serve(self) -> None:
        try:
            while not self._shutting_down.is_set():
                if not self._active and not self._waiting:
                    if not self._handle(self._commands.get()):  # idle: block, never spin
                        break
                if not self._drain_commands():
                    break
                self._admit()
                if self._active:
                    self._step()
                elif self._waiting and not self._commands.qsize():
                    self._await_grammar()
                if self._memory_changed:
                    self._check_memory(force_report=not self._active and not self._waiting)
        finally:
            self._end_all()

    def _await_grammar(self) -> None:
        """Nothing runs and the next answer waits for its grammar: wait for it (briefly, so a
        command that arrives meanwhile is seen)."""
        pending = [a.grammar for a in self._waiting if a.grammar and not a.grammar.done()]
        if pending:
            wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)

    def _drain_commands(self) -> bool:
        """Handles every queued command without blocking; False once shutdown was asked for."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return not self._shutting_down.is_set()
            if not self._handle(command):
                return False

    def _handle(self, command: GenerateCommand | CancelCommand | None) -> bool:
        """Handles one command; False for the shutdown."""
        if command is None:
            return False
        if command["op"] == "cancel":
            self._cancel(command["id"])
        else:
            self._accept(_Request(command["id"], command))
        return True

    def _accept(self, request: _Request) -> None:
        """Checks and tokenizes a new request, starts compiling its grammar, and refuses it at
        once if the KV reservation can never hold it; its answers wait until the batch's KV
        reservation holds them."""
        try:
            check_generate(request.command)
        except ValueError as exc:
            self._error(request, message=f"invalid generate command: {exc}")
            return
        try:
            request.tokens = self._prompt_tokens(request)
        except Exception as exc:
            traceback.print_exc()
            self._error(request, exc)
            return
        prompt_tokens, context = len(request.tokens), self.context_tokens
        if context is not None and prompt_tokens >= context:
            self._error(request, refused="context", message=(
                f"the prompt is {prompt_tokens} tokens and this model's context holds "
                f"{context}, with room for at least one token of answer: shorten the prompt"))
            return
        # What the context leaves room for: the answer may not run past it.
        request.max_tokens = min(request.command["max_tokens"],
                                 context - prompt_tokens if context else MAX_TOKENS)
        request.kv_tokens = prompt_tokens + request.max_tokens
        n = request.command["n"]
        refusal = kv_refusal(prompt_tokens * n, request.max_tokens * n, self.max_batch_size,
                             self.kv_reserve_tokens)
        if refusal:
            self._error(request, message=refusal, refused="kv_reservation")
            return
        if any(int(token) >= self._vocab_size for token in request.command["logit_bias"]):
            self._error(request, message=f"logit_bias names a token id past this model's "
                                         f"vocabulary (ids below {self._vocab_size})")
            return
        request.answers = [_Answer(request, index) for index in range(n)]
        if (constraint := request.command["constraint"]) is not None:
            grammar = compiled_grammar(constraint, self._tool_syntax)
            for answer in request.answers:
                answer.grammar = self._grammars().compile(grammar)
        self._waiting.extend(request.answers)

    def _kv_fits(self, answer: _Answer) -> bool:
        """Whether the batch, padded to its longest row, stays within the KV reservation with
        this answer in it."""
        rows = [active.request.kv_tokens for active in self._active.values()]
        rows.append(answer.request.kv_tokens)
        return len(rows) * max(rows) <= self.kv_capacity

    def _cancel(self, request_id: str) -> None:
        answers = [a for a in list(self._waiting) + list(self._active.values())
                   if a.request.id == request_id]
        for answer in answers:  # unknown: the request has already finished
            if answer.uid is None:
                self._waiting.remove(answer)
            else:
                self._drop(answer.uid)
            self._finish(answer, "cancelled")

    def _admit(self) -> None:
        """Moves waiting answers into the batch, in arrival order, while its KV reservation
        holds them; one whose grammar is still compiling lets those behind it go first. (Their
        number is the server's to cap: see the module's docstring.)"""
        for answer in list(self._waiting):
            if not self._kv_fits(answer):
                break
            if answer.grammar is not None and not answer.grammar.done():
                continue
            self._waiting.remove(answer)
            try:
                self._insert(answer)
            except Exception as exc:  # one bad request must not take the model down
                traceback.print_exc()
                self._fail(answer.request, exc)

    def _insert(self, answer: _Answer) -> None:
        request, command = answer.request, answer.request.command
        processors = make_processors(command)
        if answer.grammar is not None:
            from .grammar.processor import GrammarProcessor

            try:
                matcher = answer.grammar.result()
            except ValueError as exc:
                raise ValueError(f"the constraint does not compile: {exc}") from None
            processors.append(GrammarProcessor(matcher, self._vocab_size,
                                               sorted(self.tokenizer.eos_token_ids)))
        answer.stops = StopMatcher(command["stop"])
        answer.detokenizer = self.tokenizer.detokenizer  # a fresh copy per answer
        if command["messages"] is None:
            _keep_leading_space(answer.detokenizer)
        answer.router = self._router(request)
        generator = self._batch_generator()
        cache, rest = self._answer_prefix(answer)
        cached = len(request.tokens) - len(rest)
        (answer.uid,) = generator.insert(
            [rest], max_tokens=[request.max_tokens], caches=[cache],
            all_tokens=[request.tokens[:cached]], samplers=[make_sampler(command, answer.index)],
            logits_processors=[processors], stop_sequences=[self._eos_stops])
        del cache
        answer.cached_tokens = cached
        if not request.admitted_at:
            request.admitted_at = time.perf_counter()
        self._active[answer.uid] = answer

    def _router(self, request: _Request) -> OutputRouter:
        # A model with no tool syntax of its own is given the JSON one (grammar.syntax).
        from mlx_lm.tool_parsers import json_tools

        command = request.command
        parse = command["parse_tool_calls"]
        return OutputRouter(  # a bare prompt has no template to open a thinking block
            think=self._think if command["messages"] is not None else None,
            thinking=request.thinking,
            tools=self._tool_syntax if parse else None,
            parse=(self.tokenizer.tool_parser or json_tools.parse_tool_call) if parse else None,
            tool_specs=command["tools"])

    def _batch_generator(self):
        if self._generator is None:
            from mlx_lm.generate import BatchGenerator, make_stop_sequences

            from . import batching

            generator_class = BatchGenerator
            if batching.supported():
                generator_class = batching.JoiningBatchGenerator
            else:
                print("mlx-jupyter worker: this mlx-lm lacks what joining requests rely on; "
                      "each join costs a forward pass of its own", file=sys.stderr)
            self._eos_stops = make_stop_sequences(self.tokenizer)
            self._generator = generator_class(
                self.model, sampler=argmax_sampler, completion_batch_size=self.max_batch_size,
                prefill_batch_size=self.max_batch_size)
        return self._generator

    def _cached_prefix(self, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """(a copy of the cached KV state for the longest cached prefix of tokens, the rest of
        tokens); (None, tokens) on a miss. The rest is never empty."""
        if self._prompt_cache is None or not tokens:
            return None, tokens
        cache, rest = self._prompt_cache.fetch_nearest_cache(self.model_path, tokens)
        if cache is not None and not rest:
            # The whole prompt is cached, but the last token's logits are needed to start the
            # completion: recompute that one token where the cache can be trimmed.
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = None, tokens
        if cache is None:
            return None, tokens
        return cache, rest

    def _answer_prefix(self, answer: _Answer) -> tuple[list[Any] | None, list[int]]:
        """Where an answer's prefill starts: the prompt cache's longest prefix; for the answers
        of a request with n > 1, the prompt is prefilled once (all but its last token) and each
        answer starts from a copy of that state."""
        request = answer.request
        if len(request.answers) == 1:
            return self._cached_prefix(request.tokens)
        if request.shared_prefix is None:
            from mlx_lm.models.cache import make_prompt_cache

            cache, rest = self._cached_prefix(request.tokens)
            if len(rest) > 1:
                import mlx.core as mx

                cache = cache if cache is not None else make_prompt_cache(self.model)
                for start in range(0, len(rest) - 1, _PREFILL_CHUNK):
                    self.model(mx.array(rest[start:min(start + _PREFILL_CHUNK,
                                                       len(rest) - 1)])[None], cache=cache)
                    mx.eval([layer.state for layer in cache])
                rest = rest[-1:]
            request.shared_prefix = (cache, rest)
        cache, rest = request.shared_prefix
        return (copy.deepcopy(cache) if cache is not None else None), rest

    def _store_cache(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """Keeps a request's KV state, holding exactly tokens (its prompt and completion so
        far), for later prompts."""
        if self._prompt_cache is None or not cache or not tokens:
            return
        try:
            import mlx.core as mx

            # Evaluated now, each entry holds its own compact copy: left lazy, the slice of
            # the batch's KV buffer it came from would keep that whole buffer alive.
            mx.eval([layer.state for layer in cache])
            self._prompt_cache.insert_cache(self.model_path, list(tokens), cache)
        except Exception:  # the cache is an optimisation: never fail a request over it
            traceback.print_exc()

    def _prompt_tokens(self, request: _Request) -> list[int]:
        command = request.command
        if command["messages"] is None:
            return self.tokenizer.encode(command["prompt"] or "")
        messages = [_template_message(message) for message in command["messages"]]
        tools = command["tools"]
        if tools and self.tool_parser is None:
            # A template without tools cannot show them: a forced call (the only kind such a
            # model is asked for) still needs the model to know what it calls.
            messages.insert(0, {"role": "system", "content": _describe_tools(tools)})
            tools = None
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False,
            **command["chat_template_kwargs"])
        if self._think is not None:
            request.thinking = text.rstrip().endswith(self._think[0])
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _step(self) -> None:
        """One BatchGenerator step: a decode step for the batch and/or a prefill chunk. Its
        events (a token for each answer in the batch) go out in one write."""
        self._in_step = True
        try:
            self._run_step()
        finally:
            self._in_step = False
            self._events.flush()

    def _run_step(self) -> None:
        try:
            _, responses = self._generator.next()
        except Exception as exc:
            # Which request broke the step is unknown: fail the batch, start a fresh generator.
            traceback.print_exc()
            for request in {id(a.request): a.request for a in self._active.values()}.values():
                self._error(request, exc)
            self._active.clear()
            self._reset_generator()
            return
        now = time.perf_counter()
        responses = [(self._active.get(r.uid), r) for r in responses]
        responses = [(answer, r) for answer, r in responses if answer is not None]
        self._send_logprobs(responses)
        for answer, response in responses:
            answer.completion_tokens += 1
            if answer.first_token_at is None:
                answer.first_token_at = now
            detokenizer = answer.detokenizer
            if response.finish_reason != "stop":  # the end-of-sequence token is not text
                detokenizer.add_token(response.token)
            if response.finish_reason is not None:
                detokenizer.finalize()
            self._send_output(answer, answer.stops.feed(detokenizer.last_segment))
            if response.finish_reason is not None:
                self._store_cache(response.all_tokens, response.prompt_cache)
            if answer.stops.stopped:
                if response.finish_reason is None:
                    self._drop(response.uid, keep_cache=True)
                else:
                    del self._active[response.uid]
                self._finish(answer, "stop")
            elif response.finish_reason is not None:
                del self._active[response.uid]
                self._finish(answer, response.finish_reason)

    def _send_logprobs(self, responses: list[tuple[_Answer, Any]]) -> None:
        """The log-probabilities of this step's tokens, for the answers that asked (the
        end-of-sequence token is no part of an answer)."""
        asking = [(answer, response) for answer, response in responses
                  if answer.request.command["logprobs"] is not None
                  and response.finish_reason != "stop"]
        if not asking:
            return
        if self._logprobs is None:
            self._logprobs = LogprobReader(self._grammars().token_bytes)
        entries = self._logprobs.read([(response.token, response.logprobs,
                                        answer.request.command["logprobs"])
                                       for answer, response in asking])
        for (answer, _), entry in zip(asking, entries):
            self._send_piece(answer, logprobs=[entry])

    def _drop(self, uid: int, *, keep_cache: bool = False) -> None:
        """Takes a still-running answer out of the batch; keep_cache (only for an answer that
        has just produced a token, so is generating) stores its KV state in the prompt cache."""
        del self._active[uid]
        keep_cache = keep_cache and self._prompt_cache is not None
        try:
            caches = self._generator.remove([uid], return_prompt_caches=keep_cache)
        except Exception:
            traceback.print_exc()
            for request in {id(a.request): a.request for a in self._active.values()}.values():
                self._error(request, RuntimeError("the batch failed while removing a request"))
            self._active.clear()
            self._reset_generator()
            return
        if keep_cache and uid in caches:
            cache, tokens = caches[uid]
            self._store_cache(list(tokens), cache)

    def _reset_generator(self) -> None:
        generator, self._generator = self._generator, None
        if generator is not None:
            try:
                generator.close()
            except Exception:
                traceback.print_exc()

    def _end_all(self) -> None:
        """Shutdown: every answer still open ends as cancelled (if anyone is still listening)."""
        answers = list(self._active.values()) + list(self._waiting)
        self._active.clear()
        self._waiting.clear()
        for answer in answers:
            try:
                self._finish(answer, "cancelled")
            except (BrokenPipeError, OSError, ValueError):
                break  # the server is gone
        self._generator = None
        if self._compiler is not None:
            self._compiler.close()

    # -- events ---------------------------------------------------------------------------

    def _send_piece(self, answer: _Answer, **piece: Any) -> None:
        message = TextMessage(id=answer.request.id, **piece)
        if answer.index:
            message["index"] = answer.index
        self.send(message)

    def _send_output(self, answer: _Answer, text: str) -> None:
        if text:
            self._send_pieces(answer, answer.router.feed(text))

    def _send_pieces(self, answer: _Answer, pieces: list[tuple[str, Any]]) -> None:
        for kind, value in pieces:
            if kind == "tool_call":
                arguments = value.get("arguments", {})
                value = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                                 function={"name": value["name"], "arguments": (
                                     arguments if isinstance(arguments, str)
                                     else json.dumps(arguments, ensure_ascii=False))})
            self._send_piece(answer, **{kind: value})

    def _finish(self, answer: _Answer, finish_reason: Ending) -> None:
        """One answer ended; the request's done message goes once all of them did."""
        request = answer.request
        if request.failed or answer.ending is not None:
            return
        self._memory_changed = True
        if answer.stops is not None:
            self._send_output(answer, answer.stops.flush())  # nothing after a stop string
            self._send_pieces(answer, answer.router.close())
        answer.ending = finish_reason
        if not request.over():
            return
        self.send(DoneMessage(
            id=request.id, done=True, finish_reason=request.answers[0].ending,
            usage={"prompt_tokens": len(request.tokens),
                   "completion_tokens": sum(a.completion_tokens for a in request.answers),
                   "cached_tokens": request.answers[0].cached_tokens},
            timings=self._timings(request), max_tokens=request.max_tokens,
            choices=[ChoiceEnd(index=a.index, finish_reason=a.ending,
                               completion_tokens=a.completion_tokens)
                     for a in request.answers]))

    @staticmethod
    def _timings(request: _Request) -> WorkerTimings:
        """Prefill speed (admission to the first token, which the prefill's last step
        yields) and decode speed (the tokens after the first, over the time after it), each
        where it was measured, for the first answer: a request cancelled before its first
        token has neither, one of a single token no decode speed."""
        timings: WorkerTimings = {}
        answer = request.answers[0]
        if answer.first_token_at is None:
            return timings
        prompt_seconds = answer.first_token_at - request.admitted_at
        decode_seconds = time.perf_counter() - answer.first_token_at
        computed = len(request.tokens) - answer.cached_tokens  # prefilled, not cached
        if prompt_seconds > 0:
            timings["prompt_tokens_per_second"] = round(computed / prompt_seconds, 2)
        if answer.completion_tokens > 1 and decode_seconds > 0:
            timings["tokens_per_second"] = round(
                (answer.completion_tokens - 1) / decode_seconds, 2)
        return timings

    def _fail(self, request: _Request, exc: BaseException) -> None:
        """One request failed while its answers were being placed: its others leave too."""
        for answer in [a for a in self._waiting if a.request is request]:
            self._waiting.remove(answer)
        for uid in [uid for uid, a in self._active.items() if a.request is request]:
            self._drop(uid)
        self._error(request, exc)

    def _error(self, request: _Request, exc: BaseException | None = None, *,
               message: str | None = None, refused: Refusal | None = None) -> None:
        """One request failed (exc, or message), or was refused (message, and why it cannot
        run here as asked)."""
        if request.failed:
            return
        request.failed = True
        self.send(ErrorMessage(id=request.id, done=True, finish_reason="error",
                               error=message or f"{type(exc).__name__}: {exc}",
                               refused=refused))

    def _check_memory(self, *, force_report: bool = False) -> None:
        """Reports live memory and trims the prompt cache when over the limit (see
        memory_guard); after requests end, when the prompt cache and the batch change."""
        self._memory_changed = False
        if self._memory is None:
            return
        try:
            events = self._memory.check(force_report=force_report)
        except Exception:  # accounting must never take the model down
            traceback.print_exc()
            return
        for event in events:  # the server logs and counts trims
            self.send(event)


def _keep_leading_space(detokenizer: Any) -> None:
    """A bare prompt's answer continues its text, so its leading space is part of it; mlx-lm's
    detokenizers drop it (right for a chat answer, whose template ends its turn)."""
    if hasattr(detokenizer, "trim_space"):  # SentencePiece's
        detokenizer.trim_space = False
    elif callable(getattr(detokenizer, "_maybe_trim_space", None)):  # byte-level BPE's
        detokenizer._maybe_trim_space = lambda text: text


def _vocab_size(config: dict[str, Any], tokenizer: Any) -> int:
    """The width of the model's logits: its config's vocabulary (which may be padded past the
    tokenizer's), else the tokenizer's."""
    for source in (config, config.get("text_config") or {}):
        size = source.get("vocab_size")
        if isinstance(size, int) and size > 0:
            return max(size, len(tokenizer.get_vocab()))
    return len(tokenizer.get_vocab())


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates read it: content text (never None), and a call's arguments
    as a mapping (Hugging Face templates write them out with `tojson`)."""
    out = {**message, "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {**call, "function": {**call["function"],
                                  "arguments": _arguments(call["function"]["arguments"])}}
            for call in message["tool_calls"]]
    return out


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _describe_tools(tools: list[dict[str, Any]]) -> str:
    """The tools, for a model whose chat template cannot show them: one line each, short (a
    small model's context is short too; the grammar enforces the arguments anyway)."""
    lines = ['Call a function as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.']
    for tool in tools:
        function = tool.get("function", {})
        names = ", ".join((function.get("parameters") or {}).get("properties") or {})
        description = function.get("description")
        lines.append(f"{function.get('name')}({names})"
                     f"{': ' + description if description else ''}")
    return "\n".join(lines)


def max_token_bytes(tokenizer: Any) -> int:
    """At least the most UTF-8 bytes of prompt one token stands for, so that a prompt of B bytes
    is at least B / this tokens. Vocabulary pieces are counted as spelled, which only ever
    overstates (a byte-level piece spells a byte as one 1- or 2-byte character, a byte-fallback
    piece as "<0xNN>"), so the bound stays a lower bound."""
    try:
        vocabulary = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary to read: no bound (1 byte a token)
        traceback.print_exc()
        return 1
    return max((len(piece.encode("utf-8", "surrogatepass")) for piece in vocabulary), default=1)


def _protocol_stream() -> IO[bytes]:
    """Keeps the real stdout for events and sends everything else written to fd 1 to stderr."""
    events = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def _at_least_one(value: str) -> int:
    size = int(value)
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return size


def _non_negative(value: str) -> int:
    size = int(value)
    if size < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_jupyter.engine.worker")
    parser.add_argument("model_path")
    parser.add_argument("--max-batch-size", type=_at_least_one, default=DEFAULT_MAX_BATCH_SIZE,
                        help="most requests generated at once (default %(default)s)")
    parser.add_argument("--prompt-cache-bytes", type=_non_negative,
                        default=DEFAULT_PROMPT_CACHE_BYTES,
                        help="most bytes of KV state kept for reuse by later prompts; 0 turns "
                             "the prompt cache off (default %(default)s)")
    parser.add_argument("--kv-reserve-tokens", type=_at_least_one,
                        default=DEFAULT_KV_RESERVE_TOKENS,
                        help="KV positions reserved per batch slot; the batch holds at most "
                             "max-batch-size times this (default %(default)s)")
    parser.add_argument("--memory-limit-bytes", type=_non_negative, default=0,
                        help="live memory past which the prompt cache is trimmed; 0: no "
                             "limit (default %(default)s)")
    parser.add_argument("--mlx-cache-limit-bytes", type=_non_negative, default=None,
                        help="most bytes of freed buffers MLX keeps for reuse (default: "
                             "MLX's own limit)")
    parser.add_argument("--heartbeat-interval", type=float, default=0.0,
                        help="seconds between two heartbeats; 0: none (default %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    worker = Worker(args.model_path, _protocol_stream(), max_batch_size=args.max_batch_size,
                    prompt_cache_bytes=args.prompt_cache_bytes,
                    kv_reserve_tokens=args.kv_reserve_tokens,
                    memory_limit_bytes=args.memory_limit_bytes,
                    mlx_cache_limit_bytes=args.mlx_cache_limit_bytes)
    threading.Thread(target=worker.read_commands, args=(sys.stdin.buffer,),
                     name="commands", daemon=True).start()
    try:
        worker.load()
    except Exception as exc:
        traceback.print_exc()
        worker.send(FatalEvent(event="fatal", message=f"{type(exc).__name__}: {exc}"))
        return 1
    if args.heartbeat_interval > 0:
        threading.Thread(target=worker.beat, args=(args.heartbeat_interval,),
                         name="heartbeat", daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
