"""The synchronous client of the mlx-jupyter REST API (`AsyncClient` is its async twin).

    from mlx_jupyter import Client
    client = Client()                      # finds the Jupyter server of this kernel
    print(client.generate("Hello", model="demo").text)
    with client.stream(messages=[{"role": "user", "content": "Hi"}]) as events:
        for event in events:
            print(event.get("text", ""), end="")
    job = client.submit("A long essay", priority=-1)   # a background job
    print(client.result(job).text)                     # waits for it

Closing a stream before its end closes the HTTP response, which the server takes as a
cancel of the generation. A model left out is the server's `default_model` setting.
The methods are written once, in `core.Methods`; this module only runs them, blocking.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from .calls import Call
from .core import (
    ClientBase,
    Close,
    Plan,
    Sleep,
    Step,
    StreamBase,
    T,
    client_methods,
)
from .http import GenerationResult, transport_errors

__all__ = ["Client", "EventStream", "GenerationResult"]


class EventStream(StreamBase):
    """The events of one streaming generation, read from an NDJSON response.

    Raises ServerError when the server reports an error mid-stream, and
    ConnectionFailed when the connection breaks before the final event. Once the
    final event was read, `result` holds the whole GenerationResult.
    """

    def __init__(self, response: httpx.Response, call: Call, url: str):
        super().__init__(response, call, url)
        self._lines = response.iter_lines()
        self._reading_thread: int | None = None  # the thread inside __next__, if any

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops reading, also from elsewhere than the reader (a Stop button): another
        thread for an EventStream, another task of its event loop for an AsyncEventStream.
        Whoever waits for the next event wakes, and its iteration ends. Before the final
        event, the server cancels the generation."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            elsewhere = self._reading_thread not in (None, threading.get_ident())
        if elsewhere:
            # Closing a socket does not wake a thread blocked reading it; shutting it down
            # does, and that thread then closes the response (httpx's is not thread-safe).
            _shut_down(self._response)
        else:
            self._response.close()

    def __next__(self) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise StopIteration
            self._reading_thread = threading.get_ident()
        try:
            with transport_errors(self._url):
                for line in self._lines:
                    if (event := self._reader.feed(line)) is not None:
                        if self._reader.result is not None:
                            self.close()
                        return event
            raise self._reader.cut_short()
        except Exception:
            if not self._mark_closed():  # closed from another thread: just the end
                raise StopIteration from None
            raise
        except BaseException:
            # Including KeyboardInterrupt: dropping the connection cancels the request.
            self._mark_closed()
            raise
        finally:
            with self._lock:
                self._reading_thread = None
                closing = self._closed  # after this, a close() closes the response itself
            if closing:
                self._response.close()


def _shut_down(response: httpx.Response) -> None:
    """Shuts down the socket under a streamed response (where the transport tells it)."""
    network = response.extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already closed by its reader
            sock.shutdown(socket.SHUT_RDWR)
    else:
        response.close()


@client_methods
class Client(ClientBase):
    """Talks to the mlx-jupyter API of one Jupyter server, blocking.

    Without `url`, the server is discovered (see `discovery.find_server`); without
    `token`, the discovered token or else $MLX_JUPYTER_TOKEN is used.
    """

    _stream_class = EventStream
    _httpx_client, _transport_class, _unix_transport = (
        httpx.Client, httpx.BaseTransport, httpx.HTTPTransport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _drive(self, plan: Plan[T]) -> T:
        """Runs a plan of `core.Methods`, blocking on each step."""
        try:
            answer = None
            while True:
                try:
                    step = plan.send(answer)
                except StopIteration as end:
                    return end.value
                answer = self._do(step)
        finally:
            plan.close()

    def _do(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Close):
            self._http.close()
            return None
        with transport_errors(self.url):
            response = self._http.send(self._request(step), stream=step.stream)
            if step.stream:
                if not response.is_error:
                    return EventStream(response, step, self.url)
                with contextlib.closing(response):
                    response.read()  # the error's JSON body
            return self._answer(step, response)
