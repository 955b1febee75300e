"""One request's life: its turn, its model's worker, its events, its end.

A `Generation` waits for admission (its `Ticket`), takes its model's worker (`Workers`: the model
manager), turns the worker's messages into the answer's events (`contracts.generation`) and ends
exactly once, however it ends: it then gives its model back and tells the queue (`Lifecycle`)
its `Outcome`, which the queue records and counts. The figures of the answer (`Timings`) are
computed here, once, and are the ones the history stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ..contracts.generation import (
    Choice,
    ChoiceEnd,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    GenerationAnswer,
    LogprobsEvent,
    OutputEvent,
    ReasoningEvent,
    TextEvent,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
    Usage,
)
from ..engine.context import certain_refusal, prompt_field
from ..engine.grammar.constraints import model_refusal
from ..engine.protocol import DoneMessage, GenerationParams, TextMessage, WorkerTimings
from ..engine.proxy import WorkerProxy
from ..errors import InvalidRequest, MlxJupyterError, PromptTooLong
from ..limits import RECORD_WAIT_SECONDS
from ..store.records import RequestStatus, utcnow
from .admission import Ticket

log = logging.getLogger("mlx_jupyter.queue")

STATUS_OF: dict[str, RequestStatus] = {
    "stop": RequestStatus.COMPLETED, "length": RequestStatus.COMPLETED,
    "tool_calls": RequestStatus.COMPLETED,
    "cancelled": RequestStatus.CANCELLED, "timeout": RequestStatus.FAILED,
    "error": RequestStatus.FAILED}
TIMEOUT_ERROR = "the request's timeout passed before it finished"
NO_TOKENS = Usage(prompt_tokens=0, completion_tokens=0)


class Workers(Protocol):
    """Where a generation gets its model's worker (the model manager)."""

    async def acquire(self, model: str) -> WorkerProxy: ...

    def release(self, model: str) -> None: ...


class Lifecycle(Protocol):
    """What a generation tells the queue that runs it."""

    def withdraw(self, generation: Generation) -> bool:
        """Takes a waiting generation out of line; False once it was admitted."""

    def started(self, generation: Generation) -> None:
        """It was admitted and now takes its model."""

    def ended(self, generation: Generation, outcome: Outcome) -> None:
        """It ended (once): its place goes to the next, its outcome is recorded."""


@dataclass(frozen=True)
class Outcome:
    """How a request ended, as its history records it."""

    status: RequestStatus
    finish_reason: FinishReason
    text: str
    timings: Timings
    usage: Usage | None = None  # None when no worker answered for it
    error: str | None = None
    fault: str | None = None  # the fault kind it counts as (its error's), if any

    def columns(self) -> dict[str, Any]:
        """Its columns in the `requests` table."""
        return {"status": self.status, "finish_reason": self.finish_reason,
                "error": self.error, "output_text": self.text, "finished_at": utcnow(),
                "prompt_tokens": self.usage.prompt_tokens if self.usage else None,
                "completion_tokens": self.usage.completion_tokens if self.usage else None,
                **self.timings.model_dump()}


def check_request_fits(worker: WorkerProxy, params: GenerationParams) -> None:
    """Refuses, before it reaches the worker, a request the model this worker loaded cannot
    run: a prompt that certainly cannot fit its context (PromptTooLong; the worker refuses one
    that does not fit once tokenized), tools it cannot handle (InvalidRequest)."""
    if refusal := certain_refusal(params, worker.context_tokens, worker.max_token_bytes):
        raise PromptTooLong(refusal, param=prompt_field(params))
    if refusal := model_refusal(params, worker.tool_parser):
        raise InvalidRequest(f"model {worker.model_name!r}: {refusal}", param="tool_choice")
    vocabulary = worker.vocab_size
    if vocabulary and any(int(token) >= vocabulary for token in params["logit_bias"]):
        raise InvalidRequest(f"logit_bias: model {worker.model_name!r} has token ids below "
                             f"{vocabulary}", param="logit_bias")


