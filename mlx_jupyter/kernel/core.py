"""The one implementation under `Client` (blocking) and `AsyncClient` (asyncio).

Every method of the two clients is written once, in `Methods`, as a plan: a generator that
yields the steps it needs (a `calls.Call` to the server, a `Sleep`, a `Close`), is sent back
what each step gave, and returns the method's value. Plans do no I/O. `ClientBase` holds what
never waits (the server, the connection settings, `clone`); each client adds a small driver
that runs plans, blocking or awaiting, and `client_methods` gives it every plan as a method
with the plan's signature and docstring. So the two clients cannot drift: a method exists in
both or in neither, and does the same in both. (httpx shares its request building between its
two clients; here the methods themselves are shared too.)

Streams likewise: `StreamBase` holds what a stream has said (`http.StreamReader`) and the
closing, the two stream classes only wait for lines.
"""

import functools
import inspect
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar, get_args, get_origin

import httpx

from . import calls
from .calls import Call, Message
from .discovery import TOKEN_ENV, ServerInfo, find_server
from .errors import InvalidRequest
from .http import DEFAULT_TIMEOUT, GenerationResult, StreamReader, json_object, raise_for_status
from .structured import resolve

T = TypeVar("T")

RESULT_POLL_SECONDS = 0.25  # how often `result(wait=True)` reads the request again


@dataclass(frozen=True)
class Sleep:
    """Wait this long (time.sleep, or asyncio.sleep)."""

    seconds: float


@dataclass(frozen=True)
class Close:
    """Close the client's connections."""


Step = Call | Sleep | Close
# A method's plan: yields steps, is sent what each gave, returns the method's value.
Plan = Generator[Step, Any, T]


