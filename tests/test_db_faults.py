"""A database that stops answering or fills up while the server runs: generations go on, the
writes behind are kept in order and land once it answers again, the routes that need it answer
503 at once saying so, and every fault is logged and counted once per outage.

On real databases: a SQLite file whose folder is taken away and put back (no connection can
open meanwhile, as with a disk unmounted under the server), a SQLite file held to its size by
`PRAGMA max_page_count` (SQLITE_FULL, on every new connection of the store's own engine), and a
PostgreSQL cluster of the test's own, stopped and started again under a live server.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from live_server import free_port, start_server, stop_server
from model_factory import make_model
from postgres import PostgresUnavailable, start_postgres
from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from store_fixtures import nothing_to_prepare, pool  # noqa: F401  (pool: a fixture)
from unavailable import unavailable

from mlx_jupyter.services import (
    BlockingPool,
    DatabaseFull,
    DatabaseNotAnswering,
    StoreService,
    WriteBehind,
)
from mlx_jupyter.store import RequestRecord, RequestStatus, Store
from mlx_jupyter.store.faults import database_fault

DEADLINE_S = 60.0  # generous: the machine may be busy


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def error_of(awaitable: Awaitable[Any]) -> BaseException:
    try:
        await awaitable
    except Exception as exc:
        return exc
    raise AssertionError("it did not fail")


def service_logs(caplog, level: str) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "mlx_jupyter.services" and record.levelname == level]


class VanishingSqlite:
    """A real SQLite database in a folder that can be taken away and put back: while it is away
    no connection can open (SQLITE_CANTOPEN)."""

    def __init__(self, folder: Path):
        self.folder, self.away = folder, folder.with_name(folder.name + "-away")
        self.url = f"sqlite:///{folder / 'store.db'}"

    def take_away(self, store: Store) -> None:
        store.engine.dispose()  # the pooled connections hold the file open
        self.folder.rename(self.away)

    def put_back(self) -> None:
        self.away.rename(self.folder)


def test_writes_kept_through_an_outage_land_in_order_once_the_database_answers(
        tmp_path, pool, caplog):
    caplog.set_level("INFO", logger="mlx_jupyter.services")
    database = VanishingSqlite(tmp_path / "db")
    store = Store.open(database.url, settings_ttl=0)  # every settings read goes to the database
    store.ensure_model("demo", "/models/demo", "bundled", "text")
    faults: list[str] = []
    first = RequestRecord(model="demo", prompt="first", status=RequestStatus.QUEUED)
    second = RequestRecord(model="demo", prompt="second", status=RequestStatus.QUEUED)
    job = RequestRecord(model="demo", prompt="job", status=RequestStatus.QUEUED,
                        parameters={"background": True})

    async def main():
        service = StoreService(pool, faults.append, retry_seconds=0.05, max_retry_seconds=0.2)
        assert await service.open(lambda: store, nothing_to_prepare)
        read_before = await service.setting_values()
        database.take_away(store)
        # A request that needs the settings finds the database gone, and goes on.
        during = await service.setting_values()
        assert service.state().state == "unavailable"
        service.add_request(first)
        service.update_request(first.id, status=RequestStatus.RUNNING)
        service.add_request(second)
        service.update_request(first.id, status=RequestStatus.COMPLETED, output_text="done")
        service.record_model_status("demo", "loaded")
        reads = [await error_of(service.list_requests()) for _ in range(3)]  # each tries again
        durable = await error_of(service.add_request(job, durable=True))
        settings_error = await error_of(service.set_setting("default_max_tokens", 5))
        error = service.state().error
        database.put_back()
        await until(lambda: service.state().state == "ready", "the database answers again")
        rows, total = await service.list_requests(model="demo")
        return (read_before, during, reads, durable, settings_error, error, rows, total,
                await service.get_request(first.id))

    read_before, during, reads, durable, settings_error, error, rows, total, first_row = \
        asyncio.run(main())
    assert during == read_before
    for failed in (*reads, durable, settings_error):
        assert isinstance(failed, DatabaseNotAnswering) and failed.status == 503, failed
        assert str(failed) == error
    assert "is not answering (" in error and "unable to open database file" in error
    assert "writes are kept and land when it answers again" in error
    assert "c.MlxApp.database_url" in error
    assert faults == ["database_unavailable"]  # once, however many tries failed

    assert total == 2  # not the job: its caller was told it failed
    assert {row["id"]: row["status"] for row in rows} == {first.id: "completed",
                                                          second.id: "queued"}
    assert first_row["output_text"] == "done"  # the updates landed after the add, in order
    model = store.get_model("demo")
    assert (model["use_count"], model["status"]) == (2, "loaded")
    assert store.settings.get("default_max_tokens") == read_before["default_max_tokens"]

    [began] = service_logs(caplog, "WARNING")
    assert "is not answering" in began and "answer 503" in began
    [ended] = [line for line in service_logs(caplog, "INFO") if "answers again" in line]
    assert "5 write(s) kept meanwhile landed" in ended
    store.close()


def test_at_shutdown_writes_the_database_still_does_not_take_are_given_up_and_counted(
        tmp_path, pool, caplog):
    database = VanishingSqlite(tmp_path / "db")
    store = Store.open(database.url)
    store.ensure_model("demo", "/models/demo", "bundled", "text")

    async def main():
        service = StoreService(pool, retry_seconds=0.05, max_retry_seconds=0.2)
        assert await service.open(lambda: store, nothing_to_prepare)
        database.take_away(store)
        written = [service.add_request(RequestRecord(model="demo", prompt=str(n)))
                   for n in range(3)]
        await until(lambda: service.state().state == "unavailable", "the outage is seen")
        await service.flush()  # tries once more, then gives up: the server's stop goes on
        return [await error_of(future) for future in written]

    errors = asyncio.run(main())
    assert all(isinstance(error, DatabaseNotAnswering) for error in errors)
    [lost] = service_logs(caplog, "ERROR")
    assert lost.startswith("3 write(s) kept for the database are lost: ")
    assert "is not answering" in lost
    database.put_back()
    assert store.list_requests()[1] == 0
    store.close()


def test_faults_of_the_database_are_told_from_errors_of_the_call():
    """Real errors where they can be had here (a refused connection); PostgreSQL's own error
    classes by their SQLSTATE, as psycopg raises them."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed: pip install 'mlx-jupyter[postgresql]'")
    engine = create_engine(f"postgresql+psycopg://nobody:x@127.0.0.1:{free_port()}/none")
    with pytest.raises(sa_exc.OperationalError) as refused:
        engine.connect()
    assert database_fault(refused.value) == "unavailable"

    def raised(error: Exception, wrapper=sa_exc.OperationalError) -> Exception:
        return wrapper("INSERT INTO requests ...", {}, error)

    assert database_fault(raised(psycopg.errors.DiskFull("could not extend file"))) == "full"
    assert database_fault(raised(psycopg.errors.AdminShutdown("terminating connection"))) \
        == "unavailable"
    assert database_fault(raised(psycopg.errors.TooManyConnections("too many"))) == "unavailable"
    # The call's own: tried again, it would fail again and hold back the writes behind it.
    assert database_fault(raised(psycopg.errors.ProgramLimitExceeded("row too big"))) is None
    assert database_fault(raised(psycopg.errors.UniqueViolation("duplicate key"),
                                 sa_exc.IntegrityError)) is None
    assert database_fault(ValueError("not a database error")) is None


