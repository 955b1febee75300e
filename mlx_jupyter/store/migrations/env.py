"""Alembic environment of mlx_jupyter's store.

At runtime `mlx_jupyter.store.migrations` runs it programmatically and hands over an open
connection in `config.attributes["connection"]` (no alembic.ini). To write a new revision against
a database at head, build the same Config in code:

    from alembic import command
    from mlx_jupyter.store.migrations import alembic_config
    command.revision(alembic_config("sqlite:///dev.db"), "what it does", rev_id="0003",
                     autogenerate=True)

It never configures logging: the server owns the log handlers.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from mlx_jupyter.store.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass a connection in config.attributes['connection'] "
                           "or set sqlalchemy.url (alembic_config(url) does)")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from mlx_jupyter.store.database import create_engine_for

    engine = create_engine_for(_url(), pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
