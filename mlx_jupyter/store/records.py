"""What the rest of the server shares with the store, importable without SQLAlchemy: the
statuses of requests and models, UTC timestamps, and RequestRecord (one generation request as
the queue hands it to the store). The server imports this at start-up; the tables, the engine
and the migrations load when the store opens, off the start path."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidField


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the server stopped while it was queued or running


UNFINISHED = (RequestStatus.QUEUED.value, RequestStatus.RUNNING.value)
FINISHED = tuple(s.value for s in RequestStatus if s.value not in UNFINISHED)


class ModelStatus(enum.StrEnum):
    UNLOADED = "unloaded"  # registered, not loaded
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"  # the last load failed or its worker died; last_error says why


_STATUSES = frozenset(status.value for status in RequestStatus)


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_status(status: Any) -> str:
    value = status.value if isinstance(status, RequestStatus) else status
    if value not in _STATUSES:
        raise InvalidField(f"unknown request status {status!r}; "
                           f"statuses are: {', '.join(sorted(_STATUSES))}")
    return value


@dataclass(kw_only=True, slots=True)
class RequestRecord:
    """The columns of a `requests` row, with the model named rather than numbered."""

    model: str
    id: str = field(default_factory=new_request_id)
    notebook: str | None = None
    priority: int = 0
    status: str = RequestStatus.QUEUED.value
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    output_text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    ttft_ms: float | None = None
    error: str | None = None
    queue_ms: float | None = None
    total_ms: float | None = None
    tokens_per_second: float | None = None
    prompt_tokens_per_second: float | None = None

    def to_row(self, model_id: int) -> dict[str, Any]:
        # A shallow copy: dataclasses.asdict deep-copies and was most of a bulk insert's time.
        row = {name: storable(getattr(self, name)) for name in _COLUMNS}
        row["model_id"] = model_id
        row["status"] = check_status(self.status)
        return row


def storable(value: Any) -> Any:
    """A column's value with every NUL character, in text and inside JSON, replaced by U+FFFD:
    PostgreSQL cannot store a NUL, and the history should read the same on both databases."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


_COLUMNS = tuple(f.name for f in fields(RequestRecord) if f.name != "model")

# A request's figures (contracts.generation.Timings), each a column of its own.
TIMING_COLUMNS = ("queue_ms", "ttft_ms", "total_ms", "tokens_per_second",
                  "prompt_tokens_per_second")


def with_timings(row: dict[str, Any]) -> dict[str, Any]:
    """A request's row as the history shows it: its figures as one `timings` object, null
    until the server measured the request to its end (its total_ms)."""
    figures = {name: row.pop(name) for name in TIMING_COLUMNS if name in row}
    row["timings"] = figures if figures.get("total_ms") is not None else None
    return row
