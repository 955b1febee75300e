"""Thin tornado handlers: authenticate, validate, call one service method, render."""

from __future__ import annotations

import contextlib
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
from ..errors import MlxJupyterError
from ..queue import Generation
from .schemas import GenerateRequest, parse_body


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
            self.write_json({"message": str(exc), "reason": type(exc).__name__})

    return wrapper


class MlxHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = "mlx"

    @property
    def queue(self):
        return self.settings["mlx_jupyter.queue"]

    @property
    def manager(self):
        return self.settings["mlx_jupyter.manager"]

    def write_json(self, payload: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))


class StatusHandler(MlxHandler):
    @tornado.web.authenticated
    @authorized
    @maps_errors
    async def get(self) -> None:
        self.write_json({"version": __version__, "models": self.manager.loaded_models()})


class GenerateHandler(MlxHandler):
    _generation: Generation | None = None

    @tornado.web.authenticated
    @authorized
    @maps_errors
    async def post(self) -> None:
        request = parse_body(GenerateRequest, self.request.body)
        self._generation = await self.queue.submit(request.model, request.worker_params())
        if request.stream:
            await self._stream(self._generation)
        else:
            self.write_json(await self._generation.result())

    async def _stream(self, generation: Generation) -> None:
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Request-Id", generation.id)
        try:
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    self.write(json.dumps(event) + "\n")
                    await self.flush()
        except MlxJupyterError as exc:
            # The status line is gone already: the error travels as the last event.
            self.write(json.dumps({"done": True, "request_id": generation.id,
                                   "finish_reason": "error", "error": str(exc)}) + "\n")
        except StreamClosedError:
            return  # the client went away; closing the events cancelled the request
        self.finish()

    def on_connection_close(self) -> None:
        # A client that disconnects while its request waits for a token: cancel it now, not
        # when the next token fails to write.
        if self._generation is not None:
            tornado.ioloop.IOLoop.current().add_callback(self._generation.cancel)
