import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"mlx_jupyter": True}}}


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
