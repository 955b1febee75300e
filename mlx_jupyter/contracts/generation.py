"""What a generation answers: whole (`GenerationAnswer`), or streamed as `TextEvent`s then one
`DoneEvent` (NDJSON on mlx/api/generate). The same figures are stored with the request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(Answer):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cached_tokens: int = Field(0, ge=0, description="prompt tokens taken from the prompt cache")


class Timings(Answer):
    """Per-request figures, computed once by the server and stored with the request."""

    queue_ms: float | None = Field(None, description="waiting in the queue, submit to admission")
    ttft_ms: float | None = Field(None, description="submit to the first text")
    total_ms: float = Field(description="submit to the end")
    tokens_per_second: float | None = Field(None, description="decode speed, first token to end")
    prompt_tokens_per_second: float | None = Field(
        None, description="prefill speed over the prompt tokens not taken from the cache")


class TextEvent(Answer):
    text: str


class DoneEvent(Answer):
    done: Literal[True] = True
    request_id: str
    model: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    seed: int | None = Field(description="the seed sampling used (the server picks one when "
                                         "none is given); null for greedy decoding")
    error: str | None = None


class GenerationAnswer(Answer):
    request_id: str
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    seed: int | None
