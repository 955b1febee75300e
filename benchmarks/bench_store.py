"""The store's fast paths against their baselines, side by side in one run.

- settings reads through the TTL cache vs straight from the database (TTL 0);
- the history queries on 100k request rows, with their indexes vs with the index dropped
  (inside a transaction that is rolled back) and with no secondary index at all, plus the query
  plans that show which index each one uses;
- pooled vs unpooled (NullPool) connection checkout + SELECT 1;
- inserts as the server makes them: add_request, one transaction per request.

SQLite (a temporary file) by default; `--postgres URL` adds PostgreSQL (the run works in a
schema of its own, dropped at the end), `--postgres temp` starts a private server for it
(tests/postgres.py: Debian's binaries, as in the tests).

    .venv/bin/python benchmarks/bench_store.py [--rows 100000] [--postgres URL|temp]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, save, table  # noqa: E402
from sqlalchemy import Engine, Select, insert, select, text  # noqa: E402

from mlx_jupyter.store import RequestRecord, Store, create_engine_for, queries  # noqa: E402
from mlx_jupyter.store.database import immediate  # noqa: E402
from mlx_jupyter.store.schema import requests_table  # noqa: E402

MODELS = 10
NOTEBOOKS = 50
QUEUED_SHARE = 0.05
RARE_EVERY = 500
ALL_REQUEST_INDEXES = ("ix_requests_model_created", "ix_requests_notebook_created",
                       "ix_requests_status_created", "ix_requests_created")


# -- timing -------------------------------------------------------------------------------------

def throughput(operation: Callable[[], Any], seconds: float = 0.5, batch: int = 50) -> float:
    """Operations per second, over at least `seconds`."""
    operation()  # warm up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(batch):
            operation()
        calls += batch
    return calls / elapsed


def median_ms(operation: Callable[[], Any], seconds: float = 0.4, at_least: int = 7) -> float:
    operation()  # warm up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < at_least or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        operation()
        times.append(time.perf_counter() - began)
    return median(times) * 1000


# -- sections -----------------------------------------------------------------------------------

def bench_settings(url: str, name: str) -> list[list[Any]]:
    rows = []
    results = {}
    for label, ttl in (("cached (TTL 30 s)", 30.0), ("uncached (TTL 0)", 0.0)):
        with Store.open(url, settings_ttl=ttl) as store:
            store.settings.set("default_max_tokens", 512)
            results[label] = throughput(lambda s=store: s.settings.get("default_max_tokens"))
    uncached = results["uncached (TTL 0)"]
    for label, ops in results.items():
        rows.append([name, f"settings.get, {label}", ops, 1e6 / ops, ops / uncached])
    return rows


def load_history(store: Store, total: int) -> None:
    """`total` requests over MODELS models and NOTEBOOKS notebooks, one a second, 5% queued;
    one request in RARE_EVERY goes to a rarely used model."""
    random.seed(7)
    for number in range(MODELS):
        store.ensure_model(f"model-{number}", f"/models/{number}", "bench")
    store.ensure_model("model-rare", "/models/rare", "bench")
    start = datetime.now(timezone.utc) - timedelta(seconds=total)
    chunk: list[RequestRecord] = []
    for i in range(total):
        queued = random.random() < QUEUED_SHARE
        chunk.append(RequestRecord(
            model="model-rare" if i % RARE_EVERY == 0 else f"model-{i % MODELS}",
            notebook=f"work/notebook-{i % NOTEBOOKS}.ipynb",
            priority=random.randint(0, 3), status="queued" if queued else "completed",
            prompt=f"Question {i}: " + "lorem ipsum " * 20,
            output_text=None if queued else "An answer. " * 30,
            parameters={"max_tokens": 256, "temperature": 0.7},
            created_at=start + timedelta(seconds=i)))
        if len(chunk) == 10_000 or i == total - 1:
            insert_all(store, chunk)
            chunk = []


def insert_all(store: Store, records: list[RequestRecord]) -> None:
    """The set-up's bulk load, one executemany: the server adds requests one at a time (see
    bench_inserts), which for 100k rows would make the set-up the longest part of the run."""
    model_ids = {name: store.model_id(name) for name in {record.model for record in records}}
    with immediate(store.engine).begin() as connection:
        connection.execute(insert(requests_table),
                           [record.to_row(model_ids[record.model]) for record in records])


def explain(connection: Any, statement: Select[Any]) -> str:
    sql = str(statement.compile(connection, compile_kwargs={"literal_binds": True}))
    if connection.dialect.name == "sqlite":
        # The comment makes the text new to pysqlite's statement cache, which would otherwise
        # hand back the plan prepared before the indexes were dropped.
        rows = connection.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {sql} -- {uuid.uuid4().hex}").all()
        return "\n".join(row[-1] for row in rows)
    return "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN (COSTS OFF) {sql}"))


@contextmanager
def indexes_dropped(engine: Engine, names: tuple[str, ...]) -> Iterator[Any]:
    """A connection on which the indexes are gone; the transaction is rolled back at the end,
    which brings them back (DDL is transactional on SQLite and PostgreSQL)."""
    with immediate(engine).connect() as connection:
        transaction = connection.begin()
        try:
            for name in names:
                connection.exec_driver_sql(f"DROP INDEX {name}")
            yield connection
        finally:
            transaction.rollback()


def bench_queries(store: Store, name: str) -> tuple[list[list[Any]], list[str]]:
    model_id = store.model_id("model-3")
    rare_id = store.model_id("model-rare")
    cases = [
        ("history page, 1 model, newest 50",
         queries.history_page(queries.history_filters(model_id=model_id), limit=50),
         ("ix_requests_model_created",)),
        ("history page, rarely used model, newest 50",
         queries.history_page(queries.history_filters(model_id=rare_id), limit=50),
         ("ix_requests_model_created",)),
        ("history page, 1 notebook, newest 50",
         queries.history_page(queries.history_filters(notebook="work/notebook-7.ipynb"),
                              limit=50),
         ("ix_requests_notebook_created",)),
        ("history page, all, newest 50", queries.history_page([], limit=50),
         ("ix_requests_created",)),
        ("start-up recovery count (queued+running)",
         queries.history_count(queries.history_filters(status=["queued", "running"])),
         ("ix_requests_status_created",)),
    ]
    rows: list[list[Any]] = []
    plans: list[str] = []
    for label, statement, own_index in cases:
        with store.engine.connect() as connection:
            indexed = median_ms(lambda c=connection, s=statement: c.execute(s).all())
            plan = explain(connection, statement)
        with indexes_dropped(store.engine, own_index) as connection:
            without = median_ms(lambda c=connection, s=statement: c.execute(s).all())
            plan_without = explain(connection, statement)
        with indexes_dropped(store.engine, ALL_REQUEST_INDEXES) as connection:
            bare = median_ms(lambda c=connection, s=statement: c.execute(s).all(), at_least=5)
        rows.append([name, label, indexed, without, without / indexed, bare, bare / indexed])
        plans.append(f"{name}, {label}\n  indexed:\n    "
                     + plan.replace("\n", "\n    ")
                     + f"\n  without {own_index[0]}:\n    "
                     + plan_without.replace("\n", "\n    "))
    listed = median_ms(lambda: store.list_requests(model="model-3", limit=50))
    rows.append([name, "list_requests(model, limit=50) (page + total)", listed, "", "", "", ""])
    return rows, plans


def bench_pool(url: str, name: str) -> list[list[Any]]:
    results = {}
    for label, pooled in (("pooled (QueuePool)", True), ("unpooled (NullPool)", False)):
        engine = create_engine_for(url, pooled=pooled)
        try:
            def checkout_and_query(engine: Engine = engine) -> None:
                with engine.connect() as connection:
                    connection.execute(select(1)).scalar()
            results[label] = throughput(checkout_and_query, batch=10)
        finally:
            engine.dispose()
    unpooled_ops = results["unpooled (NullPool)"]
    return [[name, f"connect + SELECT 1, {label}", ops, 1e6 / ops, ops / unpooled_ops]
            for label, ops in results.items()]


def bench_inserts(url: str, name: str, count: int = 2000) -> list[list[Any]]:
    """What the server does for each request it records: add_request, its own transaction."""
    with Store.open(url) as store:
        store.ensure_model("bulk", "/bulk", "bench")
        batch = [RequestRecord(model="bulk", prompt=f"prompt {i}", parameters={"i": i})
                 for i in range(count)]
        began = time.perf_counter()
        for record in batch:
            store.add_request(record)
        rate = count / (time.perf_counter() - began)
    return [[name, f"insert {count} requests, add_request (a commit each)", rate, 1e6 / rate]]


# -- databases ----------------------------------------------------------------------------------

@contextmanager
def sqlite_database() -> Iterator[Callable[[], str]]:
    """Hands out URLs of new SQLite files in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        names = iter(range(1_000_000))
        yield lambda: f"sqlite:///{folder}/bench-{next(names)}.db"