def test_a_write_of_its_own_error_fails_alone_and_holds_nothing(tmp_path, pool):
    """A duplicate id is the write's error, not the database's: it fails, the writes after it
    land, and no outage begins."""
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    store.ensure_model("demo", "/models/demo", "bundled", "text")
    faults: list[str] = []
    record = RequestRecord(model="demo", prompt="once", status=RequestStatus.QUEUED)

    async def main():
        service = StoreService(pool, faults.append)
        assert await service.open(lambda: store, nothing_to_prepare)
        await service.add_request(record)
        again = service.add_request(record)
        service.update_request(record.id, status=RequestStatus.COMPLETED)
        row = await service.get_request(record.id)
        return await error_of(again), row, service.state().state

    duplicate, row, state = asyncio.run(main())
    assert "UNIQUE constraint failed" in str(duplicate)
    assert row["status"] == "completed" and state == "ready" and faults == []
    store.close()


def test_past_the_writes_kept_new_ones_are_dropped_and_logged_the_kept_land_in_order(caplog):
    pool = BlockingPool(2)
    down = threading.Event()
    down.set()
    landed: list[int] = []
    holds, caught_up = [], []

    class Down(Exception):
        pass

    def write(n: int) -> int:
        if down.is_set():
            raise Down("the target does not answer")
        landed.append(n)
        return n

    async def target() -> str:
        return "the target"

    async def main():
        writes = WriteBehind(pool, target, fault=lambda exc: exc if isinstance(exc, Down) else None,
                             on_hold=holds.append, on_caught_up=caught_up.append, max_kept=3,
                             retry_seconds=0.01, max_retry_seconds=0.05)
        futures = [writes.write(lambda _target: write(0))]
        await until(lambda: writes.held is not None, "the first write is held")
        futures += [writes.write(lambda _target, n=n: write(n)) for n in range(1, 5)]
        waiting_caller = writes.write(lambda _target: write(99), keep=False)
        assert await writes.landed() is False  # tried again at once: still down
        down.clear()
        assert await writes.landed() is True
        return futures, waiting_caller

    futures, waiting_caller = asyncio.run(main())
    pool.shutdown()
    assert landed == [0, 1, 2]
    assert [future.result() for future in futures[:3]] == [0, 1, 2]
    for dropped in (*futures[3:], waiting_caller):
        with pytest.raises(Down):
            dropped.result()
    [hold] = caught_up
    assert (hold.landed, hold.dropped) == (3, 2) and holds and holds[0] is hold
    [warning] = [record for record in caplog.records if record.levelname == "WARNING"]
    assert "3 writes wait for the database, the most that are kept" in warning.getMessage()


