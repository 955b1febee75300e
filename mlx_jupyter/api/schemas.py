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
    MAX_MESSAGES,
    MAX_MODEL_NAME_CHARS,
    MAX_NOTEBOOK_CHARS,
    MAX_PATH_CHARS,
    MAX_PRIORITY,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TIMEOUT_SECONDS,
    MAX_TOKENS,
    MIN_PRIORITY,
)
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


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerateRequest(_Body):
    # model, max_tokens, temperature and top_p left out (or null) take the stored settings'
    # defaults (default_model, default_max_tokens, ...).
    model_config = ConfigDict(json_schema_extra={
        **one_of("prompt", "messages"),
        "not": {"required": ["background", "stream"],
                "properties": {"background": {"const": True}, "stream": {"const": True}}}})

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

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.background and self.stream:
            raise ValueError("a background request is not streamed: leave out 'stream'")
        return self

    def queue_params(self) -> dict[str, object]:
        """What the queue needs: the model and what its worker generates with."""
        return {**self.model_dump(include={"model", "prompt", "messages", "max_tokens",
                                           "temperature", "top_p", "seed"}),
                "stop": self.stop}


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
