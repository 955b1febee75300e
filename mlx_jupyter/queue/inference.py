"""The way in for every generation: parameters resolved, admission, history, cancellation.

`submit` is the one place where a request's parameters are resolved: a model or sampling field
left out takes its stored setting (default_model, default_max_tokens, default_temperature,
default_top_p), and a sampled request without a seed gets one picked here (0 to MAX_SEED); a
greedy one (temperature 0) has none. The worker gets them as they are resolved, the history
records them, and the answer reports the seed.

Every request is recorded in the store from the moment it is submitted until it ends, however it
ends: `Admission` decides when it runs, its `Generation` lives its life and tells this queue
(its `Lifecycle`) when it starts and how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine
from typing import Any

from ..engine.grammar.constraints import for_request
from ..engine.protocol import PARAM_DEFAULTS, GenerationParams
from ..errors import InvalidRequest, MlxJupyterError, PromptTooLong, RequestDoesNotFit
from ..limits import DEFAULT_MAX_BATCH_SIZE, MAX_SEED
from ..metrics import Metrics
from ..models.manager import ModelManager
from ..services import StoreService
from ..store.records import RequestRecord, RequestStatus, utcnow
from .admission import Admission, Ticket
from .generation import Generation, Outcome, check_request_fits

log = logging.getLogger("mlx_jupyter.queue")

# Request fields that take a stored setting's value when the client leaves them out.
SETTING_DEFAULTS = {"model": "default_model", "max_tokens": "default_max_tokens",
                    "temperature": "default_temperature", "top_p": "default_top_p"}


class QueueFull(MlxJupyterError):
    status = 429

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the inference queue is full ({limit} requests waiting); "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


class RequestFinished(MlxJupyterError):
    status = 409


def with_seed(params: GenerationParams) -> GenerationParams:
    """A sampled request keeps its seed or gets one; a greedy one samples nothing, so has
    none."""
    if params["temperature"] <= 0:
        return {**params, "seed": None}
    if params["seed"] is None:
        return {**params, "seed": random.randint(0, MAX_SEED)}
    return params


def generation_params(fields: dict[str, Any]) -> GenerationParams:
    """What a worker generates with, from a request's fields once every default is applied
    (a new request's, or a background job's stored parameters, which hold the constraint as
    resolved here; a field an older version did not store takes its neutral value)."""
    fields = {**PARAM_DEFAULTS, **fields}
    if "schema" in fields or "tool_choice" in fields:  # a new request's: resolve its tools
        fields["constraint"], fields["parse_tool_calls"], fields["tools"] = for_request(
            schema=fields.get("schema"), tools=fields.get("tools"),
            tool_choice=fields.get("tool_choice"),
            parallel_tool_calls=fields.get("parallel_tool_calls", True))
    return with_seed(GenerationParams(
        prompt=fields.get("prompt"), messages=fields.get("messages"),
        max_tokens=int(fields["max_tokens"]), temperature=float(fields["temperature"]),
        top_p=float(fields["top_p"]), seed=fields.get("seed"),
        stop=list(fields.get("stop") or []),
        **{key: fields[key] for key in PARAM_DEFAULTS}))


class InferenceQueue:
    def __init__(self, manager: ModelManager, store: StoreService, *,
                 max_active_per_model: int = DEFAULT_MAX_BATCH_SIZE, max_queued: int = 256,
                 aging_seconds: float = 30.0, metrics: Metrics | None = None):
        """max_active_per_model: the requests a model's worker holds at once (the server's
        max_batch_size: its queue is what caps a worker's batch)."""
        self.manager = manager
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_queued = max_queued
        self.admission = Admission(max_active_per_model=max_active_per_model,
                                   aging_seconds=aging_seconds, on_admit=self._count_admission)
        self._by_id: dict[str, Generation] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._arriving = 0  # submits past the queue's check, not queued yet

    async def submit(self, params: dict[str, Any], *, notebook: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     background: bool = False) -> Generation:
        """Records and enqueues a request; `start()` on the result waits for its turn. A
        background request runs by itself (its result is read from the history later) and
        is run again after a server restart if it had not finished.

        `params` holds model, prompt or messages and the sampling fields as the client gave
        them (None: left out). Raises ModelNotFound for an unknown model and QueueFull when
        `max_queued` requests already wait.
        """
        # Requests still on their way in (awaiting their defaults or their record) count
        # too: else requests arriving together would all pass the check before any is queued.
        if self.admission.queued_count() + self._arriving >= self.max_queued:
            raise QueueFull(self.max_queued, self.admission.retry_after())
        self._arriving += 1
        try:
            return await self._submit(params, notebook=notebook, priority=priority,
                                      timeout=timeout, background=background)
        finally:
            self._arriving -= 1

    async def _submit(self, params: dict[str, Any], *, notebook: str | None, priority: int,
                      timeout: float | None, background: bool) -> Generation:
        submitted = time.perf_counter()  # the request's clock starts before its defaults
        fields = await self._with_defaults(params)
        model = fields["model"]
        await self.store.ready()  # the remembered models are registered again by then
        self.manager.registry.get(model)  # an unknown model is refused before it is recorded
        generation_fields = generation_params(fields)
        # Refused before it is recorded, stream or not; the prompt's part is the worker's to
        # check once it has tokenized it.
        if refusal := self.manager.kv_refusal(0, generation_fields["max_tokens"]):
            raise RequestDoesNotFit(refusal, param="max_tokens")
        if (n := generation_fields["n"]) > self.admission.max_active_per_model:
            raise InvalidRequest(
                f"n {n} needs {n} batch slots, and this server's models hold "
                f"{self.admission.max_active_per_model} (c.MlxApp.max_batch_size)", param="n")
        if (worker := self.manager.loaded_worker(model)) is not None:
            try:  # else once its model is loaded (Generation.start)
                check_request_fits(worker, generation_fields)
            except PromptTooLong as exc:
                self.metrics.fault(exc.fault)
                raise
        record = RequestRecord(
            model=model, notebook=notebook, priority=priority, status=RequestStatus.QUEUED,
            prompt=generation_fields["prompt"], messages=generation_fields["messages"],
            parameters={**_parameters(generation_fields),
                        **({"background": True, "timeout": timeout} if background else {})})
        # A background job's record must be durable before the client is told it is queued
        # (a 503 while the database does not take it); an interactive one is written behind.
        recorded = self.store.add_request(record, durable=background)
        if background:
            await recorded
        ticket = Ticket(record.id, model, priority, submitted=submitted,
                        slots=generation_fields["n"])
        # Its answer names it only once its row is written (Generation.start), unless the
        # database is known not to answer: the row then lands when it is back.
        if self.store.state().state == "unavailable":
            recorded = None
        return self._enqueue(Generation(ticket, generation_fields, workers=self.manager,
                                        lifecycle=self, background=background,
                                        recorded=recorded), timeout)

    def resume(self, jobs: list[dict[str, Any]]) -> None:
        """Runs again the background jobs a previous server process left unfinished (rows of
        the store's `recover_unfinished`), with the parameters they were recorded with."""
        for job in jobs:
            stored = job["parameters"] or {}
            try:
                params = generation_params({**stored, "prompt": job["prompt"],
                                            "messages": job["messages"]})
            except (KeyError, TypeError, ValueError) as exc:
                # A row this version cannot read (written by another, or by hand) fails
                # alone; the other jobs still run.
                error = f"its stored parameters cannot be run again ({type(exc).__name__}: {exc})"
                log.warning("background request %s not resumed: %s", job["id"], error)
                self.store.update_request(job["id"], status=RequestStatus.FAILED,
                                          finish_reason="error", error=error,
                                          finished_at=utcnow())
                continue
            ticket = Ticket(job["id"], job["model"], job["priority"],
                            slots=min(params["n"], self.admission.max_active_per_model))
            self._enqueue(Generation(ticket, params, workers=self.manager, lifecycle=self,
                                     background=True), stored.get("timeout"))

    def _enqueue(self, generation: Generation, timeout: float | None) -> Generation:
        if timeout is not None:
            generation.set_timeout(timeout)
        self._by_id[generation.id] = generation
        self.admission.enqueue(generation.ticket)
        if generation.background:
            self.spawn(self._run_in_background(generation))
        return generation

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

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Runs a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _with_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        missing = [key for key in SETTING_DEFAULTS if params.get(key) is None]
        if not missing:
            return params
        settings = await self.store.setting_values()
        return {**params, **{key: settings[SETTING_DEFAULTS[key]] for key in missing}}

    # -- what a generation tells the queue (generation.Lifecycle) ---------------------------

    def withdraw(self, generation: Generation) -> bool:
        return self.admission.withdraw(generation.ticket)

    def started(self, generation: Generation) -> None:
        self.store.update_request(generation.id, status=RequestStatus.RUNNING,
                                  started_at=utcnow())

    def ended(self, generation: Generation, outcome: Outcome) -> None:
        self._by_id.pop(generation.id, None)
        self.admission.finished(generation.ticket)
        if outcome.fault:
            self.metrics.fault(outcome.fault)
        timings = outcome.timings
        self.metrics.request_ended(
            generation.model, str(outcome.status), duration_seconds=timings.total_ms / 1000,
            ttft_seconds=None if timings.ttft_ms is None else timings.ttft_ms / 1000,
            usage=outcome.usage.model_dump() if outcome.usage else None)
        # Written behind: the answer is out; its history must not delay it (a failed write is
        # logged by the store service).
        self.store.update_request(generation.id, **outcome.columns())

    def _count_admission(self, ticket: Ticket) -> None:
        self.metrics.request_admitted(ticket.model, ticket.waited_seconds())

    # -- status ---------------------------------------------------------------------------

    def queued_count(self) -> int:
        return self.admission.queued_count()

    def counts_by_priority(self) -> dict[str, Any]:
        return self.admission.counts_by_priority()

    def get_queue_status(self, model: str) -> dict[str, int]:
        return self.admission.model_counts(model)

    def summary(self) -> dict[str, Any]:
        return self.admission.summary()

    def snapshot(self) -> dict[str, Any]:
        return {**self.admission.snapshot(), "max_queued": self.max_queued}


def _parameters(params: GenerationParams) -> dict[str, Any]:
    """What the history records as a request's parameters: all it generates with but its
    prompt or messages, which have their own columns."""
    return {key: value for key, value in params.items() if key not in ("prompt", "messages")}
