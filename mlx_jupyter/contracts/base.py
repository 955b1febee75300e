"""The base of every answer: exact, so a key the server adds without a schema fails the tests
(and the handler) instead of reaching clients undocumented."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Answer(BaseModel):
    # defer_build: a model's validator is built at its first use, not while the server starts.
    model_config = ConfigDict(extra="forbid", defer_build=True)
