"""Request bodies past c.MlxApp.max_body_bytes, against live servers: a 413 in the route's error
shape before the body is read whole (a declared length at once, a chunked body as it passes the
limit), after the 403 of a client without a token; bodies up to the limit are read as usual,
even past Jupyter's own server-wide limit. And idle connections do not stop the others."""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import httpx
import pytest

from live_server import LiveServer, start_server, stop_server
from mlx_jupyter.api.handlers import BodyHandler
from mlx_jupyter.api.openapi import implements
from mlx_jupyter.api.routes import ROUTES
from mlx_jupyter.limits import DEFAULT_MAX_BODY_BYTES

LIMIT = 65536
# Jupyter's own limit, below ours: a body between the two is still ours to read.
JUPYTER_LIMIT = 32768
HUGE = 100_000_000  # a declared length no client sends here
ANSWER_TIMEOUT = 60.0  # seconds: a loaded machine is slow, but a server that waits never answers
# (method, route) of every kind of body route: native, OpenAI, settings, models, actions
BODY_ROUTES = [("POST", "mlx/api/generate"), ("POST", "mlx/v1/chat/completions"),
               ("POST", "mlx/v1/completions"), ("POST", "mlx/api/models"),
               ("PUT", "mlx/api/settings/default_max_tokens"),
               ("POST", "mlx/api/models/demo/load")]
SMALL = {"model": "demo", "prompt": "The sea", "max_tokens": 2}


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[LiveServer]:
    """A server whose mlx routes take bodies up to LIMIT, above Jupyter's own limit."""
    root = tmp_path_factory.mktemp("body-limits")
    server = start_server(root, root / "server.log",
                          args=(f"--MlxApp.max_body_bytes={LIMIT}",
                                f"--ServerApp.max_body_size={JUPYTER_LIMIT}"))
    yield server
    stop_server(server)


def address(server: LiveServer) -> tuple[str, int]:
    url = httpx.URL(server.url)
    return url.host, url.port


def head(server: LiveServer, method: str, route: str, fields: dict[str, str], *,
         token: bool = True) -> bytes:
    """A request's head, as a client writes it before its body."""
    host, port = address(server)
    fields = {"Host": f"{host}:{port}", "Content-Type": "application/json", **fields,
              **({"Authorization": f"token {server.token}"} if token else {})}
    return (f"{method} /{route} HTTP/1.1\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
            + "\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the answer on `sock`."""
    sock.settimeout(ANSWER_TIMEOUT)
    data = b""
    try:
        while b"\r\n\r\n" not in data and (piece := sock.recv(65536)):
            data += piece
        start, _, body = data.partition(b"\r\n\r\n")
        lines = start.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, value in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)) and \
                (piece := sock.recv(65536)):
            body += piece
    except TimeoutError:
        pytest.fail(f"no answer within {ANSWER_TIMEOUT} s: the server waits for the body")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    return int(lines[0].split()[1]), headers, body


def assert_closed(sock: socket.socket) -> None:
    """The server closed the connection after its answer (the rest of the body is unread)."""
    sock.settimeout(ANSWER_TIMEOUT)
    try:
        assert sock.recv(65536) == b"", "the connection stayed open after the answer"
    except ConnectionResetError:
        pass  # closed with unread bytes of ours in its buffer: a reset


def message(route: str, body: dict) -> str:
    return body["error"]["message"] if route.startswith("mlx/v1") else body["message"]


def declare_huge(server: LiveServer, method: str, route: str, *,
                 token: bool = True) -> tuple[int, dict[str, str], dict]:
    """Declares a body of HUGE bytes, sends its first few and reads the answer."""
    with closing(socket.create_connection(address(server), timeout=ANSWER_TIMEOUT)) as sock:
        sock.sendall(head(server, method, route, {"Content-Length": str(HUGE)}, token=token)
                     + b'{"model": ')
        status, headers, body = read_answer(sock)
        assert_closed(sock)
    return status, headers, httpx.Response(status, content=body).json()


