"""The store seen from the event loop: every call runs on the blocking-work thread pool.

The event loop never waits on the database or the disk; handlers and the queue await these
methods instead of calling the (synchronous) store directly.

Writes that lie on a request's path (its history, a model's status) are written behind: they
are queued in call order and run in batches, one pool trip per batch, so a generation does not
wait for its own bookkeeping. Reads wait for the writes queued before them, so a client always
reads what it was told happened.
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


class WriteBehind:
    """Blocking writes run in the order they were queued, in batches on the pool."""

    def __init__(self, pool: BlockingPool):
        self._pool = pool
        self._pending: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._last: asyncio.Future[Any] | None = None

    def write(self, function: Callable[..., Any], /, *args: Any,
              **kwargs: Any) -> asyncio.Future[Any]:
        """Queues a write; the future holds its result (or its exception, also logged)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((functools.partial(function, *args, **kwargs), future))
        self._last = future
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return future

    async def settled(self) -> None:
        """Waits until every write queued so far has run (successfully or not)."""
        if self._last is not None:
            await asyncio.gather(self._last, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                outcomes = await self._pool.run(self._run_batch, [call for call, _ in batch])
                for (_, future), (ok, value) in zip(batch, outcomes):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                        future.exception()  # retrieved here: the failure is logged below
        finally:
            self._draining = None

    @staticmethod
    def _run_batch(calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        outcomes = []
        for call in calls:
            try:
                outcomes.append((True, call()))
            except Exception as exc:  # one failed write must not stop the ones after it
                log.exception("a store write failed: %s", getattr(call, "func", call))
                outcomes.append((False, exc))
        return outcomes


class HistoryCleanup:
    """The periodic pass that prunes the history by its settings: once at start-up, then every
    `interval_seconds` (0: never). A pass that fails is logged; the next one tries again."""

    def __init__(self, store: StoreService, interval_seconds: float):
        self._store = store
        self.interval_seconds = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_seconds > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._store.prune_history()
            except Exception:  # logged by the write-behind queue
                pass
            await asyncio.sleep(self.interval_seconds)


class StoreService:
    def __init__(self, store: Store, pool: BlockingPool):
        self.store = store
        self._pool = pool
        self._writes = WriteBehind(pool)

    # -- models ---------------------------------------------------------------------------

    def record_model_status(self, name: str, status: str, error: str | None = None) -> None:
        """Persists a model's status without waiting, in call order (the database never ends
        on a stale status)."""
        self._writes.write(self.store.set_model_status, name, status, error)

    async def ensure_model(self, name: str, path: str, source: str, kind: str) -> None:
        await self._pool.run(self.store.ensure_model, name, path, source, kind)

    async def update_model(self, name: str, **fields: Any) -> None:
        await self._pool.run(self.store.update_model, name, **fields)

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._pool.run(self.store.list_models)

    async def get_model(self, name: str) -> dict[str, Any] | None:
        return await self._pool.run(self.store.get_model, name)

    async def flush(self) -> None:
        """Waits for the writes queued so far (at shutdown, and before reads)."""
        await self._writes.settled()

    # -- settings -------------------------------------------------------------------------

    async def settings(self) -> dict[str, dict[str, Any]]:
        return await self._pool.run(self.store.settings.all)

    async def setting_values(self) -> dict[str, Any]:
        """From the cache without leaving the event loop when it is fresh (every request
        without explicit sampling fields asks)."""
        cached = self.store.settings.cached_values()
        return cached if cached is not None else await self._pool.run(
            self.store.settings.values)

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

    def add_request(self, record: RequestRecord) -> asyncio.Future[None]:
        """Records a new request and counts a use of its model, written behind; await the
        result where the record must be durable before answering (background jobs)."""
        def add_and_count() -> None:
            self.store.add_request(record)
            self.store.record_model_use(record.model)

        return self._writes.write(add_and_count)

    def update_request(self, request_id: str, **fields: Any) -> None:
        """Changes a request's columns, written behind, after the writes queued before."""
        self._writes.write(self.store.update_request, request_id, **fields)

    async def get_request(self, request_id: str) -> dict[str, Any]:
        await self.flush()
        row = await self._pool.run(self.store.get_request, request_id)
        if row is None:
            raise RequestNotFound(request_id)
        return row

    async def list_requests(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        await self.flush()
        return await self._pool.run(self.store.list_requests, **filters)

    def prune_history(self) -> asyncio.Future[int]:
        """Applies the settings history_retention_days and max_history_rows, written behind
        (after the writes queued before it); the future holds how many rows went."""
        return self._writes.write(self.store.prune_history)

    # -- database -------------------------------------------------------------------------

    async def database_info(self) -> dict[str, Any]:
        await self.flush()
        return await self._pool.run(self.store.get_database_info)
