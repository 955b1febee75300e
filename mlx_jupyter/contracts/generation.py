"""What a generation answers: whole (`GenerationAnswer`), or streamed as `TextEvent`s then one
`DoneEvent` (NDJSON on mlx/api/generate), or an `ErrorEvent` where it failed after its status
line was sent. The model worker speaks the same vocabulary (`engine.protocol`): a piece of text
is {"text"}, the end is {"done": true, "finish_reason", ...}. The same figures are stored with
the request, and the history shows them as stored."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ..limits import MAX_SEED
from .base import Answer

# How an answer ended; "timeout": its `timeout` passed first (it was cancelled then).
Ending = Literal["stop", "length", "cancelled", "timeout"]
# What the history records: an answer's ending, or "error" for a request that failed.
FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]

Seed = Annotated[int | None, Field(
    ge=0, le=MAX_SEED, description="the seed sampling used (the server picks one when the "
                                   "request gives none); null for greedy decoding "
                                   "(temperature 0)")]

ClippedMaxTokens = Annotated[int | None, Field(
    ge=1, description="the max_tokens the model's context left room for (its length less the "
                      "prompt's), when that was less than the request asked; null otherwise")]


class Usage(Answer):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cached_tokens: int = Field(0, ge=0, description="prompt tokens taken from the prompt cache")


class Timings(Answer):
    """Per-request figures, computed once by the server and stored with the request."""

    queue_ms: float | None = Field(
        None, description="waiting in the queue, submit to admission; null if never admitted")
    ttft_ms: float | None = Field(
        None, description="submit to the first text; null if no text came")
    total_ms: float = Field(description="submit to the end")
    tokens_per_second: float | None = Field(
        None, description="decode speed: the tokens after the first, over the time after it "
                          "(measured in the worker); null with fewer than two tokens")
    prompt_tokens_per_second: float | None = Field(
        None, description="prefill speed over the prompt tokens not taken from the cache "
                          "(admission to the first token); null if no token came")


class TextEvent(Answer):
    text: str


class DoneEvent(Answer):
    done: Literal[True] = True
    request_id: str
    model: str
    finish_reason: Ending
    usage: Usage
    timings: Timings
    seed: Seed
    max_tokens_clipped_to: ClippedMaxTokens = None


class ErrorEvent(Answer):
    """The last event of a stream whose generation failed (its status line was already 200)."""

    done: Literal[True] = True
    request_id: str
    model: str
    finish_reason: Literal["error"] = "error"
    error: str


class GenerationAnswer(Answer):
    request_id: str
    model: str
    text: str
    finish_reason: Ending
    usage: Usage
    timings: Timings
    seed: Seed
    max_tokens_clipped_to: ClippedMaxTokens = None
