"""The asynchronous client: `Client`'s methods, awaitable, for asyncio code and widgets.

    from mlx_jupyter import AsyncClient
    async with AsyncClient() as client:
        print((await client.generate("Hello")).text)
        async with await client.stream("Tell me a story") as events:
            async for event in events:
                print(event.get("text", ""), end="")

The methods are written once, in `core.Methods`; this module only runs them, awaiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
from .http import transport_errors


class AsyncEventStream(StreamBase):
    """`EventStream`, read with `async for`; `await close()` (or `aclose()`) stops it."""

    def __init__(self, response: httpx.Response, call: Call, url: str):
        super().__init__(response, call, url)
        self._lines = response.aiter_lines()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops reading, also from elsewhere than the reader (a Stop button): another
        thread for an EventStream, another task of its event loop for an AsyncEventStream.
        Whoever waits for the next event wakes, and its iteration ends. Before the final
        event, the server cancels the generation."""
        if self._mark_closed():
            await self._response.aclose()

    aclose = close  # the name contextlib.aclosing and async generators use

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        try:
            with transport_errors(self._url):
                async for line in self._lines:
                    if (event := self._reader.feed(line)) is not None:
                        if self._reader.result is not None:
                            await self.close()
                        return event
            raise self._reader.cut_short()
        except Exception:
            closed_elsewhere = not self._mark_closed()  # by another task: just the end
            await self._response.aclose()
            if closed_elsewhere:
                raise StopAsyncIteration from None
            raise
        except BaseException:
            # Including CancelledError: dropping the connection cancels the request.
            await self.close()
            raise


@client_methods
class AsyncClient(ClientBase):
    """See `Client`: the same methods, each a coroutine (but `clone`)."""

    _stream_class = AsyncEventStream
    _httpx_client, _transport_class, _unix_transport = (
        httpx.AsyncClient, httpx.AsyncBaseTransport, httpx.AsyncHTTPTransport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _drive(self, plan: Plan[T]) -> T:
        """Runs a plan of `core.Methods`, awaiting each step."""
        try:
            answer = None
            while True:
                try:
                    step = plan.send(answer)
                except StopIteration as end:
                    return end.value
                answer = await self._do(step)
        finally:
            plan.close()

    async def _do(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, Close):
            await self._http.aclose()
            return None
        with transport_errors(self.url):
            response = await self._http.send(self._request(step), stream=step.stream)
            if step.stream:
                if not response.is_error:
                    return AsyncEventStream(response, step, self.url)
                try:
                    await response.aread()  # the error's JSON body
                finally:
                    await response.aclose()
            return self._answer(step, response)
