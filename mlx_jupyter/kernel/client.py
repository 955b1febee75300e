"""A small synchronous client for the mlx-jupyter REST API.

    from mlx_jupyter import Client
    client = Client()                      # finds the Jupyter server of this kernel
    print(client.generate("Hello", model="demo").text)
    with client.stream(messages=[{"role": "user", "content": "Hi"}], model="demo") as events:
        for event in events:
            print(event.get("text", ""), end="")

Closing a stream before its end closes the HTTP response, which the server takes as a
cancel of the generation.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from .discovery import TOKEN_ENV, ServerInfo, find_server
from .errors import (
    AuthenticationError,
    ConnectionFailed,
    InvalidRequest,
    MlxError,
    ModelNotFound,
    ServerError,
    ServerNotFound,
)

GENERATE_PATH = "mlx/api/generate"
STATUS_PATH = "mlx/api/status"

# Generous reads: a first token may wait for a model to load or for other requests.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

Message = dict[str, str]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    request_id: str
    model: str
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    timings: dict[str, float] = field(default_factory=dict)  # ttft_ms, total_ms, tokens_per_second


class Client:
    """Talks to the mlx-jupyter API of one Jupyter server.

    Without `url`, the server is discovered (see `discovery.find_server`); without
    `token`, the discovered token or else $MLX_JUPYTER_TOKEN is used.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None):
        server = _resolve_server(url, token)
        self.url = server.url
        if transport is None and server.sock:
            transport = httpx.HTTPTransport(uds=server.sock)
        headers = {"Authorization": f"token {server.token}"} if server.token else {}
        # trust_env=False: the server is almost always local, and a proxy from the
        # environment would otherwise swallow requests to it.
        self._http = httpx.Client(base_url=server.url, headers=headers, timeout=timeout,
                                  transport=transport, trust_env=False)

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def status(self) -> dict[str, Any]:
        """The server's version and the models it has loaded."""
        with _transport_errors(self.url):
            response = self._http.get(STATUS_PATH)
            _raise_for_status(response, self.url)
            return _json_object(response)

    def generate(self, prompt: str | None = None, *, model: str,
                 messages: Sequence[Message] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ) -> GenerationResult:
        """Generates a whole answer. Give exactly one of `prompt` or `messages`."""
        body = _generate_body(prompt, model=model, messages=messages, max_tokens=max_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                              stream=False)
        with _transport_errors(self.url):
            response = self._http.post(GENERATE_PATH, json=body)
            _raise_for_status(response, self.url, model_route=True)
            return _result_from_json(_json_object(response), model)

    def stream(self, prompt: str | None = None, *, model: str,
               messages: Sequence[Message] | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: str | Sequence[str] | None = None,
               ) -> EventStream:
        """Starts a streaming generation; errors before any output raise here.

        Iterate the returned EventStream for {"text": ...} events and a final
        {"done": true, ...} event; use it as a context manager, or close() it, to stop.
        """
        body = _generate_body(prompt, model=model, messages=messages, max_tokens=max_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                              stream=True)
        request = self._http.build_request("POST", GENERATE_PATH, json=body)
        with _transport_errors(self.url):
            response = self._http.send(request, stream=True)
            if response.is_error:
                try:
                    response.read()  # the error's JSON body
                finally:
                    response.close()
                _raise_for_status(response, self.url, model_route=True)
        return EventStream(response, model=model, url=self.url)


class EventStream:
    """The events of one streaming generation, read from an NDJSON response.

    Raises ServerError when the server reports an error mid-stream, and
    ConnectionFailed when the connection breaks before the final event. Once the
    final event was read, `result` holds the whole GenerationResult.
    """

    def __init__(self, response: httpx.Response, *, model: str, url: str):
        self._response = response
        self._lines = response.iter_lines()
        self._url = url
        self._chunks: list[str] = []
        self._finished = False
        self.model = model
        self.request_id: str | None = response.headers.get("X-Request-Id")
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._chunks)

    def close(self) -> None:
        """Stops reading; before the final event, this cancels the generation."""
        self._finished = True
        self._response.close()

    def __next__(self) -> dict[str, Any]:
        if self._finished:
            raise StopIteration
        try:
            event = self._read_event()
            if event.get("done"):
                self._finish(event)
            else:
                self._chunks.append(str(event.get("text", "")))
            return event
        except BaseException:
            # Including KeyboardInterrupt: dropping the connection cancels the request.
            self.close()
            raise

    def _read_event(self) -> dict[str, Any]:
        with _transport_errors(self._url):
            for line in self._lines:
                if line.strip():
                    return _parse_event(line)
        raise ConnectionFailed("the connection to the Jupyter server closed before the "
                               "generation finished; check that the server is still running")

    def _finish(self, event: dict[str, Any]) -> None:
        self.close()
        request_id = str(event.get("request_id") or self.request_id or "")
        if event.get("finish_reason") == "error":
            message = _one_line(str(event.get("error") or "unknown error")).rstrip(".")
            raise ServerError(f"generation failed: {message}; see the Jupyter server log "
                              f"(request {request_id})", request_id=request_id)
        self.result = GenerationResult(
            text=self.text, request_id=request_id, model=self.model,
            finish_reason=str(event.get("finish_reason", "stop")),
            usage=event.get("usage") or {}, timings=event.get("timings") or {})


