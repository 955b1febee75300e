"""Thin tornado handlers: authenticate, validate, call one service method, render."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from http.client import responses
from typing import Any
from urllib.parse import unquote

import tornado.ioloop
import tornado.web
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.auth.utils import HTTP_METHOD_TO_AUTH_ACTION
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from pydantic import BaseModel
from tornado.iostream import StreamClosedError

from .._version import __version__
from ..contracts.errors import ErrorAnswer
from ..contracts.generation import (
    DoneEvent,
    ErrorEvent,
    GenerationAnswer,
    LogprobsEvent,
    OutputEvent,
    ReasoningEvent,
    TextEvent,
    ToolCallEvent,
)
from ..contracts.models import ForgottenModel, ModelDescription, ModelList
from ..contracts.requests import Accepted, Cancellation, HistoryPage, QueueSnapshot, RequestDetail
from ..contracts.settings import Setting, Settings
from ..contracts.status import ApiDocument, DatabaseInfo, Status
from ..errors import BadBody, BodyTooLarge, MlxJupyterError
from ..limits import MAX_MODEL_NAME_CHARS, MODEL_ACTIONS, STREAM_SOCKET_UNSENT_BYTES
from ..metrics import Metrics
from ..models.registry import NAME_PATTERN
from ..queue import Generation
from .openapi import METHODS, NDJSON, Stream, implements, operation
from .schemas import (
    BodyT,
    ForgetQuery,
    GenerateRequest,
    HistoryQuery,
    RegisterModel,
    SettingValue,
    parse_body,
    parse_query,
    setting_bodies,
)

REQUEST_ID = {"X-Request-Id": "the request's id in the history"}  # a generation's header
# A model name in a path: the whole rest of it, "/" included (Hub repo ids: org/name).
MODEL_NAME_PARAM = {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_NAME_CHARS,
                    "pattern": NAME_PATTERN,
                    "description": "a model name; it may hold '/' (org/name), sent as %2F"}


def maps_errors(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A route method's domain errors become its error answer (`MlxHandler.answer_error`)."""

    @functools.wraps(method)
    async def wrapper(self: MlxHandler, *args: Any, **kwargs: Any) -> None:
        try:
            await method(self, *args, **kwargs)
        except MlxJupyterError as exc:
            self.answer_error(exc)

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

    @property
    def metrics(self) -> Metrics:
        return self.settings["mlx_jupyter.metrics"]

    def answer_error(self, exc: MlxJupyterError) -> None:
        """The one place where a domain error becomes an HTTP status with a JSON message (and
        a log line that says what happened)."""
        self.log.warning("mlx_jupyter: %s %s -> %s: %s", self.request.method,
                         self.request.path, exc.status, exc)
        self.set_status(exc.status)
        if retry_after := getattr(exc, "retry_after", None):
            self.set_header("Retry-After", str(retry_after))
        self.write_json(self.error_answer(exc.status, str(exc), type(exc).__name__, exc.param))

    def write_json(self, payload: BaseModel | dict[str, Any]) -> None:
        """Renders an answer: a contract's model (or one dumped already)."""
        self.set_header("Content-Type", "application/json")
        self.finish(payload.model_dump_json() if isinstance(payload, BaseModel)
                    else json.dumps(payload))

    def error_answer(self, status: int, message: str, reason: str | None = None,
                     param: str | None = None) -> BaseModel:
        return ErrorAnswer(message=message, reason=reason)

    def allowed_methods(self) -> list[str]:
        """What the 405 of this route's path lists in `Allow`."""
        return [method.upper() for method in METHODS if implements(type(self), method)]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors of Jupyter's and tornado's own (403 without a token, 405, ...) in our
        shape; a 405 says in `Allow` what the path takes."""
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_status(status_code)
        self.write_json(self.error_answer(status_code, *_http_error(status_code, kwargs)))


def _http_error(status_code: int, kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """The message and reason of an error tornado or Jupyter raised."""
    exc = (kwargs.get("exc_info") or (None, None, None))[1]
    if isinstance(exc, tornado.web.HTTPError):
        message = exc.log_message % exc.args if exc.log_message and exc.args else exc.log_message
        return message or responses.get(status_code, "error"), exc.reason
    return responses.get(status_code, "error"), None


@tornado.web.stream_request_body
class BodyHandler(MlxHandler):
    """A route whose POST or PUT takes a body. The body is read as it arrives, and one past
    c.MlxApp.max_body_bytes is refused with a 413 as soon as that is known, never read whole:
    a declared Content-Length at once, a chunked body the moment it passes the limit. The
    client is authenticated and authorized before any of it is read (no token: a 403)."""

    body_methods = ("post", "put")  # those the limit applies to (a 413 in the document)
    _body: bytearray

    @property
    def max_body_bytes(self) -> int:
        return self.settings["mlx_jupyter.max_body_bytes"]

    async def prepare(self) -> None:
        # This route counts its body itself: the connection's own limit (Jupyter's
        # max_body_size) would refuse first with a bare 400, or refuse what a raised
        # max_body_bytes allows.
        self.request.connection.set_max_body_size(sys.maxsize)
        self._body = bytearray()
        await super().prepare()
        await self._check_access()
        declared = self.request.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            self._refuse_body(int(declared))

    def data_received(self, chunk: bytes) -> None:
        # Tornado stops calling this once an answer is finished.
        if len(self._body) + len(chunk) > self.max_body_bytes:
            self._refuse_body()
        else:
            self._body += chunk

    def read_body(self, schema: type[BodyT]) -> BodyT:
        """The whole body, validated; one that is no JSON object at all counts as a fault."""
        try:
            return parse_body(schema, self._body)
        except BadBody:
            self.metrics.fault("bad_body")  # answer_error logs what was wrong
            raise

    async def _check_access(self) -> None:
        """What @endpoint checks after the body, checked before it: a known user, with the
        authorizer's leave for this method."""
        user = self.current_user
        action = HTTP_METHOD_TO_AUTH_ACTION.get(self.request.method or "")
        if not user:
            raise tornado.web.HTTPError(403)
        if action and not await ensure_async(
                self.authorizer.is_authorized(self, user, action, self.auth_resource)):
            raise tornado.web.HTTPError(403, "User is not authorized to %s on resource: %s.",
                                        action, self.auth_resource)

    def _refuse_body(self, declared: int | None = None) -> None:
        self.metrics.fault("body_too_large")
        # The rest of the body stays unread: the connection closes after this answer.
        self.set_header("Connection", "close")
        self.answer_error(BodyTooLarge(self.max_body_bytes, declared))


