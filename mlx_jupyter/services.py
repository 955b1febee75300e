"""The store seen from the event loop: every call runs on the blocking-work thread pool.

The event loop never waits on the database or the disk; handlers and the queue await these
methods instead of calling the (synchronous) store directly.

The store opens in the background once the event loop runs (`StoreService.open`: importing
SQLAlchemy, connecting, migrating, then the start-up steps that read it), so the server answers
at once; every call here waits for that first. A store that could not be opened makes each call
raise StoreUnavailable (503, saying what to fix) instead of failing the server's start.

Writes that lie on a request's path (its history, a model's status) are written behind: they
are queued in call order and run in batches, one pool trip per batch, so a generation does not
wait for its own bookkeeping. Reads wait for the writes queued before them, so a client always
reads what it was told happened.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .contracts.status import DatabaseState
from .errors import MlxJupyterError

if TYPE_CHECKING:  # the store's modules load when it opens, off the start path
    from .store import RequestRecord, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
Target = TypeVar("Target")


class StoreUnavailable(MlxJupyterError):
    """The database could not be opened at start-up (the message says why and what to fix)."""

    status = 503

    @classmethod
    def opening(cls, database: str, exc: BaseException, fix: str) -> StoreUnavailable:
        return cls(f"the database {database} could not be opened: {_first_line(exc)}; {fix}")


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


class WriteBehind(Generic[Target]):
    """Blocking writes run in the order they were queued, in batches on the pool.

    Each write is a function of the target (the store), which `target` hands out once it is
    ready; writes queued before that wait, and fail with its exception if it never is."""

    def __init__(self, pool: BlockingPool, target: Callable[[], Awaitable[Target]]):
        self._pool = pool
        self._target = target
        self._pending: list[tuple[Callable[[Target], Any], asyncio.Future[Any]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._last: asyncio.Future[Any] | None = None

    def write(self, function: Callable[[Target], T]) -> asyncio.Future[T]:
        """Queues a write; the future holds its result (or its exception, also logged)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((function, future))
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
            try:
                target = await self._target()
            except Exception as exc:  # logged once, where it failed: not once per write
                for _, future in self._pending:
                    _settle(future, False, exc)
                self._pending = []
                return
            while self._pending:
                batch, self._pending = self._pending, []
                outcomes = await self._pool.run(self._run_batch, target,
                                                [call for call, _ in batch])
                for (_, future), (ok, value) in zip(batch, outcomes):
                    _settle(future, ok, value)
        finally:
            self._draining = None

    @staticmethod
    def _run_batch(target: Target, calls: list[Callable[[Target], Any]]) -> list[tuple[bool, Any]]:
        outcomes = []
        for call in calls:
            try:
                outcomes.append((True, call(target)))
            except Exception as exc:  # one failed write must not stop the ones after it
                log.exception("a store write failed: %s", getattr(call, "__qualname__", call))
                outcomes.append((False, exc))
        return outcomes


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
        future.exception()  # retrieved here: the failure is logged where it happened


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
    """The one way to the store from the event loop, and its gate: every call first waits
    until `open` has opened it and run the start-up steps that read it."""

    def __init__(self, pool: BlockingPool):
        self._pool = pool
        self._writes: WriteBehind[Store] = WriteBehind(pool, self.ready)
        self._store: Store | None = None
        self._failure: str | None = None  # why it could not be opened
        self._started: asyncio.Future[None] | None = None  # done once `open` has finished

    # -- opening --------------------------------------------------------------------------

    async def open(self, connect: Callable[[], Store],
                   prepare: Callable[[Store], Awaitable[None]]) -> bool:
        """Runs `connect` on the pool (it opens and migrates the store), then `prepare` with
        the store (start-up steps that must finish before any request reads it), then lets
        every waiting call through. False when the store could not be opened or prepared:
        that is logged, and every call raises StoreUnavailable from then on."""
        started = self._start_gate()
        try:
            self._store = await self._pool.run(connect)
            await prepare(self._store)
        except Exception as exc:
            self._failure = str(exc) if isinstance(exc, StoreUnavailable) else (
                f"the database could not be prepared: {_first_line(exc)}")
            log.error("%s. Requests that need the database answer 503 until the "
                      "server is restarted with this fixed.", self._failure,
                      exc_info=not isinstance(exc, StoreUnavailable))
            return False
        finally:
            started.set_result(None)
        return True

    async def ready(self) -> Store:
        """The store, once open and prepared (waits until then); StoreUnavailable if it
        could not be opened."""
        await asyncio.shield(self._start_gate())
        if self._store is None or self._failure is not None:
            raise StoreUnavailable(self._failure or "the database is closed")
        return self._store

    async def _run(self, call: Callable[[Store], T]) -> T:
        """Runs `call(store)` on the pool once the store is ready."""
        return await self._pool.run(call, await self.ready())

    def state(self) -> DatabaseState:
        """Whether the store is open yet, or why it could not be (for the status route: no
        waiting, no query)."""
        if self._failure is not None:
            return DatabaseState(state="unavailable", error=self._failure)
        opened = self._store is not None and self._started is not None and self._started.done()
        return DatabaseState(state="ready" if opened else "opening", error=None)

    def _start_gate(self) -> asyncio.Future[None]:
        if self._started is None:  # made on the event loop, by whoever needs it first
            self._started = asyncio.get_running_loop().create_future()
        return self._started

    def close(self) -> None:
        """Closes the store's connections (at shutdown, after `flush`)."""
        if self._store is not None:
            self._store.close()

    # -- models ---------------------------------------------------------------------------

    def record_model_status(self, name: str, status: str, error: str | None = None) -> None:
        """Persists a model's status without waiting, in call order (the database never ends
        on a stale status)."""
        self._writes.write(lambda store: store.set_model_status(name, status, error))

    async def ensure_model(self, name: str, path: str, source: str, kind: str) -> None:
        await self._run(lambda store: store.ensure_model(name, path, source, kind))

    async def update_model(self, name: str, **fields: Any) -> None:
        await self._run(lambda store: store.update_model(name, **fields))

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._run(lambda store: store.list_models())

    async def get_model(self, name: str) -> dict[str, Any] | None:
        return await self._run(lambda store: store.get_model(name))

    async def flush(self) -> None:
        """Waits for the writes queued so far (at shutdown, and before reads)."""
        await self._writes.settled()

    # -- settings -------------------------------------------------------------------------

    async def settings(self) -> dict[str, dict[str, Any]]:
        return await self._run(lambda store: store.settings.all())

    async def setting_values(self) -> dict[str, Any]:
        """From the cache without leaving the event loop when it is fresh (every request
        without explicit sampling fields asks)."""
        settings = (await self.ready()).settings
        cached = settings.cached_values()
        return cached if cached is not None else await self._pool.run(settings.values)

    async def setting(self, key: str) -> dict[str, Any]:
        """One setting as `settings()` describes it; UnknownSetting names a wrong key."""
        return await self._run(lambda store: _describe_setting(store, key))

    async def set_setting(self, key: str, value: Any) -> dict[str, Any]:
        """Stores a setting and returns its description."""
        def set_and_describe(store: Store) -> dict[str, Any]:
            store.settings.set(key, value)
            return _describe_setting(store, key)

        return await self._run(set_and_describe)

    # -- requests -------------------------------------------------------------------------

    def add_request(self, record: RequestRecord) -> asyncio.Future[None]:
        """Records a new request and counts a use of its model, written behind; await the
        result where the record must be durable before answering (background jobs)."""
        def add_and_count(store: Store) -> None:
            store.add_request(record)
            store.record_model_use(record.model)

        return self._writes.write(add_and_count)

    def update_request(self, request_id: str, **fields: Any) -> None:
        """Changes a request's columns, written behind, after the writes queued before."""
        self._writes.write(lambda store: store.update_request(request_id, **fields))

    async def get_request(self, request_id: str) -> dict[str, Any]:
        await self.flush()
        row = await self._run(lambda store: store.get_request(request_id))
        if row is None:
            raise RequestNotFound(request_id)
        return row

    async def list_requests(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        await self.flush()
        return await self._run(lambda store: store.list_requests(**filters))

    def prune_history(self) -> asyncio.Future[int]:
        """Applies the settings history_retention_days and max_history_rows, written behind
        (after the writes queued before it); the future holds how many rows went."""
        return self._writes.write(lambda store: store.prune_history())

    # -- database -------------------------------------------------------------------------

    async def database_info(self) -> dict[str, Any]:
        await self.flush()
        return await self._run(lambda store: store.get_database_info())


def _describe_setting(store: Store, key: str) -> dict[str, Any]:
    store.settings.spec(key)  # UnknownSetting for a wrong key
    return {"key": key, **store.settings.all()[key]}


def _first_line(exc: BaseException) -> str:
    """An exception's message without SQLAlchemy's trailing SQL and links."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
