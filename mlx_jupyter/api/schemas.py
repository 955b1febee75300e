"""Request bodies, validated with pydantic; errors name the offending field."""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..contracts.requests import RequestStatusName
from ..errors import BadBody, InvalidRequest
from ..limits import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_MESSAGES,
    MAX_MODEL_NAME_CHARS,
    MAX_NOTEBOOK_CHARS,
    MAX_PATH_CHARS,
    MAX_PENALTY,
    MAX_PRIORITY,
    MAX_PROMPT_CHARS,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TIMEOUT_SECONDS,
    MAX_TOKENS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    MIN_PRIORITY,
)
from ..engine.grammar.constraints import check_parameters, check_schema
from ..models.registry import NAME_PATTERN


class _Body(BaseModel):
    # strict: "5" is not a number and true is not 1; extra: a misspelt field is an error.
    # defer_build: its validator is built at its first use, not while the server starts.
    # allow_inf_nan: NaN and Infinity (which Python's JSON reads) are no numbers we take.
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True,
                              allow_inf_nan=False)


BodyT = TypeVar("BodyT", bound=BaseModel)


def _integral(value: object) -> object:
    """JSON has one kind of number: 5.0 is the integer 5, as JSON Schema reads it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# What an integer field of a strict body takes: 5 and 5.0, not "5" or true. Last in its
# Annotated, after the bounds (else pydantic cannot state them in the JSON Schema).
INTEGRAL = BeforeValidator(_integral)
Integer = Annotated[int, INTEGRAL]
# An absolute path without ".." parts or NUL bytes: what models.paths.check_request_path lets
# through.
_PART = r"(?:[^/\x00.][^/\x00]*|\.(?:[^/\x00.][^/\x00]*)?|\.\.[^/\x00]+)?"
ABSOLUTE_PATH = rf"^(?:/{_PART})+$"

MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS), INTEGRAL]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), INTEGRAL]
Priority = Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY,
                                description="higher first; waiting raises it (aging)"),
                     INTEGRAL]


def _not_empty(stop: str) -> str:
    if not stop:
        raise ValueError("stop strings must not be empty")
    return stop


class _OneOrList:
    """The JSON Schema of a list that also takes its one item alone."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        listed = handler(core_schema)
        return {"anyOf": [listed["items"], listed]}


# Stop strings: one, or a list of them.
StopString = Annotated[str, AfterValidator(_not_empty),
                       Field(max_length=MAX_PROMPT_CHARS, json_schema_extra={"minLength": 1})]
Stops = Annotated[list[StopString], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                  Field(max_length=MAX_STOP_STRINGS), _OneOrList()]


