"""The way in for every generation: defaults, a request id, a history record, a worker.

For now requests go straight to their model's worker, which runs them in arrival order;
priorities, admission, batching and back-pressure plug in here later. Every request is
recorded in the store from the moment it is submitted until it ends, however it ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .engine.proxy import WorkerProxy
from .errors import MlxJupyterError
from .models.manager import ModelManager
from .services import StoreService
from .store import RequestRecord, RequestStatus
from .store.schema import utcnow

log = logging.getLogger(__name__)

# Request fields that fall back to a stored setting when the client leaves them out.
SETTING_DEFAULTS = {"max_tokens": "default_max_tokens", "temperature": "default_temperature",
                    "top_p": "default_top_p"}

FINAL_STATUS = {"stop": RequestStatus.COMPLETED, "length": RequestStatus.COMPLETED,
                "cancelled": RequestStatus.CANCELLED}


@dataclass
class Generation:
    """One submitted request: its events as they come, and its final result."""

    id: str
    model: str
    _worker: WorkerProxy
    _params: dict[str, Any]
    _store: StoreService
    _release_model: Callable[[], None]  # tells the manager the request is done with it
    _submitted: float = field(default_factory=time.perf_counter)
    _first_text: float | None = None
    _released: bool = False

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yields {"text": ...} events, then one {"done": True, ...} event.

        Closing this iterator early cancels the request in the worker.
        """
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
                    done = self._done(event)
                    outcome = {"status": FINAL_STATUS.get(done["finish_reason"],
                                                          RequestStatus.FAILED),
                               "finish_reason": done["finish_reason"],
                               "prompt_tokens": done["usage"]["prompt_tokens"],
                               "completion_tokens": done["usage"]["completion_tokens"]}
                    yield done
        except MlxJupyterError as exc:
            outcome = {"status": RequestStatus.FAILED, "finish_reason": "error",
                       "error": str(exc)}
            raise
        finally:
            await worker_events.aclose()
            self.release()
            await self._record_end(outcome, "".join(pieces))

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

    def release(self) -> None:
        """Ends this request's use of its model (once): from then on the model may be evicted
        or unloaded when idle. Called when the events end; call it for a request whose events
        are never read."""
        if not self._released:
            self._released = True
            self._release_model()

    async def cancel(self) -> None:
        """Asks the worker to stop this request at its next decode step; events() then ends
        with finish_reason "cancelled"."""
        await self._worker.cancel(self.id)

    def _ttft_ms(self) -> float | None:
        if self._first_text is None:
            return None
        return round((self._first_text - self._submitted) * 1000, 1)

    def _done(self, event: dict[str, Any]) -> dict[str, Any]:
        total_ms = round((time.perf_counter() - self._submitted) * 1000, 1)
        worker_timings = event.get("worker_timings", {})
        timings = {"ttft_ms": self._ttft_ms() or total_ms, "total_ms": total_ms,
                   "tokens_per_second": worker_timings.get("tokens_per_second", 0.0),
                   "prompt_tokens_per_second": worker_timings.get("prompt_tokens_per_second",
                                                                  0.0)}
        log.info("request %s on %s: %s, %s tokens, %.0f ms", self.id, self.model,
                 event["finish_reason"], event["usage"]["completion_tokens"], total_ms)
        return {"done": True, "request_id": self.id, "finish_reason": event["finish_reason"],
                "usage": event["usage"], "timings": timings}

    async def _record_end(self, outcome: dict[str, Any], text: str) -> None:
        try:
            await self._store.update_request(self.id, output_text=text, finished_at=utcnow(),
                                             ttft_ms=self._ttft_ms(), **outcome)
        except Exception:  # the answer was delivered; a history write must not undo that
            log.exception("could not record the end of request %s", self.id)


class InferenceQueue:
    def __init__(self, manager: ModelManager, store: StoreService):
        self.manager = manager
        self.store = store

    async def submit(self, params: dict[str, Any], *, notebook: str | None = None) -> Generation:
        """Starts a request; raises ModelNotFound or WorkerError before any output exists.

        `params` holds model, prompt or messages and the sampling fields; a missing model or
        sampling field takes the stored setting's value.
        """
        started = time.perf_counter()
        params = await self._with_defaults(params)
        model = params.pop("model")
        self.manager.registry.get(model)  # an unknown model is refused before it is recorded
        record = RequestRecord(
            model=model, notebook=notebook, status=RequestStatus.RUNNING,
            prompt=params.get("prompt"), messages=params.get("messages"),
            parameters={k: v for k, v in params.items() if k not in ("prompt", "messages")})
        record.started_at = record.created_at
        await self.store.add_request(record)
        try:
            worker = await self.manager.acquire(model)
        except MlxJupyterError as exc:
            await self.store.update_request(record.id, status=RequestStatus.FAILED,
                                            finish_reason="error", error=str(exc),
                                            finished_at=utcnow())
            raise
        return Generation(record.id, model, worker, params, self.store,
                          functools.partial(self.manager.release, model), started)

    async def _with_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        missing = [key for key in (*SETTING_DEFAULTS, "model") if params.get(key) is None]
        if not missing:
            return params
        settings = await self.store.setting_values()
        defaults = {key: settings[SETTING_DEFAULTS.get(key, "default_model")] for key in missing}
        return {**params, **defaults}