class NotFoundHandler(MlxHandler):
    """Every path under mlx/ that no route matches: a JSON 404 (Jupyter's own is a page)."""

    async def prepare(self) -> None:
        await super().prepare()
        if not self.current_user:
            raise tornado.web.HTTPError(403)
        raise tornado.web.HTTPError(404, "no such route: %s", self.request.path)

    def allowed_methods(self) -> list[str]:
        return []


class OpenAPIHandler(MlxHandler):
    @operation("This document: every mlx route, OpenAPI 3.1", tag="status", answer=ApiDocument)
    @endpoint
    async def get(self) -> None:
        from .routes import openapi_document  # the route table imports this module

        self.write_json(ApiDocument.model_validate(openapi_document(self.base_url)))


class StatusHandler(MlxHandler):
    @operation("Version, memory, loaded models and queue counts", tag="status", answer=Status)
    @endpoint
    async def get(self) -> None:
        system = self.manager.get_system_status()
        self.write_json(Status(version=__version__, memory=system.memory, models=system.models,
                               queue=self.queue.summary(), database=self.store.state()))


class NdjsonRenderer:
    """Our own answer shapes (contracts.generation): a GenerationAnswer, or NDJSON events
    (TextEvent, then a DoneEvent or an ErrorEvent: done: true)."""

    content_type = "application/x-ndjson"

    def bind(self, generation: Generation) -> None:
        pass  # events carry the request id themselves

    def whole(self, result: GenerationAnswer) -> dict[str, Any]:
        return result.model_dump(mode="json")

    def event(self, event: OutputEvent | DoneEvent) -> str:
        if isinstance(event, DoneEvent):
            return event.model_dump_json() + "\n"
        # An output event names its answer's index only past the first: {"text": ...} alone
        # for a request of one answer.
        return event.model_dump_json(exclude_defaults=True) + "\n"

    def error(self, generation: Generation, exc: MlxJupyterError) -> str:
        return generation.failed(exc).model_dump_json() + "\n"

    def end(self) -> str:
        return ""


