"""OpenAI's shapes for the /v1 routes: request bodies, answers, stream chunks and errors.

Only shapes live here; the /v1 handlers (`openai_handlers`) run requests through the same queue
as every other generation. Fields OpenAI defines that have no meaning here are accepted at their
neutral value (what a client sends when it does not use them) and refused otherwise, naming
the field, so a client never silently gets something other than what it asked for.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._version import __version__
from ..contracts.errors import OpenAIErrorAnswer, OpenAIErrorDetail
from ..contracts.generation import DoneEvent, GenerationAnswer, TextEvent, Usage
from ..contracts.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    OpenAIUsage,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    TextCompletionChunk,
)
from ..errors import MlxJupyterError
from ..limits import (
    MAX_MESSAGES,
    MAX_MODEL_NAME_CHARS,
    MAX_NOTEBOOK_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TEMPERATURE,
)
from .schemas import Integer, MaxTokens, Priority, Seed, Stops

# Finish reasons of our own that OpenAI does not define keep their names ("cancelled",
# "timeout"): clients treat an unknown reason as the end of the answer.
# OpenAI's error types: every other 4xx is an "invalid_request_error", a 5xx a "server_error".
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
ERROR_CODES = {"ModelNotFound": "model_not_found", "QueueFull": "rate_limit_exceeded",
               "InvalidRequest": "invalid_request", "ModelDoesNotFit": "model_does_not_fit",
               "WorkerError": "worker_unavailable",
               "RequestDoesNotFit": "context_length_exceeded",
               "PromptTooLong": "context_length_exceeded", "BadBody": "invalid_request",
               "BodyTooLarge": "request_too_large"}


class _OpenAIBody(BaseModel):
    # Strict as JSON Schema reads the document: 1 is a number and 5.0 an integer, "5" neither.
    # Unknown fields are errors.
    # defer_build: its validator is built at its first use, not while the server starts.
    # allow_inf_nan: NaN and Infinity (which Python's JSON reads) are no numbers we take.
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True,
                              allow_inf_nan=False)


PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class TextPart(_OpenAIBody):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class Message(_OpenAIBody):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)  # accepted; chat templates do not use it

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_queue(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role,
                "content": self.text()}


class StreamOptions(_OpenAIBody):
    include_usage: bool = False


class _Completion(_OpenAIBody):
    """What chat and text completions share."""

    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Stops | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_NOTEBOOK_CHARS)  # recorded as the request's notebook
    n: Integer | None = Field(1, json_schema_extra={"enum": [1, None]})
    priority: Priority = 0  # our extension: higher first
    # Accepted at their neutral values only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: Integer | None = None
    metadata: dict[str, str] | None = None  # accepted and ignored
    store: bool | None = None  # accepted and ignored: everything is recorded anyway
    service_tier: str | None = None  # accepted and ignored

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
        "logit_bias": (None, {}), "logprobs": (None, False, 0), "top_logprobs": (None, 0)}

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: one choice per request")
        return value

    @model_validator(mode="after")
    def _neutral_values(self) -> _Completion:
        for name, allowed in self.NEUTRAL.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} is not supported here; leave it out")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        """The document states the neutral values as the only ones allowed."""
        schema = handler(core_schema)
        properties = handler.resolve_ref_schema(schema)["properties"]
        for name, allowed in cls.NEUTRAL.items():
            properties[name]["enum"] = list(allowed)
        return schema

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "stop": self.stop or []}


class ChatCompletionRequest(_Completion):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens | None = None
    response_format: dict[str, Any] | None = Field(None, json_schema_extra={
        "required": ["type"], "properties": {"type": {"const": "text"}}})
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted and ignored

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Completion.NEUTRAL, "tools": (None, []), "tool_choice": (None, "none")}

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return value

    def queue_params(self) -> dict[str, Any]:
        params = self.sampling()
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return {**params, "messages": [message.for_queue() for message in self.messages]}


class CompletionRequest(_Completion):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: Integer | None = None

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Completion.NEUTRAL, "echo": (False,), "suffix": (None, ""), "best_of": (None, 1)}

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        return value[0] if isinstance(value, list) else value

    def queue_params(self) -> dict[str, Any]:
        return {**self.sampling(), "prompt": self.prompt}


# -- answers ------------------------------------------------------------------------------


def usage(counts: Usage) -> OpenAIUsage:
    return OpenAIUsage(
        prompt_tokens=counts.prompt_tokens, completion_tokens=counts.completion_tokens,
        total_tokens=counts.prompt_tokens + counts.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=counts.cached_tokens))


class _Renderer:
    """Answers of one request (contracts.openai), whole or as server-sent events ending with
    [DONE].

    `seed` is our extension: the seed sampling used (the server picks one when the request
    gives none; null at temperature 0), in the whole answer and in the chunks that end it."""

    content_type = "text/event-stream"
    whole_answer: type[ChatCompletion] | type[TextCompletion]
    chunk: type[ChatCompletionChunk] | type[TextCompletionChunk]
    object_name = chunk_object_name = id_prefix = ""

    def __init__(self, include_usage: bool = False):
        self.include_usage = include_usage
        self.created = int(time.time())
        self.request_id = self.model = ""

    def bind(self, generation: Any) -> None:
        """The request being answered: its id and model name go into every chunk."""
        self.request_id, self.model = generation.id, generation.model

    # What differs between chat and text completions.
    def choice(self, text: str | None, finish_reason: str | None, *, whole: bool) -> Any:
        raise NotImplementedError

    def whole(self, result: GenerationAnswer) -> ChatCompletion | TextCompletion:
        return self.whole_answer(
            **self._head(result.request_id, result.model), object=self.object_name,
            choices=[self.choice(result.text, result.finish_reason, whole=True)],
            usage=usage(result.usage), seed=result.seed)

    def event(self, event: TextEvent | DoneEvent) -> str:
        head = {**self._head(self.request_id, self.model), "object": self.chunk_object_name}
        if isinstance(event, TextEvent):
            return self._sse(self.chunk(**head, choices=[
                self.choice(event.text, None, whole=False)]))
        out = self._sse(self.chunk(**head, seed=event.seed, choices=[
            self.choice(None, event.finish_reason, whole=False)]))
        if self.include_usage:  # OpenAI's last chunk: no choices, the usage
            out += self._sse(self.chunk(**head, choices=[], usage=usage(event.usage),
                                        seed=event.seed))
        return out

    def error(self, generation: Any, exc: MlxJupyterError) -> str:
        return self._sse(error_body(exc.status, str(exc), type(exc).__name__, exc.param))

    def end(self) -> str:
        return "data: [DONE]\n\n"

    def _head(self, request_id: str, model: str) -> dict[str, Any]:
        return {"id": f"{self.id_prefix}-{request_id}", "created": self.created,
                "model": model, "system_fingerprint": f"mlx-jupyter-{__version__}"}

    @staticmethod
    def _sse(answer: BaseModel) -> str:
        # Only the fields set: a chunk names its usage and seed where it has them.
        return f"data: {answer.model_dump_json(exclude_unset=True)}\n\n"


class ChatRenderer(_Renderer):
    whole_answer, chunk = ChatCompletion, ChatCompletionChunk
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    _sent_role = False

    def choice(self, text: str | None, finish_reason: str | None, *,
               whole: bool) -> ChatChoice | ChatChunkChoice:
        if whole:
            return ChatChoice(index=0, message=AssistantMessage(role="assistant", content=text),
                              finish_reason=finish_reason, logprobs=None)
        delta = ChatDelta()
        if not self._sent_role:  # OpenAI's first delta names the role
            delta.role = "assistant"
            self._sent_role = True
        if text is not None:
            delta.content = text
        return ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)


class CompletionRenderer(_Renderer):
    whole_answer, chunk = TextCompletion, TextCompletionChunk
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def choice(self, text: str | None, finish_reason: str | None, *, whole: bool) -> TextChoice:
        return TextChoice(index=0, text=text or "", finish_reason=finish_reason, logprobs=None)


def error_body(status: int, message: str, reason: str | None = None,
               param: str | None = None) -> OpenAIErrorAnswer:
    """OpenAI's error shape."""
    return OpenAIErrorAnswer(error=OpenAIErrorDetail(
        message=message, param=param, code=ERROR_CODES.get(reason or ""),
        type=ERROR_TYPES.get(status, "server_error" if status >= 500
                             else "invalid_request_error")))