def _resolve_server(url: str | None, token: str | None) -> ServerInfo:
    if url is None:
        server = find_server()
        return server if token is None else ServerInfo(server.url, token, server.sock)
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return ServerInfo(url if url.endswith("/") else url + "/", token)


def _generate_body(prompt: str | None, *, model: str, messages: Sequence[Message] | None,
                   stream: bool, stop: str | Sequence[str] | None,
                   **options: Any) -> dict[str, Any]:
    """The request body, with only the options that were given (None = server default)."""
    body: dict[str, Any] = {"model": model, "stream": stream}
    # Jupyter tells a kernel which notebook it serves; the server keeps it in the history.
    if notebook := os.environ.get("JPY_SESSION_NAME"):
        body["notebook"] = notebook
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [dict(message) for message in messages]
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    body.update({name: value for name, value in options.items() if value is not None})
    return body


@contextlib.contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """Turns httpx's network errors into ConnectionFailed."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise ConnectionFailed(f"cannot connect to the Jupyter server at {url} ({exc}); "
                               f"is it running? Restart the kernel if the server was "
                               f"restarted") from None
    except httpx.TimeoutException:
        raise ConnectionFailed(f"the Jupyter server at {url} did not answer in time; "
                               f"it may be overloaded, try again") from None
    except httpx.RequestError as exc:
        raise ConnectionFailed(f"the connection to the Jupyter server at {url} failed: "
                               f"{_one_line(str(exc)) or type(exc).__name__}") from None


def _raise_for_status(response: httpx.Response, url: str, *, model_route: bool = False) -> None:
    status = response.status_code
    if status < 400:
        return
    message = _server_message(response)
    if status in (401, 403):
        detail = "" if message in ("Forbidden", "Unauthorized") else f" ({message})"
        raise AuthenticationError(
            f"the Jupyter server refused the token{detail}; set {TOKEN_ENV} to its token "
            f"(`jupyter server list` shows it), or restart the kernel if the server was "
            f"restarted", status=status)
    if status == 404 and model_route and message != "Not Found":
        raise ModelNotFound(message, status=status)
    if status == 404:
        raise ServerNotFound(
            f"the Jupyter server at {url} has no mlx-jupyter API (HTTP 404); enable it with "
            f"`jupyter server extension enable mlx_jupyter` and restart the server",
            status=status)
    if status == 400:
        raise InvalidRequest(f"invalid request: {message}", status=status)
    if status >= 500:
        raise ServerError(f"the server failed (HTTP {status}): {message.rstrip('.')}; see "
                          f"the Jupyter server log", status=status)
    raise MlxError(f"unexpected answer from the Jupyter server (HTTP {status}): {message}",
                   status=status)


def _server_message(response: httpx.Response) -> str:
    """The "message" of a Jupyter JSON error body, else the HTTP reason phrase."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return _one_line(body["message"])
    return response.reason_phrase or f"HTTP {response.status_code}"


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServerError(f"the Jupyter server sent an answer that is not a JSON object "
                          f"(from {response.url}); is {response.url.host} a Jupyter server?")
    return body


def _parse_event(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise ServerError(f"the Jupyter server sent a malformed stream event: {line[:80]!r}")
    return event


def _result_from_json(body: dict[str, Any], model: str) -> GenerationResult:
    if body.get("finish_reason") == "error":
        message = _one_line(str(body.get("error") or "unknown error")).rstrip(".")
        raise ServerError(f"generation failed: {message}; see the Jupyter server log",
                          request_id=body.get("request_id"))
    return GenerationResult(
        text=str(body.get("text", "")), request_id=str(body.get("request_id", "")),
        model=str(body.get("model") or model),
        finish_reason=str(body.get("finish_reason", "stop")),
        usage=body.get("usage") or {}, timings=body.get("timings") or {})


def _one_line(text: str) -> str:
    return " ".join(text.split())