class GenerationHandler(BodyHandler):
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
        connection = self.request.connection.stream
        # Each token is a small write: without TCP_NODELAY, Nagle's algorithm holds it until
        # the client acknowledges the last one (tens of ms with delayed ACKs).
        connection.set_nodelay(True)
        _bound_unsent_in_kernel(connection.socket)
        try:
            await self.flush()  # the headers, with the request id, before the first token
        except StreamClosedError:
            generation.abandon()  # the client went away before its first event
            return
        outbox = Outbox(self, self.settings["mlx_jupyter.stream_buffer_bytes"])
        try:
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    if not outbox.send(renderer.event(event)):
                        await self._drop_slow_client(generation, outbox)
                        return  # leaving the events cancelled the request in the worker
        except MlxJupyterError as exc:
            # The status line is gone already: the error travels as the last event.
            self.write(renderer.error(generation, exc))
        except StreamClosedError:
            return  # the client went away; closing the events cancelled the request
        self.finish(renderer.end())

    async def _drop_slow_client(self, generation: Generation, outbox: Outbox) -> None:
        reason = (f"slow_client: the client left {outbox.unsent} bytes of its stream unread, "
                  f"past c.MlxApp.stream_buffer_bytes ({outbox.limit}); the request was "
                  f"cancelled so that it stops holding a place in its model's batch")
        self.log.warning("mlx_jupyter: request %s on %s: %s", generation.id, generation.model,
                         reason)
        self.settings["mlx_jupyter.metrics"].fault("slow_client")
        await generation.cancel(reason)
        self.request.connection.stream.close()

    def on_connection_close(self) -> None:
        super().on_connection_close()  # a client gone while its body was arriving
        # A client that disconnects while its request waits for a token: cancel it now, not
        # when the next token fails to write. Background requests outlive their client.
        if self._generation is not None and not self._generation.background:
            tornado.ioloop.IOLoop.current().add_callback(self._generation.cancel)


class Outbox:
    """A stream's writes to its client, which never wait for it: the bytes the client has not
    taken yet (those of the flush under way and those written since) are counted, and `send`
    says when they pass `limit`. One flush at a time, as tornado resolves only the latest
    flush's future; what comes meanwhile waits in the handler's buffer for the next."""

    def __init__(self, handler: tornado.web.RequestHandler, limit: int):
        self.limit = limit
        self._handler = handler
        self._flushing: asyncio.Future[None] | None = None
        self._in_flight = 0  # bytes of the flush under way
        self._waiting = 0  # bytes written since it began
        self._closed = False

    @property
    def unsent(self) -> int:
        return self._in_flight + self._waiting

    def send(self, chunk: str) -> bool:
        """Writes a chunk, unless the client would then have more than `limit` bytes unread:
        False then. StreamClosedError once the client is gone."""
        if self._closed:
            raise StreamClosedError()
        data = chunk.encode()
        if self.unsent + len(data) > self.limit:
            return False
        self._handler.write(data)
        self._waiting += len(data)
        if self._flushing is None:
            self._flush()
        return True

    def _flush(self) -> None:
        self._in_flight, self._waiting = self._waiting, 0
        self._flushing = self._handler.flush()
        self._flushing.add_done_callback(self._flushed)

    def _flushed(self, future: asyncio.Future[None]) -> None:
        self._flushing, self._in_flight = None, 0
        if future.cancelled() or future.exception() is not None:
            self._closed = True  # the client is gone: the next send says so
        elif self._waiting:
            self._flush()


