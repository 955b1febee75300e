"""A server killed with kill -9 and started again: background jobs finish, nothing is lost."""

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url

from live_server import start_server, stop_server
from model_factory import backdate, make_model
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


# -- 50 requests in flight, two models, a third loading -----------------------------------------
# Each model's batch holds 4. Each worker is stopped (SIGSTOP) once the requests it should be
# running are under way, so that the admitted ones stay running and the rest wait, whatever the
# machine's speed; killed, the server leaves them mid-batch (they go on once the test lets
# them, and find their stdin closed). Restarted, the server runs every background job again:
# short ones, so that the test stays short.
BATCH = 4
DEMO_STREAMS_RUNNING, DEMO_JOBS, DEMO_STREAMS_WAITING = 2, 12, 6  # 2 jobs run, 10 wait
TINY_STREAMS_RUNNING, TINY_JOBS, TINY_STREAMS_WAITING = 3, 20, 7  # 1 job runs, 19 wait
MIX_SIZE = (DEMO_STREAMS_RUNNING + DEMO_JOBS + DEMO_STREAMS_WAITING + TINY_STREAMS_RUNNING
            + TINY_JOBS + TINY_STREAMS_WAITING)
DEMO_JOB = {"model": "demo", "max_tokens": 64, "temperature": 0, "background": True}
TINY_JOB = {"model": "tiny", "max_tokens": 16, "temperature": 0, "background": True}
LONG_STREAM = {"max_tokens": 3000, "temperature": 0, "stream": True}  # demo: clipped to 256


def test_kill_9_with_50_requests_in_flight_loses_no_acknowledged_request_nor_leaves_a_worker(
        tmp_path):
    assert MIX_SIZE == 50
    models = tmp_path / "models"
    make_model(models / "tiny")
    _make_model_that_never_loads(models / "slow")
    # The test stops workers on purpose: no heartbeat may take them for hung meanwhile.
    args = (f"--MlxApp.model_dirs={models}", f"--MlxApp.max_batch_size={BATCH}",
            "--MlxApp.worker_heartbeat_seconds=0", "--MlxApp.idle_unload_seconds=0")
    server = start_server(tmp_path, tmp_path / "first.log", args=args)
    streams = _Streams(server)
    workers: list[psutil.Process] = []
    pids: dict[str, int] = {}
    try:
        with ThreadPoolExecutor(2) as pool:  # both workers started, one request each
            warmed = pool.map(lambda model: post(server, {**BODY, "model": model}),
                              ("demo", "tiny"))
            assert [answer.status_code for answer in warmed] == [200, 200]
        pids = {row["name"]: row["pid"] for row in
                server.get("mlx/api/status").json()["models"]["loaded"]}

        os.kill(pids["demo"], signal.SIGSTOP)  # its 4 admitted requests never end
        streams.open("demo", DEMO_STREAMS_RUNNING, priority=10, until="headers")
        jobs = _submit_jobs(server, DEMO_JOB, DEMO_JOBS)
        streams.open("demo", DEMO_STREAMS_WAITING, priority=10, until=None)

        streams.open("tiny", TINY_STREAMS_RUNNING, priority=10, until="first event")
        os.kill(pids["tiny"], signal.SIGSTOP)  # its streams generating, one slot free
        jobs += _submit_jobs(server, TINY_JOB, TINY_JOBS)
        streams.open("tiny", TINY_STREAMS_WAITING, priority=-10, until=None)

        threading.Thread(target=_ignore_errors, daemon=True, args=(
            server.request, "POST", "mlx/api/models/slow/load")).start()
        wait_until(lambda: _worker_of(server, models / "slow"))
        wait_until(lambda: _total(server) == 2 + MIX_SIZE)  # the waiting streams' rows too
        assert _total(server, "running") == 2 * BATCH
        assert _total(server, "queued") == MIX_SIZE - 2 * BATCH
        workers = psutil.Process(server.process.pid).children(recursive=True)
        assert {pids["demo"], pids["tiny"]} <= {worker.pid for worker in workers}
        assert len(workers) == 3
    finally:
        server.process.kill()  # kill -9: no shutdown hook runs
        server.process.wait()
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)  # mid-batch again: they find their stdin's end
    survivors = _outlived(workers, seconds=60)
    assert not survivors, f"workers outlived their server: {survivors}"
    acknowledged_streams = streams.acknowledged()
    assert len(acknowledged_streams) == DEMO_STREAMS_RUNNING + TINY_STREAMS_RUNNING

    restarted = start_server(tmp_path, tmp_path / "second.log", args=args)
    try:
        rows = wait_until(lambda: _all_final(restarted), seconds=240)
        assert len(rows) == 2 + MIX_SIZE
        assert {job: rows.get(job) for job in jobs} == dict.fromkeys(jobs, "completed")
        assert {stream: rows.get(stream) for stream in acknowledged_streams} == \
            dict.fromkeys(acknowledged_streams, "interrupted")
        assert sorted(set(rows.values())) == ["completed", "interrupted"]
    finally:
        stop_server(restarted)
        streams.close()


