"""A real Jupyter server in its own process, with the extension, for end-to-end tests.

Its database is SQLite in the server's own data folder, or, with MLX_TEST_DATABASE=postgresql
in the environment, a new schema on a private PostgreSQL server (tests/postgres.py): `make test`
runs the server tests a second time that way. Servers started again on the same root find the
same database, as a restarted server does.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

_schema_numbers = itertools.count()
DATABASES = ("sqlite", "postgresql")
_postgres_urls: dict[Path, str] = {}  # root -> its schema's URL, for servers started again


@dataclass
class LiveServer:
    url: str
    token: str
    process: subprocess.Popen
    runtime_dir: Path
    root_dir: Path
    database_url: str  # the server's database, for tests that reach into it

    def get(self, path: str, params: dict | None = None) -> httpx.Response:
        return self.request("GET", path, params=params, timeout=30)

    def request(self, method: str, path: str, *, timeout: float = 120,
                headers: dict | None = None, **kwargs) -> httpx.Response:
        """A request to a route of this server (path relative to its base URL), with its token."""
        return httpx.request(method, self.url + path, timeout=timeout, **kwargs,
                             headers={"Authorization": f"token {self.token}", **(headers or {})})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_kind() -> str:
    """The database the server tests run on: MLX_TEST_DATABASE, sqlite by default."""
    database = os.environ.get("MLX_TEST_DATABASE", "sqlite").strip().lower() or "sqlite"
    if database not in DATABASES:
        raise ValueError(f"MLX_TEST_DATABASE={database!r}: expected one of {', '.join(DATABASES)}")
    return database


def postgres_database_url(name: str) -> str:
    """A new, empty database (a schema) on the private PostgreSQL server; skipped (under
    CI=true: failed) where PostgreSQL cannot run."""
    from postgres import PostgresUnavailable, shared_postgres
    from unavailable import unavailable

    try:
        server = shared_postgres()
    except PostgresUnavailable as why:
        unavailable(f"MLX_TEST_DATABASE=postgresql, but PostgreSQL cannot run here: {why}")
    return server.create_schema(f"{name}_{os.getpid()}_{next(_schema_numbers)}")


def database_url_for(root: Path, args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The database of a server started on `root` with `args`, and the arguments that give
    it that database: one named in args, else the test database for that root."""
    for arg in args:
        if arg.startswith("--MlxApp.database_url="):
            return arg.split("=", 1)[1], args
    if database_kind() == "sqlite":
        from mlx_jupyter.store import default_database_url

        return default_database_url(root / "data"), args  # the server's default place
    if root not in _postgres_urls:
        _postgres_urls[root] = postgres_database_url("live")
    url = _postgres_urls[root]
    return url, (*args, f"--MlxApp.database_url={url}")


def start_server(root: Path, log_path: Path, timeout: float = 90.0, *,
                 lab: bool = False, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> LiveServer:
    """A Jupyter server with the extension; with `lab`, JupyterLab (for the browser tests);
    `env` adds to its environment."""
    runtime_dir, root_dir = root / "runtime", root / "notebooks"
    root_dir.mkdir(parents=True, exist_ok=True)
    token, port = secrets.token_hex(16), free_port()
    database_url, args = database_url_for(root, args)
    # Its own runtime and data folders: kernels find it there, and its database is a new one.
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir),
           "JUPYTER_DATA_DIR": str(root / "data"), "HF_HUB_OFFLINE": "1", **(env or {})}
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
    server = LiveServer(f"http://127.0.0.1:{port}/", token, process, runtime_dir, root_dir,
                        database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {process.returncode}; see {log_path}")
        try:
            code = server.get("mlx/api/status").status_code
        except httpx.TransportError:
            code = None
        if code == 200:
            return server
        if code == 404:  # the server runs without our routes: the extension did not load
            stop_server(server)
            raise RuntimeError(f"the mlx_jupyter extension did not load; see {log_path}")
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
