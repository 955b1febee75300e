"""The asynchronous client: `Client`'s methods, awaitable, for asyncio code and widgets.

    from mlx_jupyter import AsyncClient
    async with AsyncClient() as client:
        print((await client.generate("Hello")).text)
        async with await client.stream("Tell me a story") as events:
            async for event in events:
                print(event.get("text", ""), end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from . import calls
from .calls import Message
from .client import auth_headers, resolve_server
from .http import (
    DEFAULT_TIMEOUT,
    GenerationResult,
    StreamBase,
    StreamReader,
    json_object,
    raise_for_status,
    transport_errors,
)


class AsyncClient:
    """See `Client`: the same methods, each a coroutine."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None):
        server = resolve_server(url, token)
        self.url = server.url
        if transport is None and server.sock:
            transport = httpx.AsyncHTTPTransport(uds=server.sock)
        self._http = httpx.AsyncClient(base_url=server.url, headers=auth_headers(server),
                                       timeout=timeout, transport=transport, trust_env=False)

    def __repr__(self) -> str:
        return f"AsyncClient(url={self.url!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def status(self) -> dict[str, Any]:
        return await self._run(calls.status())

    async def models(self) -> list[dict[str, Any]]:
        return await self._run(calls.models())

    async def model(self, name: str) -> dict[str, Any]:
        return await self._run(calls.model(name))

    async def load(self, name: str) -> dict[str, Any]:
        return await self._run(calls.model_action(name, "load"))

    async def unload(self, name: str) -> dict[str, Any]:
        return await self._run(calls.model_action(name, "unload"))

    async def pin(self, name: str, pinned: bool = True) -> dict[str, Any]:
        return await self._run(calls.model_action(name, "pin" if pinned else "unpin"))

    async def unpin(self, name: str) -> dict[str, Any]:
        return await self.pin(name, False)

    async def queue(self) -> dict[str, Any]:
        return await self._run(calls.queue())

    async def history(self, limit: int = 20, *, offset: int = 0, model: str | None = None,
                      notebook: str | None = None, status: str | None = None,
                      ) -> list[dict[str, Any]]:
        return await self._run(calls.history(limit, offset, model=model, notebook=notebook,
                                             status=status))

    async def request(self, request_id: str) -> dict[str, Any]:
        return await self._run(calls.request(request_id))

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self._run(calls.cancel(request_id))

    async def settings(self) -> dict[str, dict[str, Any]]:
        return await self._run(calls.settings())

    async def set_setting(self, key: str, value: Any) -> dict[str, Any]:
        return await self._run(calls.set_setting(key, value))

    async def generate(self, prompt: str | None = None, *, model: str | None = None,
                       messages: Sequence[Message] | None = None, **options: Any
                       ) -> GenerationResult:
        return await self._run(calls.generate(prompt, model=model, messages=messages,
                                              **options))

    async def chat(self, messages: Sequence[Message], *, model: str | None = None,
                   **options: Any) -> GenerationResult:
        return await self.generate(model=model, messages=messages, **options)

    async def stream(self, prompt: str | None = None, *, model: str | None = None,
                     messages: Sequence[Message] | None = None, **options: Any
                     ) -> AsyncEventStream:
        call = calls.generate(prompt, model=model, messages=messages, stream=True, **options)
        request = self._http.build_request(call.method, call.path, json=call.json)
        with transport_errors(self.url):
            response = await self._http.send(request, stream=True)
            if response.is_error:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                raise_for_status(response, self.url, not_found=call.not_found)
        return AsyncEventStream(response, model=model, url=self.url)

    async def submit(self, prompt: str | None = None, *, model: str | None = None,
                     messages: Sequence[Message] | None = None, **options: Any) -> str:
        return await self._run(calls.generate(prompt, model=model, messages=messages,
                                              background=True, **options))

    async def result(self, request_id: str, *, wait: bool = True,
                     timeout: float | None = None, poll_seconds: float = 0.25
                     ) -> GenerationResult | None:
        poll = calls.ResultPoll(wait, timeout)
        while not poll.done(await self.request(request_id)):
            await asyncio.sleep(poll_seconds)
        return poll.result

    async def _run(self, call: calls.Call) -> Any:
        with transport_errors(self.url):
            response = await self._http.request(call.method, call.path, json=call.json,
                                                params=call.params)
            raise_for_status(response, self.url, not_found=call.not_found)
            return call.read(json_object(response))


class AsyncEventStream(StreamBase):
    """`EventStream`, read with `async for`; `aclose()` before the end cancels."""

    def __init__(self, response: httpx.Response, *, model: str | None, url: str):
        super().__init__(response, model=model, url=url)
        self._lines = response.aiter_lines()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._finished = True
        await self._response.aclose()

    async def __anext__(self) -> dict[str, Any]:
        if self._finished:
            raise StopAsyncIteration
        try:
            with transport_errors(self._url):
                async for line in self._lines:
                    event = self._reader.feed(line)
                    if event is not None:
                        if event.get("done"):
                            await self.aclose()
                        return event
            raise StreamReader.cut_short()
        except BaseException:
            await self.aclose()
            raise
