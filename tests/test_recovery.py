"""A server killed with kill -9 and started again: background jobs finish, nothing is lost."""

import os
import signal
import threading
import time

import httpx
from sqlalchemy import create_engine, update

from live_server import start_server, stop_server
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
