"""HTTP for the kernel-side clients (sync and async): errors, JSON bodies, stream events.

Both clients send the same requests (`calls`) and read the answers the same way (here); only
the transport differs (`core` runs one over each).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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


@dataclass(frozen=True)
class GenerationResult:
    text: str
    request_id: str
    model: str
    finish_reason: str  # "stop", "length", "cancelled" or "timeout"
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    timings: dict[str, float] = field(default_factory=dict)  # ttft_ms, total_ms, tokens_per_second
    seed: int | None = None  # the seed the server sampled with; None when greedy
    # The max_tokens the model's context left room for, when less than asked.
    max_tokens_clipped_to: int | None = None


class StreamReader:
    """What a stream of NDJSON lines has said so far; `feed` each line in order."""

    def __init__(self, model: str | None, request_id: str | None):
        self.model = model or ""
        self.request_id = request_id
        self.pieces: list[str] = []
        self.result: GenerationResult | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event of a line (None for a blank one); raises ServerError for an error event."""
        if not line.strip():
            return None
        event = parse_event(line)
        if not event.get("done"):
            self.pieces.append(str(event.get("text", "")))
            return event
        self.result = result_from_json(
            {**event, "text": self.text,
             "request_id": event.get("request_id") or self.request_id or ""}, self.model)
        return event

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
    return GenerationResult(
        text=str(body.get("text", "")), request_id=str(body.get("request_id", "")),
        model=str(body.get("model") or model),
        finish_reason=str(body.get("finish_reason", "stop")),
        usage=body.get("usage") or {}, timings=body.get("timings") or {}, seed=body.get("seed"),
        max_tokens_clipped_to=body.get("max_tokens_clipped_to"))


def one_line(text: str) -> str:
    return " ".join(text.split())
