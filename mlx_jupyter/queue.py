"""The way in for every generation: gives each request an id, its worker and its timings.

For now requests go straight to their model's worker, which runs them in arrival order;
priorities, persistence, batching and back-pressure plug in here later.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .engine.proxy import WorkerProxy
from .models.manager import ModelManager

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One submitted request: its events as they come, and its final result."""

    id: str
    model: str
    _worker: WorkerProxy
    _params: dict[str, Any]
    _submitted: float = field(default_factory=time.perf_counter)
    _first_text: float | None = None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yields {"text": ...} events, then one {"done": True, ...} event.

        Closing this iterator early cancels the request in the worker.
        """
        worker_events = self._worker.generate(self.id, self._params)
        try:
            async for event in worker_events:
                if event["event"] == "text":
                    if self._first_text is None:
                        self._first_text = time.perf_counter()
                    yield {"text": event["text"]}
                elif event["event"] == "done":
                    yield self._done(event)
        finally:
            await worker_events.aclose()

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

    async def cancel(self) -> None:
        """Asks the worker to stop this request at its next decode step; events() then ends
        with finish_reason "cancelled"."""
        await self._worker.cancel(self.id)

    def _done(self, event: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        first = self._first_text if self._first_text is not None else now
        worker_timings = event.get("worker_timings", {})
        timings = {"ttft_ms": round((first - self._submitted) * 1000, 1),
                   "total_ms": round((now - self._submitted) * 1000, 1),
                   "tokens_per_second": worker_timings.get("tokens_per_second", 0.0),
                   "prompt_tokens_per_second": worker_timings.get("prompt_tokens_per_second",
                                                                  0.0)}
        log.info("request %s on %s: %s, %s tokens, %.0f ms", self.id, self.model,
                 event["finish_reason"], event["usage"]["completion_tokens"], timings["total_ms"])
        return {"done": True, "request_id": self.id, "finish_reason": event["finish_reason"],
                "usage": event["usage"], "timings": timings}


class InferenceQueue:
    def __init__(self, manager: ModelManager):
        self.manager = manager

    async def submit(self, model: str, params: dict[str, Any]) -> Generation:
        """Starts a request; raises ModelNotFound or WorkerError before any output exists."""
        started = time.perf_counter()
        worker = await self.manager.worker(model)
        request_id = uuid.uuid4().hex
        return Generation(request_id, model, worker, params, started)
