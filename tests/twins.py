"""An AsyncClient driven from blocking code, so one test body runs through both clients.

`Blocking(AsyncClient(...))` has the client's methods as plain calls: each coroutine runs on
an event loop of its own, in a thread of its own, and what comes back that is async (a clone,
an event stream) is wrapped the same way. A call from another thread runs as another task on
that loop: closing a stream from another thread is closing it from another task.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

from mlx_jupyter.kernel import AsyncClient, AsyncEventStream


class Loop:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="async-client-loop")
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


class Blocking:
    """`target` (an AsyncClient or AsyncEventStream), its coroutines run to their end."""

    def __init__(self, target: AsyncClient | AsyncEventStream, loop: Loop):
        self._target = target
        self._loop = loop

    def __repr__(self) -> str:
        return f"Blocking({self._target!r})"

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value  # url, text, result, request_id, ...
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self._wrap(self._loop.run(value(*args, **kwargs)))
        return lambda *args, **kwargs: self._wrap(value(*args, **kwargs))  # clone()

    def _wrap(self, value: Any) -> Any:
        return Blocking(value, self._loop) if isinstance(
            value, (AsyncClient, AsyncEventStream)) else value

    def __enter__(self) -> Blocking:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return self._loop.run(self._target.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None


@contextlib.contextmanager
def blocking_async_client(*args: Any, **kwargs: Any) -> Iterator[Blocking]:
    """An AsyncClient(*args, **kwargs), blocking, on a loop of its own while in use."""
    loop = Loop()
    try:
        with Blocking(AsyncClient(*args, **kwargs), loop) as client:
            yield client
    finally:
        loop.stop()
