"""A client that stops reading its stream, against a live server.

Its batch's other 7 streams finish; what it leaves unread is held up to
`c.MlxApp.stream_buffer_bytes` (here 4 KiB; the kernel keeps at most
limits.STREAM_SOCKET_UNSENT_BYTES more, TCP_NOTSENT_LOWAT), then its request is cancelled with the
reason slow_client, logged and counted. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from live_server import start_server, stop_server
from model_factory import make_model

BUFFER_BYTES = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow-clients")
    make_model(root / "models" / "tiny", hidden=64, layers=2)
    live = start_server(root, root / "server.log", args=(
        f"--MlxApp.model_dirs={root / 'models'}", "--MlxApp.idle_unload_seconds=0",
        "--MlxApp.max_batch_size=8", f"--MlxApp.stream_buffer_bytes={BUFFER_BYTES}"))
    live.log_path = root / "server.log"
    yield live
    stop_server(live)


def unread_stream(live, body: dict) -> tuple[socket.socket, str]:
    """Sends a streaming request on a socket with a small receive window, reads its headers
    and nothing more; returns the socket (kept open) and the request's id."""
    url = urlparse(live.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connecting: the window
    sock.connect((url.hostname, url.port))
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /mlx/api/generate HTTP/1.1\r\nHost: %s:%d\r\n"
                 b"Authorization: token %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (url.hostname.encode(), url.port,
                                                   live.token.encode(), len(payload), payload))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: not a byte of the body more than needed
    assert head.startswith(b"HTTP/1.1 200"), head
    [request_id] = [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                    if line.lower().startswith(b"x-request-id:")]
    return sock, request_id


async def read_whole_stream(http: httpx.AsyncClient, body: dict) -> dict:
    async with http.stream("POST", "mlx/api/generate", json={**body, "stream": True}) as answer:
        assert answer.status_code == 200, await answer.aread()
        lines = [line async for line in answer.aiter_lines() if line]
    return json.loads(lines[-1])


def history_row(live, request_id: str) -> dict:
    return live.get(f"mlx/api/requests/{request_id}").json()


async def test_a_client_that_stops_reading_is_cancelled_and_the_batch_goes_on(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=300, headers={
            "Authorization": f"token {server.token}"}) as http:
        assert (await http.post("mlx/api/models/tiny/load")).status_code == 200
        sock, slow_id = await asyncio.to_thread(unread_stream, server, {
            "model": "tiny", "prompt": "an endless story", "max_tokens": 4000,
            "temperature": 0})
        try:
            others = await asyncio.gather(*(read_whole_stream(http, {
                "model": "tiny", "prompt": f"story number {i}", "max_tokens": 300,
                "temperature": 0}) for i in range(7)))
            assert all(done["finish_reason"] in ("stop", "length") for done in others), others
            deadline = time.monotonic() + 240
            while (row := history_row(server, slow_id))["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, row
                await asyncio.sleep(0.2)
        finally:
            sock.close()
    assert row["status"] == "cancelled" and row["finish_reason"] == "cancelled", row
    assert row["error"].startswith("slow_client:"), row["error"]
    assert f"stream_buffer_bytes ({BUFFER_BYTES})" in row["error"]
    metrics = server.get("mlx/metrics").text
    assert 'mlx_jupyter_faults_total{kind="slow_client"} 1.0' in metrics
    assert f"request {slow_id} on tiny: slow_client" in server.log_path.read_text()
    # The server serves on.
    answer = server.request("POST", "mlx/api/generate",
                            json={"model": "tiny", "prompt": "after", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
