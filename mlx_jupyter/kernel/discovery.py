"""Finds the Jupyter server that hosts the models, from inside a kernel.

Order: the MLX_JUPYTER_URL/MLX_JUPYTER_TOKEN environment variables; the runtime
file of the server that started this kernel (JPY_PARENT_PID); the only running
server on this machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
from jupyter_core.paths import jupyter_runtime_dir

from .errors import ServerNotFound

URL_ENV = "MLX_JUPYTER_URL"
TOKEN_ENV = "MLX_JUPYTER_TOKEN"
PARENT_PID_ENV = "JPY_PARENT_PID"  # set by jupyter_client when it launches a kernel

_SET_ENV_HINT = f"set {URL_ENV} (the server's URL, with its base_url) and {TOKEN_ENV}"


@dataclass(frozen=True)
class ServerInfo:
    """Where the server listens. `url` ends with "/" and includes the base_url."""

    url: str
    token: str = field(default="", repr=False)  # kept out of logs and tracebacks
    sock: str | None = None  # a Unix socket path, for servers started with --sock


def find_server() -> ServerInfo:
    """Locates the server, or raises ServerNotFound with what to do about it."""
    from_env = _server_from_env()
    if from_env is not None:
        return from_env

    runtime_dir = Path(jupyter_runtime_dir())
    servers = _read_runtime_files(runtime_dir)
    parent = _parent_server(servers)
    if parent is not None:
        return _server_info(parent)

    alive = [info for info in servers if _is_alive(info["pid"])]
    if len(alive) == 1:
        return _server_info(alive[0])
    if not alive:
        raise ServerNotFound(
            f"no running Jupyter server was found (runtime dir {runtime_dir}); start one with "
            f"`jupyter lab` and run this kernel from it, or {_SET_ENV_HINT}"
        )
    urls = ", ".join(sorted(info["url"] for info in alive))
    raise ServerNotFound(
        f"{len(alive)} Jupyter servers are running ({urls}) and none started this kernel; "
        f"{_SET_ENV_HINT} to pick one"
    )


def _server_from_env() -> ServerInfo | None:
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        return None
    return ServerInfo(url=_with_trailing_slash(url), token=os.environ.get(TOKEN_ENV, ""))


def _read_runtime_files(runtime_dir: Path) -> list[dict[str, Any]]:
    """The server info of every readable jpserver-<pid>.json; broken files are skipped."""
    servers = []
    for path in sorted(runtime_dir.glob("jpserver-*.json")):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # half-written, or removed while we read it
        if isinstance(info, dict) and isinstance(info.get("url"), str) \
                and isinstance(info.get("pid"), int):
            servers.append(info)
    return servers


def _parent_server(servers: list[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        parent_pid = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return None
    return next((info for info in servers if info["pid"] == parent_pid), None)


def _is_alive(pid: int) -> bool:
    # A server killed with SIGKILL leaves its runtime file behind.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True  # it exists, under another user
    except psutil.Error:
        return False


def _server_info(info: dict[str, Any]) -> ServerInfo:
    token = info.get("token") or ""
    base_url = info.get("base_url") or "/"
    sock = info.get("sock") or None
    if sock:
        # The runtime file's url is "http+unix://<socket>/..."; httpx wants plain http
        # with the socket given to its transport.
        return ServerInfo(url=_join_base_url("http://localhost/", base_url), token=token,
                          sock=sock)
    return ServerInfo(url=_join_base_url(info["url"], base_url), token=token)


def _join_base_url(url: str, base_url: str) -> str:
    """The url with base_url as its path unless it carries one already."""
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else base_url
    return _with_trailing_slash(urlunsplit((parts.scheme, parts.netloc, path, "", "")))


def _with_trailing_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"
