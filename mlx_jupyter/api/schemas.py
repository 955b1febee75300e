"""Request bodies, validated with pydantic; errors name the offending field."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InvalidRequest
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


class _Body(BaseModel):
    # strict: "5" is not a number and true is not 1; extra: a misspelt field is an error.
    model_config = ConfigDict(extra="forbid", strict=True)


BodyT = TypeVar("BodyT", bound=BaseModel)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerateRequest(_Body):
    # model, max_tokens, temperature and top_p left out (or null) take the stored settings'
    # defaults (default_model, default_max_tokens, ...).
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY)  # higher first; waiting raises it (aging)
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_SECONDS)  # seconds from submit to the end
    background: bool = False  # answer 202 at once; the result is read from the history
    notebook: str | None = Field(None, max_length=MAX_NOTEBOOK_CHARS)  # the kernel's JPY_SESSION_NAME

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.background and self.stream:
            raise ValueError("a background request is not streamed: leave out 'stream'")
        return self

    def queue_params(self) -> dict[str, object]:
        """What the queue needs: the model and what its worker generates with."""
        return self.model_dump(include={"model", "prompt", "messages", "max_tokens",
                                        "temperature", "top_p", "seed", "stop"})


class HistoryQuery(_Body):
    model_config = ConfigDict(extra="forbid", strict=False)  # query strings are all text

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    notebook: str | None = Field(None, max_length=MAX_NOTEBOOK_CHARS)
    status: Literal["queued", "running", "completed", "cancelled", "failed",
                    "interrupted"] | None = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0)


class SettingValue(_Body):
    value: Any


def parse_body(schema: type[BodyT], body: bytes) -> BodyT:
    """Validates a JSON body, turning pydantic's report into one line per problem."""
    try:
        return schema.model_validate_json(body or b"")
    except ValidationError as exc:
        raise _invalid(exc) from None


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
    name: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)


class ForgetQuery(_Body):
    model_config = ConfigDict(extra="forbid", strict=False)  # query strings are all text

    delete_files: bool = False
