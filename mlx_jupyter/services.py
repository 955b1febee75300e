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

A database that stops answering, or fills up, at runtime is an outage, not an error of each call:
the writes behind are kept, in order, and tried again with a backoff until they land; the calls
that need the database answer 503 at once (DatabaseNotAnswering, DatabaseFull), saying so; a
request that needs the settings takes the last ones read; the status route says `unavailable`
until the database answers again. Each outage is logged when it begins and when it ends, and
counted once in faults_total.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from .contracts.status import DatabaseState
from .errors import MlxJupyterError
from .limits import DATABASE_RETRY_FIRST_SECONDS, DATABASE_RETRY_MAX_SECONDS, MAX_KEPT_WRITES

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


class DatabaseFault(StoreUnavailable):
    """The database stopped answering, or filled up, while the server runs: it may pass, and
    the writes behind are kept meanwhile. `kind` is what faults_total counts it as."""

    kind = "database_unavailable"
    saying = "the database {database} failed ({reason})"

    @classmethod
    def of(cls, kind: str, database: str, exc: BaseException) -> DatabaseFault:
        """The error for a fault of `kind` (store.faults: "full" or "unavailable")."""
        fault = DatabaseFull if kind == "full" else DatabaseNotAnswering
        return fault(fault.saying.format(database=database, reason=_first_line(exc)))


class DatabaseNotAnswering(DatabaseFault):
    saying = ("the database {database} is not answering ({reason}); generations go on, and "
              "the history's writes are kept and land when it answers again; check that it "
              "is running and reachable (c.MlxApp.database_url)")


class DatabaseFull(DatabaseFault):
    kind = "database_full"
    saying = ("the database {database} is full ({reason}); free disk space (or raise the "
              "database's size limit); generations go on, and the history's writes are kept "
              "and land once it has room")


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


class _Write(NamedTuple):
    function: Callable[[Any], Any]
    future: asyncio.Future[Any]
    keep: bool  # kept through a fault of the target; else failed with it


@dataclass
class Hold:
    """A fault of the target that held the write queue, and what happened since it began."""

    error: Exception
    began: float = field(default_factory=time.monotonic)
    landed: int = 0  # writes that landed after it began
    dropped: int = 0  # writes dropped past max_kept


