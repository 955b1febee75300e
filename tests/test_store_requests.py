"""Models and requests in the store: registration, history, start-up recovery, pruning and
many threads at once, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event

from mlx_jupyter.store import (
    InvalidField,
    ModelStatus,
    RequestRecord,
    RequestStatus,
    Store,
    UnknownModel,
)

pytest_plugins = ["store_fixtures"]  # database_url, store, postgres_server

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def statements_of(store: Store) -> list[str]:
    seen: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _record(_conn, _cursor, statement, *_args):
        seen.append(statement)
    return seen


def add_all(store: Store, records: list[RequestRecord]) -> None:
    for record in records:
        store.add_request(record)


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target):
        def run():
            try:
                target()
            except BaseException as error:  # returned to the test
                errors.append(error)
        return run

    threads = [threading.Thread(target=guarded(target)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors


# -- models -------------------------------------------------------------------------------------

def test_ensure_model_upserts_and_caches_the_id(store):
    first = store.ensure_model("demo", "/models/demo", "bundled")
    statements = statements_of(store)
    assert store.ensure_model("demo", "/models/demo", "bundled") == first
    assert statements == []  # same values: served from memory
    assert store.ensure_model("demo", "/elsewhere/demo", "configured", "text",
                              size_bytes=10, memory_estimate_bytes=20,
                              metadata={"arch": "llama"}) == first
    assert [s for s in statements if "models" in s and not s.startswith("BEGIN")] == \
        [statements[-1]]  # one upsert statement
    other = store.ensure_model("whisper", "/models/whisper", "huggingface", "audio")
    assert other != first
    rows = {row["name"]: row for row in store.list_models()}
    assert list(rows) == ["demo", "whisper"]
    demo = rows["demo"]
    assert (demo["path"], demo["source"], demo["size_bytes"], demo["memory_estimate_bytes"],
            demo["metadata"], demo["status"], demo["pinned"], demo["use_count"]) == \
        ("/elsewhere/demo", "configured", 10, 20, {"arch": "llama"}, "unloaded", False, 0)
    assert rows["whisper"]["kind"] == "audio"
    # Sizes left out on a later call keep what was stored.
    store.ensure_model("demo", "/elsewhere/demo", "configured")
    assert store.get_model("demo")["size_bytes"] == 10


def test_ensure_model_from_a_second_store_finds_the_same_row(database_url):
    with Store.open(database_url) as first, Store(database_url) as second:
        assert first.ensure_model("m", "/a", "api") == second.ensure_model("m", "/b", "api")
        assert second.model_id("m") == first.model_id("m")
        assert first.get_model("m")["path"] == "/b"


def test_model_use_and_status(store):
    store.ensure_model("demo", "/d", "bundled")
    assert store.record_model_use("demo") and store.record_model_use("demo")
    assert store.set_model_status("demo", ModelStatus.LOADED)
    demo = store.get_model("demo")
    assert demo["use_count"] == 2 and demo["last_used_at"].tzinfo == timezone.utc
    assert demo["status"] == "loaded" and demo["last_error"] is None
    assert store.set_model_status("demo", "failed", error="out of memory")
    assert store.get_model("demo")["last_error"] == "out of memory"
    assert store.update_model("demo", pinned=True)
    assert store.get_model("demo")["pinned"] is True
    assert not store.record_model_use("nope") and not store.set_model_status("nope", "loaded")
    with pytest.raises(InvalidField, match="unknown model status 'sleeping'"):
        store.set_model_status("demo", "sleeping")
    with pytest.raises(InvalidField, match="name"):
        store.update_model("demo", name="renamed")


# -- requests -----------------------------------------------------------------------------------

def test_a_nul_character_is_stored_as_a_replacement_character_on_both_databases(store):
    # PostgreSQL cannot store a NUL in text or JSON; a prompt holding one is still recorded.
    store.ensure_model("demo", "/d", "bundled")
    record = RequestRecord(model="demo", prompt="a\x00b", notebook="n\x00.ipynb",
                           messages=[{"role": "user", "content": "c\x00"}],
                           parameters={"stop": ["\x00"]})
    store.add_request(record)
    assert store.update_request(record.id, output_text="d\x00", error="e\x00")
    got = store.get_request(record.id)
    assert (got["prompt"], got["notebook"], got["messages"], got["parameters"],
            got["output_text"], got["error"]) == (
        "a\ufffdb", "n\ufffd.ipynb", [{"role": "user", "content": "c\ufffd"}],
        {"stop": ["\ufffd"]}, "d\ufffd", "e\ufffd")


def test_add_get_and_update_a_request(store):
    store.ensure_model("demo", "/d", "bundled")
    record = RequestRecord(model="demo", notebook="work/analysis.ipynb", priority=5,
                           messages=[{"role": "user", "content": "Hi"}],
                           parameters={"max_tokens": 32, "temperature": 0.2, "stop": ["\n"]},
                           created_at=at(0))
    assert store.add_request(record) == record.id and len(record.id) == 32
    got = store.get_request(record.id)
    assert got["model"] == "demo" and got["status"] == "queued" and got["priority"] == 5
    assert got["timings"] is None  # not measured until it ends
    assert got["messages"] == [{"role": "user", "content": "Hi"}] and got["prompt"] is None
    assert got["parameters"] == {"max_tokens": 32, "temperature": 0.2, "stop": ["\n"]}
    assert got["created_at"] == at(0) and got["started_at"] is None

    assert store.update_request(record.id, status=RequestStatus.RUNNING, started_at=at(1))
    figures = {"queue_ms": 0.125, "ttft_ms": 12.5, "total_ms": 40.1,
               "tokens_per_second": 131.07, "prompt_tokens_per_second": 812.5}
    assert store.update_request(record.id, status="completed", finished_at=at(3),
                                output_text="Hello!", finish_reason="stop", prompt_tokens=7,
                                completion_tokens=3, **figures)
    got = store.get_request(record.id)
    assert (got["status"], got["started_at"], got["finished_at"], got["output_text"],
            got["finish_reason"], got["prompt_tokens"], got["completion_tokens"],
            got["timings"]) == ("completed", at(1), at(3), "Hello!", "stop", 7, 3, figures)
    [row], _ = store.list_requests(model="demo")
    assert row["timings"] == figures and "ttft_ms" not in row  # one object, as stored

    assert store.get_request("0" * 32) is None
    assert store.update_request("0" * 32, status="failed") is False
    with pytest.raises(InvalidField, match="prompt"):
        store.update_request(record.id, prompt="rewritten")
    with pytest.raises(InvalidField, match="unknown request status 'done'"):
        store.update_request(record.id, status="done")
    with pytest.raises(UnknownModel, match="'ghost'"):
        store.add_request(RequestRecord(model="ghost"))


def test_history_filters_order_and_pages(store):
    store.ensure_model("a", "/a", "api")
    store.ensure_model("b", "/b", "api")
    records = []
    for i in range(30):
        records.append(RequestRecord(
            model="ab"[i % 2], notebook=f"nb{i % 3}.ipynb", prompt="x" * 500 + str(i),
            status="completed" if i % 5 else "failed", output_text="y" * 300,
            created_at=at(i)))
    add_all(store, records)
    newest_first = [r.id for r in reversed(records)]

    rows, total = store.list_requests(limit=10)
    assert total == 30 and [r["id"] for r in rows] == newest_first[:10]
    pages = [store.list_requests(limit=7, offset=offset)[0] for offset in range(0, 35, 7)]
    assert [r["id"] for page in pages for r in page] == newest_first

    row = rows[0]
    assert "prompt" not in row and "output_text" not in row and "messages" not in row
    assert row["prompt_preview"] == "x" * 200 and row["output_preview"] == "y" * 200
    assert store.list_requests(limit=1, preview_chars=5)[0][0]["prompt_preview"] == "xxxxx"
    assert store.get_request(row["id"])["prompt"] == "x" * 500 + "29"

    def ids(**filters):
        rows, total = store.list_requests(limit=100, **filters)
        assert total == len(rows)
        return [r["id"] for r in rows]

    def expected(keep):
        return [r.id for r in reversed(records) if keep(records.index(r))]

    assert ids(model="a") == expected(lambda i: i % 2 == 0)
    assert ids(notebook="nb1.ipynb") == expected(lambda i: i % 3 == 1)
    assert ids(status="failed") == expected(lambda i: i % 5 == 0)
    assert ids(status=["failed", "queued"]) == expected(lambda i: i % 5 == 0)
    assert ids(model="b", notebook="nb0.ipynb", status="completed") == \
        expected(lambda i: i % 2 == 1 and i % 3 == 0 and i % 5 != 0)
    assert store.list_requests(model="never-registered") == ([], 0)
    rows, total = store.list_requests(model="a", limit=3, offset=2)
    assert total == 15 and [r["id"] for r in rows] == expected(lambda i: i % 2 == 0)[2:5]
    with pytest.raises(InvalidField):
        store.list_requests(limit=0)
    with pytest.raises(InvalidField):
        store.list_requests(status="sleeping")


# -- start-up recovery --------------------------------------------------------------------------

def test_recovery_requeues_background_jobs_and_interrupts_the_rest(database_url):
    """What a server finds after a stop or a crash: its background jobs go back to the queue,
    oldest first, to be run again; every other unfinished request is interrupted (its client
    is gone), keeping an error it already had; finished ones stay as they were."""
    job = {"background": True, "max_tokens": 8}
    with Store.open(database_url) as before_restart:
        before_restart.ensure_model("a", "/a", "api")
        add_all(before_restart, [
            RequestRecord(id="queued", model="a", created_at=at(0)),
            RequestRecord(id="running", model="a", status="running", started_at=at(0),
                          created_at=at(1)),
            RequestRecord(id="running-error", model="a", status="running", error="boom",
                          created_at=at(2)),
            RequestRecord(id="job-running", model="a", status="running", started_at=at(4),
                          parameters=job, created_at=at(4)),
            RequestRecord(id="job-queued", model="a", parameters=job, created_at=at(3)),
            RequestRecord(id="job-done", model="a", status="completed", parameters=job,
                          finished_at=at(5), created_at=at(5)),
            RequestRecord(id="done", model="a", status="completed", finished_at=at(1)),
            RequestRecord(id="cancelled", model="a", status="cancelled")])
    with Store.open(database_url) as after_restart:
        jobs, interrupted = after_restart.recover_unfinished()
        assert interrupted == 3
        assert [job["id"] for job in jobs] == ["job-queued", "job-running"]
        assert all(job["model"] == "a" and job["status"] == "queued" and
                   job["started_at"] is None and job["parameters"]["background"]
                   for job in jobs)
        for rid in ("job-queued", "job-running"):
            row = after_restart.get_request(rid)
            assert row["status"] == "queued" and row["started_at"] is None
        for rid in ("queued", "running", "running-error"):
            row = after_restart.get_request(rid)
            assert row["status"] == "interrupted" and row["finished_at"] is not None
            assert row["error"] == ("boom" if rid == "running-error"
                                    else "the server stopped before this request finished")
        for rid, status in (("done", "completed"), ("job-done", "completed"),
                            ("cancelled", "cancelled")):
            assert after_restart.get_request(rid)["status"] == status
        assert after_restart.get_request("done")["finished_at"] == at(1)
        # A second start finds the same jobs and nothing more to interrupt.
        again, interrupted = after_restart.recover_unfinished()
        assert [job["id"] for job in again] == ["job-queued", "job-running"]
        assert interrupted == 0


def test_prune_history(store):
    store.ensure_model("a", "/a", "api")
    now = datetime.now(timezone.utc)
    add_all(store, [RequestRecord(id=f"old{i}", model="a", status="completed",
                                  created_at=now - timedelta(days=40, seconds=i))
                    for i in range(3)]
            + [RequestRecord(id=f"new{i}", model="a", status="completed",
                             created_at=now - timedelta(seconds=i)) for i in range(5)]
            + [RequestRecord(id="old-queued", model="a", created_at=now - timedelta(days=90))])
    assert store.prune_history() == 0  # the defaults keep everything
    assert store.prune_history(retention_days=30) == 3
    assert store.prune_history(max_rows=2) == 3
    rows, _ = store.list_requests()
    assert [r["id"] for r in rows] == ["new0", "new1", "old-queued"]  # unfinished ones stay
    store.settings.set("max_history_rows", 1)
    assert store.prune_history() == 1
    assert store.get_request("new0") and not store.get_request("new1")


# -- many threads -------------------------------------------------------------------------------

WRITERS, WRITES = 8, 200


def test_many_writers_and_readers_at_once(store):
    """8 writer threads x 200 writes (each its own transaction: inserts, and updates of their
    own rows) while readers page through the history, fetch rows and read settings. No
    "database is locked", no lost row."""
    store.ensure_model("a", "/a", "api")
    store.ensure_model("b", "/b", "api")
    done = threading.Event()
    written: list[list[str]] = [[] for _ in range(WRITERS)]

    def writer(number: int):
        def run():
            mine = written[number]
            for i in range(WRITES):
                if i % 4 == 3:  # every 4th write updates one of this writer's rows
                    assert store.update_request(mine[-1], status="completed",
                                                output_text=f"done {number}-{i}")
                else:
                    record = RequestRecord(model="ab"[number % 2], notebook=f"nb{number}",
                                           prompt=f"{number}-{i}", priority=i % 3)
                    mine.append(store.add_request(record))
        return run

    def reader():
        while not done.is_set():
            rows, _ = store.list_requests(limit=20)
            for row in rows[:3]:
                assert store.get_request(row["id"]) is not None
            store.list_requests(notebook="nb1", status="completed", limit=5)
            store.settings.get("default_max_tokens")

    writers = [writer(number) for number in range(WRITERS)]

    def writers_then_stop():
        try:
            assert run_threads(writers) == []
        finally:
            done.set()

    errors = run_threads([writers_then_stop, reader, reader])
    assert errors == [], errors[:3]
    expected = [rid for mine in written for rid in mine]
    assert len(expected) == WRITERS * WRITES * 3 // 4
    assert store.list_requests(limit=1)[1] == len(expected)
    for number, mine in enumerate(written):
        rows, _ = store.list_requests(notebook=f"nb{number}", limit=1000)
        assert sorted(r["id"] for r in rows) == sorted(mine)
        assert sum(r["status"] == "completed" for r in rows) == WRITES // 4