class StreamBase:
    """What the sync and async event streams share: the response, what it said so far, and
    whether it was closed (by its reader at the end, or by anyone before)."""

    def __init__(self, response: httpx.Response, call: Call, url: str):
        self._response = response
        self._url = url
        self._closed = False
        self._lock = threading.Lock()  # close() may come from another thread
        model = call.json.get("model") if isinstance(call.json, dict) else None
        self._reader = StreamReader(call.read, model, response.headers.get("X-Request-Id"))
        self.model: str = self._reader.model
        self.request_id: str | None = self._reader.request_id

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"{type(self).__name__}(request_id={self.request_id!r}, {state})"

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._reader.text

    @property
    def reasoning(self) -> str:
        """The reasoning received so far (what the model thinks before it answers)."""
        return self._reader.reasoning

    @property
    def result(self) -> GenerationResult | None:
        """The whole result, once the final event was read."""
        return self._reader.result

    def _mark_closed(self) -> bool:
        """Marks the stream closed; False if it already was."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True


class ClientBase:
    """What the two clients share that never waits: where the server is (`Client` says how
    `url` and `token` find it), how to reach it, and `clone`."""

    # What each client is made of: its event stream, and httpx's blocking or async classes.
    _stream_class: type[StreamBase]
    _httpx_client: type[httpx.Client] | type[httpx.AsyncClient]
    _transport_class: type[httpx.BaseTransport] | type[httpx.AsyncBaseTransport]
    _unix_transport: type[httpx.HTTPTransport] | type[httpx.AsyncHTTPTransport]

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None):
        self._connect(resolve_server(url, token), timeout, transport)

    def _connect(self, server: ServerInfo, timeout: float | httpx.Timeout,
                 transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None) -> None:
        if transport is not None and not isinstance(transport, self._transport_class):
            raise TypeError(f"{type(self).__name__} needs an httpx."
                            f"{self._transport_class.__name__}, not {transport!r}")
        if transport is None and server.sock:
            transport = self._unix_transport(uds=server.sock)
        self.server = server
        self.url = server.url
        self._timeout = timeout
        # trust_env=False: the server is almost always local, and a proxy from the
        # environment would otherwise swallow requests to it.
        self._http: Any = self._httpx_client(
            base_url=server.url, headers=auth_headers(server), timeout=timeout,
            transport=transport, trust_env=False)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    def clone(self) -> Self:
        """A new client of the same server, with connections of its own: for another thread
        (a client is used by one thread at a time; an async one by one event loop)."""
        twin = object.__new__(type(self))
        twin._connect(self.server, self._timeout, None)
        return twin

    def _request(self, call: Call) -> httpx.Request:
        return self._http.build_request(call.method, call.path, json=call.json,
                                        params=call.params)

    def _answer(self, call: Call, response: httpx.Response) -> Any:
        """What a whole answer means for this call; raises the typed error of an error."""
        raise_for_status(response, self.url, not_found=call.not_found)
        return call.read(json_object(response))


class Methods:
    """Every method of `Client` and `AsyncClient`, each written once, as a plan (see above).

    `self` is the client the method was called on.
    """

    def close(self) -> Plan[None]:
        """Closes the client's connections (`with Client() as client:` does it at the end)."""
        yield Close()

    # -- the server -----------------------------------------------------------------------

    def status(self) -> Plan[dict[str, Any]]:
        """Version, memory, loaded models and queue counts."""
        return (yield calls.status())

    def models(self) -> Plan[list[dict[str, Any]]]:
        """Every model the server knows, with its status and memory estimate."""
        return (yield calls.models())

    def model(self, name: str) -> Plan[dict[str, Any]]:
        """One model's description; ModelNotFound if the server does not know it."""
        return (yield calls.model(name))

    def load(self, name: str) -> Plan[dict[str, Any]]:
        """Loads a model (waits until it is loaded); returns its description."""
        return (yield calls.model_action(name, "load"))

    def unload(self, name: str) -> Plan[dict[str, Any]]:
        """Unloads a model; Conflict while requests to it are in flight."""
        return (yield calls.model_action(name, "unload"))

    def pin(self, name: str, pinned: bool = True) -> Plan[dict[str, Any]]:
        """A pinned model is never unloaded for idleness or to make room."""
        return (yield calls.model_action(name, "pin" if pinned else "unpin"))

    def unpin(self, name: str) -> Plan[dict[str, Any]]:
        """Lets the model be unloaded again for idleness or to make room."""
        return (yield calls.model_action(name, "unpin"))

    def queue(self) -> Plan[dict[str, Any]]:
        """Per model, the active requests and the waiting ones with positions and ETAs."""
        return (yield calls.queue())

    def history(self, limit: int = 20, *, offset: int = 0, model: str | None = None,
                notebook: str | None = None, status: str | None = None,
                ) -> Plan[list[dict[str, Any]]]:
        """Recent requests, newest first (previews of prompt and output)."""
        return (yield calls.history(limit, offset, model=model, notebook=notebook,
                                    status=status))

    def request(self, request_id: str) -> Plan[dict[str, Any]]:
        """One request with everything: prompt, parameters, output, times, error."""
        return (yield calls.request(request_id))

    def cancel(self, request_id: str) -> Plan[dict[str, Any]]:
        """Cancels a queued or running request; Conflict if it has already ended."""
        return (yield calls.cancel(request_id))

    def settings(self) -> Plan[dict[str, dict[str, Any]]]:
        """The server's settings: per key, its value, default and description."""
        return (yield calls.settings())

    def set_setting(self, key: str, value: Any) -> Plan[dict[str, Any]]:
        """Changes one setting; the server keeps it across restarts."""
        return (yield calls.set_setting(key, value))

    # -- generation -----------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, model: str | None = None,
                 messages: Sequence[Message] | None = None, **options: Any
                 ) -> Plan[GenerationResult]:
        """A whole answer. Give exactly one of `prompt` or `messages` (roles system, user,
        assistant, tool). A model left out is the server's `default_model` setting.

        Options: max_tokens, temperature, top_p, top_k, min_p, seed, stop, n,
        repetition_penalty, frequency_penalty, presence_penalty, logit_bias, priority, timeout,
        chat_template_kwargs; `schema` (a pydantic model class, a dataclass, a TypedDict or a
        JSON-schema dict: the answer is JSON of it, and `parsed` the validated value, else
        StructuredOutputError); `logprobs`, `top_logprobs`; `tools`, `tool_choice`,
        `parallel_tool_calls` (the answer's `tool_calls`). The answer also has `reasoning`
        and, for n > 1, `choices`."""
        return (yield calls.generate(prompt, model=model, messages=messages, **options))

    def chat(self, messages: Sequence[Message], *, model: str | None = None,
             **options: Any) -> Plan[GenerationResult]:
        """A whole answer to a conversation (the model's chat template applies); the options
        are `generate`'s."""
        return (yield calls.generate(None, model=model, messages=messages, **options))

    def stream(self, prompt: str | None = None, *, model: str | None = None,
               messages: Sequence[Message] | None = None, **options: Any
               ) -> Plan[StreamBase]:
        """Starts a streaming generation; errors before any output raise here.

        Iterate the returned stream for {"text": ...} events (and, as asked, {"reasoning"},
        {"tool_call"} and {"logprobs"} ones; each says the `index` of its answer when n > 1)
        and a final {"done": true, ...} event; `text` and `reasoning` are the first answer's
        so far, `result` the whole result after the final event (the options and the result
        are `generate`'s; a `schema`'s answer that is not valid raises at the end).
        Use it as a context manager, or close() it (from anywhere), to stop: before the final
        event, the server cancels the generation.
        """
        return (yield calls.generate(prompt, model=model, messages=messages, stream=True,
                                     **options))

    def submit(self, prompt: str | None = None, *, model: str | None = None,
               messages: Sequence[Message] | None = None, **options: Any) -> Plan[str]:
        """Queues a background job and returns its request id at once; the server runs it
        even if this kernel goes away (and again after a server restart)."""
        return (yield calls.generate(prompt, model=model, messages=messages, background=True,
                                     **options))

    def result(self, request_id: str, *, wait: bool = True, timeout: float | None = None,
               poll_seconds: float = RESULT_POLL_SECONDS, schema: Any = None
               ) -> Plan[GenerationResult | None]:
        """The result of a request (a background job); with `wait`, reads it every
        `poll_seconds` until it ends. None if it has not ended (wait=False, or `timeout`
        seconds passed). ServerError if it failed. With the `schema` it was submitted with,
        its `parsed` is the validated value (as `generate` gives)."""
        if not poll_seconds > 0:
            raise InvalidRequest(f"poll_seconds must be more than 0, not {poll_seconds!r}")
        structured = None if schema is None else resolve(schema)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = calls.finished_result((yield calls.request(request_id)))
            if result is not None:
                return calls.structured_result(result, structured)
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                return None
            yield Sleep(poll_seconds)


