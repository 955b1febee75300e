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
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from . import calls
from .calls import Message
from .discovery import TOKEN_ENV, ServerInfo, find_server
from .http import (
    DEFAULT_TIMEOUT,
    GenerationResult,
    StreamBase,
    StreamReader,
    json_object,
    raise_for_status,
    transport_errors,
)

__all__ = ["Client", "EventStream", "GenerationResult"]


class Client:
    """Talks to the mlx-jupyter API of one Jupyter server.

    Without `url`, the server is discovered (see `discovery.find_server`); without
    `token`, the discovered token or else $MLX_JUPYTER_TOKEN is used.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None):
        server = resolve_server(url, token)
        self.url = server.url
        self.server = server
        if transport is None and server.sock:
            transport = httpx.HTTPTransport(uds=server.sock)
        # trust_env=False: the server is almost always local, and a proxy from the
        # environment would otherwise swallow requests to it.
        self._http = httpx.Client(base_url=server.url, headers=auth_headers(server),
                                  timeout=timeout, transport=transport, trust_env=False)

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def clone(self) -> Client:
        """A new client of the same server, for another thread (one client per thread)."""
        return Client(self.server.url, self.server.token, timeout=self._http.timeout,
                      transport=httpx.HTTPTransport(uds=self.server.sock)
                      if self.server.sock else None)

    # -- the server -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Version, memory, loaded models and queue counts."""
        return self._run(calls.status())

    def models(self) -> list[dict[str, Any]]:
        """Every model the server knows, with its status and memory estimate."""
        return self._run(calls.models())

    def model(self, name: str) -> dict[str, Any]:
        return self._run(calls.model(name))

    def load(self, name: str) -> dict[str, Any]:
        """Loads a model (waits until it is loaded); returns its description."""
        return self._run(calls.model_action(name, "load"))

    def unload(self, name: str) -> dict[str, Any]:
        return self._run(calls.model_action(name, "unload"))

    def pin(self, name: str, pinned: bool = True) -> dict[str, Any]:
        """A pinned model is never unloaded for idleness or to make room."""
        return self._run(calls.model_action(name, "pin" if pinned else "unpin"))

    def unpin(self, name: str) -> dict[str, Any]:
        return self.pin(name, False)

    def queue(self) -> dict[str, Any]:
        """Per model, the active requests and the waiting ones with positions and ETAs."""
        return self._run(calls.queue())

    def history(self, limit: int = 20, *, offset: int = 0, model: str | None = None,
                notebook: str | None = None, status: str | None = None,
                ) -> list[dict[str, Any]]:
        """Recent requests, newest first (previews of prompt and output)."""
        return self._run(calls.history(limit, offset, model=model, notebook=notebook,
                                       status=status))

    def request(self, request_id: str) -> dict[str, Any]:
        """One request with everything: prompt, parameters, output, times, error."""
        return self._run(calls.request(request_id))

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self._run(calls.cancel(request_id))

    def settings(self) -> dict[str, dict[str, Any]]:
        return self._run(calls.settings())

    def set_setting(self, key: str, value: Any) -> dict[str, Any]:
        return self._run(calls.set_setting(key, value))

    # -- generation -----------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, model: str | None = None,
                 messages: Sequence[Message] | None = None, **options: Any
                 ) -> GenerationResult:
        """A whole answer. Give exactly one of `prompt` or `messages`; options: max_tokens,
        temperature, top_p, seed, stop, priority, timeout."""
        return self._run(calls.generate(prompt, model=model, messages=messages, **options))

    def chat(self, messages: Sequence[Message], *, model: str | None = None,
             **options: Any) -> GenerationResult:
        """A whole answer to a conversation (the model's chat template applies)."""
        return self.generate(model=model, messages=messages, **options)

    def stream(self, prompt: str | None = None, *, model: str | None = None,
               messages: Sequence[Message] | None = None, **options: Any) -> EventStream:
        """Starts a streaming generation; errors before any output raise here.

        Iterate the returned EventStream for {"text": ...} events and a final
        {"done": true, ...} event; use it as a context manager, or close() it, to stop.
        """
        call = calls.generate(prompt, model=model, messages=messages, stream=True, **options)
        request = self._http.build_request(call.method, call.path, json=call.json)
        with transport_errors(self.url):
            response = self._http.send(request, stream=True)
            if response.is_error:
                try:
                    response.read()  # the error's JSON body
                finally:
                    response.close()
                raise_for_status(response, self.url, not_found=call.not_found)
        return EventStream(response, model=model, url=self.url)

    def submit(self, prompt: str | None = None, *, model: str | None = None,
               messages: Sequence[Message] | None = None, **options: Any) -> str:
        """Queues a background job and returns its request id at once; the server runs it
        even if this kernel goes away (and again after a server restart)."""
        return self._run(calls.generate(prompt, model=model, messages=messages,
                                        background=True, **options))

    def result(self, request_id: str, *, wait: bool = True, timeout: float | None = None,
               poll_seconds: float = 0.25) -> GenerationResult | None:
        """The result of a request (a background job); with `wait`, polls until it ends.
        None if it has not ended (wait=False, or `timeout` seconds passed)."""
        poll = calls.ResultPoll(wait, timeout)
        while not poll.done(self.request(request_id)):
            time.sleep(poll_seconds)
        return poll.result

    def _run(self, call: calls.Call) -> Any:
        with transport_errors(self.url):
            response = self._http.request(call.method, call.path, json=call.json,
                                          params=call.params)
            raise_for_status(response, self.url, not_found=call.not_found)
            return call.read(json_object(response))


class EventStream(StreamBase):
    """The events of one streaming generation, read from an NDJSON response.

    Raises ServerError when the server reports an error mid-stream, and
    ConnectionFailed when the connection breaks before the final event. Once the
    final event was read, `result` holds the whole GenerationResult.
    """

    def __init__(self, response: httpx.Response, *, model: str | None, url: str):
        super().__init__(response, model=model, url=url)
        self._lines = response.iter_lines()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops reading; before the final event, this cancels the generation."""
        self._finished = True
        self._response.close()

    def __next__(self) -> dict[str, Any]:
        if self._finished:
            raise StopIteration
        try:
            with transport_errors(self._url):
                for line in self._lines:
                    event = self._reader.feed(line)
                    if event is not None:
                        if event.get("done"):
                            self.close()
                        return event
            raise StreamReader.cut_short()
        except Exception:
            if self._finished:  # closed from another thread (a Stop button): just the end
                raise StopIteration from None
            self.close()
            raise
        except BaseException:
            # Including KeyboardInterrupt: dropping the connection cancels the request.
            self.close()
            raise


def resolve_server(url: str | None, token: str | None) -> ServerInfo:
    if url is None:
        server = find_server()
        return server if token is None else ServerInfo(server.url, token, server.sock)
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return ServerInfo(url if url.endswith("/") else url + "/", token)


def auth_headers(server: ServerInfo) -> dict[str, str]:
    return {"Authorization": f"token {server.token}"} if server.token else {}
