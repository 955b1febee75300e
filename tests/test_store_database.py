"""The store's engine, pool, pragmas, transactions, schema, migrations and database info, on real
SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, insert, inspect
from sqlalchemy.exc import OperationalError, StatementError
from sqlalchemy.pool import QueuePool, StaticPool

from mlx_jupyter.store import (
    RequestRecord,
    Store,
    create_engine_for,
    current_revision,
    default_database_url,
    head_revision,
    mask_url,
    upgrade_to_head,
)
from mlx_jupyter.store.database import immediate
from mlx_jupyter.store.migrations import downgrade_to, upgrade_to
from mlx_jupyter.store.schema import Base, Model, Request

pytest_plugins = ["store_fixtures"]  # database_url, store, postgres_server

QUEUE_INDEX = "ix_requests_queue"  # the database queue claim's, until revision 0004
HISTORY_INDEXES = {
    "ix_requests_model_created": ["model_id", "created_at"],
    "ix_requests_notebook_created": ["notebook", "created_at"],
    "ix_requests_status_created": ["status", "created_at"],
    "ix_requests_created": ["created_at"],
}
REVISION_0002_INDEXES = {"ix_requests_notebook_created", "ix_requests_status_created",
                         "ix_requests_created"}
REVISION_0003_COLUMNS = {"queue_ms", "total_ms", "tokens_per_second", "prompt_tokens_per_second"}


def request_indexes(engine: Engine) -> dict[str, list[str]]:
    return {index["name"]: index["column_names"]
            for index in inspect(engine).get_indexes("requests")}


def descending_columns(engine: Engine, index: str) -> set[str]:
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(f"PRAGMA index_xinfo({index})").mappings().all()
        return {row["name"] for row in rows if row["key"] and row["desc"]}
    found = next(i for i in inspect(engine).get_indexes("requests") if i["name"] == index)
    return {column for column, sorting in found.get("column_sorting", {}).items()
            if "desc" in sorting}


# -- URLs and engines ---------------------------------------------------------------------------

def test_default_database_url_is_a_sqlite_file_in_the_data_dir(tmp_path):
    url = default_database_url(tmp_path / "data")
    assert url == f"sqlite:///{(tmp_path / 'data').resolve()}/mlx_jupyter.db"
    engine = create_engine_for(url)  # creates the missing data directory
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x)")
        assert (tmp_path / "data" / "mlx_jupyter.db").is_file()
    finally:
        engine.dispose()


def test_passwords_are_masked_for_display():
    assert mask_url("postgresql+psycopg://me:s3cret@db:5432/mlx") == \
        "postgresql+psycopg://me:***@db:5432/mlx"
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_every_new_sqlite_connection_gets_the_pragmas(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'p.db'}", busy_timeout_ms=1234)
    try:
        # Two connections checked out at once are two different DBAPI connections.
        with engine.connect() as first, engine.connect() as second:
            assert first.connection.dbapi_connection is not second.connection.dbapi_connection
            for connection in (first, second):
                def pragma(name: str, connection=connection):
                    return connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                assert pragma("journal_mode") == "wal"
                assert pragma("synchronous") == 1  # NORMAL
                assert pragma("cache_size") == -32768
                assert pragma("mmap_size") == 268435456
                assert pragma("temp_store") == 2  # MEMORY
                assert pragma("foreign_keys") == 1
                assert pragma("busy_timeout") == 1234
    finally:
        engine.dispose()


def test_pool_settings_are_applied(database_url):
    engine = create_engine_for(database_url, pool_size=3, max_overflow=4, pool_recycle=77)
    try:
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        assert (pool.size(), pool._max_overflow, pool._recycle, pool._pre_ping) == (3, 4, 77, True)
        connections = [engine.connect() for _ in range(5)]
        for connection in connections:
            connection.exec_driver_sql("SELECT 1")
        assert pool.checkedout() == 5
        assert pool.overflow() == 2  # two beyond pool_size
        for connection in connections:
            connection.close()
        assert pool.checkedout() == 0
        assert pool.checkedin() == 3  # the overflow ones are closed, the pool keeps 3
    finally:
        engine.dispose()


def test_in_memory_sqlite_shares_one_connection():
    engine = create_engine_for("sqlite://")
    try:
        assert isinstance(engine.pool, StaticPool)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x)")
        with engine.connect() as connection:  # the same database, not a new empty one
            assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_write_lock_at_begin(tmp_path):
    """BEGIN IMMEDIATE: a second writer waits at BEGIN (here: gives up after the busy timeout),
    never halfway through a transaction; readers are not blocked."""
    engine = create_engine_for(f"sqlite:///{tmp_path / 'lock.db'}", busy_timeout_ms=50)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x)")
        with immediate(engine).connect() as writer:
            writer.begin()  # nothing executed yet: the lock is taken by BEGIN itself
            with immediate(engine).connect() as second_writer:
                with pytest.raises(OperationalError, match="database is locked"):
                    second_writer.begin()
            with engine.connect() as reader:
                assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
            writer.exec_driver_sql("INSERT INTO t VALUES (1)")
            writer.commit()
        with immediate(engine).begin() as second_writer:
            second_writer.exec_driver_sql("INSERT INTO t VALUES (2)")
        with engine.connect() as reader:
            assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 2
    finally:
        engine.dispose()


def test_sqlite_transactions_are_real_transactions(tmp_path):
    """With pysqlite's own handling off, a rollback undoes everything since BEGIN, DDL too."""
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tx.db'}")
    try:
        with engine.connect() as connection:
            with connection.begin() as transaction:
                connection.exec_driver_sql("CREATE TABLE t (x)")
                connection.exec_driver_sql("INSERT INTO t VALUES (1)")
                transaction.rollback()
            tables = connection.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master WHERE name = 't'").scalar()
        assert tables == 0
    finally:
        engine.dispose()