def plans() -> dict[str, Callable[..., Plan[Any]]]:
    """The methods of `Methods`, by name."""
    return {name: plan for name, plan in vars(Methods).items()
            if inspect.isgeneratorfunction(plan)}


def client_methods(client: type[ClientBase]) -> type[ClientBase]:
    """Class decorator: gives the client every method of `Methods`, run by its `_drive`
    (awaited where `_drive` is a coroutine function)."""
    for name, plan in plans().items():
        if name in vars(client):
            raise TypeError(f"{client.__name__}.{name} is written by hand; write it once, "
                            f"in core.Methods")
        setattr(client, name, _method(plan, client))
    return client


def _method(plan: Callable[..., Plan[Any]], client: type[ClientBase]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(client._drive):  # type: ignore[attr-defined]
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await self._drive(plan(self, *args, **kwargs))
    else:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._drive(plan(self, *args, **kwargs))
    functools.update_wrapper(method, plan)  # its name and docstring; the source is the plan's
    method.__module__, method.__qualname__ = client.__module__, f"{client.__name__}.{plan.__name__}"
    # What the caller gets: the plan's value (and, for `stream`, this client's stream class).
    returns = plan_value(inspect.signature(plan).return_annotation)
    returns = {StreamBase: client._stream_class, type(None): None}.get(returns, returns)
    method.__signature__ = inspect.signature(plan).replace(  # type: ignore[attr-defined]
        return_annotation=returns)
    method.__annotations__ = {**plan.__annotations__, "return": returns}
    return method


def plan_value(annotation: Any) -> Any:
    """T of Plan[T]."""
    if get_origin(annotation) is not get_origin(Plan):
        raise TypeError(f"a plan's return annotation is Plan[...], not {annotation!r}")
    return get_args(annotation)[2]


def resolve_server(url: str | None, token: str | None) -> ServerInfo:
    if url is None:
        server = find_server()
        return server if token is None else ServerInfo(server.url, token, server.sock)
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return ServerInfo(url if url.endswith("/") else url + "/", token)


def auth_headers(server: ServerInfo) -> dict[str, str]:
    return {"Authorization": f"token {server.token}"} if server.token else {}
