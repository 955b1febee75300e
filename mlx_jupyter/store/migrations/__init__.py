"""Schema migrations (alembic), run from code: no alembic.ini, no command line at runtime.

The environment (env.py), the template and the revisions live in this folder; `alembic_config`
points an alembic Config at it. Every run happens in one transaction on a connection of ours:
- PostgreSQL: DDL is transactional, and an advisory lock makes a second server that starts at
  the same moment wait instead of migrating twice.
- SQLite: DDL is transactional too, and BEGIN IMMEDIATE serialises concurrent starts. Foreign
  keys are switched off for the run (SQLite's own procedure for schema changes: a batch
  migration drops and recreates tables, and with them on, that DROP would cascade-delete the
  requests of every model) and checked before the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, Connection

from ..database import immediate, mask_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent
# pg_advisory_xact_lock key: any constant of our own ("mlxj").
_POSTGRES_LOCK_KEY = 0x6D6C786A


def alembic_config(url: str | URL | None = None) -> Config:
    """An alembic Config for our migrations folder, built in code."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


@cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> str:
    """Brings the database to the newest revision; returns it. Cheap when already there."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        log.debug("database %s is at head %s", mask_url(engine.url), head)
        return head
    return upgrade_to(engine, "head")


def upgrade_to(engine: Engine, revision: str) -> str:
    return _run(engine, "upgrade", revision, lambda config: command.upgrade(config, revision))


def downgrade_to(engine: Engine, revision: str) -> str:
    return _run(engine, "downgrade", revision, lambda config: command.downgrade(config, revision))


def _run(engine: Engine, action: str, target: str, step: Callable[[Config], None]) -> str:
    with _migration_connection(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        log.info("%s of %s from revision %s to %s", action, mask_url(engine.url),
                 before or "<empty>", target)
        config = alembic_config()
        config.attributes["connection"] = connection
        step(config)
        after = MigrationContext.configure(connection).get_current_revision()
    log.info("database %s now at revision %s", mask_url(engine.url), after or "<empty>")
    return after or ""


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction, prepared for DDL as the module docstring says."""
    sqlite = engine.dialect.name == "sqlite"
    with immediate(engine).connect() as connection:
        if sqlite:
            # Must happen outside a transaction, so on the driver connection before BEGIN.
            _driver_execute(connection, "PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": _POSTGRES_LOCK_KEY})
                yield connection
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left broken foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                _driver_execute(connection, "PRAGMA foreign_keys=ON")


def _driver_execute(connection: Connection, sql: str) -> None:
    """Runs SQL on the DBAPI connection itself, outside SQLAlchemy's transaction handling."""
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()
