import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["pytest_jupyter.jupyter_server"]

# Tests that use these start a real Jupyter server with the extension; so does any test in a
# module that imports live_server.start_server.
SERVER_FIXTURES = {"live_server", "kernel_env", "jp_serverapp", "jp_fetch", "jp_ws_fetch"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "server: starts a real Jupyter server with the extension (given by "
                   "conftest.py); `make test` runs these again with MLX_TEST_DATABASE=postgresql")


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                hasattr(getattr(item, "module", None), "start_server"):
            item.add_marker(pytest.mark.server)


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"mlx_jupyter": True}}}


@pytest.fixture
def jp_argv():
    """The in-process server's arguments: on PostgreSQL (MLX_TEST_DATABASE=postgresql), a new
    database for each test, as the SQLite file in each test's own data folder is."""
    from live_server import database_kind, postgres_database_url

    if database_kind() == "postgresql":
        return [f"--MlxApp.database_url={postgres_database_url('app')}"]
    return []


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """One real Jupyter server process with the extension, shared by the end-to-end tests."""
    from live_server import start_server, stop_server

    root = tmp_path_factory.mktemp("live-server")
    server = start_server(root, root / "server.log")
    yield server
    stop_server(server)


@pytest.fixture
def kernel_env(live_server, monkeypatch):
    """Kernels started by the test find the live server the way they would in real use: as the
    only running server in the Jupyter runtime directory."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(live_server.runtime_dir))
    monkeypatch.delenv("MLX_JUPYTER_URL", raising=False)
    monkeypatch.delenv("MLX_JUPYTER_TOKEN", raising=False)
    return live_server
