"""The OpenAI-compatible routes under mlx/v1, served by the same queue as everything else.

Authentication is Jupyter's: OpenAI clients send the Jupyter token as their API key
(`Authorization: Bearer <token>`), which Jupyter accepts like `token <token>`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..contracts.errors import OpenAIErrorAnswer
from ..contracts.models import ModelDescription
from ..contracts.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    OpenAIModel,
    OpenAIModelList,
    TextCompletion,
    TextCompletionChunk,
)
from .handlers import (
    MODEL_NAME_PARAM,
    REQUEST_ID,
    GenerationHandler,
    MlxHandler,
    NotFoundHandler,
    endpoint,
)
from .openai import (
    ChatCompletionRequest,
    ChatRenderer,
    CompletionRenderer,
    CompletionRequest,
    error_body as openai_error,
)
from .openapi import SSE, Stream, operation

SSE_WHEN = "stream true: chunks as server-sent events (an error as the last), then [DONE]"


class OpenAIHandler(MlxHandler):
    """Errors in OpenAI's shape: ours, and Jupyter's own (403 without a token, 405, ...)."""

    error_model = OpenAIErrorAnswer  # for the OpenAPI document

    def error_answer(self, status: int, message: str, reason: str | None = None,
                     param: str | None = None) -> BaseModel:
        if status == 403 and not self._authenticated():
            # Jupyter's own reason (a missing XSRF argument, ...) would only puzzle an API user.
            message = "a valid Jupyter token is required: pass it as the API key"
        return openai_error(status, message, reason, param)

    def _authenticated(self) -> bool:
        try:
            return bool(self.current_user)
        except Exception:  # the identity provider refused the credentials outright
            return False


class OpenAINotFoundHandler(OpenAIHandler, NotFoundHandler):
    """Paths under mlx/v1 that no route matches: a 404 in OpenAI's shape."""


class ModelsV1Handler(OpenAIHandler):
    @operation("OpenAI: list models", tag="openai", answer=OpenAIModelList, errors=(503,))
    @endpoint
    async def get(self) -> None:
        models = await self.models.list()
        self.write_json(OpenAIModelList(object="list", data=[_entry(m) for m in models]))


class ModelV1Handler(OpenAIHandler):
    openapi_params = {"name": MODEL_NAME_PARAM}

    @operation("OpenAI: one model", tag="openai", answer=OpenAIModel, errors=(404, 503))
    @endpoint
    async def get(self, name: str) -> None:
        # ModelNotFound: a 404 in OpenAI's shape
        self.write_json(_entry(await self.models.get(name)))


class _CompletionHandler(OpenAIHandler, GenerationHandler):
    """Chat and text completions: the same flow with their own body and answer shapes."""

    schema: type[ChatCompletionRequest] | type[CompletionRequest]
    renderer: type[ChatRenderer] | type[CompletionRenderer]

    async def complete(self) -> None:
        request = self.read_body(self.schema)
        await self.generate(request.queue_params(), self.renderer(request.include_usage),
                            stream=request.stream, notebook=request.user,
                            priority=request.priority)


class ChatCompletionsHandler(_CompletionHandler):
    schema, renderer = ChatCompletionRequest, ChatRenderer

    @operation("OpenAI: chat completion", tag="openai", body=ChatCompletionRequest,
               answer=ChatCompletion, headers=REQUEST_ID,
               streams=(Stream(SSE, SSE_WHEN, (ChatCompletionChunk, OpenAIErrorAnswer)),),
               errors=(404, 409, 429, 503))
    @endpoint
    async def post(self) -> None:
        await self.complete()


class CompletionsHandler(_CompletionHandler):
    schema, renderer = CompletionRequest, CompletionRenderer

    @operation("OpenAI: text completion", tag="openai", body=CompletionRequest,
               answer=TextCompletion, headers=REQUEST_ID,
               streams=(Stream(SSE, SSE_WHEN, (TextCompletionChunk, OpenAIErrorAnswer)),),
               errors=(404, 409, 429, 503))
    @endpoint
    async def post(self) -> None:
        await self.complete()


def _entry(model: ModelDescription) -> OpenAIModel:
    registered = model.registered_at
    return OpenAIModel(id=model.name, object="model", owned_by="mlx-jupyter",
                       created=int(registered.timestamp()) if registered is not None else 0)
