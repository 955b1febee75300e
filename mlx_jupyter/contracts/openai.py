"""OpenAI's answer shapes on mlx/v1: models, chat and text completions whole and as stream
chunks. `seed` is our extension: the seed sampling used (null for greedy decoding)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Answer


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


class AssistantMessage(Answer):
    role: Literal["assistant"]
    content: str


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None


class ChatCompletion(_Head):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ChatDelta(Answer):
    role: Literal["assistant"] | None = Field(None, description="in the first delta only")
    content: str | None = None


class ChatChunkChoice(Answer):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None


class _Chunk(_Head):
    """One server-sent event of a stream; the last, with stream_options.include_usage, has no
    choices and the usage."""

    usage: OpenAIUsage | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class TextChoice(Answer):
    index: int
    text: str
    finish_reason: str | None = Field(description="null in a stream until its last chunk")
    logprobs: None


class TextCompletion(_Head):
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: OpenAIUsage


class TextCompletionChunk(_Chunk):
    object: Literal["text_completion"]
    choices: list[TextChoice]
