"""Errors the kernel-side client raises.

Each message is one line that says what is wrong and what to do about it: the
`%%mlx` magic shows it as is, without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .http import GenerationResult


class MlxError(Exception):
    """Base of every error the client raises on purpose."""

    def __init__(self, message: str, *, status: int | None = None,
                 request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status  # the HTTP status, when the server answered with one
        self.request_id = request_id  # set for errors reported mid-stream


class ServerNotFound(MlxError):
    """No Jupyter server with the mlx-jupyter extension could be located."""


class ConnectionFailed(MlxError):
    """The server could not be reached, or the connection broke."""


class AuthenticationError(MlxError):
    """The server refused the token (HTTP 401/403)."""


class InvalidRequest(MlxError):
    """The server rejected a parameter (HTTP 400)."""


class NotFound(MlxError):
    """The server has no such model, request or setting (HTTP 404)."""


class ModelNotFound(NotFound):
    """The server does not know the model (HTTP 404)."""


class RequestNotFound(NotFound):
    """The history has no request with that id (HTTP 404)."""


class Conflict(MlxError):
    """The server cannot do it now (HTTP 409): a model busy with requests or too big for the
    memory budget, a request that needs more KV cache than its model reserves, a model that
    cannot be forgotten, or a request that already finished."""


class QueueFull(MlxError):
    """The server's queue is full (HTTP 429); `retry_after` says when to try again."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after  # seconds, from the Retry-After header


class ServerError(MlxError):
    """The server or its model worker failed (HTTP 5xx, or an error event mid-stream)."""


class StructuredOutputError(MlxError):
    """An answer asked for with a `schema` is not a value of it: cut at max_tokens before its
    JSON ended (`cut`), or not valid for it. `result` holds the answer as it came (`parsed`
    None), its text included."""

    def __init__(self, message: str, *, result: GenerationResult, cut: bool):
        super().__init__(message, request_id=result.request_id or None)
        self.result = result
        self.cut = cut
