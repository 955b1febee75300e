"""The store seen from the event loop: every call runs on the blocking-work thread pool.

The event loop never waits on the database or the disk; handlers and the queue await these
methods instead of calling the (synchronous) store directly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import MlxJupyterError
from .store import RequestRecord, Store

log = logging.getLogger(__name__)

T = TypeVar("T")


class RequestNotFound(MlxJupyterError):
    status = 404

    def __init__(self, request_id: str):
        super().__init__(f"no request with id {request_id!r}")


class BlockingPool:
    """A small thread pool for blocking work: database calls, file scans, hashing."""

    def __init__(self, workers: int):
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="mlx-jupyter")

    async def run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


class StoreService:
    def __init__(self, store: Store, pool: BlockingPool):
        self.store = store
        self._pool = pool
        self._last_model_write: asyncio.Future[None] | None = None

    # -- models ---------------------------------------------------------------------------

    def record_model_status(self, name: str, status: str, error: str | None = None) -> None:
        """Persists a model's status without waiting; writes keep the order of the calls
        (each waits for the one before), so the database never ends on a stale status."""
        previous = self._last_model_write

        async def write() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await self._pool.run(self.store.set_model_status, name, status, error)
            except Exception:
                log.exception("could not record status %s of model %s", status, name)

        self._last_model_write = asyncio.ensure_future(write())

    async def ensure_model(self, name: str, path: str, source: str, kind: str) -> None:
        await self._pool.run(self.store.ensure_model, name, path, source, kind)

    async def update_model(self, name: str, **fields: Any) -> None:
        await self._pool.run(self.store.update_model, name, **fields)

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._pool.run(self.store.list_models)

    async def get_model(self, name: str) -> dict[str, Any] | None:
        return await self._pool.run(self.store.get_model, name)

    async def flush(self) -> None:
        """Waits for the status writes in flight (at shutdown, and in tests)."""
        if self._last_model_write is not None:
            await self._last_model_write

    # -- settings -------------------------------------------------------------------------

    async def settings(self) -> dict[str, dict[str, Any]]:
        return await self._pool.run(self.store.settings.all)

    async def setting_values(self) -> dict[str, Any]:
        return await self._pool.run(self.store.settings.values)

    async def setting(self, key: str) -> dict[str, Any]:
        """One setting as `settings()` describes it; UnknownSetting names a wrong key."""
        return await self._pool.run(self._describe, key)

    async def set_setting(self, key: str, value: Any) -> dict[str, Any]:
        """Stores a setting and returns its description."""
        def set_and_describe() -> dict[str, Any]:
            self.store.settings.set(key, value)
            return self._describe(key)

        return await self._pool.run(set_and_describe)

    def _describe(self, key: str) -> dict[str, Any]:
        self.store.settings.spec(key)
        return {"key": key, **self.store.settings.all()[key]}

    # -- requests -------------------------------------------------------------------------

    async def add_request(self, record: RequestRecord) -> None:
        """Records a new request and counts a use of its model: one trip to the pool, since
        it lies on every request's way in."""
        def add_and_count() -> None:
            self.store.add_request(record)
            self.store.record_model_use(record.model)

        await self._pool.run(add_and_count)

    async def update_request(self, request_id: str, **fields: Any) -> None:
        await self._pool.run(self.store.update_request, request_id, **fields)

    async def get_request(self, request_id: str) -> dict[str, Any]:
        row = await self._pool.run(self.store.get_request, request_id)
        if row is None:
            raise RequestNotFound(request_id)
        return row

    async def list_requests(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        return await self._pool.run(self.store.list_requests, **filters)

    # -- database -------------------------------------------------------------------------

    async def database_info(self) -> dict[str, Any]:
        return await self._pool.run(self.store.get_database_info)
