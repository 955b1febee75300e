"""The way in for every generation: defaults, priority admission, history, cancellation.

Every request is recorded in the store from the moment it is submitted until it ends, however
it ends. Each model admits up to `max_active_per_model` requests to its worker at a time; the
rest wait here, highest priority first, first come first served within a priority, with aging
(a request gains one priority level for every `aging_seconds` it waits) so that a low priority
never starves. Dispatch is event-driven: a submit, a finish or a cancel admits the next
request at once; nothing polls. Status answers come from in-memory counters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .engine.proxy import WorkerProxy
from .errors import InvalidRequest, MlxJupyterError
from .metrics import Metrics
from .models.manager import ModelManager
from .services import StoreService
from .store import RequestRecord, RequestStatus, utcnow

log = logging.getLogger(__name__)

# Request fields that fall back to a stored setting when the client leaves them out.
SETTING_DEFAULTS = {"max_tokens": "default_max_tokens", "temperature": "default_temperature",
                    "top_p": "default_top_p"}

FINAL_STATUS = {"stop": RequestStatus.COMPLETED, "length": RequestStatus.COMPLETED,
                "cancelled": RequestStatus.CANCELLED, "timeout": RequestStatus.FAILED}


class QueueFull(MlxJupyterError):
    status = 429

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the inference queue is full ({limit} requests waiting); "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


class RequestFinished(MlxJupyterError):
    status = 409


@dataclass
class Generation:
    """One submitted request: wait for `start()`, then read `events()` or `result()`."""

    id: str
    model: str
    priority: int
    _queue: InferenceQueue
    _params: dict[str, Any]
    _submitted: float = field(default_factory=time.perf_counter)  # also the aging clock
    _seq: int = 0
    _admitted: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    _admitted_at: float | None = None
    _worker: WorkerProxy | None = None
    _first_text: float | None = None
    _usage: dict[str, int] | None = None  # the worker's count, once it answered
    _finished: bool = False
    _deadline: asyncio.TimerHandle | None = None  # the per-request timeout, if any
    _timed_out: bool = False
    _cancel_requested: bool = False
    background: bool = False

    @property
    def state(self) -> str:
        if self._finished:
            return "finished"
        return "active" if self._admitted.done() else "queued"

    def effective_priority(self, now: float, aging_seconds: float) -> float:
        return self.priority + (now - self._submitted) / aging_seconds

    async def start(self) -> None:
        """Waits for admission, then for the model (loading it if needed). Raises a domain
        error (ModelDoesNotFit, WorkerError, ...) before any output exists."""
        if not await self._admitted:
            return  # cancelled while it waited: events() reports it
        self._queue.store.update_request(self.id, status=RequestStatus.RUNNING,
                                         started_at=utcnow())
        try:
            self._worker = await self._queue.manager.acquire(self.model)
        except MlxJupyterError as exc:
            self._end({"status": RequestStatus.FAILED, "finish_reason": "error",
                       "error": str(exc)}, "", model_acquired=False)
            raise

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yields {"text": ...} events, then one {"done": True, ...} event.

        Closing this iterator early cancels the request in the worker. A request its worker
        refuses (InvalidRequest: it cannot hold its KV cache) raises before any event.
        """
        if self._worker is None or self._cancel_requested:  # cancelled before it started
            yield self._done_event(self._reason("cancelled"),
                                   {"prompt_tokens": 0, "completion_tokens": 0}, {})
            self._end(self._cancelled_outcome(), "",
                      model_acquired=self._worker is not None)
            return
        worker_events = self._worker.generate(self.id, self._params)
        pieces: list[str] = []
        outcome: dict[str, Any] = {"status": RequestStatus.CANCELLED}  # closed before the end
        try:
            async for event in worker_events:
                if event["event"] == "text":
                    if self._first_text is None:
                        self._first_text = time.perf_counter()
                    pieces.append(event["text"])
                    yield {"text": event["text"]}
                elif event["event"] == "done":
                    done = self._done_event(self._reason(event["finish_reason"]),
                                            event["usage"], event.get("worker_timings", {}))
                    outcome = {"status": FINAL_STATUS.get(done["finish_reason"],
                                                          RequestStatus.FAILED),
                               "finish_reason": done["finish_reason"],
                               "prompt_tokens": done["usage"]["prompt_tokens"],
                               "completion_tokens": done["usage"]["completion_tokens"],
                               "error": self._timeout_error()}
                    yield done
        except MlxJupyterError as exc:
            outcome = {"status": RequestStatus.FAILED, "finish_reason": "error",
                       "error": str(exc)}
            raise
        finally:
            await worker_events.aclose()
            self._end(outcome, "".join(pieces))

    async def result(self) -> dict[str, Any]:
        pieces: list[str] = []
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if "text" in event:
                    pieces.append(event["text"])
                else:
                    done = event
        return {"request_id": self.id, "model": self.model, "text": "".join(pieces),
                **{key: done[key] for key in ("finish_reason", "usage", "timings")}}

    async def cancel(self) -> str:
        """Cancels the request: a waiting one leaves the queue at once, a running one stops at
        its worker's next decode step. Returns the state it was in."""
        state = self.state
        if state == "queued":
            self._queue.withdraw(self)
            self._admitted.set_result(False)
            self._end(self._cancelled_outcome(), "", model_acquired=False)
        elif state == "active":
            self._cancel_requested = True  # seen by events() if the model is still loading
            if self._worker is not None:
                await self._worker.cancel(self.id)
        return state

    def set_timeout(self, seconds: float) -> None:
        """Cancels the request, queued or running, once `seconds` have passed since submit."""
        def expire() -> None:
            self._timed_out = True
            log.info("request %s timed out after %g s", self.id, seconds)
            self._queue.spawn(self.cancel())

        self._deadline = asyncio.get_running_loop().call_later(seconds, expire)

    def _cancelled_outcome(self) -> dict[str, Any]:
        reason = self._reason("cancelled")
        return {"status": FINAL_STATUS[reason], "finish_reason": reason,
                "error": self._timeout_error()}

    def _reason(self, finish_reason: str) -> str:
        return "timeout" if finish_reason == "cancelled" and self._timed_out else finish_reason

    def _timeout_error(self) -> str | None:
        if not self._timed_out or self._deadline is None:
            return None
        return "the request's timeout passed before it finished"

    def _ttft_ms(self) -> float | None:
        if self._first_text is None:
            return None
        return round((self._first_text - self._submitted) * 1000, 1)

    def _done_event(self, finish_reason: str, usage: dict[str, int],
                    worker_timings: dict[str, float]) -> dict[str, Any]:
        total_ms = round((time.perf_counter() - self._submitted) * 1000, 1)
        queue_ms = (None if self._admitted_at is None
                    else round((self._admitted_at - self._submitted) * 1000, 3))
        timings = {"queue_ms": queue_ms, "ttft_ms": self._ttft_ms() or total_ms,
                   "total_ms": total_ms,
                   "tokens_per_second": worker_timings.get("tokens_per_second", 0.0),
                   "prompt_tokens_per_second": worker_timings.get("prompt_tokens_per_second",
                                                                  0.0)}
        log.info("request %s on %s: %s, %s tokens, %.0f ms", self.id, self.model,
                 finish_reason, usage["completion_tokens"], total_ms)
        self._usage = usage
        return {"done": True, "request_id": self.id, "model": self.model,
                "finish_reason": finish_reason, "usage": usage, "timings": timings}

    def _end(self, outcome: dict[str, Any], text: str, *,
             model_acquired: bool = True) -> None:
        """Once per request: frees its place (and its model), admits the next, records and
        counts it."""
        if self._finished:
            return
        self._finished = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._queue.finished(self, model_acquired=model_acquired)
        ttft = None if self._first_text is None else self._first_text - self._submitted
        self._queue.metrics.request_ended(
            self.model, str(outcome["status"]), ttft_seconds=ttft, usage=self._usage,
            duration_seconds=time.perf_counter() - self._submitted)
        # Written behind: the answer is out; its history must not delay it (a failed write is
        # logged by the store service).
        self._queue.store.update_request(
            self.id, output_text=text, finished_at=utcnow(), ttft_ms=self._ttft_ms(), **outcome)