# -- schema and migrations ----------------------------------------------------------------------

def test_schema_has_the_tables_and_indexes(store):
    inspector = inspect(store.engine)
    assert {"models", "requests", "settings", "alembic_version"} <= set(inspector.get_table_names())
    indexes = request_indexes(store.engine)
    assert set(indexes) == set(HISTORY_INDEXES)
    for name, columns in HISTORY_INDEXES.items():
        assert indexes[name] == columns
    assert descending_columns(store.engine, "ix_requests_model_created") == {"created_at"}
    foreign_keys = inspector.get_foreign_keys("requests")
    assert [(fk["referred_table"], fk["options"].get("ondelete")) for fk in foreign_keys] == \
        [("models", "CASCADE")]
    assert [uc["column_names"] for uc in inspector.get_unique_constraints("models")] == [["name"]]


def test_migrations_build_exactly_the_schema_of_the_models(store):
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_an_empty_database(database_url):
    engine = create_engine_for(database_url)
    try:
        assert current_revision(engine) is None
        assert upgrade_to_head(engine) == head_revision() == "0004"
        assert current_revision(engine) == "0004"
        assert upgrade_to_head(engine) == "0004"  # again: nothing to do
        assert set(request_indexes(engine)) == set(HISTORY_INDEXES)
    finally:
        engine.dispose()


def test_upgrade_from_the_first_revision_keeps_the_rows(database_url):
    engine = create_engine_for(database_url)
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    try:
        assert upgrade_to(engine, "0001") == "0001"
        assert not REVISION_0002_INDEXES & set(request_indexes(engine))
        with immediate(engine).begin() as connection:  # rows as a 0001 server wrote them
            model_id = connection.scalar(insert(Model.__table__).values(
                name="old", path="/models/old", source="configured", metadata={"v": 1},
                created_at=created, updated_at=created).returning(Model.__table__.c.id))
            connection.execute(insert(Request.__table__), [
                {"id": f"r{i}", "model_id": model_id, "notebook": "nb.ipynb", "priority": i,
                 "status": "completed", "prompt": f"prompt {i}", "parameters": {"seed": i},
                 "created_at": created.replace(second=i)} for i in range(3)])
        assert upgrade_to_head(engine) == "0004"
        assert REVISION_0002_INDEXES <= set(request_indexes(engine))
    finally:
        engine.dispose()
    with Store.open(database_url) as store:
        rows, total = store.list_requests(notebook="nb.ipynb")
        assert total == 3
        assert [row["id"] for row in rows] == ["r2", "r1", "r0"]
        assert store.get_request("r1")["parameters"] == {"seed": 1}
        assert store.get_request("r1")["created_at"] == created.replace(second=1)
        assert [m["metadata"] for m in store.list_models()] == [{"v": 1}]


