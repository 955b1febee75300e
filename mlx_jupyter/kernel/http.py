"""HTTP for the kernel-side clients (sync and async): errors, JSON bodies, stream events.

Both clients send the same requests (`calls`) and read the answers the same way (here); only
the transport differs (`core` runs one over each).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from .discovery import TOKEN_ENV
from .errors import (
    AuthenticationError,
    Conflict,
    ConnectionFailed,
    InvalidRequest,
    MlxError,
    NotFound,
    QueueFull,
    ServerError,
    ServerNotFound,
)

# Generous reads: a first token may wait for a model to load or for other requests.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


TokenLogprob = dict[str, Any]  # {"token", "logprob", "bytes", "top_logprobs": [...]}
ToolCall = dict[str, Any]  # {"id", "type": "function", "function": {"name", "arguments"}}


@dataclass(frozen=True)
class Choice:
    """One of the `n` answers of a request (`GenerationResult.choices` when n > 1)."""

    index: int
    text: str
    finish_reason: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    parsed: Any = None  # with `schema`: the validated value
    parse_error: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    request_id: str
    model: str
    # "stop", "length", "tool_calls", "cancelled" or "timeout"
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    timings: dict[str, float] = field(default_factory=dict)  # ttft_ms, total_ms, tokens_per_second
    seed: int | None = None  # the seed the server sampled with; None when greedy
    # The max_tokens the model's context left room for, when less than asked.
    max_tokens_clipped_to: int | None = None
    reasoning: str | None = None  # what the model thought before its answer, if it did
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # with logprobs=True: one per token
    # With `schema`: the answer as a value of it (a pydantic model's instance, a dataclass's,
    # a dict for a TypedDict or a JSON-schema dict).
    parsed: Any = None
    parse_error: str | None = None  # the server's, when it could not parse the answer
    choices: list[Choice] | None = None  # n > 1: every answer; the fields above are the first's


class StreamReader:
    """What a stream of NDJSON lines has said so far; `feed` each line in order.

    Events carry the `index` of the answer they belong to (n > 1); `text` and `reasoning` are
    the first answer's. The last event, with what was gathered, becomes the answer's JSON as a
    whole answer has it, which `read` (the call's own) turns into the result.
    """

    def __init__(self, read: Callable[[dict[str, Any]], GenerationResult], model: str | None,
                 request_id: str | None):
        self._read = read
        self.model = model or ""
        self.request_id = request_id
        self._texts: dict[int, list[str]] = {}
        self._reasonings: dict[int, list[str]] = {}
        self._tool_calls: dict[int, list[ToolCall]] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self.result: GenerationResult | None = None

    @property
    def text(self) -> str:
        return "".join(self._texts.get(0, ()))

    @property
    def reasoning(self) -> str:
        return "".join(self._reasonings.get(0, ()))

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event of a line (None for a blank one); raises ServerError for an error event
        (and, at the end, whatever `read` raises: a schema's answer that is not valid)."""
        if not line.strip():
            return None
        event = parse_event(line)
        if event.get("done"):
            self.result = self._read(self._whole(event))
            return event
        index = event.get("index", 0)
        if not isinstance(index, int):
            raise ServerError(f"the Jupyter server sent a stream event with a bad index: "
                              f"{line[:80]!r}")
        if "text" in event:
            self._texts.setdefault(index, []).append(str(event["text"]))
        if "reasoning" in event:
            self._reasonings.setdefault(index, []).append(str(event["reasoning"]))
        if isinstance(event.get("tool_call"), dict):
            self._tool_calls.setdefault(index, []).append(event["tool_call"])
        if isinstance(event.get("logprobs"), list):
            self._logprobs.setdefault(index, []).extend(event["logprobs"])
        return event

    def _whole(self, done: dict[str, Any]) -> dict[str, Any]:
        """The last event with what the stream gathered: a whole answer's JSON."""
        body = {**done, **self._gathered(0, done),
                "request_id": done.get("request_id") or self.request_id or ""}
        if isinstance(done.get("choices"), list):
            body["choices"] = [{**choice, **self._gathered(choice.get("index", 0), choice)}
                               for choice in done["choices"] if isinstance(choice, dict)]
        return body

    def _gathered(self, index: int, said: dict[str, Any]) -> dict[str, Any]:
        reasoning = "".join(self._reasonings.get(index, ())) or said.get("reasoning")
        return {"text": "".join(self._texts.get(index, ())), "reasoning": reasoning,
                "tool_calls": self._tool_calls.get(index) or said.get("tool_calls") or [],
                "logprobs": self._logprobs.get(index) or said.get("logprobs")}

    @staticmethod
    def cut_short() -> ConnectionFailed:
        return ConnectionFailed("the connection to the Jupyter server closed before the "
                                "generation finished; check that the server is still running")


@contextlib.contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """Turns httpx's network errors into ConnectionFailed."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise ConnectionFailed(f"cannot connect to the Jupyter server at {url} ({exc}); "
                               f"is it running? Restart the kernel if the server was "
                               f"restarted") from None
    except httpx.TimeoutException:
        raise ConnectionFailed(f"the Jupyter server at {url} did not answer in time; "
                               f"it may be overloaded, try again") from None
    except httpx.RequestError as exc:
        raise ConnectionFailed(f"the connection to the Jupyter server at {url} failed: "
                               f"{one_line(str(exc)) or type(exc).__name__}") from None


def raise_for_status(response: httpx.Response, url: str, *,
                     not_found: type[NotFound] | None = None) -> None:
    """Raises the typed error of an HTTP error answer. `not_found`: what a 404 with a message
    of ours means on this route (ModelNotFound, RequestNotFound, ...); without it, or with
    Jupyter's own "Not Found", a 404 means the extension is missing."""
    status = response.status_code
    if status < 400:
        return
    message = server_message(response)
    if status in (401, 403):
        detail = "" if message in ("Forbidden", "Unauthorized") else f" ({message})"
        raise AuthenticationError(
            f"the Jupyter server refused the token{detail}; set {TOKEN_ENV} to its token "
            f"(`jupyter server list` shows it), or restart the kernel if the server was "
            f"restarted", status=status)
    if status == 404 and not_found is not None and message != "Not Found":
        raise not_found(message, status=status)
    if status == 404:
        raise ServerNotFound(
            f"the Jupyter server at {url} has no mlx-jupyter API (HTTP 404); enable it with "
            f"`jupyter server extension enable mlx_jupyter` and restart the server",
            status=status)
    if status == 400:
        raise InvalidRequest(f"invalid request: {message}", status=status)
    if status == 409:
        raise Conflict(message, status=status)
    if status == 429:
        retry_after = _seconds(response.headers.get("Retry-After"))
        raise QueueFull(message, status=status, retry_after=retry_after)
    if status >= 500:
        raise ServerError(f"the server failed (HTTP {status}): {message.rstrip('.')}; see "
                          f"the Jupyter server log", status=status)
    raise MlxError(f"unexpected answer from the Jupyter server (HTTP {status}): {message}",
                   status=status)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the message says when, too


def server_message(response: httpx.Response) -> str:
    """The "message" of a Jupyter JSON error body, else the HTTP reason phrase."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return one_line(body["message"])
    return response.reason_phrase or f"HTTP {response.status_code}"


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServerError(f"the Jupyter server sent an answer that is not a JSON object "
                          f"(from {response.url}); is {response.url.host} a Jupyter server?")
    return body


def parse_event(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise ServerError(f"the Jupyter server sent a malformed stream event: {line[:80]!r}")
    return event


def result_from_json(body: dict[str, Any], model: str) -> GenerationResult:
    """The result of a whole answer, or of a stream's last event with its text; raises
    ServerError for a generation that failed."""
    if body.get("finish_reason") == "error":
        message = one_line(str(body.get("error") or "unknown error")).rstrip(".")
        request_id = body.get("request_id")
        where = f" (request {request_id})" if request_id else ""
        raise ServerError(f"generation failed: {message}; see the Jupyter server log{where}",
                          request_id=request_id)
    choices = body.get("choices")
    return GenerationResult(
        text=str(body.get("text", "")), request_id=str(body.get("request_id", "")),
        model=str(body.get("model") or model),
        finish_reason=str(body.get("finish_reason", "stop")),
        usage=body.get("usage") or {}, timings=body.get("timings") or {}, seed=body.get("seed"),
        max_tokens_clipped_to=body.get("max_tokens_clipped_to"),
        reasoning=body.get("reasoning") or None, tool_calls=list(body.get("tool_calls") or []),
        logprobs=body.get("logprobs"), parsed=body.get("parsed"),
        parse_error=body.get("parse_error"),
        choices=[_choice(choice, body) for choice in choices if isinstance(choice, dict)]
        if isinstance(choices, list) and choices else None)


def _choice(choice: dict[str, Any], body: dict[str, Any]) -> Choice:
    return Choice(
        index=int(choice.get("index", 0)), text=str(choice.get("text") or ""),
        finish_reason=str(choice.get("finish_reason") or body.get("finish_reason", "stop")),
        reasoning=choice.get("reasoning") or None,
        tool_calls=list(choice.get("tool_calls") or []), logprobs=choice.get("logprobs"),
        parsed=choice.get("parsed"), parse_error=choice.get("parse_error"))


def one_line(text: str) -> str:
    return " ".join(text.split())
