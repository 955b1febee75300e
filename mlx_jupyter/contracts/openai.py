"""OpenAI's answer shapes on mlx/v1: models, chat and text completions whole and as stream
chunks. `seed` is our extension: the seed sampling used (null for greedy decoding)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Answer
from .generation import TokenLogprob, ToolCall


class OpenAIModel(Answer):
    id: str
    object: Literal["model"]
    created: int = Field(description="when it was registered, Unix seconds")
    owned_by: str


class OpenAIModelList(Answer):
    object: Literal["list"]
    data: list[OpenAIModel]


class PromptTokensDetails(Answer):
    cached_tokens: int


class OpenAIUsage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class _Head(Answer):
    id: str
    created: int
    model: str
    system_fingerprint: str
    seed: int | None = Field(None, description="our extension: the seed sampling used; null "
                                               "for greedy decoding")


class ChatLogprobs(Answer):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(Answer):
    role: Literal["assistant"]
    content: str | None = Field(description="null when it only calls tools")
    tool_calls: list[ToolCall] | None = Field(None, description="the calls it made, if any")
    reasoning_content: str | None = Field(None, description="the text inside the model "
                                                            "family's thinking markers")
    refusal: None = None


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None


class ChatCompletion(_Head):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: OpenAIUsage


class StreamedToolCall(ToolCall):
    """A whole call in one delta (OpenAI's clients join the pieces of a call by index)."""

    index: int = Field(description="its place among the answer's calls")


class ChatDelta(Answer):
    role: Literal["assistant"] | None = Field(None, description="in the first delta only")
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[StreamedToolCall] | None = None


class ChatChunkChoice(Answer):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None


class _Chunk(_Head):
    """One server-sent event of a stream; the last, with stream_options.include_usage, has no
    choices and the usage."""

    usage: OpenAIUsage | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class LegacyLogprobs(Answer):
    """The legacy completions' log-probabilities: a column per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TextChoice(Answer):
    index: int
    text: str
    finish_reason: str | None = Field(description="null in a stream until its last chunk")
    logprobs: LegacyLogprobs | None


class TextCompletion(_Head):
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: OpenAIUsage


class TextCompletionChunk(_Chunk):
    object: Literal["text_completion"]
    choices: list[TextChoice]