def one_of(*fields: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields, not null" (a model validator's rule,
    stated in the document too, so that what it allows the server accepts)."""
    return {"oneOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                      for name in fields]}


# Fields clients add that do not change the answer: accepted and ignored, each named here (and
# in the README), so that every other unknown field is still refused and nothing a client asks
# for is silently dropped.
ACCEPTED_AND_IGNORED = {
    "cache_control": "a prompt-caching hint on a message or content part (litellm, jupyter-ai "
                     "add it): this server caches every prompt's prefix by itself",
    "metadata": "OpenAI's tags for its dashboard",
    "store": "OpenAI's opt-in to keep the answer: every request is recorded here anyway",
    "service_tier": "OpenAI's processing tier",
}


def ignored(name: str) -> Any:
    """The declaration of a field in ACCEPTED_AND_IGNORED."""
    return Field(None, description=f"accepted and ignored: {ACCEPTED_AND_IGNORED[name]}")


CacheControl = Annotated[dict[str, Any] | None, ignored("cache_control")]
FUNCTION_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


def _parameters(value: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else check_parameters(value)


JsonSchema = Annotated[dict[str, Any], AfterValidator(check_schema)]


class FunctionDefinition(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    parameters: Annotated[dict[str, Any] | None, AfterValidator(_parameters)] = Field(
        None, description="a JSON schema of an object; left out: no arguments")
    strict: bool | None = Field(None, description="calls are always enforced to match the "
                                                  "parameters when forced (tool_choice "
                                                  "required or named)")


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS, description="JSON text")


class ToolCallIn(_Body):
    id: str = Field(max_length=MAX_MODEL_NAME_CHARS)
    type: Literal["function"]
    function: FunctionCallIn


# check_message's rules, stated in the document too (so that what it allows the server
# accepts).
MESSAGE_RULES = {"allOf": [
    {"if": {"properties": {"role": {"const": "tool"}}},
     "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
     "else": {"properties": {"tool_call_id": {"type": "null"}}}},
    {"if": {"required": ["tool_calls"],
            "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
     "then": {"properties": {"role": {"const": "assistant"}}}},
    {"if": {"properties": {"content": {"type": "null"}}},
     "then": {"required": ["tool_calls"],
              "properties": {"role": {"const": "assistant"},
                             "tool_calls": {"type": "array", "minItems": 1}}}}]}
# _check_sampling's and _check_tools' rules that JSON Schema can state (the others: a named
# tool_choice names one of the tools, the tools' names differ).
SAMPLING_RULES = [
    {"if": {"required": ["top_logprobs"],
            "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
     "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
    {"if": {"required": ["tool_choice"],
            "properties": {"tool_choice": {"not": {"enum": ["none", "auto", None]}}}},
     "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},
]


def schema_or_tools(schema_field: str) -> dict[str, Any]:
    """The rule "a schema or tools, not both", for the field that holds the schema."""
    return {"not": {"required": [schema_field, "tools"],
                    "properties": {schema_field: {"type": "object"},
                                   "tools": {"type": "array", "minItems": 1},
                                   "tool_choice": {"not": {"const": "none"}}}}}


class ChatMessage(_Body):
    """A message: system, user, assistant (which may carry the tool calls it made, its content
    then null) or tool (a call's result, naming the call)."""

    model_config = ConfigDict(json_schema_extra=MESSAGE_RULES)
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(max_length=MAX_PROMPT_CHARS)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    name: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    cache_control: CacheControl = None

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        check_message(self.role, self.content, self.tool_calls, self.tool_call_id)
        return self

    def for_queue(self) -> dict[str, Any]:
        return message_for_queue(self.role, self.content, self.tool_calls, self.tool_call_id,
                                 self.name)


def check_message(role: str, content: Any, tool_calls: list[Any] | None,
                  tool_call_id: str | None) -> None:
    if tool_calls and role != "assistant":
        raise ValueError("only an assistant message carries tool_calls")
    if content is None and not (role == "assistant" and tool_calls):
        raise ValueError("content is null only in an assistant message with tool_calls")
    if (role == "tool") != (tool_call_id is not None):
        raise ValueError("a tool message, and only a tool message, names its tool_call_id")


def message_for_queue(role: str, content: str | None, tool_calls: list[ToolCallIn] | None,
                      tool_call_id: str | None, name: str | None) -> dict[str, Any]:
    """A message as the worker's chat template gets it."""
    message: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = [call.model_dump() for call in tool_calls]
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
        if name is not None:
            message["name"] = name
    return message


class Sampling(_Body):
    """What native and OpenAI requests share beyond the basics: answers, sampling, penalties,
    log-probabilities."""

    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), INTEGRAL] | None = Field(
        None, description="answers to generate (each takes a batch slot; each from the seed "
                          "plus its index)")
    top_k: Annotated[int, Field(ge=0), INTEGRAL] | None = Field(
        None, description="sample from the k likeliest tokens only; 0: off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="drop tokens less likely "
                                                                  "than this times the "
                                                                  "likeliest; 0: off")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=MAX_REPETITION_PENALTY,
        description="divide the logits of recent tokens by this (1: off)")
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = \
        Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES,
              description="token id -> a value added to its logit")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = Field(
        None, description="with logprobs: the likeliest rivals of each token")
    def _check_sampling(self, logprobs: bool) -> None:
        """The rules across fields (InvalidRequest, naming the field: it passes through
        pydantic's validation untouched)."""
        if self.top_logprobs and not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs", param="top_logprobs")

    def sampling_params(self, logprobs: bool) -> dict[str, Any]:
        """The queue's fields for these (None: left out, the worker's neutral value)."""
        return {
            "n": self.n or 1, "top_k": self.top_k or 0, "min_p": self.min_p or 0.0,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "logit_bias": self.logit_bias or {},
            "logprobs": (self.top_logprobs or 0) if logprobs else None}


class ToolUse(_Body):
    """What chat requests (native and OpenAI) add: tools, and the chat template's options."""

    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto (the default with tools), required (at least one call, "
                          "enforced), or a named function (one call of it, enforced)")
    parallel_tool_calls: bool | None = Field(
        None, description="required: the answer may make several calls (the default)")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="passed to the chat template (e.g. enable_thinking)")

    def _check_tools(self, schema: dict[str, Any] | None) -> None:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise InvalidRequest("tools: two functions have the same name", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) \
                and self.tool_choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names the function {self.tool_choice.function.name!r}, which is "
                f"not among the tools ({', '.join(names) or 'none given'})",
                param="tool_choice")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidRequest("tool_choice asks for a call, and no tools are given",
                                 param="tool_choice")
        if schema is not None and self.tools and self.tool_choice != "none":
            raise InvalidRequest("give a schema or tools, not both: an answer is either JSON "
                                 "for the schema or tool calls", param="tools")

    def tool_params(self, schema: dict[str, Any] | None) -> dict[str, Any]:
        """The queue's fields for the schema and tools (resolved there into a constraint)."""
        choice = self.tool_choice
        return {
            "schema": schema,
            "tools": [tool.model_dump(exclude_none=True) for tool in self.tools or ()] or None,
            "tool_choice": choice.model_dump() if isinstance(choice, NamedToolChoice)
            else choice,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "chat_template_kwargs": self.chat_template_kwargs or {}}


