"""Start-up: loading the extension imports no store, Hub or HTTP client; the database opens in
the background, requests that arrive before it is ready wait for it, and a database that
cannot be opened leaves a server that starts and says, in a 503, what to fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from live_server import start_server, stop_server
from model_factory import make_model

LAZY = ("sqlalchemy", "alembic", "huggingface_hub", "httpx")
STORE_BACKED = ("mlx/api/requests", "mlx/api/settings", "mlx/api/settings/default_max_tokens",
                "mlx/api/database", "mlx/api/models", "mlx/api/models/demo", "mlx/v1/models")




def test_importing_the_app_loads_no_store_hub_or_http_client():
    code = ("import sys, mlx_jupyter.app; "
            f"print([name for name in {LAZY!r} if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.replace("'", '"')) == []


def test_importing_the_store_package_alone_loads_no_sqlalchemy():
    # What the queue and the model manager take from it at start-up: statuses and records.
    code = ("import sys; from mlx_jupyter.store import RequestRecord, RequestStatus, "
            "ModelStatus, utcnow; print('sqlalchemy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


def test_requests_right_after_the_start_wait_for_the_store_and_are_answered(tmp_path):
    """start_server returns as soon as mlx/api/status answers; the routes that need the
    database, asked at once, answer as they do later: a model registered before the restart
    is listed and readable, the history and the settings are there."""
    root = tmp_path / "server"
    folder = make_model(root / "notebooks" / "mine").path  # root_dir: an allowed root
    live = start_server(root, tmp_path / "first.log")
    try:
        answer = live.request("POST", "mlx/api/models", json={"name": "mine", "path": str(folder)})
        assert answer.status_code == 201, answer.text
        assert live.request("PUT", "mlx/api/settings/default_max_tokens",
                    json={"value": 77}).status_code == 200
    finally:
        stop_server(live)

    live = start_server(root, tmp_path / "second.log")
    try:
        # All at once, in the order a client that just connected might ask.
        mine = live.request("GET", "mlx/api/models/mine")
        listed = live.request("GET", "mlx/api/models")
        settings = live.request("GET", "mlx/api/settings")
        requests = live.request("GET", "mlx/api/requests")
        assert mine.status_code == 200, mine.text
        assert mine.json()["source"] == "registered"
        assert "mine" in {model["name"] for model in listed.json()["models"]}
        assert settings.status_code == 200, settings.text
        assert settings.json()["settings"]["default_max_tokens"]["value"] == 77
        assert requests.status_code == 200, requests.text
        assert requests.json()["total"] == 0
        # Those waited for the store: the status says it is open now.
        assert live.request("GET", "mlx/api/status").json()["database"] == \
            {"state": "ready", "error": None}
    finally:
        stop_server(live)


@pytest.fixture(params=["under-a-file", "unsupported-backend"])
def broken_database(request, tmp_path):
    """A database URL the server cannot open, and words its error must contain."""
    if request.param == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        return f"sqlite:///{blocker / 'mlx.db'}", ("cannot create the folder", str(blocker))
    return "mysql://someone:hunter2@localhost/mlx", ("mysql", "SQLite and PostgreSQL")


def test_a_server_whose_database_cannot_be_opened_starts_and_answers_503(broken_database,
                                                                         tmp_path):
    url, words = broken_database
    log = tmp_path / "server.log"
    live = start_server(tmp_path / "server", log, args=(f"--MlxApp.database_url={url}",))
    try:
        status = live.request("GET", "mlx/api/status")
        assert status.status_code == 200 and status.json()["version"]
        answers = {path: live.request("GET", path) for path in STORE_BACKED}
        answers["generate"] = live.request("POST", "mlx/api/generate",
                                   json={"model": "demo", "prompt": "Hi"})
        for path, answer in answers.items():
            assert answer.status_code == 503, (path, answer.text)
            assert answer.headers["Content-Type"].startswith("application/json"), path
            message = answer.json().get("message") or answer.json()["error"]["message"]
            assert "could not be opened" in message and "c.MlxApp.database_url" in message
            assert all(word in message for word in words), (path, message)
            assert "hunter2" not in message
        status = live.request("GET", "mlx/api/status")  # still up, and says why
        assert status.status_code == 200
        database = status.json()["database"]
        assert database["state"] == "unavailable", database
        metrics = live.request("GET", "mlx/metrics").text
        assert 'mlx_jupyter_faults_total{kind="database_unavailable"} 1.0' in metrics
        assert "could not be opened" in database["error"] and "hunter2" not in database["error"]
    finally:
        stop_server(live)
    logged = log.read_text()
    assert "could not be opened" in logged and "hunter2" not in logged