def test_a_full_sqlite_database_says_so_keeps_the_writes_and_loses_nothing_acknowledged(
        tmp_path, pool, caplog):
    caplog.set_level("INFO", logger="mlx_jupyter.services")
    path = tmp_path / "store.db"
    store = Store.open(f"sqlite:///{path}")
    store.ensure_model("demo", "/models/demo", "bundled", "text")
    size_limit = {"pages": 0}

    @event.listens_for(store.engine, "connect")
    def limit_size(dbapi_connection, _record) -> None:
        if size_limit["pages"]:  # SQLite's limit holds per connection
            dbapi_connection.execute(f"PRAGMA max_page_count={size_limit['pages']}")

    def fill_up() -> None:
        with store.engine.connect() as connection:
            size_limit["pages"] = connection.exec_driver_sql("PRAGMA page_count").scalar()
        store.engine.dispose()  # the next connections are held to the size it has now

    def make_room() -> None:
        size_limit["pages"] = 0
        store.engine.dispose()

    faults: list[str] = []
    early = [RequestRecord(model="demo", prompt=f"early {n}", status=RequestStatus.COMPLETED)
             for n in range(3)]
    job = RequestRecord(model="demo", prompt="job", status=RequestStatus.QUEUED,
                        parameters={"background": True})
    late = [RequestRecord(model="demo", prompt=f"late {n} " + "x" * 8000,
                          status=RequestStatus.QUEUED) for n in range(20)]
    refused_job = RequestRecord(model="demo", prompt="refused", parameters={"background": True})

    async def main():
        service = StoreService(pool, faults.append, retry_seconds=0.05, max_retry_seconds=0.2)
        assert await service.open(lambda: store, nothing_to_prepare)
        for record in early:  # acknowledged: each awaited
            await service.add_request(record, durable=True)
        await service.set_setting("default_max_tokens", 99)
        await service.add_request(job, durable=True)
        fill_up()
        for record in late:  # the first already needs pages it cannot have
            service.add_request(record)
        service.update_request(late[0].id, status=RequestStatus.COMPLETED)  # after its add
        service.update_request(job.id, status=RequestStatus.RUNNING)
        await until(lambda: service.state().state == "unavailable", "the database is full")
        refused = await error_of(service.add_request(refused_job, durable=True))
        read = await error_of(service.list_requests())
        try:  # may fit in a page it has: what it answers must hold afterwards
            answered = (await service.set_setting("default_temperature", 0.25))["value"]
        except DatabaseFull:
            answered = None
        error = service.state().error
        integrity_while_full = integrity(path)
        make_room()
        await until(lambda: service.state().state == "ready", "the database has room again")
        rows, total = await service.list_requests(limit=100)
        return refused, read, answered, error, integrity_while_full, rows, total

    refused, read, answered, error, integrity_while_full, rows, total = asyncio.run(main())
    for failed in (refused, read):
        assert isinstance(failed, DatabaseFull) and failed.status == 503, failed
    assert "is full (" in error and "database or disk is full" in error
    assert "free disk space" in error and "writes are kept and land once it has room" in error
    assert faults == ["database_full"]
    assert integrity_while_full == "ok" and integrity(path) == "ok"

    by_id = {row["id"]: row for row in rows}
    assert total == len(early) + 1 + len(late)  # nothing acknowledged lost, nothing kept lost
    assert {record.id for record in (*early, job, *late)} == set(by_id)
    assert refused_job.id not in by_id
    assert by_id[job.id]["status"] == "running"
    assert by_id[late[0].id]["status"] == "completed"  # its update landed after its add
    assert store.settings.get("default_max_tokens") == 99
    assert store.settings.get("default_temperature") == (0.7 if answered is None else answered)
    [ended] = [line for line in service_logs(caplog, "INFO") if "answers again" in line]
    assert f"{len(late) + 2} write(s) kept meanwhile landed" in ended
    store.close()


