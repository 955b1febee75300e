"""The OpenAI-compatible routes under mlx/v1, served by the same queue as everything else.

Authentication is Jupyter's: OpenAI clients send the Jupyter token as their API key
(`Authorization: Bearer <token>`), which Jupyter accepts like `token <token>`.
"""

from __future__ import annotations

import json
from http.client import responses
from typing import Any

import tornado.web

from .handlers import GenerationHandler, MlxHandler, endpoint
from .openai import (
    ChatCompletionRequest,
    ChatRenderer,
    CompletionRenderer,
    CompletionRequest,
    error_body as openai_error,
    model_entry,
)
from .openapi import operation
from .schemas import parse_body


SSE = {"text/event-stream": "stream true: chunks as server-sent events, then data: [DONE]"}


class OpenAIHandler(MlxHandler):
    """Errors in OpenAI's shape: ours, and Jupyter's own (403 without a token, 405, ...)."""

    error_schema = "OpenAIError"  # for the OpenAPI document

    def error_body(self, exc: Exception) -> dict[str, Any]:
        return openai_error(getattr(exc, "status", 500), str(exc), type(exc).__name__,
                          getattr(exc, "param", None))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        message = responses.get(status_code, "error")
        if status_code == 403 and not self._authenticated():
            # Jupyter's own reason (a missing XSRF argument, ...) would only puzzle an API user.
            message = "a valid Jupyter token is required: pass it as the API key"
        elif isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(openai_error(status_code, message)))

    def _authenticated(self) -> bool:
        try:
            return bool(self.current_user)
        except Exception:  # the identity provider refused the credentials outright
            return False


class ModelsV1Handler(OpenAIHandler):
    @operation("OpenAI: list models", tag="openai")
    @endpoint
    async def get(self) -> None:
        models = await self.models.list()
        self.write_json({"object": "list",
                         "data": [model_entry(m["name"], _created(m)) for m in models]})


class ModelV1Handler(OpenAIHandler):
    @operation("OpenAI: one model", tag="openai", errors=(404,))
    @endpoint
    async def get(self, name: str) -> None:
        model = await self.models.get(name)  # ModelNotFound: a 404 in OpenAI's shape
        self.write_json(model_entry(model["name"], _created(model)))


class _CompletionHandler(OpenAIHandler, GenerationHandler):
    """Chat and text completions: the same flow with their own body and answer shapes."""

    schema: type[ChatCompletionRequest] | type[CompletionRequest]
    renderer: type[ChatRenderer] | type[CompletionRenderer]

    async def complete(self) -> None:
        request = parse_body(self.schema, self.request.body)
        await self.generate(request.queue_params(), self.renderer(request.include_usage),
                            stream=request.stream, notebook=request.user,
                            priority=request.priority)


class ChatCompletionsHandler(_CompletionHandler):
    schema, renderer = ChatCompletionRequest, ChatRenderer

    @operation("OpenAI: chat completion", tag="openai", body=ChatCompletionRequest,
               streams=SSE, errors=(404, 409, 429, 503))
    @endpoint
    async def post(self) -> None:
        await self.complete()


class CompletionsHandler(_CompletionHandler):
    schema, renderer = CompletionRequest, CompletionRenderer

    @operation("OpenAI: text completion", tag="openai", body=CompletionRequest,
               streams=SSE, errors=(404, 409, 429, 503))
    @endpoint
    async def post(self) -> None:
        await self.complete()


def _created(model: dict[str, Any]) -> int:
    registered = model.get("registered_at")
    return int(registered.timestamp()) if registered is not None else 0
