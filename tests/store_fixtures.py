"""Fixtures of the store tests: every test that takes `database_url` or `store` runs twice, on a
SQLite file and on PostgreSQL (a private server, see postgres.py; skipped, with the reason, where
PostgreSQL cannot run). A test module loads them with `pytest_plugins = ["store_fixtures"]`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from postgres import postgres_server  # noqa: F401  (a fixture, used through getfixturevalue)

from mlx_jupyter.services import BlockingPool
from mlx_jupyter.store import Store

_database_numbers = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The URL of a new, empty database (on PostgreSQL: a new schema, 300x faster to make)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_schema(f"test_{os.getpid()}_{next(_database_numbers)}")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated store on a new database."""
    with Store.open(database_url) as opened:
        yield opened


@pytest.fixture
def pool() -> Iterator[BlockingPool]:
    """The thread pool a StoreService runs its calls on."""
    pool = BlockingPool(4)
    yield pool
    pool.shutdown()


async def nothing_to_prepare(_store: Store) -> None:
    """A StoreService.open step with nothing to do once the store is open."""