def test_upgrade_to_0003_keeps_the_old_figures_and_times_finished_requests(database_url):
    engine = create_engine_for(database_url)
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    try:
        assert upgrade_to(engine, "0002") == "0002"
        assert not REVISION_0003_COLUMNS & request_columns(engine)
        with immediate(engine).begin() as connection:  # rows as a 0002 server wrote them
            model_id = connection.scalar(insert(Model.__table__).values(
                name="old", path="/models/old", source="configured", metadata={},
                created_at=created, updated_at=created).returning(Model.__table__.c.id))
            connection.execute(insert(Request.__table__), [
                {"id": "done", "model_id": model_id, "status": "completed", "prompt": "p",
                 "parameters": {}, "created_at": created, "ttft_ms": 40.5,
                 "finished_at": created.replace(second=7, microsecond=250000)},
                {"id": "waiting", "model_id": model_id, "status": "queued", "prompt": "p",
                 "parameters": {}, "created_at": created, "ttft_ms": None,
                 "finished_at": None}])
        assert upgrade_to(engine, "0003") == "0003"
        assert REVISION_0003_COLUMNS <= request_columns(engine)
    finally:
        engine.dispose()
    with Store.open(database_url) as store:
        # What was stored stays; the total comes from the row's own times (2.25 s); the
        # figures no server stored stay unknown.
        assert store.get_request("done")["timings"] == {
            "queue_ms": None, "ttft_ms": 40.5, "total_ms": 2250.0, "tokens_per_second": None,
            "prompt_tokens_per_second": None}
        assert store.get_request("waiting")["timings"] is None
    engine = create_engine_for(database_url)
    try:
        downgrade_to(engine, "0002")
        assert not REVISION_0003_COLUMNS & request_columns(engine)
        assert "ttft_ms" in request_columns(engine)
        assert set(HISTORY_INDEXES) | {QUEUE_INDEX} <= set(request_indexes(engine))
    finally:
        engine.dispose()


def request_columns(engine: Engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns("requests")}


def test_downgrade_to_base_and_upgrade_again(database_url):
    engine = create_engine_for(database_url)
    try:
        upgrade_to_head(engine)
        downgrade_to(engine, "0003")  # the queue claim's index is back, as 0001 made it
        assert request_indexes(engine)[QUEUE_INDEX] == ["model_id", "status", "priority",
                                                        "created_at"]
        assert descending_columns(engine, QUEUE_INDEX) == {"priority"}
        downgrade_to(engine, "0001")
        assert current_revision(engine) == "0001"
        assert not REVISION_0002_INDEXES & set(request_indexes(engine))
        downgrade_to(engine, "base")
        assert current_revision(engine) is None
        assert not {"models", "requests", "settings"} & set(inspect(engine).get_table_names())
        assert upgrade_to_head(engine) == "0004"
    finally:
        engine.dispose()


def test_timestamps_are_utc_and_naive_ones_are_refused(store):
    store.ensure_model("m", "/m", "api")
    local = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc).astimezone()
    store.add_request(RequestRecord(id="aware", model="m", created_at=local))
    created = store.get_request("aware")["created_at"]
    assert created == local and created.tzinfo == timezone.utc
    with pytest.raises(StatementError, match="naive datetime"):
        store.add_request(RequestRecord(id="naive", model="m", created_at=datetime(2025, 1, 1)))
    assert store.get_request("naive") is None


# -- database info ------------------------------------------------------------------------------

def test_database_info(store):
    store.ensure_model("m", "/m", "api")
    for _ in range(3):
        store.add_request(RequestRecord(model="m"))
    store.settings.set("default_max_tokens", 64)
    info = store.get_database_info()
    assert info["dialect"] == store.engine.dialect.name
    assert info["schema_revision"] == info["schema_head"] == "0004"
    assert info["row_counts"] == {"models": 1, "requests": 3, "settings": 1}
    assert info["connection_pool_class"] == "QueuePool"
    assert info["connection_pool_size"] == 10
    assert info["connection_pool_checked_out"] == 0
    assert info["connection_pool_overflow"] == 0
    assert info["size_bytes"] > 0
    assert info["server_version"]
    password = store.engine.url.password
    if info["dialect"] == "sqlite":
        assert info["pragmas"] == {
            "journal_mode": "wal", "synchronous": "NORMAL", "cache_size": -32768,
            "mmap_size": 268435456, "temp_store": "MEMORY", "foreign_keys": True,
            "busy_timeout": 5000}
        assert info["file"] and info["url"].endswith(info["file"])
        assert info["server_settings"] is None
    else:
        assert password and password not in info["url"] and ":***@" in info["url"]
        assert info["pragmas"] is None
        assert info["server_settings"]["server_version"]


def test_the_store_imports_no_server_or_mlx_modules():
    code = ("import sys, mlx_jupyter.store.store, mlx_jupyter.store.migrations; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tornado', 'jupyter_server', "
            "'mlx', 'mlx_lm')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("url", ["mysql://someone:secret@localhost/db", "mssql+pyodbc://x/y"])
def test_backends_other_than_sqlite_and_postgresql_are_refused_by_name(url):
    backend = url.split(":")[0].split("+")[0]
    with pytest.raises(ValueError, match=f"supports SQLite and PostgreSQL .* not '{backend}'"):
        create_engine_for(url)


def test_a_sqlite_file_whose_folder_cannot_be_made_is_refused_naming_the_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(OSError, match=f"cannot create the folder {blocker} for the SQLite"):
        Store.open(f"sqlite:///{blocker / 'store.db'}")
