"""A server killed with kill -9 and started again: background jobs finish, nothing is lost."""

import contextlib
import os
import signal
import sqlite3
import threading
import time

import httpx
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url

from live_server import start_server, stop_server
from mlx_jupyter.limits import RECORD_WAIT_SECONDS
from mlx_jupyter.store.schema import Request

BODY = {"model": "demo", "prompt": "The sea", "max_tokens": 8, "temperature": 0}


def post(server, body, timeout=60.0):
    return server.request("POST", "mlx/api/generate", json=body, timeout=timeout)


def wait_until(check, seconds=90.0):
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.1)
    return result


def test_background_jobs_survive_kill_9_and_interactive_requests_are_interrupted(tmp_path):
    server = start_server(tmp_path, tmp_path / "first.log")
    try:
        assert post(server, BODY).status_code == 200  # loads the model
        [worker] = server.get("mlx/api/status").json()["models"]["loaded"]
        os.kill(worker["pid"], signal.SIGSTOP)  # nothing can finish from here on

        accepted = [post(server, {**BODY, "background": True, "prompt": prompt})
                    for prompt in ("The sea", "A story", "Unreadable")]
        assert [answer.status_code for answer in accepted] == [202, 202, 202]
        *jobs, unreadable = [answer.json()["request_id"] for answer in accepted]
        interactive = threading.Thread(target=lambda: _ignore_errors(post, server, BODY),
                                       daemon=True)
        interactive.start()
        wait_until(lambda: server.get("mlx/api/requests",
                                      {"status": "running"}).json()["total"] == 4)
    finally:
        server.process.kill()  # kill -9: no shutdown hook runs
        server.process.wait()
        os.kill(worker["pid"], signal.SIGKILL)
    # One job's stored parameters made unreadable (as another version might leave them):
    # it fails alone at the restart; the others still run.
    engine = create_engine(server.database_url)
    with engine.begin() as connection:
        connection.execute(update(Request).where(Request.id == unreadable)
                           .values(parameters={"background": True}))
    engine.dispose()

    restarted = start_server(tmp_path, tmp_path / "second.log")
    try:
        for job in jobs:
            done = wait_until(lambda job=job: _finished(restarted, job))
            assert done["status"] == "completed" and done["output_text"].strip()
        failed = restarted.get(f"mlx/api/requests/{unreadable}").json()
        assert failed["status"] == "failed"
        assert "stored parameters cannot be run again" in failed["error"]
        history = restarted.get("mlx/api/requests").json()["requests"]
        statuses = sorted(row["status"] for row in history)
        assert statuses == ["completed", "completed", "completed", "failed", "interrupted"]
    finally:
        stop_server(restarted)


def _finished(server, request_id):
    row = server.get(f"mlx/api/requests/{request_id}").json()
    return row if row["status"] not in ("queued", "running") else None


def _ignore_errors(function, *args):
    try:
        function(*args)
    except httpx.HTTPError:
        pass  # the server was killed under it


def test_a_streams_headers_go_out_once_its_row_is_durable(tmp_path):
    """The request id in a stream's headers names a row a crash cannot lose: with the
    requests table locked for a while (less than the answer waits for its row), the headers
    wait for the lock and the row's write."""
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        assert post(server, BODY).status_code == 200  # loads the model
        headers_seen = threading.Event()
        with _requests_table_locked(server.database_url, until=headers_seen,
                                    seconds=RECORD_WAIT_SECONDS / 2):
            with httpx.stream("POST", server.url + "mlx/api/generate", timeout=60,
                              json={**BODY, "stream": True},
                              headers={"Authorization": f"token {server.token}"}) as answer:
                request_id = answer.headers["X-Request-Id"]
                stored = _stored_status(server.database_url, request_id)  # lock held or not
                headers_seen.set()
                answer.read()
        assert stored is not None, "the headers went out before the request's row was stored"
    finally:
        stop_server(server)


@contextlib.contextmanager
def _requests_table_locked(database_url: str, *, until: threading.Event, seconds: float):
    """Keeps writers out of the requests table (readers still read) from its start until
    `until` is set or `seconds` have passed."""
    locked, failure = threading.Event(), []

    def hold() -> None:
        try:
            with _write_lock(database_url):
                locked.set()
                until.wait(seconds)
        except Exception as exc:
            failure.append(exc)
            locked.set()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    locked.wait()
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        until.set()
        holder.join()


@contextlib.contextmanager
def _write_lock(database_url: str):
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":  # the database's write lock, as a writer takes it
        connection = sqlite3.connect(url.database, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:  # inserts wait; plain reads do not
            connection.execute(text("LOCK TABLE requests IN EXCLUSIVE MODE"))
            yield
    finally:
        engine.dispose()


def _stored_status(database_url: str, request_id: str) -> str | None:
    """The request's status as the database holds it now, read by a connection of our own."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(select(Request.status).where(Request.id == request_id))
    finally:
        engine.dispose()
