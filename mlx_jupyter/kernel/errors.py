"""Errors the kernel-side client raises.

Each message is one line that says what is wrong and what to do about it: the
`%%mlx` magic shows it as is, without a traceback.
"""

from __future__ import annotations


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


class ModelNotFound(MlxError):
    """The server does not know the model (HTTP 404)."""


class ServerError(MlxError):
    """The server or its model worker failed (HTTP 5xx, or an error event mid-stream)."""
