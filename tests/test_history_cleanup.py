"""The history cleanup pass on a live server: the settings history_retention_days and
max_history_rows take effect by themselves, every c.MlxApp.cleanup_interval_seconds."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, update

from live_server import start_server, stop_server
from mlx_jupyter.store.schema import Request, utcnow


@pytest.fixture
def server(tmp_path):
    live = start_server(tmp_path, tmp_path / "server.log",
                        args=("--MlxApp.cleanup_interval_seconds=0.2",))
    yield live
    stop_server(live)


def call(live, method, path, **kwargs):
    answer = live.request(method, path, **kwargs)
    answer.raise_for_status()
    return answer.json()


def history_ids(live):
    return [row["id"] for row in call(live, "GET", "mlx/api/requests")["requests"]]


def wait_for(check, what, seconds=30):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.1)


def test_old_rows_go_and_recent_ones_stay(server, tmp_path):
    ids = [call(server, "POST", "mlx/api/generate",
                json={"model": "demo", "prompt": f"Line {i}", "max_tokens": 2})["request_id"]
           for i in range(5)]
    assert sorted(history_ids(server)) == sorted(ids)  # the defaults keep everything
    # Two rows made 40 days old, straight in the server's database.
    engine = create_engine(server.database_url)
    with engine.begin() as connection:
        connection.execute(update(Request).where(Request.id.in_(ids[:2]))
                           .values(created_at=utcnow() - timedelta(days=40)))
    engine.dispose()
    time.sleep(1)
    assert len(history_ids(server)) == 5  # no retention set: the pass keeps them

    call(server, "PUT", "mlx/api/settings/history_retention_days", json={"value": 30})
    wait_for(lambda: len(history_ids(server)) == 3, "pruning the rows older than 30 days")
    assert sorted(history_ids(server)) == sorted(ids[2:])

    call(server, "PUT", "mlx/api/settings/max_history_rows", json={"value": 1})
    wait_for(lambda: len(history_ids(server)) == 1, "keeping only the newest row")
    assert history_ids(server) == [ids[-1]]
    assert "pruned 2 finished request(s) from the history" in (
        tmp_path / "server.log").read_text()
