"""A throwaway PostgreSQL server for the store's tests (and `bench_store.py --postgres temp`).

It uses the installed binaries (Debian: /usr/lib/postgresql/<version>/bin, package `postgresql`)
to create its own cluster in a temporary directory, listening on 127.0.0.1 on a free port with
its unix socket in that directory: the system's cluster and service are never touched. PostgreSQL
refuses to run as root, so under root the cluster belongs to the `postgres` system user that the
Debian package creates, and its commands run as that user.

    with running_postgres() as server:
        url = server.create_database("bench")   # postgresql+psycopg://mlx:...@127.0.0.1:port/bench
        url = server.create_schema("test_1")    # an empty schema: as good as a new database
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from unavailable import unavailable

USER = "mlx"
START_TIMEOUT_S = 60


class PostgresUnavailable(Exception):
    """PostgreSQL cannot run here at all; the message says why and how to fix it."""


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    password: str
    run_as: dict[str, Any] = field(default_factory=dict)  # subprocess user/group under root
    _stopped: bool = False
    _databases: set[str] = field(default_factory=set)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Creates an empty database; returns its SQLAlchemy URL. (About 0.3 s: PostgreSQL
        copies a template and checkpoints. `create_schema` is the fast way to isolate tests.)"""
        self._execute("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_schema(self, name: str, database: str = "scratch") -> str:
        """Creates an empty schema (in a shared database made on first use); returns a URL whose
        connections have it as their search_path, so to its user it is an empty database."""
        if database not in self._databases:
            self.create_database(database)
            self._databases.add(database)
        self._execute(database, f'CREATE SCHEMA "{name}"')
        return f"{self.url(database)}?options=-csearch_path%3D{name}"

    def _execute(self, database: str, statement: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER,
                             password=self.password, dbname=database,
                             autocommit=True) as connection:
            connection.execute(statement)

    def pause(self) -> None:
        """Stops the server as an administrator would (a fast shutdown: every client is
        disconnected), keeping its data for `resume`."""
        _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
              "stop"], self.run_as)

    def resume(self) -> None:
        """Starts the server again after `pause`, on the same port."""
        started = self._start()
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start again: {started.stdout}"
                               f"{started.stderr}\n{self.log_file.read_text()[-3000:]}")

    def _start(self) -> subprocess.CompletedProcess[str]:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        return _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                     str(self.log_file), "-o", options, "-w", "-t", str(START_TIMEOUT_S),
                     "start"], self.run_as, check=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
              "stop"], self.run_as, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def find_bin_dir() -> Path:
    """The directory of initdb and pg_ctl: Debian's newest version, else the one on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda path: int(Path(path).parent.parent.name)
                        if Path(path).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresUnavailable(
        "initdb not found (looked for /usr/lib/postgresql/*/bin/initdb and on PATH); "
        "install PostgreSQL: `apt-get install postgresql` (or `make system-deps`)")


def start_postgres() -> PostgresServer:
    """Creates and starts a private cluster; raises PostgresUnavailable when it cannot run here,
    RuntimeError (with the server log) when it should have started and did not."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PostgresUnavailable(
            "psycopg is not installed; install it with pip install 'mlx-jupyter[postgresql]'"
        ) from None
    bin_dir = find_bin_dir()
    run_as, owner = _unprivileged_user()
    root = Path(tempfile.mkdtemp(prefix="mlx-jupyter-pg-"))
    password = secrets.token_hex(12)
    (root / "pwfile").write_text(password + "\n")
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(root / "pwfile", owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bin_dir, root, port=0, password=password, run_as=run_as)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", USER,
              f"--pwfile={root / 'pwfile'}", "--auth-host=scram-sha-256", "--auth-local=trust",
              "-E", "UTF8", "--locale=C", "--no-sync"], run_as)
        for _attempt in range(3):  # the free port may be taken between the probe and the start
            server.port = _free_port()
            started = server._start()
            if started.returncode == 0:
                atexit.register(server.stop)
                return server
        log = server.log_file.read_text()[-3000:] if server.log_file.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}\n{log}")
    except BaseException:
        server.stop()
        raise


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


_shared: PostgresServer | None = None


def shared_postgres() -> PostgresServer:
    """One private server for this process, started on first use and stopped at exit: the
    store tests and the live servers on PostgreSQL (live_server.py) share it."""
    global _shared
    if _shared is None or _shared._stopped:
        _shared = start_postgres()
    return _shared


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The private PostgreSQL server; where PostgreSQL cannot run, the test is skipped with the
    reason (under CI=true it fails). (Test modules get it through
    `pytest_plugins = ["store_fixtures"]`, which registers it once for the whole session.)"""
    try:
        return shared_postgres()
    except PostgresUnavailable as why:
        unavailable(f"PostgreSQL cannot run here: {why}")


def _unprivileged_user() -> tuple[dict[str, Any], pwd.struct_passwd | None]:
    """Under root: subprocess arguments that run a command as `postgres`, and that user."""
    if os.geteuid() != 0:
        return {}, None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root, and PostgreSQL refuses root; there is no 'postgres' system user "
            "to run it as (Debian's postgresql package creates one)") from None
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}, owner


def _run(command: list[str], run_as: dict[str, Any], check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30,
                            cwd="/", **run_as)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