class _Streams:
    """Interactive streams, each in a thread of its own, held open until the server goes;
    the ids of those whose headers came (acknowledged) are kept."""

    def __init__(self, server):
        self._server = server
        self._ids: list[str] = []
        self._threads: list[threading.Thread] = []

    def open(self, model: str, count: int, *, priority: int, until: str | None) -> None:
        """Opens `count` streams; with `until`, returns once each has its headers (and, for
        "first event", its first line)."""
        reached = [threading.Event() for _ in range(count)]
        for event in reached:
            thread = threading.Thread(target=_ignore_errors, daemon=True, args=(
                self._read, {**LONG_STREAM, "model": model, "priority": priority,
                             "prompt": f"Story {len(self._threads)}"}, until, event))
            thread.start()
            self._threads.append(thread)
        if until is not None:  # the others wait for their turn: nothing comes yet
            for event in reached:
                assert event.wait(90), f"a {model} stream never reached its {until}"

    def _read(self, body: dict, until: str | None, reached: threading.Event) -> None:
        with httpx.stream("POST", self._server.url + "mlx/api/generate", json=body,
                          timeout=httpx.Timeout(30, read=None),
                          headers={"Authorization": f"token {self._server.token}"}) as answer:
            assert answer.status_code == 200
            self._ids.append(answer.headers["X-Request-Id"])
            lines = answer.iter_lines()
            if until == "first event":
                assert "text" in json.loads(next(lines))
            reached.set()
            for _ in lines:  # held open until the server is killed
                pass

    def acknowledged(self) -> list[str]:
        return list(self._ids)

    def close(self) -> None:
        for thread in self._threads:
            thread.join(30)


def _submit_jobs(server, body: dict, count: int) -> list[str]:
    """`count` background jobs, sent 8 at a time; their ids once each was accepted."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda number: post(server, {**body, "prompt": f"Job {number}"}),
                                range(count)))
    assert [answer.status_code for answer in answers] == [202] * count, answers[0].text
    return [answer.json()["request_id"] for answer in answers]


def _make_model_that_never_loads(folder: Path) -> None:
    """A model folder whose worker stays in the middle of loading for good: its tokenizer
    file is a named pipe nobody writes (the server only checks that it is there), so the
    worker's load blocks opening it, as a long load does."""
    make_model(folder)
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    backdate(folder)


def _worker_of(server, model_path: Path) -> psutil.Process | None:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if str(model_path) in child.cmdline():
                return child
    return None


def _outlived(workers: list[psutil.Process], seconds: float) -> list[str]:
    """The command lines of the workers still running after `seconds` (killed then: none may
    outlive the test)."""
    deadline = time.monotonic() + seconds
    while (alive := [worker for worker in workers if _alive(worker)]) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = []
    for worker in alive:
        with contextlib.suppress(psutil.Error):
            survivors.append(" ".join(worker.cmdline()))
            worker.kill()
    return survivors


def _alive(process: psutil.Process) -> bool:
    """Still running: a zombie has exited (whoever reaps orphans here may not have yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _total(server, status: str | None = None) -> int:
    return server.get("mlx/api/requests", {"limit": 1, **({"status": status} if status
                                                          else {})}).json()["total"]


def _all_final(server) -> dict[str, str] | None:
    """Every request's status once none is queued or running any more."""
    rows = server.get("mlx/api/requests", {"limit": 500}).json()["requests"]
    statuses = {row["id"]: row["status"] for row in rows}
    return None if {"queued", "running"} & set(statuses.values()) else statuses


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
