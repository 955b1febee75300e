"""Store: the server's one handle on the database (models, requests, settings, status).

Synchronous and thread-safe: the server calls it from a thread pool, never on the event loop.
Hot paths use Core statements that select only the columns they need; writes that touch many
rows are one statement each. Every write transaction starts with BEGIN IMMEDIATE on SQLite
(see database.py); reads use deferred transactions and never wait for a writer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.engine import URL, Connection

from . import queries
from .database import (
    create_engine_for,
    dialect_insert,
    immediate,
    is_sqlite,
    mask_url,
    pool_info,
    postgres_settings,
    sqlite_pragmas,
    storage_size,
)
from .errors import InvalidField, UnknownModel
from .migrations import current_revision, head_revision, upgrade_to_head
from .records import (
    FINISHED,
    TIMING_COLUMNS,
    UNFINISHED,
    ModelStatus,
    RequestRecord,
    RequestStatus,
    check_status,
    storable,
    utcnow,
    with_timings,
)
from .schema import Base, models_table, requests_table
from .settings import DEFAULT_TTL_SECONDS, SettingsService

log = logging.getLogger(__name__)

models = models_table.c
requests = requests_table.c

# Columns update_request may change; the rest are fixed once the request is added.
UPDATABLE_REQUEST_FIELDS = frozenset({
    "status", "priority", "started_at", "finished_at", "output_text", "finish_reason",
    "prompt_tokens", "completion_tokens", "error", *TIMING_COLUMNS})
UPDATABLE_MODEL_FIELDS = frozenset({
    "path", "source", "kind", "size_bytes", "memory_estimate_bytes", "status", "pinned",
    "last_error", "metadata"})
MAX_PAGE = 1000
INTERRUPTED_ERROR = "the server stopped before this request finished"


class Store:
    """Database access for the server. `Store.open(url)` is the usual way in."""

    def __init__(self, url: str | URL, *, settings_ttl: float = DEFAULT_TTL_SECONDS,
                 **engine_options: Any):
        self.engine: Engine = create_engine_for(url, **engine_options)
        self._write_engine = immediate(self.engine)
        self.settings = SettingsService(self.engine, ttl_seconds=settings_ttl)
        # name -> id, and name -> what ensure_model last wrote (to skip identical upserts).
        self._model_ids: dict[str, int] = {}
        self._model_rows: dict[str, tuple[Any, ...]] = {}
        self._models_lock = threading.Lock()

    @classmethod
    def open(cls, url: str | URL, *, settings_ttl: float = DEFAULT_TTL_SECONDS,
             **engine_options: Any) -> Store:
        """Creates the engine and brings the schema to the newest revision."""
        store = cls(url, settings_ttl=settings_ttl, **engine_options)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def migrate(self) -> str:
        return upgrade_to_head(self.engine)

    @property
    def url(self) -> str:
        """The database URL with the password masked."""
        return mask_url(self.engine.url)

    def close(self) -> None:
        """Closes every pooled connection. The store can still be used (it reconnects)."""
        self.engine.dispose()
        with self._models_lock:
            self._model_ids.clear()
            self._model_rows.clear()
        log.debug("store %s closed", self.url)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- sessions ------------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[Connection]:
        """A connection in a write transaction (BEGIN IMMEDIATE on SQLite), committed on exit."""
        return self._write_engine.begin()

    def _read(self) -> AbstractContextManager[Connection]:
        """A connection for reads; its deferred transaction is rolled back on exit."""
        return self.engine.connect()

    # -- models --------------------------------------------------------------------------------

    def ensure_model(self, name: str, path: str, source: str, kind: str = "text", *,
                     size_bytes: int | None = None, memory_estimate_bytes: int | None = None,
                     metadata: dict[str, Any] | None = None) -> int:
        """Registers a model or updates its path/source/kind; returns its id.

        Sizes and metadata are only written when given. Calling it again with the same values
        costs no database round trip.
        """
        wanted = (path, source, kind, size_bytes, memory_estimate_bytes, repr(metadata))
        with self._models_lock:
            if self._model_rows.get(name) == wanted:
                log.debug("model id cache hit: %s", name)
                return self._model_ids[name]
        now = utcnow()
        values: dict[str, Any] = {"name": name, "path": path, "source": source, "kind": kind,
                                  "size_bytes": size_bytes,
                                  "memory_estimate_bytes": memory_estimate_bytes,
                                  "metadata": metadata or {}, "created_at": now, "updated_at": now}
        changed = {"path", "source", "kind", "updated_at"}
        changed |= {key for key in ("size_bytes", "memory_estimate_bytes")
                    if values[key] is not None}
        if metadata is not None:
            changed.add("metadata")
        with self._write() as connection:
            statement = dialect_insert(self.engine)(models_table).values(**values)
            statement = statement.on_conflict_do_update(
                index_elements=[models.name],
                set_={key: statement.excluded[key] for key in changed})
            model_id = connection.scalar(statement.returning(models.id))
        with self._models_lock:
            self._model_ids[name] = model_id
            self._model_rows[name] = wanted
        log.debug("model %s registered with id %s (cache updated)", name, model_id)
        return model_id

    def model_id(self, name: str) -> int:
        """The id of a registered model (cached); `UnknownModel` when there is none."""
        with self._models_lock:
            cached = self._model_ids.get(name)
        if cached is not None:
            return cached
        log.debug("model id cache miss: %s", name)
        with self._read() as connection:
            found = connection.scalar(select(models.id).where(models.name == name))
        if found is None:
            raise UnknownModel(name)
        with self._models_lock:
            self._model_ids[name] = found
        return found

    def record_model_use(self, name: str) -> bool:
        """Counts one use of a model and stamps last_used_at. False when it is not registered."""
        with self._write() as connection:
            return _count_use(connection, name)

    def set_model_status(self, name: str, status: str | ModelStatus,
                         error: str | None = None) -> bool:
        """Sets a model's status; `error`, when given, becomes its last_error."""
        fields: dict[str, Any] = {"status": status}
        if error is not None:
            fields["last_error"] = error
        return self.update_model(name, **fields)

    def update_model(self, name: str, /, **fields: Any) -> bool:
        """Changes columns of a model (see UPDATABLE_MODEL_FIELDS). False when it is unknown."""
        unknown = set(fields) - UPDATABLE_MODEL_FIELDS
        if unknown:
            raise InvalidField(f"cannot update model field(s) {', '.join(sorted(unknown))}; "
                               f"updatable: {', '.join(sorted(UPDATABLE_MODEL_FIELDS))}")
        if "status" in fields:
            fields["status"] = _model_status(fields["status"])
        with self._write() as connection:
            result = connection.execute(update(models_table).where(models.name == name)
                                        .values(**fields, updated_at=utcnow()))
        with self._models_lock:  # the next ensure_model must write again
            self._model_rows.pop(name, None)
        return result.rowcount > 0

    def list_models(self) -> list[dict[str, Any]]:
        with self._read() as connection:
            rows = connection.execute(select(models_table).order_by(models.name)).mappings()
            return [dict(row) for row in rows]

    def get_model(self, name: str) -> dict[str, Any] | None:
        with self._read() as connection:
            row = connection.execute(
                select(models_table).where(models.name == name)).mappings().first()
        return dict(row) if row is not None else None

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, record: RequestRecord, *, count_use: bool = False) -> str:
        """Inserts a request; with `count_use`, counts a use of its model in the same
        transaction (so that a write tried again after a database fault does both or neither)."""
        row = record.to_row(self.model_id(record.model))
        with self._write() as connection:
            connection.execute(insert(requests_table), row)
            if count_use:
                _count_use(connection, record.model)
        return record.id

    def update_request(self, request_id: str, /, **fields: Any) -> bool:
        """Changes columns of a request (see UPDATABLE_REQUEST_FIELDS). False when unknown."""
        unknown = set(fields) - UPDATABLE_REQUEST_FIELDS
        if unknown:
            raise InvalidField(f"cannot update request field(s) {', '.join(sorted(unknown))}; "
                               f"updatable: {', '.join(sorted(UPDATABLE_REQUEST_FIELDS))}")
        if not fields:
            return self.get_request(request_id) is not None
        if "status" in fields:
            fields["status"] = check_status(fields["status"])
        fields = {name: storable(value) for name, value in fields.items()}
        with self._write() as connection:
            result = connection.execute(
                update(requests_table).where(requests.id == request_id).values(**fields))
        return result.rowcount > 0

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        """Every column of one request, and the model's name."""
        with self._read() as connection:
            row = connection.execute(
                select(requests_table, queries.MODEL_NAME).where(requests.id == request_id)
            ).mappings().first()
        return with_timings(dict(row)) if row is not None else None

    def list_requests(self, model: str | None = None, notebook: str | None = None,
                      status: str | Iterable[str] | None = None, limit: int = 50,
                      offset: int = 0, preview_chars: int = 200,
                      ) -> tuple[list[dict[str, Any]], int]:
        """A page of the history, newest first, and how many requests match in all.

        Rows carry `prompt_preview`/`output_preview` (the first `preview_chars` characters)
        instead of the full prompt, messages and output; `get_request` has everything.
        """
        if limit < 1 or offset < 0:
            raise InvalidField(f"limit must be at least 1 and offset at least 0, "
                               f"got limit={limit}, offset={offset}")
        if isinstance(status, str):
            status = check_status(status)
        elif status is not None:
            status = [check_status(value) for value in status]
        try:
            model_id = self.model_id(model) if model is not None else None
        except UnknownModel:
            return [], 0
        filters = queries.history_filters(model_id, notebook, status)
        with self._read() as connection:  # one transaction: the page and the total agree
            rows = connection.execute(queries.history_page(
                filters, limit=min(limit, MAX_PAGE), offset=offset,
                preview_chars=preview_chars)).mappings().all()
            total = connection.scalar(queries.history_count(filters))
        return [with_timings(dict(row)) for row in rows], int(total or 0)

    def recover_unfinished(self) -> tuple[list[dict[str, Any]], int]:
        """Start-up recovery after a stop or a crash: background jobs left queued or running
        go back to queued and are returned (every column) to be run again; every other
        unfinished request is marked interrupted, since its client is gone. Returns the jobs
        and how many requests were marked interrupted."""
        with self._write() as connection:
            rows = connection.execute(
                select(requests_table, queries.MODEL_NAME)
                .where(requests.status.in_(UNFINISHED)).order_by(requests.created_at)
            ).mappings().all()
            jobs = [dict(row) for row in rows if (row["parameters"] or {}).get("background")]
            job_ids = [job["id"] for job in jobs]
            if job_ids:
                connection.execute(update(requests_table).where(requests.id.in_(job_ids))
                                   .values(status=RequestStatus.QUEUED.value, started_at=None))
            interrupted = connection.execute(
                update(requests_table)
                .where(requests.status.in_(UNFINISHED), requests.id.not_in(job_ids))
                .values(status=RequestStatus.INTERRUPTED.value, finished_at=utcnow(),
                        error=func.coalesce(requests.error, INTERRUPTED_ERROR))).rowcount
        log.info("start-up recovery: %d background job(s) to run again, %d request(s) "
                 "interrupted", len(jobs), interrupted)
        return [{**job, "status": RequestStatus.QUEUED.value, "started_at": None}
                for job in jobs], interrupted

    def prune_history(self, retention_days: int | None = None,
                      max_rows: int | None = None) -> int:
        """Deletes finished requests older than `retention_days` and beyond the newest
        `max_rows` (0: no limit). Defaults come from the settings `history_retention_days` and
        `max_history_rows`. Returns how many rows were deleted."""
        if retention_days is None:
            retention_days = self.settings.get("history_retention_days")
        if max_rows is None:
            max_rows = self.settings.get("max_history_rows")
        finished = requests.status.in_(FINISHED)
        deleted = 0
        with self._write() as connection:
            if retention_days:
                cutoff = utcnow() - timedelta(days=retention_days)
                deleted += connection.execute(delete(requests_table).where(
                    finished, requests.created_at < cutoff)).rowcount
            if max_rows:
                # created_at of the oldest row that stays; everything older goes.
                oldest_kept = connection.scalar(
                    select(requests.created_at).where(finished)
                    .order_by(requests.created_at.desc()).offset(max_rows - 1).limit(1))
                if oldest_kept is not None:
                    deleted += connection.execute(delete(requests_table).where(
                        finished, requests.created_at < oldest_kept)).rowcount
        if deleted:
            log.info("pruned %d finished request(s) from the history", deleted)
        return deleted

    # -- status --------------------------------------------------------------------------------

    def ping(self) -> None:
        """One round trip to the database (whether it answers); raises what it raises."""
        with self._read() as connection:
            connection.exec_driver_sql("SELECT 1")

    def get_database_info(self) -> dict[str, Any]:
        """Dialect, masked URL, pool, pragmas (SQLite) or server settings (PostgreSQL),
        schema revision, size on disk and row counts."""
        info: dict[str, Any] = {"dialect": self.engine.dialect.name,
                                "driver": self.engine.dialect.driver, "url": self.url}
        info.update(pool_info(self.engine))  # before we check a connection out ourselves
        with self._read() as connection:
            info["server_version"] = ".".join(
                str(part) for part in (self.engine.dialect.server_version_info or ()))
            info["pragmas"] = sqlite_pragmas(connection) if is_sqlite(self.engine) else None
            info["server_settings"] = (postgres_settings(connection)
                                       if self.engine.dialect.name == "postgresql" else None)
            info.update(storage_size(self.engine, connection))
            info["row_counts"] = _row_counts(connection)
        info["schema_revision"] = current_revision(self.engine)
        info["schema_head"] = head_revision()
        info["settings_cache"] = self.settings.cache.info()
        return info


def _count_use(connection: Connection, name: str) -> bool:
    result = connection.execute(update(models_table).where(models.name == name)
                                .values(use_count=models.use_count + 1, last_used_at=utcnow()))
    return result.rowcount > 0


def _model_status(status: str | ModelStatus) -> str:
    value = status.value if isinstance(status, ModelStatus) else status
    known = [s.value for s in ModelStatus]
    if value not in known:
        raise InvalidField(f"unknown model status {status!r}; statuses are: {', '.join(known)}")
    return value


def _row_counts(connection: Connection) -> dict[str, int]:
    return {table.name: connection.scalar(select(func.count()).select_from(table)) or 0
            for table in Base.metadata.sorted_tables}
