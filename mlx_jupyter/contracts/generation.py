"""What a generation answers: whole (`GenerationAnswer`), or streamed as output events (`TextEvent`,
and `ReasoningEvent`, `ToolCallEvent`, `LogprobsEvent` where the request has them) then one
`DoneEvent` (NDJSON on mlx/api/generate), or an `ErrorEvent` where it failed after its status
line was sent. A request for n answers gets each event with its answer's `index`. The model worker speaks the same vocabulary (`engine.protocol`): a piece of text
is {"text"}, the end is {"done": true, "finish_reason", ...}. The same figures are stored with
the request, and the history shows them as stored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, WithJsonSchema

from ..limits import MAX_SEED
from .base import Answer

# How an answer ended; "timeout": its `timeout` passed first (it was cancelled then);
# "tool_calls": it ended after calling tools.
Ending = Literal["stop", "length", "cancelled", "timeout", "tool_calls"]
# What the history records: an answer's ending, or "error" for a request that failed.
FinishReason = Literal["stop", "length", "cancelled", "timeout", "tool_calls", "error"]

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


class FunctionCall(Answer):
    name: str
    arguments: str = Field(description="the arguments, as JSON text (OpenAI's shape)")


class ToolCall(Answer):
    id: str
    type: Literal["function"]
    function: FunctionCall


class TopLogprob(Answer):
    token: str = Field(description="its text (a token that is part of a character: "
                                   "with U+FFFD for the bytes it lacks)")
    logprob: float
    bytes: list[int] = Field(description="its UTF-8 bytes")


class TokenLogprob(TopLogprob):
    """A sampled token's log-probability and its best rivals' (as the sampler saw them: after
    the penalties and the constraint, before the temperature)."""

    top_logprobs: list[TopLogprob]


AnswerIndex = Annotated[int, Field(ge=0, description="the answer it belongs to, of the "
                                                     "request's n")]
# Any JSON value, stated as such (a bare Any would publish no schema at all).
JSON_VALUE = {"anyOf": [{"type": kind} for kind in
                        ("object", "array", "string", "number", "boolean", "null")]}
Parsed = Annotated[Any, WithJsonSchema(JSON_VALUE), Field(
    description="with a schema: the answer's JSON value, valid for it; null when it is not "
                "(see parse_error)")]
ParseError = Annotated[str | None, Field(description="with a schema: why the answer is no "
                                                     "valid JSON for it (max_tokens cut it)")]


class TextEvent(Answer):
    text: str
    index: AnswerIndex = 0


class ReasoningEvent(Answer):
    """Text inside the model family's thinking markers."""

    reasoning: str
    index: AnswerIndex = 0


class ToolCallEvent(Answer):
    """One whole tool call, once the model closed it."""

    tool_call: ToolCall
    index: AnswerIndex = 0


class LogprobsEvent(Answer):
    """The log-probabilities of the tokens sampled since the last such event."""

    logprobs: list[TokenLogprob]
    index: AnswerIndex = 0


OutputEvent = Union[TextEvent, ReasoningEvent, ToolCallEvent, LogprobsEvent]


class ChoiceEnd(Answer):
    """How one of n answers ended."""

    index: AnswerIndex
    finish_reason: Ending
    parsed: Parsed = None
    parse_error: ParseError = None


class DoneEvent(Answer):
    done: Literal[True] = True
    request_id: str
    model: str
    finish_reason: Ending
    usage: Usage
    timings: Timings
    seed: Seed
    max_tokens_clipped_to: ClippedMaxTokens = None
    parsed: Parsed = None
    parse_error: ParseError = None
    choices: list[ChoiceEnd] | None = Field(None, description="n > 1: how each answer ended "
                                                              "(the fields above: the first's)")


class ErrorEvent(Answer):
    """The last event of a stream whose generation failed (its status line was already 200)."""

    done: Literal[True] = True
    request_id: str
    model: str
    finish_reason: Literal["error"] = "error"
    error: str


class AnswerOutput(Answer):
    """What one answer holds: its text, thinking, tool calls, log-probabilities, ending."""

    text: str
    reasoning: str | None = Field(None, description="the text inside the model family's "
                                                    "thinking markers; null: none")
    tool_calls: list[ToolCall] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = Field(None, description="asked for: one per token")
    parsed: Parsed = None
    parse_error: ParseError = None
    finish_reason: Ending


class Choice(AnswerOutput):
    """One answer of a request for n."""

    index: AnswerIndex


class GenerationAnswer(AnswerOutput):
    """The answer; with n > 1, `choices` holds every answer and the fields of the first are
    also here."""

    request_id: str
    model: str
    usage: Usage
    timings: Timings
    seed: Seed
    max_tokens_clipped_to: ClippedMaxTokens = None
    choices: list[Choice] | None = Field(None, description="n > 1: every answer")