class _Answer:
    """One answer (of n) as it arrives: its text, thinking, tool calls, log-probabilities."""

    def __init__(self, index: int, logprobs: bool):
        self.index = index
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None

    def take(self, message: TextMessage) -> OutputEvent:
        """Records a piece of output; its event."""
        if "text" in message:
            self.text.append(message["text"])
            return TextEvent(text=message["text"], index=self.index)
        if "reasoning" in message:
            self.reasoning.append(message["reasoning"])
            return ReasoningEvent(reasoning=message["reasoning"], index=self.index)
        if "tool_call" in message:
            call = ToolCall.model_validate(message["tool_call"])
            self.tool_calls.append(call)
            return ToolCallEvent(tool_call=call, index=self.index)
        entries = [TokenLogprob.model_validate(entry) for entry in message["logprobs"]]
        if self.logprobs is not None:
            self.logprobs.extend(entries)
        return LogprobsEvent(logprobs=entries, index=self.index)

    def ending(self, worker_ending: str, schema: dict[str, Any] | None, max_tokens: int
               ) -> ChoiceEnd:
        """How it ended: "tool_calls" for an answer that called tools; with a schema, its JSON
        value, checked against it."""
        finish = worker_ending
        if self.tool_calls and worker_ending == "stop":
            finish = "tool_calls"
        parsed, error = None, None
        if schema is not None:
            parsed, error = parse_answer("".join(self.text), schema, worker_ending, max_tokens)
        return ChoiceEnd(index=self.index, finish_reason=finish, parsed=parsed,
                         parse_error=error)

    def choice(self, end: ChoiceEnd) -> Choice:
        return Choice(index=self.index, text="".join(self.text),
                      reasoning="".join(self.reasoning) if self.reasoning else None,
                      tool_calls=self.tool_calls, logprobs=self.logprobs, parsed=end.parsed,
                      parse_error=end.parse_error, finish_reason=end.finish_reason)

    def stored_text(self) -> str:
        """What the history keeps as its output: its text, or its calls where it has none."""
        text = "".join(self.text)
        if self.tool_calls and not text:
            return json.dumps([call.model_dump() for call in self.tool_calls])
        return text


def parse_answer(text: str, schema: dict[str, Any], ending: str, max_tokens: int
                 ) -> tuple[Any, str | None]:
    """(the answer's JSON value, None), or (None, why it is none) for an answer that is no
    valid JSON for its schema: one cut by max_tokens, or cancelled, before its grammar ended."""
    import jsonschema

    try:
        value = json.loads(text)
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
        return value, None
    except (ValueError, jsonschema.ValidationError) as exc:
        if ending == "length":
            return None, (f"max_tokens ({max_tokens}) cut the answer before its JSON was "
                          f"complete: raise max_tokens")
        if ending == "cancelled":
            return None, "the answer was cancelled before its JSON was complete"
        detail = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
        return None, f"the answer is no valid JSON for the schema: {detail}"


