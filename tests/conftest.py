import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"mlx_jupyter": True}}}
