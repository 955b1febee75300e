"""Engines: the one place they are built, with the pool, SQLite's pragmas and transaction mode.

SQLite (the default) and PostgreSQL are supported. File SQLite and PostgreSQL get a QueuePool;
an in-memory SQLite database gets a StaticPool (one connection, single-threaded use only).

SQLite needs two things to take concurrent writers without "database is locked":
- WAL journal mode plus a busy timeout, so readers never block writers and a writer waits for
  the lock instead of failing at once;
- write transactions that take the write lock when they begin (BEGIN IMMEDIATE). A deferred
  transaction that reads first and writes later cannot wait for the lock in WAL mode: when
  another writer committed in between, SQLite answers SQLITE_BUSY at once, busy timeout or not.
  pysqlite's own transaction handling cannot do that, so we switch it off
  (``isolation_level = None``) and emit BEGIN ourselves in the engine's ``begin`` event, with
  the mode the connection's ``sqlite_begin`` execution option asks for (see `immediate`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import NullPool, QueuePool, StaticPool

from ..limits import DATABASE_CONNECT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

DATABASE_FILE = "mlx_jupyter.db"

# Applied to every new SQLite connection, in this order (busy_timeout first: the others may
# have to wait for a lock).
SQLITE_PRAGMAS: dict[str, str] = {
    "journal_mode": "WAL",  # readers and one writer at the same time
    "synchronous": "NORMAL",  # safe with WAL; fsync at checkpoints, not at every commit
    "cache_size": "-32768",  # negative: KiB, so 32 MiB of page cache per connection
    "mmap_size": "268435456",  # 256 MiB of memory-mapped I/O
    "temp_store": "MEMORY",  # sorts and temp indexes in memory
    "foreign_keys": "ON",  # off by default in SQLite
}

SUPPORTED_BACKENDS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}

_BEGIN_OPTION = "sqlite_begin"
_BEGIN_MODES = {"DEFERRED", "IMMEDIATE", "EXCLUSIVE"}


def default_database_url(data_dir: str | os.PathLike[str]) -> str:
    """The SQLite database in the given data directory (the server passes jupyter_core's)."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / DATABASE_FILE}"


def mask_url(url: str | URL) -> str:
    """The URL for logs and status pages, with the password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory databases and other backends."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):  # URI filename: sqlite:///file:path?uri=true
        database = database[len("file:"):]
    return Path(database)


def immediate(engine: Engine) -> Engine:
    """The same engine and pool, but its transactions start with BEGIN IMMEDIATE on SQLite.

    Use it for every transaction that writes. Reads use the plain engine (BEGIN DEFERRED), so
    they never wait for a writer. On other backends the option is ignored.
    """
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


def create_engine_for(
    url: str | URL,
    *,
    pool_size: int = 10,
    max_overflow: int = 20,
    pool_recycle: int = 3600,
    pool_pre_ping: bool = True,
    busy_timeout_ms: int = 5000,
    pooled: bool = True,
) -> Engine:
    """Builds the engine for a database URL with our pool, pragmas and transaction handling.

    `pooled=False` gives a NullPool (a new connection per checkout, closed on return): for
    short-lived tools and as the benchmark's baseline, not for the server.
    """
    url = make_url(url)
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ValueError(f"the store supports {' and '.join(SUPPORTED_BACKENDS.values())} "
                         f"(URLs sqlite:///... and postgresql+psycopg://...), not "
                         f"{url.get_backend_name()!r}")
    options: dict[str, Any] = {"pool_pre_ping": pool_pre_ping}
    sqlite = url.get_backend_name() == "sqlite"
    database_file = sqlite_file(url)
    if sqlite and database_file is None:
        # Every connection to :memory: is a new, empty database: share one connection.
        options.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif not pooled:
        options["poolclass"] = NullPool
    else:
        options.update(poolclass=QueuePool, pool_size=pool_size, max_overflow=max_overflow,
                       pool_recycle=pool_recycle)
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        # libpq waits for a connection as long as TCP does (minutes for a host that is gone):
        # a database that stopped answering must fail the call quickly instead.
        options["connect_args"] = {"connect_timeout": DATABASE_CONNECT_TIMEOUT_SECONDS}
    if sqlite and database_file is not None:
        try:
            database_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a file where a folder of the path should be
            raise OSError(f"cannot create the folder {database_file.parent} for the SQLite "
                          f"database: {exc.strerror}") from exc
        # Connections move between the pool's threads; the pool hands each to one at a time.
        options["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
    engine = create_engine(url, **options)
    if sqlite:
        _install_sqlite_listeners(engine, busy_timeout_ms)
    if isinstance(engine.pool, QueuePool):
        log.debug("engine created for %s: QueuePool(pool_size=%d, max_overflow=%d, "
                  "pool_recycle=%ds, pre_ping=%s)", mask_url(url), pool_size, max_overflow,
                  pool_recycle, pool_pre_ping)
    else:
        log.debug("engine created for %s: %s", mask_url(url), type(engine.pool).__name__)
    return engine


def _install_sqlite_listeners(engine: Engine, busy_timeout_ms: int) -> None:
    pragmas = {"busy_timeout": str(int(busy_timeout_ms)), **SQLITE_PRAGMAS}

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Switch off pysqlite's own BEGIN handling; `_on_begin` emits BEGIN instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for name, value in pragmas.items():
                cursor.execute(f"PRAGMA {name}={value}")
        finally:
            cursor.close()
        log.debug("new SQLite connection, pragmas set: %s",
                  ", ".join(f"{name}={value}" for name, value in pragmas.items()))

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        if mode not in _BEGIN_MODES:
            raise ValueError(f"{_BEGIN_OPTION} must be one of {sorted(_BEGIN_MODES)}, not {mode!r}")
        connection.exec_driver_sql(f"BEGIN {mode}")


# -- introspection for get_database_info ----------------------------------------------------------

_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
_TEMP_STORE = {0: "DEFAULT", 1: "FILE", 2: "MEMORY"}
_POSTGRES_SETTINGS = ("server_version", "max_connections", "shared_buffers", "work_mem",
                      "synchronous_commit", "TimeZone")


def pool_info(engine: Engine) -> dict[str, int | str | None]:
    """Pool figures. Overflow counts connections open beyond pool_size (SQLAlchemy's own
    counter starts at -pool_size: it counts connections not yet opened as negative)."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return {"connection_pool_class": type(pool).__name__, "connection_pool_size": None,
                "connection_pool_checked_out": None, "connection_pool_checked_in": None,
                "connection_pool_overflow": None}
    return {"connection_pool_class": "QueuePool", "connection_pool_size": pool.size(),
            "connection_pool_checked_out": pool.checkedout(),
            "connection_pool_checked_in": pool.checkedin(),
            "connection_pool_overflow": max(0, pool.overflow())}