def _bound_unsent_in_kernel(sock: socket.socket | None) -> None:
    """Keeps what a stream's client has not read in our count, not in the kernel's send
    buffer (megabytes on Linux): past STREAM_SOCKET_UNSENT_BYTES unsent, the socket takes no
    more and the rest waits in the `Outbox`, where `stream_buffer_bytes` bounds it."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is None or option is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, STREAM_SOCKET_UNSENT_BYTES)


class GenerateHandler(GenerationHandler):
    @operation("Generate text: whole, streamed as NDJSON, or as a background job", tag="generate",
               body=GenerateRequest, answer=GenerationAnswer,
               description="the answer (stream false), or its events (stream true)",
               headers=REQUEST_ID,
               streams=(Stream(NDJSON, "stream true: output events (text, and thinking, tool "
                                       "calls, log-probabilities where asked for), then the "
                                       "end (or an error)",
                               (TextEvent, ReasoningEvent, ToolCallEvent, LogprobsEvent,
                                DoneEvent, ErrorEvent)),),
               also=((202, "background true: recorded and queued", Accepted),),
               errors=(404, 409, 429, 503))
    @endpoint
    async def post(self) -> None:
        request = self.read_body(GenerateRequest)
        if request.background:
            generation = await self.queue.submit(
                request.queue_params(), notebook=request.notebook, priority=request.priority,
                timeout=request.timeout, background=True)
            self.set_status(202)
            self.write_json(Accepted(request_id=generation.id, status="queued"))
            return
        await self.generate(request.queue_params(), NdjsonRenderer(), stream=request.stream,
                            notebook=request.notebook, priority=request.priority,
                            timeout=request.timeout)


class SettingsHandler(MlxHandler):
    @operation("Every setting: value, default, type, description", tag="settings",
               answer=Settings, errors=(503,))
    @endpoint
    async def get(self) -> None:
        self.write_json(Settings(settings=await self.store.settings()))


class SettingHandler(BodyHandler):
    # The document has a path per setting: each takes its own type of value.
    openapi_expand = ("key", lambda: setting_bodies())

    # A path per known setting: an unknown key is no documented path (it answers a 400).
    @operation("One setting", tag="settings", answer=Setting, errors=(503,))
    @endpoint
    async def get(self, key: str) -> None:
        self.write_json(Setting.model_validate(await self.store.setting(key)))

    @operation("Change one setting", tag="settings", answer=Setting,
               body=lambda key: setting_bodies()[key], errors=(503,))
    @endpoint
    async def put(self, key: str) -> None:
        body = self.read_body(SettingValue)
        self.write_json(Setting.model_validate(await self.store.set_setting(key, body.value)))


class DatabaseHandler(MlxHandler):
    @operation("The database: dialect, pool, pragmas, revision, size, row counts", tag="status",
               answer=DatabaseInfo, errors=(503,))
    @endpoint
    async def get(self) -> None:
        self.write_json(DatabaseInfo.model_validate(await self.store.database_info()))


class RequestsHandler(MlxHandler):
    @operation("The history of requests, newest first", tag="requests", query=HistoryQuery,
               answer=HistoryPage, errors=(503,))
    @endpoint
    async def get(self) -> None:
        query = parse_query(HistoryQuery, self.request.query_arguments)
        rows, total = await self.store.list_requests(**query.model_dump())
        self.write_json(HistoryPage(requests=rows, total=total, limit=query.limit,
                                    offset=query.offset))


class RequestHandler(MlxHandler):
    @operation("One request with its prompt, parameters, output and times", tag="requests",
               answer=RequestDetail, errors=(404, 503))
    @endpoint
    async def get(self, request_id: str) -> None:
        self.write_json(RequestDetail.model_validate(await self.store.get_request(request_id)))

    @operation("Cancel a queued or running request", tag="requests", answer=Cancellation,
               errors=(404, 409, 503))
    @endpoint
    async def delete(self, request_id: str) -> None:
        self.write_json(Cancellation.model_validate(await self.queue.cancel(request_id)))


class QueueHandler(MlxHandler):
    @operation("Active and waiting requests per model, with positions and ETAs", tag="requests",
               answer=QueueSnapshot)
    @endpoint
    async def get(self) -> None:
        self.write_json(QueueSnapshot.model_validate(self.queue.snapshot()))


class ModelsHandler(BodyHandler):
    @operation("Every known model with its status and memory estimate", tag="models",
               answer=ModelList, errors=(503,))
    @endpoint
    async def get(self) -> None:
        self.write_json(ModelList(models=await self.models.list()))

    @operation("Register a model folder under a name", tag="models", body=RegisterModel, ok=201,
               answer=ModelDescription, errors=(403, 404, 409, 503))
    @endpoint
    async def post(self) -> None:
        body = self.read_body(RegisterModel)
        self.set_status(201)
        self.write_json(await self.models.register(body.name, body.path))


class ModelHandler(BodyHandler):
    """models/{name}: the whole rest of the path is the name (it may hold "/"), for GET and
    DELETE; POST takes its last segment as an action (models/{name}/load)."""

    openapi_params = {"name": MODEL_NAME_PARAM}

    @operation("One model", tag="models", answer=ModelDescription, errors=(404, 503))
    @endpoint
    async def get(self, name: str) -> None:
        self.write_json(await self.models.get(name))

    @operation("Forget a registered model (optionally deleting its files)", tag="models",
               query=ForgetQuery, answer=ForgottenModel, errors=(404, 409, 503))
    @endpoint
    async def delete(self, name: str) -> None:
        query = parse_query(ForgetQuery, self.request.query_arguments)
        self.write_json(await self.models.forget(name, delete_files=query.delete_files))

    @operation("Load, unload, pin or unpin a model", tag="models", answer=ModelDescription,
               subpath="/{action}",
               path_params={"action": {"type": "string", "enum": list(MODEL_ACTIONS)}},
               errors=(404, 405, 409, 503))
    @endpoint
    async def post(self, name: str) -> None:
        name, action = _action(name) or (name, None)
        if action is None:  # a model name: GET and DELETE only
            raise tornado.web.HTTPError(405)
        if action in ("pin", "unpin"):
            self.write_json(await self.models.pin(name, action == "pin"))
        else:
            self.write_json(await getattr(self.models, action)(name))

    def allowed_methods(self) -> list[str]:
        # A method tornado does not know (TRACE) is refused before the path is read.
        path = (getattr(self, "path_kwargs", None) or {}).get("name") or unquote(
            self.request.path.partition("/models/")[2])
        return ["GET", "DELETE", *(["POST"] if _action(path) else [])]


def _action(path: str) -> tuple[str, str] | None:
    """models/{name}/{action}: the name and the action, when the path ends in one."""
    name, _, last = path.rpartition("/")
    return (name, last) if name and last in MODEL_ACTIONS else None