def faults(server: LiveServer) -> dict[str, float]:
    text = server.get("mlx/metrics").text
    return {kind: float(value) for kind, value in
            re.findall(r'^mlx_jupyter_faults_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


def wait_for_log(server: LiveServer, text: str) -> None:
    log = server.root_dir.parent / "server.log"
    deadline = time.monotonic() + 30
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the server log has no line with {text!r}"
        time.sleep(0.2)


def test_every_route_with_a_body_streams_it():
    takes_body = [handler for _, handler in ROUTES
                  if implements(handler, "post") or implements(handler, "put")]
    assert takes_body and all(issubclass(handler, BodyHandler) for handler in takes_body)


@pytest.mark.parametrize(("method", "route"), BODY_ROUTES)
def test_a_declared_length_past_the_limit_is_refused_before_the_body(limited, method, route):
    status, headers, body = declare_huge(limited, method, route)
    assert status == 413, body
    assert headers.get("connection") == "close"
    assert f"limit of {LIMIT} bytes" in message(route, body), body
    assert "c.MlxApp.max_body_bytes" in message(route, body), body
    if route.startswith("mlx/v1"):
        assert body["error"]["code"] == "request_too_large"
    else:
        assert body["reason"] == "BodyTooLarge"


@pytest.mark.parametrize("route", ["mlx/api/generate", "mlx/v1/chat/completions"])
def test_a_chunked_body_is_refused_as_it_passes_the_limit(limited, route):
    piece, planned = b"x" * 16384, 32 * 1024 * 1024
    sent = 0
    with closing(socket.create_connection(address(limited), timeout=ANSWER_TIMEOUT)) as sock:
        sock.sendall(head(limited, "POST", route, {"Transfer-Encoding": "chunked"}))
        try:
            while sent < planned and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed while we were sending
        assert sent < planned, "the server read the whole chunked body without refusing it"
        status, _, body = read_answer(sock)
        assert_closed(sock)
    assert status == 413, body
    assert f"limit of {LIMIT} bytes" in message(route, httpx.Response(413, content=body).json())


def padded(body: bytes, size: int) -> bytes:
    """`body` (a JSON object) padded with spaces to `size` bytes."""
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_a_body_at_the_limit_is_read_as_usual_past_jupyters_own_limit(limited):
    good = padded(b'{"model": "demo", "prompt": "The sea", "max_tokens": 2}', LIMIT)
    answer = limited.request("POST", "mlx/api/generate", content=good)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
    chunked = limited.request("POST", "mlx/api/generate",
                              content=iter([good[:LIMIT // 2], good[LIMIT // 2:]]))
    assert chunked.status_code == 200, chunked.text
    bad = limited.request("POST", "mlx/v1/completions", content=padded(b'{"model": }', LIMIT))
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    over = limited.request("POST", "mlx/api/generate", content=padded(good, LIMIT + 1))
    assert over.status_code == 413, over.text


@pytest.mark.parametrize("route", ["mlx/api/generate", "mlx/v1/chat/completions"])
def test_a_client_without_a_token_gets_its_403_first(limited, route):
    status, _, body = declare_huge(limited, "POST", route, token=False)
    assert status == 403, body


def test_refused_bodies_are_counted_and_logged(limited):
    before = faults(limited)
    status, _, _ = declare_huge(limited, "POST", "mlx/v1/completions")
    assert status == 413
    bad = limited.request("POST", "mlx/api/generate", content=b'{"model": "demo", ')
    assert bad.status_code == 400
    nan = limited.request("PUT", "mlx/api/settings/default_temperature",
                          content=b'{"value": NaN}')
    assert nan.status_code == 400 and "finite number" in nan.json()["message"], nan.text
    field = limited.request("POST", "mlx/api/generate", json={**SMALL, "max_tokens": 0})
    assert field.status_code == 400  # a bad field: no fault
    after = faults(limited)
    assert after.get("body_too_large", 0) == before.get("body_too_large", 0) + 1
    assert after.get("bad_body", 0) == before.get("bad_body", 0) + 2
    wait_for_log(limited, f"POST /mlx/v1/completions -> 413: the request body is {HUGE} bytes")
    wait_for_log(limited, "POST /mlx/api/generate -> 400: request body is not valid JSON")


def test_the_default_limit_holds(live_server):
    status, _, body = declare_huge(live_server, "POST", "mlx/api/generate")
    assert status == 413, body
    assert f"limit of {DEFAULT_MAX_BODY_BYTES} bytes" in body["message"]


IDLE = 500


@contextmanager
def idle_connections(server: LiveServer, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that never finish a request: half send nothing, half the start
    of a request line."""
    sockets: list[socket.socket] = []
    try:
        for number in range(count):
            try:
                sock = socket.create_connection(address(server), timeout=ANSWER_TIMEOUT)
            except OSError as exc:
                pytest.fail(f"connection {number + 1} of {count} to the server failed: {exc}")
            sockets.append(sock)
            if number % 2:
                sock.sendall(b"POST /mlx/api/gen")
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def accepted(server: LiveServer, ports: set[int]) -> int:
    """How many connections from these client ports the server process holds the other end
    of (Linux: its sockets' inodes, found in /proc/net/tcp), not merely queued by the kernel."""
    held = {link[len("socket:["):-1] for link in _fd_links(server.process.pid)
            if link.startswith("socket:[")}
    port = address(server)[1]
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port
               and int(row[2].split(":")[1], 16) in ports and row[9] in held)


def _fd_links(pid: int) -> list[str]:
    """What a process's descriptors point at; one closed while they are read is skipped."""
    fds, links = f"/proc/{pid}/fd", []
    for fd in os.listdir(fds):
        try:
            links.append(os.readlink(f"{fds}/{fd}"))
        except FileNotFoundError:
            pass
    return links


def wait_until_accepted(server: LiveServer, ports: set[int], done: Callable[[int], bool],
                        what: str) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while not done(count := accepted(server, ports)):
        assert time.monotonic() < deadline, \
            f"{what}: the server holds {count} of {len(ports)} connections"
        time.sleep(0.2)


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Enough file descriptors for the idle connections, in this process and in the server
    it starts (which inherits the limit)."""
    needed = 3 * IDLE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"`ulimit -n` is {soft} (at most {hard}): this test holds {IDLE} "
                        f"connections and needs {needed}; raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_do_not_stop_the_others(tmp_path, descriptors):
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with idle_connections(server, IDLE) as clients:
            ports = {sock.getsockname()[1] for sock in clients}
            wait_until_accepted(server, ports, lambda count: count == IDLE,
                                "the idle connections were not all accepted")
            status = server.get("mlx/api/status")
            assert status.status_code == 200, status.text
            answer = server.request("POST", "mlx/api/generate", json=SMALL)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] >= 1
        # Closed by their clients: the server lets them go, and still serves.
        wait_until_accepted(server, ports, lambda count: count == 0,
                            "the idle connections were closed but not released")
        assert server.get("mlx/api/status").status_code == 200
    finally:
        stop_server(server)
