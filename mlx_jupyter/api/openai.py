"""OpenAI's shapes for the /v1 routes: request bodies, answers, stream chunks and errors.

Only shapes live here; the /v1 handlers (`openai_handlers`) run requests through the same queue
as every other generation. Fields OpenAI defines that have no meaning here are accepted at their
neutral value (what a client sends when it does not use them) and refused otherwise, naming
the field, so a client never silently gets something other than what it asked for.
"""

from __future__ import annotations

import collections
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._version import __version__
from ..contracts.errors import OpenAIErrorAnswer, OpenAIErrorDetail
from ..contracts.generation import (
    Choice,
    ChoiceEnd,
    DoneEvent,
    GenerationAnswer,
    LogprobsEvent,
    OutputEvent,
    ReasoningEvent,
    TextEvent,
    TokenLogprob,
    ToolCallEvent,
    Usage,
)
from ..contracts.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    LegacyLogprobs,
    OpenAIUsage,
    PromptTokensDetails,
    StreamedToolCall,
    TextChoice,
    TextCompletion,
    TextCompletionChunk,
)
from ..errors import MlxJupyterError
from ..limits import (
    MAX_LEGACY_LOGPROBS,
    MAX_MESSAGES,
    MAX_MODEL_NAME_CHARS,
    MAX_NOTEBOOK_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TEMPERATURE,
    MAX_TOOLS,
)
from .schemas import (
    INTEGRAL,
    MESSAGE_RULES,
    SAMPLING_RULES,
    CacheControl,
    Integer,
    JsonSchema,
    MaxTokens,
    Priority,
    Sampling,
    Seed,
    Stops,
    ToolCallIn,
    ToolUse,
    check_message,
    ignored,
    message_for_queue,
)

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
    cache_control: CacheControl = None


class Message(_OpenAIBody):
    model_config = ConfigDict(json_schema_extra=MESSAGE_RULES)

    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)  # a tool's; else unused
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    cache_control: CacheControl = None

    @model_validator(mode="after")
    def _shape(self) -> Message:
        check_message(self.role, self.content, self.tool_calls, self.tool_call_id)
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_queue(self) -> dict[str, Any]:
        return message_for_queue("system" if self.role == "developer" else self.role,
                                 self.text(), self.tool_calls, self.tool_call_id, self.name)


class StreamOptions(_OpenAIBody):
    include_usage: bool = False


class _Completion(Sampling):
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
    priority: Priority = 0  # our extension: higher first
    metadata: dict[str, str] | None = ignored("metadata")
    store: bool | None = ignored("store")
    service_tier: str | None = ignored("service_tier")

    # Fields OpenAI defines that have no meaning here: accepted at their neutral value only.
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {}

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

    def basics(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "stop": self.stop or []}


class JsonSchemaFormat(_OpenAIBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    schema_: JsonSchema | None = Field(None, alias="schema",
                                       description="left out: any JSON object")
    strict: bool | None = Field(None, description="the answer is always enforced to match")


class ResponseFormat(_OpenAIBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema comes with type \"json_schema\", and only with it")
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match; None: free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is not None:
            return self.json_schema.schema_ or {"type": "object"}
        return None


class ChatCompletionRequest(_Completion, ToolUse):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        *SAMPLING_RULES,
        {"not": {"required": ["response_format", "tools"],
                 "properties": {"response_format": {"required": ["type"], "properties": {
                                    "type": {"enum": ["json_object", "json_schema"]}}},
                                "tools": {"type": "array", "minItems": 1},
                                "tool_choice": {"not": {"const": "none"}}}}}]})

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None

    @model_validator(mode="after")
    def _across_fields(self) -> ChatCompletionRequest:
        self._check_sampling(bool(self.logprobs))
        self._check_tools(self._schema())
        return self

    def _schema(self) -> dict[str, Any] | None:
        return self.response_format.answer_schema() if self.response_format else None

    def queue_params(self) -> dict[str, Any]:
        params = self.basics()
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return {**params, "messages": [message.for_queue() for message in self.messages],
                **self.sampling_params(bool(self.logprobs)), **self.tool_params(self._schema())}


class CompletionRequest(_Completion):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: Integer | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LEGACY_LOGPROBS), INTEGRAL] | None = Field(
        None, description="the log-probabilities of each token and of this many rivals")

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "echo": (False,), "suffix": (None, ""), "best_of": (None, 1), "top_logprobs": (None,)}

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        return value[0] if isinstance(value, list) else value

    def queue_params(self) -> dict[str, Any]:
        return {**self.basics(), "prompt": self.prompt,
                **self.sampling_params(False), "logprobs": self.logprobs}


# -- answers ------------------------------------------------------------------------------


def usage(counts: Usage) -> OpenAIUsage:
    return OpenAIUsage(
        prompt_tokens=counts.prompt_tokens, completion_tokens=counts.completion_tokens,
        total_tokens=counts.prompt_tokens + counts.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=counts.cached_tokens))


