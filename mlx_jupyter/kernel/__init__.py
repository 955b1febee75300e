"""The kernel side of mlx-jupyter: a REST client and the `%%mlx` magic.

Nothing here imports jupyter_server or mlx: kernels stay light. The magics module
(which needs IPython) is not imported here, so scripts can use the client alone.
"""

from .aclient import AsyncClient, AsyncEventStream
from .client import Client, EventStream
from .discovery import ServerInfo, find_server
from .errors import (
    AuthenticationError,
    Conflict,
    ConnectionFailed,
    InvalidRequest,
    MlxError,
    ModelNotFound,
    NotFound,
    QueueFull,
    RequestNotFound,
    ServerError,
    ServerNotFound,
    StructuredOutputError,
)
from .http import Choice, GenerationResult

__all__ = [
    "AsyncClient",
    "AsyncEventStream",
    "AuthenticationError",
    "Choice",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "EventStream",
    "GenerationResult",
    "InvalidRequest",
    "MlxError",
    "ModelNotFound",
    "NotFound",
    "QueueFull",
    "RequestNotFound",
    "ServerError",
    "ServerInfo",
    "ServerNotFound",
    "StructuredOutputError",
    "find_server",
]