class Generation:
    """One submitted request: wait for `start()`, then read `events()` or `result()`."""

    def __init__(self, ticket: Ticket, params: GenerationParams, *, workers: Workers,
                 lifecycle: Lifecycle, background: bool = False,
                 recorded: asyncio.Future[None] | None = None):
        """recorded: the write of the request's row, if it may still be under way."""
        self.ticket = ticket
        self._recorded = recorded
        self.params = params  # resolved by the queue: defaults applied, seed picked
        self.background = background  # it outlives its client
        self._workers = workers
        self._lifecycle = lifecycle
        self._worker: WorkerProxy | None = None
        self._first_text: float | None = None  # perf_counter
        self._clipped_to: int | None = None  # max_tokens, when the model's context cut it
        self._outcome: Outcome | None = None  # once it ended
        self._deadline: asyncio.TimerHandle | None = None  # the per-request timeout, if any
        self._expiry: asyncio.Task[str] | None = None
        self._timed_out = False
        self._cancel_requested = False
        self._cancel_reason: str | None = None  # why the server cancelled it, if it did
        # Its worker's messages, once start() has handed it to its worker, and the task that
        # reads the first of them (it runs while the request's row is being written).
        self._messages: AsyncIterator[TextMessage | DoneMessage] | None = None
        self._first: asyncio.Future[TextMessage | DoneMessage] | None = None
        self._closing: asyncio.Future[None] | None = None  # abandon()'s, kept until it is done
        self._answers = [_Answer(index, params["logprobs"] is not None)
                         for index in range(params["n"])]
        self._ends: list[ChoiceEnd] | None = None  # how each answer ended, once they did

    @property
    def id(self) -> str:
        return self.ticket.id

    @property
    def model(self) -> str:
        return self.ticket.model

    @property
    def priority(self) -> int:
        return self.ticket.priority

    @property
    def seed(self) -> int | None:
        return self.params["seed"]

    @property
    def state(self) -> str:
        if self._outcome is not None:
            return "finished"
        return "active" if self.ticket.admitted.done() else "queued"

    async def start(self) -> None:
        """Waits for admission, then for the model (loading it if needed), then hands the
        request to its worker and waits for the request's row to be written (its prompt is
        processed meanwhile): what the client is told next (headers with its id) names a
        request a crash cannot lose. Raises a domain error (ModelDoesNotFit, WorkerError, ...)
        before any output exists; the request has then ended as failed."""
        if not await self.ticket.admitted:
            return  # withdrawn while it waited: events() reports it
        self._lifecycle.started(self)
        try:
            self._worker = await self._workers.acquire(self.model)
        except Exception as exc:  # any: a request that never got its model still ends
            self._end(self._outcome_now("error", error=str(exc) or type(exc).__name__),
                      model_acquired=False)
            raise
        try:
            check_request_fits(self._worker, self.params)
        except (PromptTooLong, InvalidRequest) as exc:
            self._end(self._outcome_now("error", error=str(exc), fault=exc.fault))
            raise
        if self._cancel_requested:
            return  # cancelled while its model loaded: events() reports it
        self._messages = self._worker.generate(self.id, self.params)
        self._first = asyncio.ensure_future(anext(self._messages))  # sends the command
        await self._wait_for_record()

    async def _wait_for_record(self) -> None:
        """Usually written already: the write ran while the request waited for its turn. A
        write that failed was logged where it failed; one still under way past
        RECORD_WAIT_SECONDS (a database not answering) lands later."""
        if self._recorded is None or self._recorded.done():
            return
        await asyncio.wait([self._recorded], timeout=RECORD_WAIT_SECONDS)
        if not self._recorded.done():
            log.info("request %s answers before its row is written: the database has not "
                     "taken it within %g s", self.id, RECORD_WAIT_SECONDS)

    async def events(self) -> AsyncIterator[OutputEvent | DoneEvent]:
        """Yields output events (text, and thinking, tool calls, log-probabilities where the
        request has them; each with its answer's index), then one DoneEvent.

        Closing this iterator early cancels the request in the worker. A request its worker
        refuses (RequestDoesNotFit: it cannot hold its KV cache) raises before any event; one
        that fails raises (a domain error) after the events so far.
        """
        if self._messages is None:
            # Never handed to its worker: withdrawn, or cancelled while its model loaded.
            self.abandon()
        if self._outcome is not None:
            yield self._done_event(self._outcome)
            return
        assert self._messages is not None and self._first is not None
        first = self._answers[0]
        outcome: Outcome | None = None
        try:
            message = await self._first
            while "done" not in message:
                if self._first_text is None and "logprobs" not in message:
                    self._first_text = time.perf_counter()
                yield self._answers[message.get("index", 0)].take(message)
                message = await anext(self._messages)
            done = cast(DoneMessage, message)
            if done["max_tokens"] < self.params["max_tokens"]:
                self._clipped_to = done["max_tokens"]
            self._ends = self._answer_ends(done)
            outcome = self._outcome_now(
                self._ends[0].finish_reason, text=first.stored_text(),
                usage=Usage(**done["usage"]), worker=done["timings"])
            yield self._done_event(outcome)
        except MlxJupyterError as exc:
            outcome = self._outcome_now("error", text=first.stored_text(), error=str(exc),
                                        fault=exc.fault)
            raise
        finally:
            await self._close_messages()
            # Closed before the end: the client went away, and the worker was told.
            self._end(outcome or self._outcome_now("cancelled", text=first.stored_text()))

    def _answer_ends(self, done: DoneMessage) -> list[ChoiceEnd]:
        constraint = self.params["constraint"]
        schema = constraint["schema"] if constraint and constraint["kind"] == "json" else None
        endings = {end["index"]: end["finish_reason"] for end in done.get("choices") or ()}
        return [answer.ending(endings.get(answer.index, done["finish_reason"]), schema,
                              done["max_tokens"])
                for answer in self._answers]

    async def _close_messages(self) -> None:
        """Stops reading the worker's messages; one still running is cancelled there."""
        if self._first is not None and not self._first.done():
            self._first.cancel()
            await asyncio.gather(self._first, return_exceptions=True)
        if self._messages is not None:
            await self._messages.aclose()

    async def result(self) -> GenerationAnswer:
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if isinstance(event, DoneEvent):
                    done = event
        ends = self._ends or [ChoiceEnd(index=answer.index, finish_reason=done.finish_reason)
                              for answer in self._answers]
        choices = [answer.choice(end) for answer, end in zip(self._answers, ends)]
        first = choices[0].model_dump(exclude={"index", "finish_reason"})
        return GenerationAnswer(
            **first, request_id=self.id, model=self.model, finish_reason=done.finish_reason,
            usage=done.usage, timings=done.timings, seed=done.seed,
            max_tokens_clipped_to=done.max_tokens_clipped_to,
            choices=choices if len(choices) > 1 else None)

    def abandon(self) -> None:
        """Ends as cancelled a request whose events will not be read (its client went away
        before the first); it gives its model back, and its worker forgets it."""
        if self._outcome is None:
            if self._messages is not None:
                self._closing = asyncio.ensure_future(self._close_messages())
            self._end(self._outcome_now("cancelled"), model_acquired=self._worker is not None)

    def failed(self, exc: MlxJupyterError) -> ErrorEvent:
        """The last event of a stream that `events()` ended with this error."""
        return ErrorEvent(request_id=self.id, model=self.model, error=str(exc))

    async def cancel(self, reason: str | None = None) -> str:
        """Cancels the request: a waiting one leaves the queue at once, a running one stops at
        its worker's next decode step. `reason`: why, when the server cancels it (its history
        keeps it as the error). Returns the state it was in."""
        state = self.state
        if reason and self._cancel_reason is None:
            self._cancel_reason = reason
        if state == "queued" and self._lifecycle.withdraw(self):
            self._end(self._outcome_now("cancelled"), model_acquired=False)
        elif state != "finished":
            self._cancel_requested = True  # seen by events() if the model is still loading
            if self._worker is not None:
                await self._worker.cancel(self.id)
        return state

    def set_timeout(self, seconds: float) -> None:
        """Cancels the request, queued or running, once `seconds` have passed since submit."""
        def expire() -> None:
            self._timed_out = True
            log.info("request %s timed out after %g s", self.id, seconds)
            self._expiry = asyncio.ensure_future(self.cancel())

        self._deadline = asyncio.get_running_loop().call_later(seconds, expire)

    # -- the end --------------------------------------------------------------------------

    def _outcome_now(self, finish_reason: FinishReason, *, text: str = "",
                     usage: Usage | None = None, worker: WorkerTimings | None = None,
                     error: str | None = None, fault: str | None = None) -> Outcome:
        """The outcome of a request ending now, with its figures."""
        if finish_reason == "cancelled" and self._timed_out:
            finish_reason, error = "timeout", TIMEOUT_ERROR
        elif finish_reason == "cancelled" and self._cancel_reason:
            error = self._cancel_reason
        submitted, admitted_at = self.ticket.submitted, self.ticket.admitted_at
        worker = worker or {}
        timings = Timings(
            queue_ms=None if admitted_at is None else round((admitted_at - submitted) * 1000, 3),
            ttft_ms=(None if self._first_text is None
                     else round((self._first_text - submitted) * 1000, 1)),
            total_ms=round((time.perf_counter() - submitted) * 1000, 1),
            tokens_per_second=worker.get("tokens_per_second"),
            prompt_tokens_per_second=worker.get("prompt_tokens_per_second"))
        return Outcome(STATUS_OF[finish_reason], finish_reason, text, timings, usage, error,
                       fault)

    def _done_event(self, outcome: Outcome) -> DoneEvent:
        first = self._ends[0] if self._ends else None
        return DoneEvent(request_id=self.id, model=self.model,
                         finish_reason=outcome.finish_reason,
                         usage=outcome.usage or NO_TOKENS, timings=outcome.timings,
                         seed=self.seed, max_tokens_clipped_to=self._clipped_to,
                         parsed=first.parsed if first else None,
                         parse_error=first.parse_error if first else None,
                         choices=self._ends if self._ends and len(self._ends) > 1 else None)

    def _end(self, outcome: Outcome, *, model_acquired: bool = True) -> None:
        """Once per request: gives its model back and tells the queue how it ended."""
        if self._outcome is not None:
            return
        self._outcome = outcome
        if self._deadline is not None:
            self._deadline.cancel()
        if model_acquired:
            self._workers.release(self.model)
        log.log(logging.WARNING if outcome.fault else logging.INFO,
                "request %s on %s: %s, %s tokens, %.0f ms%s", self.id, self.model,
                outcome.finish_reason, outcome.usage.completion_tokens if outcome.usage else 0,
                outcome.timings.total_ms, f": {outcome.error}" if outcome.error else "")
        self._lifecycle.ended(self, outcome)
