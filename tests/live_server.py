"""A real Jupyter server in its own process, with the extension, for end-to-end tests."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class LiveServer:
    url: str
    token: str
    process: subprocess.Popen
    runtime_dir: Path
    root_dir: Path

    def get(self, path: str, params: dict | None = None) -> httpx.Response:
        return httpx.get(self.url + path, params=params,
                         headers={"Authorization": f"token {self.token}"}, timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, log_path: Path, timeout: float = 90.0, *,
                 lab: bool = False, args: tuple[str, ...] = ()) -> LiveServer:
    """A Jupyter server with the extension; with `lab`, JupyterLab (for the browser tests)."""
    runtime_dir, root_dir = root / "runtime", root / "notebooks"
    root_dir.mkdir(parents=True, exist_ok=True)
    token, port = secrets.token_hex(16), free_port()
    # Its own runtime and data folders: kernels find it there, and its database is a new one.
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir),
           "JUPYTER_DATA_DIR": str(root / "data"), "HF_HUB_OFFLINE": "1"}
    app = ["jupyter_server"]
    if lab:
        # No news pop-up, no update check: nothing of JupyterLab's own over the page.
        settings = root / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            '{"fetchNews": "false", "checkForUpdates": false}')
        app = ["jupyterlab", f"--LabApp.user_settings_dir={root / 'lab-settings'}",
               "--LabApp.expose_app_in_browser=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    command = [sys.executable, "-m", *app, "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root_dir}", *args]
    log = open(log_path, "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}/", token, process, runtime_dir, root_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {process.returncode}; see {log_path}")
        try:
            if server.get("mlx/api/status").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"jupyter server did not answer within {timeout} s; see {log_path}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