def sqlite_pragmas(connection: Connection) -> dict[str, Any]:
    """The pragmas in force on a (pooled) connection, read back from SQLite itself."""
    values: dict[str, Any] = {name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
              for name in ("journal_mode", "synchronous", "cache_size", "mmap_size",
                           "temp_store", "foreign_keys", "busy_timeout")}
    values["synchronous"] = _SYNCHRONOUS.get(values["synchronous"], values["synchronous"])
    values["temp_store"] = _TEMP_STORE.get(values["temp_store"], values["temp_store"])
    values["foreign_keys"] = bool(values["foreign_keys"])
    return values


def postgres_settings(connection: Connection) -> dict[str, str]:
    return {name: connection.scalar(text("SELECT current_setting(:name)"), {"name": name})
            for name in _POSTGRES_SETTINGS}


def storage_size(engine: Engine, connection: Connection) -> dict[str, Any]:
    """Bytes on disk: the SQLite file and its WAL, or PostgreSQL's database size."""
    if is_sqlite(engine):
        path = sqlite_file(engine.url)
        if path is None:
            return {"file": None, "size_bytes": None, "wal_size_bytes": None}
        main = path.stat().st_size if path.exists() else 0
        wal_path = path.with_name(path.name + "-wal")
        wal = wal_path.stat().st_size if wal_path.exists() else 0
        return {"file": str(path), "size_bytes": main + wal, "wal_size_bytes": wal}
    if engine.dialect.name == "postgresql":
        size = connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
        return {"file": None, "size_bytes": size, "wal_size_bytes": None}
    return {"file": None, "size_bytes": None, "wal_size_bytes": None}


def dialect_insert(engine_or_dialect_name: Engine | str) -> Any:
    """The dialect's INSERT construct, which has ON CONFLICT DO UPDATE (every supported backend
    has one: create_engine_for refuses the others)."""
    name = (engine_or_dialect_name if isinstance(engine_or_dialect_name, str)
            else engine_or_dialect_name.dialect.name)
    return _DIALECT_INSERTS[name]


_DIALECT_INSERTS = {"sqlite": sqlite_dialect.insert, "postgresql": postgresql_dialect.insert}