@contextmanager
def postgres_database(url: str) -> Iterator[Callable[[], str]]:
    """Hands out URLs of new schemas in the given database; drops them at the end."""
    if url == "temp":
        sys.path.insert(0, str(ROOT / "tests"))
        from postgres import running_postgres

        with running_postgres() as server, \
                postgres_database(server.create_database("bench")) as new_url:
            yield new_url
        return
    admin = create_engine_for(url, pool_size=1)
    schemas: list[str] = []

    def new_url() -> str:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        separator = "&" if "?" in url else "?"
        return f"{url}{separator}options=-csearch_path%3D{schema}"

    try:
        yield new_url
    finally:
        with admin.begin() as connection:
            for schema in schemas:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run_backend(name: str, new_url: Callable[[], str], total: int,
                out: dict[str, list[Any]]) -> None:
    print(f"[{name}] settings ...", flush=True)
    out["settings"] += bench_settings(new_url(), name)
    print(f"[{name}] connection pool ...", flush=True)
    out["pool"] += bench_pool(new_url(), name)
    print(f"[{name}] inserts ...", flush=True)
    out["inserts"] += bench_inserts(new_url(), name)
    print(f"[{name}] loading {total:,} requests ...", flush=True)
    with Store.open(new_url()) as store:
        began = time.perf_counter()
        load_history(store, total)
        loaded = time.perf_counter() - began
        out["load"].append([name, total, loaded, total / loaded])
        if store.engine.dialect.name == "postgresql":
            # What autovacuum does shortly after a bulk load (statistics, visibility map).
            with store.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT") as connection:
                connection.exec_driver_sql("VACUUM ANALYZE requests")
        print(f"[{name}] queries ...", flush=True)
        rows, plans = bench_queries(store, name)
        out["queries"] += rows
        out["plans"] += plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="requests in the history")
    parser.add_argument("--postgres", metavar="URL",
                        help="also run on PostgreSQL: a SQLAlchemy URL, or 'temp'")
    args = parser.parse_args()

    out: dict[str, list[Any]] = {"settings": [], "pool": [], "inserts": [], "load": [],
                                 "queries": [], "plans": []}
    with sqlite_database() as new_url:
        run_backend("SQLite", new_url, args.rows, out)
    if args.postgres:
        with postgres_database(args.postgres) as new_url:
            run_backend("PostgreSQL", new_url, args.rows, out)

    rate_headers = ["database", "operation", "ops/s", "µs/op", "× baseline"]
    body = "\n\n".join([
        "## Settings reads (baseline: uncached)",
        table(rate_headers, out["settings"]),
        "## Connection checkout + SELECT 1 (baseline: NullPool)",
        table(rate_headers, out["pool"]),
        "## Inserts",
        table(["database", "operation", "rows/s", "µs/row"], out["inserts"]),
        f"## Queries on {args.rows:,} requests ({MODELS} models + 1 rarely used one with "
        f"1 in {RARE_EVERY} requests, {NOTEBOOKS} notebooks, {QUEUED_SHARE:.0%} queued); "
        "median ms",
        table(["database", "query", "indexed", "index dropped", "× slower",
               "no secondary index", "× slower"], out["queries"]),
        "Loading the history (one executemany per 10,000 rows): "
        + "; ".join(f"{name}: {total:,} rows in {seconds:.1f} s ({rate:,.0f} rows/s)"
                    for name, total, seconds, rate in out["load"]),
        "## Query plans",
        "```\n" + "\n\n".join(out["plans"]) + "\n```",
    ])
    command = ".venv/bin/python benchmarks/bench_store.py" + "".join(
        f" {arg}" for arg in sys.argv[1:])
    save("store", "Store: caches, indexes, pool and inserts", body, command)


if __name__ == "__main__":
    main()
