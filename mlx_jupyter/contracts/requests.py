"""What the request routes answer: the queue now, the history, one request, a cancellation and
an accepted background job."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from .base import Answer
from .generation import Timings

# A request's state in the history (the store's RequestStatus, checked equal by the tests).
RequestStatusName = Literal["queued", "running", "completed", "cancelled", "failed",
                            "interrupted"]


class QueuedRequest(Answer):
    request_id: str
    priority: int
    waited_seconds: float = Field(description="since it was submitted")


class WaitingRequest(QueuedRequest):
    position: int = Field(description="1: admitted next")
    eta_seconds: float | None = Field(description="when it may be admitted, by the model's "
                                                  "recent pace; null before one finished")


class ModelQueue(Answer):
    active: list[QueuedRequest]
    queued: list[WaitingRequest] = Field(description="in admission order")


class QueueSnapshot(Answer):
    max_active_per_model: int
    max_queued: int
    queued: int
    models: dict[str, ModelQueue] = Field(description="per model with requests")


class _RequestColumns(Answer):
    """What a history row and a whole request share."""

    id: str
    model: str
    notebook: str | None
    priority: int
    status: RequestStatusName
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    timings: Timings | None = Field(description="the figures the server computed when it "
                                                "ended, as stored; null until it ended")


class HistoryRow(_RequestColumns):
    prompt_preview: str | None = Field(description="the prompt's (or messages') first "
                                                   "characters")
    output_preview: str | None


class HistoryPage(Answer):
    requests: list[HistoryRow] = Field(description="newest first")
    total: int = Field(description="requests that match, every page")
    limit: int
    offset: int


class StoredMessage(Answer):
    role: str
    content: str


class RequestParameters(Answer):
    """What the request was generated with (stored as JSON: rows written by other versions may
    hold other fields, so these are the known ones)."""

    model_config = ConfigDict(extra="allow")

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    background: bool | None = None
    timeout: float | None = None


class RequestDetail(_RequestColumns):
    model_id: int = Field(description="the model's row in the database")
    prompt: str | None
    messages: list[StoredMessage] | None
    parameters: RequestParameters
    output_text: str | None


class Cancellation(Answer):
    request_id: str
    was: Literal["queued", "active", "finished"] = Field(
        description="its state when cancelled (finished: it ended meanwhile)")
    status: Literal["cancelled", "cancelling"] = Field(
        description="cancelled: it left the queue; cancelling: it stops at its worker's next "
                    "step")


class Accepted(Answer):
    """A background request, recorded and queued: its result is read from the history."""

    request_id: str
    status: Literal["queued"]