class WriteBehind(Generic[Target]):
    """Blocking writes run in the order they were queued, in batches on the pool.

    Each write is a function of the target (the store), which `target` hands out once it is
    ready; writes queued before that wait, and fail with its exception if it never is.

    `fault` (called on the pool's thread: a pure function) tells a fault of the target itself
    from a write's own error: it returns the error to answer with, or None. A write's own error
    fails it alone. A fault holds the queue: the write and every one after it stay queued, in
    order, and are tried again after a backoff (`retry_seconds`, doubling up to
    `max_retry_seconds`), or at once when a reader asks (`landed`). A write queued with
    `keep=False` (its caller waits to answer) fails with the fault instead of waiting. While the
    queue is held, at most `max_kept` writes wait; past it new ones are dropped, and logged.
    When a fault leaves nothing kept, `probe` (a write that only asks whether the target
    answers) is queued to find out when it has passed.

    `on_hold(hold)` is called each time a fault holds the queue, `on_caught_up(hold)` once
    every write it held has landed: the fault has passed."""

    def __init__(self, pool: BlockingPool, target: Callable[[], Awaitable[Target]], *,
                 fault: Callable[[BaseException], Exception | None] = lambda _exc: None,
                 probe: Callable[[Target], Any] | None = None,
                 on_hold: Callable[[Hold], None] = lambda _hold: None,
                 on_caught_up: Callable[[Hold], None] = lambda _hold: None,
                 max_kept: int = MAX_KEPT_WRITES,
                 retry_seconds: float = DATABASE_RETRY_FIRST_SECONDS,
                 max_retry_seconds: float = DATABASE_RETRY_MAX_SECONDS):
        self._pool = pool
        self._target = target
        self._fault = fault
        self._probe = probe
        self._on_hold = on_hold
        self._on_caught_up = on_caught_up
        self._max_kept = max_kept
        self._retry_seconds = retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self._pending: deque[_Write] = deque()  # the batch being run stays in it until done
        self._draining: asyncio.Task[None] | None = None
        self._hold: Hold | None = None  # from a fault until the writes it held have landed
        self._waiting = False  # the last try failed with a fault: wait, then try again
        self._wake: asyncio.Event | None = None  # ends the wait early
        self._tried: asyncio.Future[None] | None = None  # done after the next try

    @property
    def held(self) -> Exception | None:
        """The fault the queue waits on, or None while writes flow."""
        return self._hold.error if self._waiting and self._hold is not None else None

    def write(self, function: Callable[[Target], T], *, keep: bool = True) -> asyncio.Future[T]:
        """Queues a write; the future holds its result (or its exception, also logged)."""
        future = asyncio.get_running_loop().create_future()
        held = self.held
        if held is not None and not keep:
            _settle(future, False, copy.copy(held))
        elif held is not None and len(self._pending) >= self._max_kept:
            self._drop(function, future, held)
        else:
            self._pending.append(_Write(function, future, keep))
            self._start()
        return future

    def hold(self, fault: Exception) -> None:
        """A fault of the target seen elsewhere (a read): the queue waits and tries again as
        if one of its writes had failed with it."""
        self._held_by(fault)
        self._start()

    def try_now(self) -> None:
        """Ends the wait before the next try (the target answered a call meanwhile)."""
        if self._wake is not None:
            self._wake.set()

    async def settled(self) -> None:
        """Waits until every write queued so far has run (successfully or not), however long
        a fault holds them."""
        waiting = [write.future for write in self._pending]
        if waiting:
            await asyncio.wait(waiting)

    async def landed(self) -> bool:
        """Waits until every write queued so far has run, as `settled`; but while a fault
        holds them, has them tried again at once and returns False if that try fails too.
        True once they have run."""
        waiting = {write.future for write in self._pending}
        self.try_now()
        while waiting := {future for future in waiting if not future.done()}:
            tried = self._next_try()
            await asyncio.wait({*waiting, tried}, return_when=asyncio.FIRST_COMPLETED)
            if tried.done() and self.held is not None:
                return False
        return True

    def abandon(self) -> int:
        """Stops trying (at shutdown, once `landed` said a fault holds the writes): fails the
        writes still queued with it; returns how many there were."""
        error = self.held or RuntimeError("the write queue was abandoned")
        lost = len(self._pending)
        if self._draining is not None:
            self._draining.cancel()
        while self._pending:
            _settle(self._pending.popleft().future, False, copy.copy(error))
        return lost

    def _start(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    def _next_try(self) -> asyncio.Future[None]:
        if self._tried is None:
            self._tried = asyncio.get_running_loop().create_future()
        return self._tried

    def _after_try(self) -> None:
        tried, self._tried = self._tried, None
        if tried is not None and not tried.done():
            tried.set_result(None)

    async def _drain(self) -> None:
        try:
            try:
                target = await self._target()
            except Exception as exc:  # logged once, where it failed: not once per write
                while self._pending:
                    _settle(self._pending.popleft().future, False, exc)
                return
            delay = self._retry_seconds
            while self._pending:
                if self._waiting:
                    await self._pause(delay)
                    delay = min(delay * 2, self._max_retry_seconds)
                fault = await self._try(target)
                if fault is None:
                    self._waiting, delay = False, self._retry_seconds
                else:
                    self._held_by(fault)
                self._after_try()
            if self._hold is not None:
                hold, self._hold = self._hold, None
                self._on_caught_up(hold)
        finally:
            self._draining = None
            self._after_try()  # nobody waits for a try that will not come

    async def _try(self, target: Target) -> Exception | None:
        """Runs the queued writes (one pool trip) up to the first fault, which it returns."""
        batch = list(self._pending)
        outcomes, fault = await self._pool.run(self._run_batch, target,
                                               [write.function for write in batch])
        ran = batch[:len(outcomes)]
        for write, (ok, value) in zip(ran, outcomes):
            _settle(write.future, ok, value)
            if ok and self._hold is not None and write.function is not self._probe:
                self._hold.landed += 1
        done = {id(write) for write in ran}  # `hold` may have taken some out meanwhile
        self._pending = deque(write for write in self._pending if id(write) not in done)
        return fault

    def _held_by(self, fault: Exception) -> None:
        """The queue waits on `fault`: the writes whose callers wait for an answer get it now,
        the others stay, in order."""
        if self._hold is None:
            self._hold = Hold(fault)
        self._hold.error, self._waiting = fault, True
        kept: deque[_Write] = deque()
        for write in self._pending:
            if write.keep:
                kept.append(write)
            else:
                _settle(write.future, False, copy.copy(fault))
        self._pending = kept
        if not kept and self._probe is not None:
            probe = asyncio.get_running_loop().create_future()
            self._pending.append(_Write(self._probe, probe, keep=True))
        self._on_hold(self._hold)

    async def _pause(self, seconds: float) -> None:
        self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._wake = None

    def _drop(self, function: Callable[[Target], Any], future: asyncio.Future[Any],
              held: Exception) -> None:
        assert self._hold is not None
        if not self._hold.dropped:
            log.warning("%d writes wait for the database, the most that are kept "
                        "(limits.MAX_KEPT_WRITES): new writes are dropped until it takes them",
                        self._max_kept)
        self._hold.dropped += 1
        log.debug("write dropped: %s", getattr(function, "__qualname__", function))
        _settle(future, False, copy.copy(held))

    def _run_batch(self, target: Target, calls: list[Callable[[Target], Any]],
                   ) -> tuple[list[tuple[bool, Any]], Exception | None]:
        """Runs the calls in order until one fails with a fault of the target: the outcomes
        of those that ran, and the fault (None if every call ran)."""
        outcomes: list[tuple[bool, Any]] = []
        for call in calls:
            try:
                outcomes.append((True, call(target)))
            except Exception as exc:
                fault = self._fault(exc)
                if fault is not None:  # this call and the ones after it stay queued
                    fault.__cause__ = exc
                    return outcomes, fault
                # One failed write must not stop the ones after it.
                log.exception("a store write failed: %s", getattr(call, "__qualname__", call))
                outcomes.append((False, exc))
        return outcomes, None


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
    until `open` has opened it and run the start-up steps that read it.

    `count_fault(kind)` counts a database that could not be opened or, once per outage, one
    that stopped answering or filled up (faults_total)."""

    def __init__(self, pool: BlockingPool,
                 count_fault: Callable[[str], None] = lambda _kind: None, *,
                 retry_seconds: float = DATABASE_RETRY_FIRST_SECONDS,
                 max_retry_seconds: float = DATABASE_RETRY_MAX_SECONDS):
        self._pool = pool
        self._count_fault = count_fault
        self._writes: WriteBehind[Store] = WriteBehind(
            pool, self.ready, fault=self._fault_of, probe=lambda store: store.ping(),
            on_hold=self._outage_seen, on_caught_up=self._outage_over,
            retry_seconds=retry_seconds, max_retry_seconds=max_retry_seconds)
        self._store: Store | None = None
        self._failure: str | None = None  # why it could not be opened
        self._started: asyncio.Future[None] | None = None  # done once `open` has finished
        self._outage: DatabaseFault | None = None  # while it does not answer, or is full
        self._counted: set[str] = set()  # the kinds this outage was counted as

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
            self._count_fault("database_unavailable")
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
        """Runs `call(store)` on the pool once the store is ready; a fault of the database
        raises its DatabaseFault (503), and has the writes behind wait for it to pass."""
        store = await self.ready()
        try:
            result = await self._pool.run(call, store)
        except Exception as exc:
            fault = self._fault_of(exc)
            if fault is None:
                raise
            self._writes.hold(fault)
            raise fault from exc
        if self._outage is not None:  # it answers again: the writes kept need not wait
            self._writes.try_now()
        return result

    async def _read(self, call: Callable[[Store], T]) -> T:
        """`_run` for reads, after the writes queued before them (so that a client reads
        what it was told happened); while a fault holds those, the fault (503) at once."""
        if not await self._writes.landed():
            raise copy.copy(self._outage or self._writes.held)
        return await self._run(call)

    # -- faults of the database while it runs -----------------------------------------------

    def _fault_of(self, exc: BaseException) -> DatabaseFault | None:
        """The DatabaseFault `exc` is, or None for an error of the call's own (on any thread)."""
        from .store.faults import database_fault  # loaded with the store, once it opened

        kind = database_fault(exc)
        database = self._store.url if self._store is not None else "the database"
        return None if kind is None else DatabaseFault.of(kind, database, exc)

    def _outage_seen(self, hold: Hold) -> None:
        """A fault holds the writes: an outage begins (logged, counted) or goes on."""
        fault = hold.error
        assert isinstance(fault, DatabaseFault)
        if self._outage is None:
            log.warning("%s. Routes that need the database answer 503 until then.", fault)
        self._outage = fault
        if fault.kind not in self._counted:  # once per outage (and kind)
            self._counted.add(fault.kind)
            self._count_fault(fault.kind)

    def _outage_over(self, hold: Hold) -> None:
        """Every write the outage held has landed: the database answers again."""
        seconds = time.monotonic() - hold.began
        log.info("the database answers again after %.1f s; %d write(s) kept meanwhile "
                 "landed", seconds, hold.landed)
        if hold.dropped:
            log.warning("%d write(s) were dropped during the outage: more than %d waited "
                        "(limits.MAX_KEPT_WRITES)", hold.dropped, MAX_KEPT_WRITES)
        self._outage = None
        self._counted.clear()

    def state(self) -> DatabaseState:
        """Whether the store is open yet, or why it could not be, or why it does not answer
        now (for the status route: no waiting, no query)."""
        if self._failure is not None:
            return DatabaseState(state="unavailable", error=self._failure)
        if self._outage is not None:
            return DatabaseState(state="unavailable", error=str(self._outage))
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
        """Waits for the writes queued so far (at shutdown). While the database does not take
        them it tries once more, then gives them up, saying how many were lost."""
        if not await self._writes.landed():
            lost = self._writes.abandon()
            log.error("%d write(s) kept for the database are lost: %s", lost, self._outage)

    # -- settings -------------------------------------------------------------------------

    async def settings(self) -> dict[str, dict[str, Any]]:
        return await self._run(lambda store: store.settings.all())

    async def setting_values(self) -> dict[str, Any]:
        """From the cache without leaving the event loop when it is fresh (every request
        without explicit sampling fields asks). While the database does not answer, the
        values last read: generations go on."""
        settings = (await self.ready()).settings
        cached = settings.cached_values()
        if cached is not None:
            return cached
        last = settings.last_values()
        if self._outage is None or last is None:
            try:
                return await self._run(lambda store: store.settings.values())
            except DatabaseFault:
                if last is None:
                    raise
        log.debug("settings: the values last read, since the database does not answer")
        return last

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

    def add_request(self, record: RequestRecord, *, durable: bool = False,
                    ) -> asyncio.Future[str]:
        """Records a new request and counts a use of its model, written behind. `durable`:
        the caller awaits the record before it answers (background jobs), so while the
        database does not take it, the future fails at once with the fault (503) rather than
        waiting for it to pass."""
        return self._writes.write(lambda store: store.add_request(record, count_use=True),
                                  keep=not durable)

    def update_request(self, request_id: str, **fields: Any) -> None:
        """Changes a request's columns, written behind, after the writes queued before."""
        self._writes.write(lambda store: store.update_request(request_id, **fields))

    async def get_request(self, request_id: str) -> dict[str, Any]:
        row = await self._read(lambda store: store.get_request(request_id))
        if row is None:
            raise RequestNotFound(request_id)
        return row

    async def list_requests(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        return await self._read(lambda store: store.list_requests(**filters))

    def prune_history(self) -> asyncio.Future[int]:
        """Applies the settings history_retention_days and max_history_rows, written behind
        (after the writes queued before it); the future holds how many rows went. Not kept
        through a fault of the database: the next pass does it."""
        return self._writes.write(lambda store: store.prune_history(), keep=False)

    # -- database -------------------------------------------------------------------------

    async def database_info(self) -> dict[str, Any]:
        return await self._read(lambda store: store.get_database_info())


def _describe_setting(store: Store, key: str) -> dict[str, Any]:
    store.settings.spec(key)  # UnknownSetting for a wrong key
    return {"key": key, **store.settings.all()[key]}


def _first_line(exc: BaseException) -> str:
    """An exception's message without SQLAlchemy's trailing SQL and links."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
