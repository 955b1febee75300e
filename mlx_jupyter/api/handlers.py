"""Thin tornado handlers: authenticate, validate, call one service method, render."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.ioloop
import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado.iostream import StreamClosedError

from .._version import __version__
from ..contracts.generation import DoneEvent, GenerationAnswer, TextEvent
from ..errors import MlxJupyterError
from ..queue import Generation
from .openapi import operation
from .schemas import (
    ForgetQuery,
    GenerateRequest,
    HistoryQuery,
    RegisterModel,
    SettingValue,
    parse_body,
    parse_query,
)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(payload: Any) -> str:
    return json.dumps(payload, default=_json_default)


def maps_errors(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """The one place where domain errors become HTTP statuses with a JSON message."""

    @functools.wraps(method)
    async def wrapper(self: MlxHandler, *args: Any, **kwargs: Any) -> None:
        try:
            await method(self, *args, **kwargs)
        except MlxJupyterError as exc:
            self.log.warning("mlx_jupyter: %s %s -> %s: %s", self.request.method,
                             self.request.path, exc.status, exc)
            self.set_status(exc.status)
            if retry_after := getattr(exc, "retry_after", None):
                self.set_header("Retry-After", str(retry_after))
            self.write_json(self.error_body(exc))

    return wrapper


def endpoint(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Every route method: Jupyter's authentication and authorization, then our error map."""
    return tornado.web.authenticated(authorized(maps_errors(method)))


class MlxHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = "mlx"

    @property
    def queue(self):
        return self.settings["mlx_jupyter.queue"]

    @property
    def manager(self):
        return self.settings["mlx_jupyter.manager"]

    @property
    def models(self):
        return self.settings["mlx_jupyter.models"]

    @property
    def store(self):
        return self.settings["mlx_jupyter.store"]

    def write_json(self, payload: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(to_json(payload))

    def error_body(self, exc: MlxJupyterError) -> dict[str, Any]:
        return {"message": str(exc), "reason": type(exc).__name__}


class OpenAPIHandler(MlxHandler):
    @operation("This document: every mlx route, OpenAPI 3.1", tag="status")
    @endpoint
    async def get(self) -> None:
        from .routes import openapi_document  # the route table imports this module

        self.write_json(openapi_document(self.base_url))


class StatusHandler(MlxHandler):
    @operation("Version, memory, loaded models and queue counts", tag="status")
    @endpoint
    async def get(self) -> None:
        self.write_json({"version": __version__, **self.manager.get_system_status(),
                         "queue": self.queue.summary()})


class NdjsonRenderer:
    """Our own answer shapes (contracts.generation): a GenerationAnswer, or NDJSON events
    (TextEvent, then a DoneEvent or an ErrorEvent: done: true)."""

    content_type = "application/x-ndjson"

    def bind(self, generation: Generation) -> None:
        pass  # events carry the request id themselves

    def whole(self, result: GenerationAnswer) -> dict[str, Any]:
        return result.model_dump(mode="json")

    def event(self, event: TextEvent | DoneEvent) -> str:
        return event.model_dump_json() + "\n"

    def error(self, generation: Generation, exc: MlxJupyterError) -> str:
        return generation.failed(exc).model_dump_json() + "\n"

    def end(self) -> str:
        return ""


class GenerationHandler(MlxHandler):
    """A route that generates: submits to the queue, waits for its turn, answers whole or
    streamed through a renderer (our NDJSON, or OpenAI's shapes). A client that disconnects
    cancels its request."""

    _generation: Generation | None = None

    async def generate(self, params: dict[str, Any], renderer: Any, *, stream: bool,
                       notebook: str | None = None, priority: int = 0,
                       timeout: float | None = None) -> None:
        self._generation = await self.queue.submit(params, notebook=notebook,
                                                   priority=priority, timeout=timeout)
        self.set_header("X-Request-Id", self._generation.id)
        renderer.bind(self._generation)
        await self._generation.start()
        if stream:
            await self._stream(self._generation, renderer)
        else:
            self.write_json(renderer.whole(await self._generation.result()))

    async def _stream(self, generation: Generation, renderer: Any) -> None:
        self.set_header("Content-Type", renderer.content_type)
        self.set_header("Cache-Control", "no-cache")
        # Each token is a small write: without TCP_NODELAY, Nagle's algorithm holds it until
        # the client acknowledges the last one (tens of ms with delayed ACKs).
        self.request.connection.stream.set_nodelay(True)
        try:
            await self.flush()  # the headers, with the request id, before the first token
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    self.write(renderer.event(event))
                    await self.flush()
        except MlxJupyterError as exc:
            # The status line is gone already: the error travels as the last event.
            self.write(renderer.error(generation, exc))
        except StreamClosedError:
            return  # the client went away; closing the events cancelled the request
        self.finish(renderer.end())

    def on_connection_close(self) -> None:
        # A client that disconnects while its request waits for a token: cancel it now, not
        # when the next token fails to write. Background requests outlive their client.
        if self._generation is not None and not self._generation.background:
            tornado.ioloop.IOLoop.current().add_callback(self._generation.cancel)


class GenerateHandler(GenerationHandler):
    @operation("Generate text: whole, streamed as NDJSON, or as a background job", tag="generate",
               body=GenerateRequest,
               answer="the answer (stream false); 202 with the request id for a background job",
               streams={"application/x-ndjson": "stream true: text events, the last done"},
               errors=(404, 409, 429, 503))
    @endpoint
    async def post(self) -> None:
        request = parse_body(GenerateRequest, self.request.body)
        if request.background:
            generation = await self.queue.submit(
                request.queue_params(), notebook=request.notebook, priority=request.priority,
                timeout=request.timeout, background=True)
            self.set_status(202)
            self.write_json({"request_id": generation.id, "status": "queued"})
            return
        await self.generate(request.queue_params(), NdjsonRenderer(), stream=request.stream,
                            notebook=request.notebook, priority=request.priority,
                            timeout=request.timeout)


class SettingsHandler(MlxHandler):
    @operation("Every setting: value, default, type, description", tag="settings")
    @endpoint
    async def get(self) -> None:
        self.write_json({"settings": await self.store.settings()})


class SettingHandler(MlxHandler):
    @operation("One setting", tag="settings", errors=(404,))
    @endpoint
    async def get(self, key: str) -> None:
        self.write_json(await self.store.setting(key))

    @operation("Change one setting", tag="settings", body=SettingValue, errors=(404,))
    @endpoint
    async def put(self, key: str) -> None:
        body = parse_body(SettingValue, self.request.body)
        self.write_json(await self.store.set_setting(key, body.value))


class DatabaseHandler(MlxHandler):
    @operation("The database: dialect, pool, pragmas, revision, size, row counts", tag="status")
    @endpoint
    async def get(self) -> None:
        self.write_json(await self.store.database_info())


class RequestsHandler(MlxHandler):
    @operation("The history of requests, newest first", tag="requests", query=HistoryQuery)
    @endpoint
    async def get(self) -> None:
        query = parse_query(HistoryQuery, self.request.query_arguments)
        rows, total = await self.store.list_requests(**query.model_dump())
        self.write_json({"requests": rows, "total": total, "limit": query.limit,
                         "offset": query.offset})


class RequestHandler(MlxHandler):
    @operation("One request with its prompt, parameters, output and times", tag="requests",
               errors=(404,))
    @endpoint
    async def get(self, request_id: str) -> None:
        self.write_json(await self.store.get_request(request_id))

    @operation("Cancel a queued or running request", tag="requests", errors=(404, 409))
    @endpoint
    async def delete(self, request_id: str) -> None:
        self.write_json(await self.queue.cancel(request_id))


class QueueHandler(MlxHandler):
    @operation("Active and waiting requests per model, with positions and ETAs", tag="requests")
    @endpoint
    async def get(self) -> None:
        self.write_json(self.queue.snapshot())


class ModelsHandler(MlxHandler):
    @operation("Every known model with its status and memory estimate", tag="models")
    @endpoint
    async def get(self) -> None:
        self.write_json({"models": await self.models.list()})

    @operation("Register a model folder under a name", tag="models", body=RegisterModel, ok=201,
               errors=(409,))
    @endpoint
    async def post(self) -> None:
        body = parse_body(RegisterModel, self.request.body)
        self.set_status(201)
        self.write_json(await self.models.register(body.name, body.path))


class ModelHandler(MlxHandler):
    @operation("One model", tag="models", errors=(404,))
    @endpoint
    async def get(self, name: str) -> None:
        self.write_json(await self.models.get(name))

    @operation("Forget a registered model (optionally deleting its files)", tag="models",
               query=ForgetQuery, errors=(404, 409))
    @endpoint
    async def delete(self, name: str) -> None:
        query = parse_query(ForgetQuery, self.request.query_arguments)
        self.write_json(await self.models.forget(name, delete_files=query.delete_files))


class ModelActionHandler(MlxHandler):
    """POST models/{name}/load | unload | pin | unpin."""

    @operation("Load, unload, pin or unpin a model", tag="models", errors=(404, 409, 503))
    @endpoint
    async def post(self, name: str, action: str) -> None:
        if action in ("pin", "unpin"):
            self.write_json(await self.models.pin(name, action == "pin"))
        else:
            self.write_json(await getattr(self.models, action)(name))
