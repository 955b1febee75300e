"""Admission: who runs when, per model.

Each model admits up to `max_active_per_model` batch slots' worth of requests to its worker at a
time (a request takes one slot per answer it asks for, `n`; this is the one cap on how many a
worker holds: the worker itself only checks that its KV reservation holds them). The
rest wait here, highest priority first, first come first served within a priority, with aging (a
request gains one priority level for every `aging_seconds` it waits) so that a low priority never
starves. Dispatch is event-driven: an enqueue, a finish or a withdrawal admits the next request
at once; nothing polls. Counts and the snapshot come from memory.

Admission knows requests only by their `Ticket`; what a request does once admitted is
`generation`'s.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Ticket:
    """One request's place in admission; `admitted` resolves True when it may run, False when
    it was withdrawn while waiting."""

    id: str
    model: str
    priority: int
    submitted: float = field(default_factory=time.perf_counter)  # also the aging clock
    admitted: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    admitted_at: float | None = None  # perf_counter
    seq: int = 0  # arrival order, set by Admission
    slots: int = 1  # batch slots it takes: one per answer it asks for (n)

    def effective_priority(self, now: float, aging_seconds: float) -> float:
        return self.priority + (now - self.submitted) / aging_seconds

    def waited_seconds(self, now: float | None = None) -> float:
        return (now if now is not None else time.perf_counter()) - self.submitted


class Admission:
    def __init__(self, *, max_active_per_model: int, aging_seconds: float,
                 on_admit: Callable[[Ticket], None] | None = None):
        """on_admit(ticket) is told of each admission (the metrics count the wait)."""
        self.max_active_per_model = max_active_per_model
        self.aging_seconds = aging_seconds
        self._on_admit = on_admit
        self._waiting: dict[str, list[Ticket]] = collections.defaultdict(list)
        self._active: dict[str, dict[str, Ticket]] = collections.defaultdict(dict)
        self._seq = itertools.count()
        self._seconds_per_request: dict[str, float] = {}  # moving average, for ETAs

    # -- a request's passage ----------------------------------------------------------------

    def enqueue(self, ticket: Ticket) -> None:
        """Puts a request in line; it may be admitted at once."""
        ticket.seq = next(self._seq)
        self._waiting[ticket.model].append(ticket)
        self._dispatch(ticket.model)

    def withdraw(self, ticket: Ticket) -> bool:
        """Takes a waiting request out of line (its `admitted` resolves False); False when it
        is not waiting (admitted already, or gone)."""
        waiting = self._waiting.get(ticket.model, [])
        if ticket not in waiting:
            return False
        waiting.remove(ticket)
        ticket.admitted.set_result(False)
        return True

    def finished(self, ticket: Ticket) -> None:
        """An admitted request ended: its place goes to the next one."""
        if self._active[ticket.model].pop(ticket.id, None) is not None \
                and ticket.admitted_at is not None:
            elapsed = time.perf_counter() - ticket.admitted_at
            previous = self._seconds_per_request.get(ticket.model, elapsed)
            self._seconds_per_request[ticket.model] = 0.8 * previous + 0.2 * elapsed
        self._dispatch(ticket.model)

    def _dispatch(self, model: str) -> None:
        active = self._active[model]
        while self._waiting[model]:
            chosen = self.order(model)[0]
            if sum(t.slots for t in active.values()) + chosen.slots > \
                    self.max_active_per_model:
                break  # it waits for enough slots, and those behind it wait for it
            self._waiting[model].remove(chosen)
            active[chosen.id] = chosen
            chosen.admitted_at = time.perf_counter()
            chosen.admitted.set_result(True)
            if self._on_admit is not None:
                self._on_admit(chosen)

    def order(self, model: str) -> list[Ticket]:
        """A model's waiting requests in the order they would be admitted now."""
        now = time.perf_counter()
        return sorted(self._waiting.get(model, ()),
                      key=lambda t: (-t.effective_priority(now, self.aging_seconds), t.seq))

    # -- counts -----------------------------------------------------------------------------

    def queued_count(self) -> int:
        return sum(len(waiting) for waiting in self._waiting.values())

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's time."""
        known = list(self._seconds_per_request.values())
        return max(1, round(sum(known) / len(known))) if known else 5

    def counts_by_priority(self) -> dict[str, collections.Counter[tuple[str, int]]]:
        """Requests "queued" and "running", each counted per (model, priority)."""
        return {"queued": collections.Counter((t.model, t.priority)
                                              for waiting in self._waiting.values()
                                              for t in waiting),
                "running": collections.Counter((t.model, t.priority)
                                               for active in self._active.values()
                                               for t in active.values())}

    def model_counts(self, model: str) -> dict[str, int]:
        return {"queued_requests": len(self._waiting.get(model, ())),
                "active_requests": len(self._active.get(model, ()))}

    def summary(self) -> dict[str, Any]:
        """How many wait in all, and `model_counts` of each model with requests."""
        models = {model for model, waiting in self._waiting.items() if waiting}
        models |= {model for model, active in self._active.items() if active}
        return {"queued": self.queued_count(),
                "models": {model: self.model_counts(model) for model in sorted(models)}}

    def snapshot(self) -> dict[str, Any]:
        """Per model: active requests, and waiting ones in admission order with an ETA."""
        now = time.perf_counter()
        models = {}
        for model in sorted(set(self._waiting) | set(self._active)):
            active = list(self._active.get(model, {}).values())
            waiting = self.order(model)
            if not active and not waiting:
                continue
            per_request = self._seconds_per_request.get(model)
            models[model] = {
                "active": [_describe(t, now) for t in active],
                "queued": [{**_describe(t, now), "position": i + 1,
                            "eta_seconds": round((i // self.max_active_per_model + 1)
                                                 * per_request, 1) if per_request else None}
                           for i, t in enumerate(waiting)]}
        return {"max_active_per_model": self.max_active_per_model,
                "queued": self.queued_count(), "models": models}


def _describe(ticket: Ticket, now: float) -> dict[str, Any]:
    return {"request_id": ticket.id, "priority": ticket.priority,
            "waited_seconds": round(ticket.waited_seconds(now), 2)}