def integrity(path: Path) -> str:
    """PRAGMA integrity_check on a connection of its own (no size limit)."""
    with sqlite3.connect(path) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]


# -- PostgreSQL stopped under a live server ----------------------------------------------


def stream_lines(live, body: dict) -> Any:
    """The NDJSON lines of a streamed generation, as they come."""
    import httpx

    with httpx.stream("POST", live.url + "mlx/api/generate", json={**body, "stream": True},
                      headers={"Authorization": f"token {live.token}"}, timeout=300) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line:
                yield json.loads(line)


def faults_counted(live, kind: str) -> float:
    text = live.get("mlx/metrics").text
    found = re.search(rf'^mlx_jupyter_faults_total\{{kind="{kind}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_postgresql_stopped_mid_stream_the_stream_ends_and_the_history_lands_later(tmp_path):
    try:  # a cluster of its own, to stop and start again: not the shared one
        postgres = start_postgres()
    except PostgresUnavailable as why:
        unavailable(f"PostgreSQL cannot run here: {why}")
    live = None
    try:
        make_model(tmp_path / "models" / "long", hidden=256, layers=4)
        url = postgres.create_database("outage")
        live = start_server(tmp_path / "server", tmp_path / "server.log", args=(
            f"--MlxApp.database_url={url}", f"--MlxApp.model_dirs={tmp_path / 'models'}",
            "--MlxApp.settings_cache_ttl=0"))  # every request reads its defaults
        assert live.get("mlx/api/requests").status_code == 200  # open and ready
        long = stream_lines(live, {"model": "long", "prompt": "Once upon a time",
                                   "max_tokens": 3000, "temperature": 0.8, "seed": 1})
        first = next(long)
        assert "text" in first, first
        postgres.pause()

        history = live.get("mlx/api/requests")
        assert history.status_code == 503, history.text
        message = history.json()["message"]
        assert "is not answering" in message and "writes are kept" in message, message
        status = live.get("mlx/api/status").json()["database"]
        assert status["state"] == "unavailable" and "is not answering" in status["error"]

        # A request made while it is down takes the settings read last, and streams too.
        during = list(stream_lines(live, {"model": "long", "prompt": "The sea"}))
        rest = list(long)
        for events in (rest, during):
            assert events[-1].get("done") and events[-1]["finish_reason"] in ("stop", "length"), \
                events[-1]
        ids = {rest[-1]["request_id"], during[-1]["request_id"]}
        assert live.get("mlx/api/requests").status_code == 503  # still down
        background = live.request("POST", "mlx/api/generate", json={
            "model": "long", "prompt": "later", "background": True})
        assert background.status_code == 503 and "is not answering" in background.text

        postgres.resume()
        deadline = time.monotonic() + DEADLINE_S
        while True:  # each read tries the kept writes again at once
            history = live.get("mlx/api/requests")
            rows = {row["id"]: row for row in history.json()["requests"]} \
                if history.status_code == 200 else {}
            if ids <= set(rows) and all(rows[i]["status"] == "completed" for i in ids):
                break
            assert time.monotonic() < deadline, (history.status_code, history.text)
            time.sleep(0.2)
        assert live.get("mlx/api/status").json()["database"] == {"state": "ready",
                                                                  "error": None}
        for request_id in ids:
            row = live.get(f"mlx/api/requests/{request_id}").json()
            assert row["finished_at"] and row["completion_tokens"] > 0, row
        assert faults_counted(live, "database_unavailable") == 1
        log = (tmp_path / "server.log").read_text()
        assert "is not answering" in log and "the database answers again after" in log
    finally:
        if live is not None:
            stop_server(live)
        postgres.stop()
