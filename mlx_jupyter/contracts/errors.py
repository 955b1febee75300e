"""What an error answers: ours, and OpenAI's shape on mlx/v1."""

from __future__ import annotations

from pydantic import Field

from .base import Answer


class ErrorAnswer(Answer):
    message: str = Field(description="one line a user can act on")
    reason: str | None = Field(None, description="the error's name (ModelNotFound, ...)")


class OpenAIErrorDetail(Answer):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, "
                                  "permission_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault")
    code: str | None


class OpenAIErrorAnswer(Answer):
    error: OpenAIErrorDetail