class InferenceQueue:
    def __init__(self, manager: ModelManager, store: StoreService, *,
                 max_active_per_model: int = 8, max_queued: int = 256,
                 aging_seconds: float = 30.0, metrics: Metrics | None = None):
        self.manager = manager
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_active_per_model = max_active_per_model
        self.max_queued = max_queued
        self.aging_seconds = aging_seconds
        self._waiting: dict[str, list[Generation]] = collections.defaultdict(list)
        self._active: dict[str, dict[str, Generation]] = collections.defaultdict(dict)
        self._by_id: dict[str, Generation] = {}
        self._seq = itertools.count()
        self._seconds_per_request: dict[str, float] = {}  # moving average, for ETAs
        self._tasks: set[asyncio.Task[Any]] = set()

    async def submit(self, params: dict[str, Any], *, notebook: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     background: bool = False) -> Generation:
        """Records and enqueues a request; `start()` on the result waits for its turn. A
        background request runs by itself (its result is read from the history later) and
        is run again after a server restart if it had not finished.

        `params` holds model, prompt or messages and the sampling fields; a missing model or
        sampling field takes the stored setting's value. Raises ModelNotFound for an unknown
        model and QueueFull when `max_queued` requests already wait.
        """
        submitted = time.perf_counter()
        if self.queued_count() >= self.max_queued:
            raise QueueFull(self.max_queued, self._retry_after())
        params = await self._with_defaults(params)
        model = params.pop("model")
        await self.store.ready()  # the remembered models are registered again by then
        self.manager.registry.get(model)  # an unknown model is refused before it is recorded
        # Refused before it is recorded, stream or not; the prompt's part is the worker's to
        # check once it has tokenized it.
        if refusal := self.manager.kv_refusal(0, params["max_tokens"]):
            raise InvalidRequest(refusal, param="max_tokens")
        record = RequestRecord(
            model=model, notebook=notebook, priority=priority, status=RequestStatus.QUEUED,
            prompt=params.get("prompt"), messages=params.get("messages"),
            parameters={**{k: v for k, v in params.items() if k not in ("prompt", "messages")},
                        **({"background": True, "timeout": timeout} if background else {})})
        recorded = self.store.add_request(record)
        if background:  # its record must be durable before the client is told it is queued
            await recorded
        generation = Generation(record.id, model, priority, self, params,
                                _submitted=submitted, _seq=next(self._seq))
        self._enqueue(generation, timeout, background)
        return generation

    def resume(self, jobs: list[dict[str, Any]]) -> None:
        """Runs again the background jobs a previous server process left unfinished (rows of
        the store's `recover_unfinished`)."""
        for job in jobs:
            parameters = dict(job["parameters"] or {})
            parameters.pop("background", None)
            timeout = parameters.pop("timeout", None)
            params = {"prompt": job["prompt"], "messages": job["messages"], **parameters}
            generation = Generation(job["id"], job["model"], job["priority"], self, params,
                                    _seq=next(self._seq))
            self._enqueue(generation, timeout, background=True)

    def _enqueue(self, generation: Generation, timeout: float | None,
                 background: bool) -> None:
        generation.background = background
        if timeout is not None:
            generation.set_timeout(timeout)
        self._by_id[generation.id] = generation
        self._waiting[generation.model].append(generation)
        self._dispatch(generation.model)
        if background:
            self.spawn(self._run_in_background(generation))

    @staticmethod
    async def _run_in_background(generation: Generation) -> None:
        try:
            await generation.start()
            await generation.result()
        except MlxJupyterError as exc:  # the generation recorded it as failed, with the error
            log.warning("background request %s failed: %s", generation.id, exc)

    async def cancel(self, request_id: str) -> dict[str, str]:
        generation = self._by_id.get(request_id)
        if generation is None:
            row = await self.store.get_request(request_id)  # RequestNotFound when unknown
            raise RequestFinished(f"request {request_id!r} is not running: it is "
                                  f"{row['status']}")
        was = await generation.cancel()
        return {"request_id": request_id, "was": was, "status": "cancelled"
                if was == "queued" else "cancelling"}

    def spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        """Runs a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- status ---------------------------------------------------------------------------

    def queued_count(self) -> int:
        return sum(len(waiting) for waiting in self._waiting.values())

    def counts_by_priority(self) -> dict[str, collections.Counter[tuple[str, int]]]:
        """Requests "queued" and "running", each counted per (model, priority)."""
        return {"queued": collections.Counter((g.model, g.priority)
                                              for waiting in self._waiting.values()
                                              for g in waiting),
                "running": collections.Counter((g.model, g.priority)
                                               for active in self._active.values()
                                               for g in active.values())}

    def get_queue_status(self, model: str) -> dict[str, int]:
        return {"queued_requests": len(self._waiting.get(model, ())),
                "active_requests": len(self._active.get(model, ()))}

    def summary(self) -> dict[str, Any]:
        """How many wait in all, and per model with requests the `get_queue_status` counts."""
        models = {model for model, waiting in self._waiting.items() if waiting}
        models |= {model for model, active in self._active.items() if active}
        return {"queued": self.queued_count(),
                "models": {model: self.get_queue_status(model) for model in sorted(models)}}

    def snapshot(self) -> dict[str, Any]:
        """Per model: active requests, and waiting ones in admission order with an ETA."""
        models = {}
        for model in sorted(set(self._waiting) | set(self._active)):
            active = list(self._active.get(model, {}).values())
            waiting = self._admission_order(model)
            if not active and not waiting:
                continue
            per_request = self._seconds_per_request.get(model)
            models[model] = {
                "active": [self._describe(g) for g in active],
                "queued": [{**self._describe(g), "position": i + 1,
                            "eta_seconds": round((i // self.max_active_per_model + 1)
                                                 * per_request, 1) if per_request else None}
                           for i, g in enumerate(waiting)]}
        return {"max_active_per_model": self.max_active_per_model,
                "max_queued": self.max_queued, "queued": self.queued_count(),
                "models": models}

    # -- dispatch -------------------------------------------------------------------------

    def withdraw(self, generation: Generation) -> None:
        waiting = self._waiting.get(generation.model, [])
        if generation in waiting:
            waiting.remove(generation)

    def finished(self, generation: Generation, *, model_acquired: bool) -> None:
        self._by_id.pop(generation.id, None)
        if self._active[generation.model].pop(generation.id, None) is not None:
            elapsed = time.perf_counter() - generation._admitted_at
            previous = self._seconds_per_request.get(generation.model, elapsed)
            self._seconds_per_request[generation.model] = 0.8 * previous + 0.2 * elapsed
        if model_acquired:
            self.manager.release(generation.model)
        self._dispatch(generation.model)

    def _dispatch(self, model: str) -> None:
        active = self._active[model]
        while len(active) < self.max_active_per_model and self._waiting[model]:
            chosen = self._admission_order(model)[0]
            self._waiting[model].remove(chosen)
            active[chosen.id] = chosen
            chosen._admitted_at = time.perf_counter()
            chosen._admitted.set_result(True)
            self.metrics.request_admitted(model, chosen._admitted_at - chosen._submitted)

    def _admission_order(self, model: str) -> list[Generation]:
        now = time.perf_counter()
        return sorted(self._waiting.get(model, ()),
                      key=lambda g: (-g.effective_priority(now, self.aging_seconds), g._seq))

    def _retry_after(self) -> int:
        known = list(self._seconds_per_request.values())
        return max(1, round(sum(known) / len(known))) if known else 5

    @staticmethod
    def _describe(generation: Generation) -> dict[str, Any]:
        return {"request_id": generation.id, "priority": generation.priority,
                "waited_seconds": round(time.perf_counter() - generation._submitted, 2)}

    async def _with_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        missing = [key for key in (*SETTING_DEFAULTS, "model") if params.get(key) is None]
        if not missing:
            return params
        settings = await self.store.setting_values()
        defaults = {key: settings[SETTING_DEFAULTS.get(key, "default_model")] for key in missing}
        return {**params, **defaults}