class _Renderer:
    """Answers of one request (contracts.openai), whole or as server-sent events ending with
    [DONE]; one choice per answer (n).

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
    def whole_choice(self, answer: Choice) -> Any:
        raise NotImplementedError

    def delta_choice(self, event: OutputEvent) -> Any:
        raise NotImplementedError

    def end_choice(self, index: int, finish_reason: str) -> Any:
        raise NotImplementedError

    def whole(self, result: GenerationAnswer) -> ChatCompletion | TextCompletion:
        answers = result.choices or [Choice(
            index=0, text=result.text, reasoning=result.reasoning, tool_calls=result.tool_calls,
            logprobs=result.logprobs, finish_reason=result.finish_reason)]
        return self.whole_answer(
            **self._head(result.request_id, result.model), object=self.object_name,
            choices=[self.whole_choice(answer) for answer in answers],
            usage=usage(result.usage), seed=result.seed)

    def event(self, event: OutputEvent | DoneEvent) -> str:
        head = {**self._head(self.request_id, self.model), "object": self.chunk_object_name}
        if not isinstance(event, DoneEvent):
            return self._sse(self.chunk(**head, choices=[self.delta_choice(event)]))
        ends = event.choices or [ChoiceEnd(index=0, finish_reason=event.finish_reason)]
        out = self._sse(self.chunk(**head, seed=event.seed, choices=[
            self.end_choice(end.index, end.finish_reason) for end in ends]))
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

    def __init__(self, include_usage: bool = False):
        super().__init__(include_usage)
        self._started: set[int] = set()  # the answers whose first delta went out
        self._calls: collections.Counter[int] = collections.Counter()  # calls per answer

    def whole_choice(self, answer: Choice) -> ChatChoice:
        message = AssistantMessage(
            role="assistant", content=answer.text or (None if answer.tool_calls else ""),
            tool_calls=answer.tool_calls or None, reasoning_content=answer.reasoning)
        return ChatChoice(index=answer.index, message=message,
                          finish_reason=answer.finish_reason,
                          logprobs=None if answer.logprobs is None
                          else ChatLogprobs(content=answer.logprobs))

    def delta_choice(self, event: OutputEvent) -> ChatChunkChoice:
        delta, logprobs = self._delta(event.index), None
        if isinstance(event, TextEvent):
            delta.content = event.text
        elif isinstance(event, ReasoningEvent):
            delta.reasoning_content = event.reasoning
        elif isinstance(event, ToolCallEvent):
            delta.tool_calls = [StreamedToolCall(index=self._calls[event.index],
                                                 **event.tool_call.model_dump())]
            self._calls[event.index] += 1
        else:
            logprobs = ChatLogprobs(content=event.logprobs)
        return ChatChunkChoice(index=event.index, delta=delta, finish_reason=None,
                               logprobs=logprobs)

    def end_choice(self, index: int, finish_reason: str) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=self._delta(index),
                               finish_reason=finish_reason, logprobs=None)

    def _delta(self, index: int) -> ChatDelta:
        delta = ChatDelta()
        if index not in self._started:  # OpenAI's first delta of an answer names the role
            delta.role = "assistant"
            self._started.add(index)
        return delta


class CompletionRenderer(_Renderer):
    whole_answer, chunk = TextCompletion, TextCompletionChunk
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, include_usage: bool = False):
        super().__init__(include_usage)
        self._offsets: collections.Counter[int] = collections.Counter()  # text per answer

    def whole_choice(self, answer: Choice) -> TextChoice:
        return TextChoice(index=answer.index, text=answer.text,
                          finish_reason=answer.finish_reason,
                          logprobs=None if answer.logprobs is None
                          else self._legacy(answer.index, answer.logprobs))

    def delta_choice(self, event: OutputEvent) -> TextChoice:
        if isinstance(event, LogprobsEvent):
            return TextChoice(index=event.index, text="", finish_reason=None,
                              logprobs=self._legacy(event.index, event.logprobs))
        text = event.text if isinstance(event, TextEvent) else ""
        return TextChoice(index=event.index, text=text, finish_reason=None, logprobs=None)

    def end_choice(self, index: int, finish_reason: str) -> TextChoice:
        return TextChoice(index=index, text="", finish_reason=finish_reason, logprobs=None)

    def _legacy(self, index: int, entries: list[TokenLogprob]) -> LegacyLogprobs:
        """OpenAI's legacy columns; text_offset counts the answer's characters before each
        token."""
        offsets = []
        for entry in entries:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(entry.token)
        return LegacyLogprobs(
            tokens=[entry.token for entry in entries],
            token_logprobs=[entry.logprob for entry in entries],
            top_logprobs=[{rival.token: rival.logprob for rival in entry.top_logprobs}
                          for entry in entries],
            text_offset=offsets)


def error_body(status: int, message: str, reason: str | None = None,
               param: str | None = None) -> OpenAIErrorAnswer:
    """OpenAI's error shape."""
    return OpenAIErrorAnswer(error=OpenAIErrorDetail(
        message=message, param=param, code=ERROR_CODES.get(reason or ""),
        type=ERROR_TYPES.get(status, "server_error" if status >= 500
                             else "invalid_request_error")))