class GenerateRequest(Sampling, ToolUse):
    # model, max_tokens, temperature and top_p left out (or null) take the stored settings'
    # defaults (default_model, default_max_tokens, ...).
    model_config = ConfigDict(json_schema_extra={
        **one_of("prompt", "messages"),
        "allOf": [
            {"not": {"required": ["background", "stream"],
                     "properties": {"background": {"const": True}, "stream": {"const": True}}}},
            {"not": {"required": ["prompt", "tools"],
                     "properties": {"prompt": {"type": "string"},
                                    "tools": {"type": "array", "minItems": 1}}}},
            schema_or_tools("schema"), *SAMPLING_RULES]})

    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: Stops = Field(default_factory=list)
    stream: bool = False
    priority: Priority = 0
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_SECONDS)  # seconds from submit to the end
    background: bool = False  # answer 202 at once; the result is read from the history
    notebook: str | None = Field(None, max_length=MAX_NOTEBOOK_CHARS)  # the kernel's JPY_SESSION_NAME
    schema_: JsonSchema | None = Field(
        None, alias="schema", description="a JSON schema: the answer is JSON valid for it, "
                                          "enforced token by token ({}: any JSON value)")
    logprobs: bool = Field(False, description="each answer token's log-probability")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.background and self.stream:
            raise ValueError("a background request is not streamed: leave out 'stream'")
        if self.tools and self.prompt is not None:
            raise InvalidRequest("tools go through the chat template: give messages, not a "
                                 "prompt", param="tools")
        self._check_sampling(self.logprobs)
        self._check_tools(self.schema_)
        return self

    def queue_params(self) -> dict[str, object]:
        """What the queue needs: the model and what its worker generates with."""
        return {**self.model_dump(include={"model", "prompt", "max_tokens", "temperature",
                                           "top_p", "seed"}),
                "messages": None if self.messages is None
                else [message.for_queue() for message in self.messages],
                "stop": self.stop, **self.sampling_params(self.logprobs),
                **self.tool_params(self.schema_)}


class HistoryQuery(_Body):
    model_config = ConfigDict(extra="forbid", strict=False)  # query strings are all text

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    notebook: str | None = Field(None, max_length=MAX_NOTEBOOK_CHARS)
    status: RequestStatusName | None = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=2**63 - 1)  # the databases' 64-bit integers


def _finite(value: object) -> object:
    """NaN and the infinities, which Python's JSON reads, are no value: as in a typed field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


class SettingValue(_Body):
    # Checked against the setting's own type by the store (its errors name the setting and
    # what it expects); 5.0 is an integer there too.
    value: Annotated[Any, BeforeValidator(_finite), INTEGRAL]


@functools.cache
def setting_bodies() -> dict[str, type[BaseModel]]:
    """The body of PUT mlx/api/settings/{key} for each key, as the store checks its value (for
    the OpenAPI document; the store's settings load SQLAlchemy, so only when it is built)."""
    from ..store.settings import SETTINGS

    def value_type(spec: Any) -> Any:
        bounds = [] if spec.constraint is None else [spec.constraint]
        return Annotated[spec.type, *bounds, *([INTEGRAL] if spec.type is int else [])]

    return {key: create_model(f"Set_{key}", __base__=_Body,
                              value=(value_type(spec), Field(description=spec.expected)))
            for key, spec in SETTINGS.items()}


def parse_body(schema: type[BodyT], body: bytes | bytearray) -> BodyT:
    """Validates a JSON body, turning pydantic's report into one line per problem; a body
    that is no JSON object at all is a BadBody."""
    try:
        return schema.model_validate_json(body or b"")
    except ValidationError as exc:
        invalid = _invalid(exc)
        if any(_unreadable(error) for error in exc.errors()):
            raise BadBody(str(invalid), param=invalid.param) from None
        raise invalid from None


def _unreadable(error: dict) -> bool:
    """Not JSON (or not UTF-8, nested too deep, a number too long), a NaN or an infinity
    anywhere, or a whole body that is no object."""
    return error["type"] in ("json_invalid", "finite_number") or \
        (error["type"] == "model_type" and not error["loc"])


def parse_query(schema: type[BodyT], arguments: dict[str, list[bytes]]) -> BodyT:
    """Validates query arguments (the last value of each wins). A bare number with no value is
    a cache buster (JupyterLab's ServerConnection adds one to every GET), not a field."""
    values = {key: raw[-1].decode(errors="replace") for key, raw in arguments.items()
              if not (key.isdigit() and raw == [b""])}
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors()
    first = ".".join(str(part) for part in errors[0]["loc"]) if errors else ""
    return InvalidRequest("; ".join(_describe(error) for error in errors), param=first or None)


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "json_invalid":
        return f"request body is not valid JSON: {error['msg']}"
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown field"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


class RegisterModel(_Body):
    # The patterns are the registry's rules (checked there, where the errors say why), stated
    # in the document too.
    name: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS,
                      json_schema_extra={"pattern": NAME_PATTERN})
    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS,
                      json_schema_extra={"pattern": ABSOLUTE_PATH},
                      description="an absolute path, under c.MlxApp.allowed_model_roots")


class ForgetQuery(_Body):
    model_config = ConfigDict(extra="forbid", strict=False)  # query strings are all text

    delete_files: bool = False
