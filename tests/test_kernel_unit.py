"""Kernel side without the real server: discovery, the client, and the %%mlx magic.

The network peer is a small HTTP server started here that speaks the REST contract
(auth, JSON errors, NDJSON streams); end-to-end tests against the real server live
elsewhere. Every client test runs through both `Client` and `AsyncClient` (the latter
driven from blocking code, `twins.Blocking`). The magic runs in a real (in-process)
IPython kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mlx_jupyter.kernel import (
    AuthenticationError,
    Client,
    ConnectionFailed,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    ServerError,
    ServerInfo,
    ServerNotFound,
    find_server,
)
from IPython.core.error import UsageError

from mlx_jupyter.kernel.options import parse_cell
from mlx_jupyter.kernel.render import PlainText
from twins import blocking_async_client

TOKEN = "secret-token"
BASE = "/base/"
GENERATE = "mlx/api/generate"
STATUS = "mlx/api/status"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No outside server settings leak in; the runtime dir is empty and private."""
    for name in ("MLX_JUPYTER_URL", "MLX_JUPYTER_TOKEN", "JPY_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime_dir))
    return runtime_dir


# -- a fake network peer --------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Responder = Callable[["_Handler"], None]


@dataclass
class FakeServer:
    """Speaks the mlx-jupyter REST contract under BASE, with token auth like Jupyter."""

    port: int = 0
    routes: dict[str, Responder] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE}"

    def generate_bodies(self) -> list[Any]:
        return [r.body for r in self.requests if r.path == BASE + GENERATE]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        fake: FakeServer = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        fake.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"token {TOKEN}":
            return send_json(self, 403, {"message": "Forbidden", "reason": None})
        responder = fake.routes.get(self.path.removeprefix(BASE)) if \
            self.path.startswith(BASE) else None
        if responder is None:  # like Jupyter's catch-all route: an HTML page
            return send_body(self, 404, "text/html", b"<html><body>404 : Not Found</body></html>")
        responder(self)


def send_body(handler: BaseHTTPRequestHandler, status: int, content_type: str,
              body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    send_body(handler, status, "application/json", json.dumps(payload).encode())


def json_reply(status: int, payload: Any) -> Responder:
    return lambda handler: send_json(handler, status, payload)


def done_event(finish_reason: str = "stop", completion_tokens: int = 3,
               model: str | None = None) -> dict[str, Any]:
    """The server's last event; it names the model that answered (the server's default when
    the request named none) and the seed it sampled with."""
    return {"done": True, "request_id": "req-1", "finish_reason": finish_reason,
            "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens},
            "timings": {"ttft_ms": 10.0, "total_ms": 100.0, "tokens_per_second": 30.0},
            "seed": SERVER_SEED, **({"model": model} if model else {})}


SERVER_SEED = 1234567


def ndjson_reply(chunks: list[bytes | dict[str, Any]], *, hang: bool = False,
                 stall: bool = False,
                 after_chunk: Callable[[int], None] | None = None) -> Responder:
    """Streams chunks (dicts become NDJSON lines) with chunked encoding, like tornado.

    With `hang`, keeps sending {"text": "."} events until the client goes away, then sets
    `disconnected`; with `stall`, sends nothing more and waits for the client to go away
    (a model that went quiet); `after_chunk(n)` runs once the n-th chunk (from 0) is out.
    """

    def respond(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("X-Request-Id", "req-1")
        handler.end_headers()
        try:
            deadline = time.monotonic() + 30
            for index, chunk in enumerate(_chunks_to_send(chunks, hang, deadline)):
                write_chunk(handler, chunk)
                if after_chunk is not None:
                    after_chunk(index)
            if stall:
                return wait_for_hang_up(handler)
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            handler.server.fake.disconnected.set()
            handler.close_connection = True

    return respond


def wait_for_hang_up(handler: _Handler) -> None:
    handler.connection.settimeout(30)
    with contextlib.suppress(OSError):
        if handler.connection.recv(1) == b"":  # the client closed its end
            handler.server.fake.disconnected.set()
    handler.close_connection = True


def _chunks_to_send(chunks: list[bytes | dict[str, Any]], hang: bool,
                    deadline: float) -> Iterator[bytes | dict[str, Any]]:
    yield from chunks
    while hang and time.monotonic() < deadline:
        time.sleep(0.01)
        yield {"text": "."}


def write_chunk(handler: BaseHTTPRequestHandler, chunk: bytes | dict[str, Any]) -> None:
    data = chunk if isinstance(chunk, bytes) else (json.dumps(chunk) + "\n").encode()
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that hang up
            super().handle_error(request, client_address)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
    fake = FakeServer(port=httpd.server_address[1])
    httpd.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()


OpenClient = Callable[..., AbstractContextManager[Any]]


@pytest.fixture(params=["Client", "AsyncClient"])
def open_client(request: pytest.FixtureRequest) -> OpenClient:
    """Opens a client of one kind or the other: every client test runs with both."""
    return Client if request.param == "Client" else blocking_async_client


@pytest.fixture
def client(fake_server: FakeServer, open_client: OpenClient) -> Iterator[Any]:
    with open_client(fake_server.url, TOKEN, timeout=30) as client:
        yield client


# -- discovery ------------------------------------------------------------------------------


def write_runtime_file(runtime_dir: Path, pid: int, url: str, token: str = "tok",
                       base_url: str = "/", **extra: Any) -> None:
    info = {"url": url, "token": token, "pid": pid, "base_url": base_url, "port": 8888,
            "hostname": "localhost", "sock": "", "secure": False, "password": False,
            "root_dir": "/tmp", "version": "2.21.1", **extra}
    (runtime_dir / f"jpserver-{pid}.json").write_text(json.dumps(info))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_env_url_wins_over_runtime_files(clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    write_runtime_file(clean_env, os.getpid(), "http://localhost:8888/")
    monkeypatch.setenv("MLX_JUPYTER_URL", "http://example.org:9000/jupyter")
    monkeypatch.setenv("MLX_JUPYTER_TOKEN", "abc")
    assert find_server() == ServerInfo("http://example.org:9000/jupyter/", "abc")


def test_env_url_without_token_means_no_token(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLX_JUPYTER_URL", "http://127.0.0.1:1/")
    assert find_server() == ServerInfo("http://127.0.0.1:1/", "")


def test_single_live_server_is_found_with_its_base_url(clean_env: Path):
    write_runtime_file(clean_env, os.getpid(), "http://localhost:8888/lab/", token="t1",
                       base_url="/lab/")
    assert find_server() == ServerInfo("http://localhost:8888/lab/", "t1")


def test_base_url_is_added_when_the_url_lacks_it(clean_env: Path):
    write_runtime_file(clean_env, os.getpid(), "http://localhost:8888", base_url="/lab/")
    assert find_server().url == "http://localhost:8888/lab/"


def test_dead_servers_are_ignored(clean_env: Path):
    write_runtime_file(clean_env, dead_pid(), "http://localhost:1111/")
    write_runtime_file(clean_env, os.getpid(), "http://localhost:2222/")
    assert find_server().url == "http://localhost:2222/"


def test_only_dead_servers_is_a_clear_error(clean_env: Path):
    write_runtime_file(clean_env, dead_pid(), "http://localhost:1111/")
    with pytest.raises(ServerNotFound, match="no running Jupyter server was found") as info:
        find_server()
    assert "MLX_JUPYTER_URL" in str(info.value) and "\n" not in str(info.value)


def test_empty_runtime_dir_is_a_clear_error():
    with pytest.raises(ServerNotFound, match="no running Jupyter server was found"):
        find_server()


def test_parent_pid_picks_among_several_servers(clean_env: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    write_runtime_file(clean_env, os.getpid(), "http://localhost:1111/", token="mine")
    write_runtime_file(clean_env, os.getppid(), "http://localhost:2222/", token="parent")
    monkeypatch.setenv("JPY_PARENT_PID", str(os.getppid()))
    assert find_server() == ServerInfo("http://localhost:2222/", "parent")


def test_several_live_servers_without_parent_is_an_error(clean_env: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    write_runtime_file(clean_env, os.getpid(), "http://localhost:1111/")
    write_runtime_file(clean_env, os.getppid(), "http://localhost:2222/")
    monkeypatch.setenv("JPY_PARENT_PID", str(dead_pid()))  # a parent without a server
    with pytest.raises(ServerNotFound, match="2 Jupyter servers are running") as info:
        find_server()
    message = str(info.value)
    assert "http://localhost:1111/" in message and "http://localhost:2222/" in message
    assert "MLX_JUPYTER_URL" in message and "MLX_JUPYTER_TOKEN" in message


def test_unreadable_runtime_files_are_skipped(clean_env: Path):
    (clean_env / "jpserver-1.json").write_text("{not json")
    (clean_env / "jpserver-2.json").write_text(json.dumps(["a list"]))
    write_runtime_file(clean_env, os.getpid(), "http://localhost:3333/")
    assert find_server().url == "http://localhost:3333/"


def test_unix_socket_server(clean_env: Path):
    write_runtime_file(clean_env, os.getpid(), "http+unix://%2Ftmp%2Fjp.sock/base/",
                       base_url="/base/", sock="/tmp/jp.sock")
    assert find_server() == ServerInfo("http://localhost/base/", "tok", "/tmp/jp.sock")


def test_server_info_repr_hides_the_token():
    assert "s3cret" not in repr(ServerInfo("http://x/", "s3cret"))


# -- client ---------------------------------------------------------------------------------


def test_status_sends_the_token_under_the_base_url(fake_server: FakeServer, client: Any):
    fake_server.routes[STATUS] = json_reply(200, {"version": "0.1.0", "models": []})
    assert client.status() == {"version": "0.1.0", "models": []}
    request = fake_server.requests[-1]
    assert (request.method, request.path) == ("GET", BASE + STATUS)
    assert request.headers["Authorization"] == f"token {TOKEN}"


def test_client_discovers_the_server(fake_server: FakeServer, clean_env: Path,
                                     open_client: OpenClient):
    write_runtime_file(clean_env, os.getpid(), f"http://127.0.0.1:{fake_server.port}/",
                       token=TOKEN, base_url=BASE)
    fake_server.routes[STATUS] = json_reply(200, {"version": "0.1.0", "models": []})
    with open_client() as client:
        assert client.url == fake_server.url
        assert client.status()["version"] == "0.1.0"


def test_generate_sends_only_the_given_options(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = json_reply(200, {
        "request_id": "r1", "model": "demo", "text": "Hello!", "finish_reason": "length",
        "usage": {"prompt_tokens": 2, "completion_tokens": 5},
        "timings": {"ttft_ms": 1.0, "total_ms": 9.0, "tokens_per_second": 50.0}})
    result = client.generate("Hi", model="demo", max_tokens=5, stop="END")
    assert fake_server.generate_bodies() == [
        {"model": "demo", "prompt": "Hi", "stream": False, "max_tokens": 5, "stop": ["END"]}]
    assert (result.text, result.request_id, result.model, result.finish_reason) == \
        ("Hello!", "r1", "demo", "length")
    assert result.usage["completion_tokens"] == 5
    assert result.timings["tokens_per_second"] == 50.0


def test_generate_with_messages_and_every_option(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = json_reply(200, {
        "request_id": "r1", "model": "demo", "text": "", "finish_reason": "stop",
        "usage": {}, "timings": {}})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    client.generate(model="demo", messages=messages, max_tokens=1, temperature=0.0,
                    top_p=0.5, seed=7, stop=["a", "b"])
    assert fake_server.generate_bodies() == [
        {"model": "demo", "messages": messages, "stream": False, "max_tokens": 1,
         "temperature": 0.0, "top_p": 0.5, "seed": 7, "stop": ["a", "b"]}]


def test_a_refused_token_is_an_authentication_error(fake_server: FakeServer,
                                                     open_client: OpenClient):
    with open_client(fake_server.url, "wrong") as client, \
            pytest.raises(AuthenticationError) as info:
        client.generate("Hi", model="demo")
    assert str(info.value).startswith("the Jupyter server refused the token;")
    assert "MLX_JUPYTER_TOKEN" in str(info.value) and info.value.status == 403


def test_the_token_falls_back_to_the_environment(fake_server: FakeServer,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 open_client: OpenClient):
    monkeypatch.setenv("MLX_JUPYTER_TOKEN", TOKEN)
    fake_server.routes[STATUS] = json_reply(200, {"version": "0.1.0", "models": []})
    with open_client(fake_server.url.rstrip("/")) as client:
        assert client.status()["version"] == "0.1.0"


def test_an_unknown_model_is_model_not_found(fake_server: FakeServer, client: Any):
    message = "unknown model 'nope'; available models: demo"
    fake_server.routes[GENERATE] = json_reply(404, {"message": message,
                                                    "reason": "ModelNotFound"})
    with pytest.raises(ModelNotFound, match="available models: demo"):
        client.generate("Hi", model="nope")


def test_a_missing_api_says_to_enable_the_extension(fake_server: FakeServer, client: Any):
    with pytest.raises(ServerNotFound, match="jupyter server extension enable mlx_jupyter"):
        client.status()


def test_a_bad_field_is_an_invalid_request(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = json_reply(400, {
        "message": "temperature: Input should be less than or equal to 2", "reason": None})
    with pytest.raises(InvalidRequest, match="^invalid request: temperature: Input should"):
        client.generate("Hi", model="demo", temperature=5.0)


def test_a_full_queue_is_queue_full_with_its_retry_after(fake_server: FakeServer,
                                                         client: Any):
    # 256 waiting requests are needed to fill the real server's queue; the contract is enough.
    message = "the inference queue is full (256 requests waiting); retry in 7 s"

    def full(handler: _Handler) -> None:
        body = json.dumps({"message": message, "reason": "QueueFull"}).encode()
        handler.send_response(429)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Retry-After", "7")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    fake_server.routes[GENERATE] = full
    with pytest.raises(QueueFull, match="^the inference queue is full") as info:
        client.generate("Hi", model="demo")
    assert (info.value.status, info.value.retry_after) == (429, 7.0)


def test_a_worker_failure_is_a_server_error(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = json_reply(503, {
        "message": "the worker for 'demo' exited\nwith code 1", "reason": "WorkerError"})
    with pytest.raises(ServerError, match="HTTP 503.*the worker for 'demo' exited with code 1"
                       ) as info:
        client.generate("Hi", model="demo")
    assert "\n" not in str(info.value)


def test_no_server_listening_is_connection_failed(open_client: OpenClient):
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open_client(f"http://127.0.0.1:{port}/", "t") as client, \
            pytest.raises(ConnectionFailed, match="cannot connect to the Jupyter server"):
        client.status()


def test_stream_yields_text_then_the_result(fake_server: FakeServer, client: Any):
    # The second event is split across two chunks: lines are reassembled.
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": "Hel"}, b'{"text": "lo', b' there"}\n', b"\n", done_event("length", 2)])
    with client.stream("Hi", model="demo", max_tokens=2) as events:
        received = list(events)
    assert [e.get("text") for e in received[:-1]] == ["Hel", "lo there"]
    assert received[-1]["done"] is True
    assert events.result is not None
    assert (events.result.text, events.result.finish_reason, events.result.request_id) == \
        ("Hello there", "length", "req-1")
    assert events.result.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    assert fake_server.generate_bodies()[0]["stream"] is True


def test_an_error_event_mid_stream_raises_server_error(fake_server: FakeServer,
                                                       client: Any):
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": "partial"},
        {"done": True, "request_id": "req-9", "finish_reason": "error",
         "error": "worker died"}])
    events = client.stream("Hi", model="demo")
    assert next(events) == {"text": "partial"}
    with pytest.raises(ServerError, match="worker died") as info:
        next(events)
    assert info.value.request_id == "req-9"
    assert events.text == "partial"


def test_a_stream_cut_short_is_connection_failed(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = ndjson_reply([{"text": "a"}])
    with pytest.raises(ConnectionFailed, match="closed before the generation finished"):
        list(client.stream("Hi", model="demo"))


def test_a_malformed_event_is_a_server_error(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = ndjson_reply([b"<html>oops</html>\n"])
    with pytest.raises(ServerError, match="malformed stream event"):
        list(client.stream("Hi", model="demo"))


def test_stream_errors_before_output_raise_at_once(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = json_reply(404, {"message": "unknown model 'x'"})
    with pytest.raises(ModelNotFound, match="unknown model 'x'"):
        client.stream("Hi", model="x")


def test_closing_a_stream_drops_the_connection(fake_server: FakeServer, client: Any):
    fake_server.routes[GENERATE] = ndjson_reply([{"text": "first"}], hang=True)
    events = client.stream("Hi", model="demo")
    assert next(events) == {"text": "first"}
    events.close()
    assert fake_server.disconnected.wait(20), "the server never saw the client go away"
    assert list(events) == []


def test_closing_a_stream_from_another_thread_ends_its_reader(fake_server: FakeServer,
                                                              client: Any):
    # The panel's Stop button: the reading thread waits for an event that will not come.
    fake_server.routes[GENERATE] = ndjson_reply([{"text": "first"}], stall=True)
    events = client.stream("Hi", model="demo")
    assert next(events) == {"text": "first"}
    outcome: list[Any] = []
    reader = threading.Thread(target=lambda: outcome.append(read_rest(events)), daemon=True)
    reader.start()
    wait_until(lambda: waiting_for_the_network(reader))
    events.close()
    reader.join(20)
    assert not reader.is_alive(), "closing the stream did not wake its reader"
    assert outcome == [[]] and events.text == "first" and events.result is None
    assert fake_server.disconnected.wait(20), "the server never saw the client go away"


def read_rest(events: Any) -> list[Any] | BaseException:
    try:
        return list(events)
    except BaseException as error:  # noqa: BLE001  (the test says which)
        return error


def waiting_for_the_network(thread: threading.Thread) -> bool:
    """Whether the thread is blocked reading a socket (Client) or waiting for its event
    loop to read one (AsyncClient through twins.Blocking)."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return False
    code = frame.f_code
    return (code.co_name == "read" and code.co_filename.endswith(
        os.path.join("httpcore", "_backends", "sync.py"))) or (
        code.co_name == "wait" and code.co_filename == threading.__file__)


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds  # a guard against a hang, not a measure
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


# -- %%mlx argument parsing -----------------------------------------------------------------


def test_parse_cell_defaults():
    request = parse_cell("", "  What is MLX?\n", "demo")
    assert request.model == "demo" and request.stream is True and request.options == {}
    assert request.messages == [{"role": "user", "content": "What is MLX?"}]


def test_parse_cell_every_option():
    request = parse_cell(
        "tiny --max-tokens 8 --temperature 0 --top-p 0.9 --seed 3 --stop END --stop '###' "
        "--system 'Be brief.' --no-stream", "Hi", "demo")
    assert request.model == "tiny" and request.stream is False
    assert request.options == {"max_tokens": 8, "temperature": 0.0, "top_p": 0.9, "seed": 3,
                               "stop": ["END", "###"]}
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("line, expected", [
    ("--max-tokens many", "invalid int value"),
    ("--bogus", "unrecognized arguments: --bogus"),
    ("a b", "unrecognized arguments: b"),
    ("--system 'unclosed", "No closing quotation"),
    ("--max", "unrecognized arguments"),  # no abbreviations
])
def test_parse_cell_bad_options(line: str, expected: str):
    with pytest.raises(UsageError, match=expected):
        parse_cell(line, "Hi", "demo")


def test_parse_cell_rejects_an_empty_cell():
    with pytest.raises(UsageError, match="the cell is empty"):
        parse_cell("", "  \n", "demo")


def test_plain_text_output_prints_the_growing_text_and_footer(capsys: pytest.CaptureFixture):
    output = PlainText()
    output.update("Hel")
    output.update("Hello")
    output.finish({"text/plain": "Hello!"}, "demo · 3 tokens")
    assert capsys.readouterr().out == "Hello!\n[demo · 3 tokens]\n"


# -- %%mlx in a real kernel -----------------------------------------------------------------


@dataclass
class CellOutput:
    status: str
    stdout: str = ""
    stderr: str = ""
    displays: list[dict[str, Any]] = field(default_factory=list)  # display/update messages
    errors: list[dict[str, Any]] = field(default_factory=list)

    def markdown_updates(self) -> list[tuple[str, str]]:
        return [(d["msg_type"], d["content"]["data"].get("text/markdown", ""))
                for d in self.displays]


class Kernel:
    """An in-process IPython kernel: real shell, real display messages."""

    def __init__(self) -> None:
        from ipykernel.inprocess.manager import InProcessKernelManager

        self.manager = InProcessKernelManager()
        self.manager.start_kernel()
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready()

    def run(self, code: str) -> CellOutput:
        msg_id = self.client.execute(code)
        reply = self.client.get_shell_msg(timeout=60)
        output = CellOutput(status=reply["content"]["status"])
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=5)
            except queue.Empty:
                break
            # No filter on the parent for streams: the in-process kernel's stderr may carry
            # a stale one. Earlier cells' messages were drained up to their idle status.
            kind = msg["msg_type"]
            if kind == "stream":
                name = msg["content"]["name"]
                setattr(output, name, getattr(output, name) + msg["content"]["text"])
            elif kind in ("display_data", "update_display_data"):
                output.displays.append(msg)
            elif kind == "error":
                output.errors.append(msg["content"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle" \
                    and msg["parent_header"].get("msg_id") == msg_id:
                break
        return output

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel()


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    kernel = Kernel()
    yield kernel
    kernel.stop()


@pytest.fixture
def mlx(kernel: Kernel, fake_server: FakeServer,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    """The kernel with the extension loaded fresh, pointed at the fake server."""
    monkeypatch.setenv("MLX_JUPYTER_URL", fake_server.url)
    monkeypatch.setenv("MLX_JUPYTER_TOKEN", TOKEN)
    assert kernel.run("%load_ext mlx_jupyter").status == "ok"
    yield kernel
    kernel.run("%unload_ext mlx_jupyter")


def assert_no_traceback(output: CellOutput) -> None:
    assert output.status == "ok" and output.errors == []
    assert "Traceback" not in output.stdout + output.stderr


def one_red_line(output: CellOutput) -> str:
    lines = output.stderr.splitlines()
    assert len(lines) == 1, output.stderr
    assert lines[0].startswith("\x1b[31mmlx: ") and lines[0].endswith("\x1b[0m")
    return lines[0]


def test_cell_streams_markdown_in_place(mlx: Kernel, fake_server: FakeServer):
    fake_server.routes[GENERATE] = ndjson_reply(
        [{"text": "# Title"}, {"text": "\n\nsome"}, {"text": " *text*"}, done_event("stop", 3)])
    output = mlx.run('%%mlx tiny --max-tokens 16 --stop END --system "Be brief."\nWhat is MLX?')
    assert_no_traceback(output)
    assert output.stderr == ""
    [body] = fake_server.generate_bodies()
    assert "seed" not in body  # the server picks one when the cell samples without --seed
    assert body == {
        "model": "tiny", "stream": True, "max_tokens": 16, "stop": ["END"],
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is MLX?"}]}
    answer, footer = output.displays[:-1], output.displays[-1]
    made = answer[-1]["content"]["metadata"]["mlx_jupyter"]
    assert (made["seed"], made["request_id"], made["model"]) == (SERVER_SEED, "req-1", "tiny")
    assert answer[0]["msg_type"] == "display_data"
    display_id = answer[0]["content"]["transient"]["display_id"]
    assert all(d["content"]["transient"]["display_id"] == display_id for d in answer)
    assert all(d["msg_type"] == "update_display_data" for d in answer[1:])
    assert answer[-1]["content"]["data"]["text/markdown"] == "# Title\n\nsome *text*"
    assert len(answer) <= 4  # at most one per event, plus the final render
    assert footer["msg_type"] == "display_data"
    assert footer["content"]["data"]["text/plain"] == "tiny · 3 tokens · 30.0 tok/s"


def test_footer_names_a_finish_reason_other_than_stop(mlx: Kernel, fake_server: FakeServer):
    fake_server.routes[GENERATE] = ndjson_reply([{"text": "a"}, done_event("length", 1, "demo")])
    output = mlx.run("%%mlx\nHi")
    assert output.displays[-1]["content"]["data"]["text/plain"] == \
        "demo · 1 token · 30.0 tok/s · length"


def test_no_stream_shows_the_whole_answer(mlx: Kernel, fake_server: FakeServer):
    fake_server.routes[GENERATE] = json_reply(200, {
        "request_id": "r1", "model": "demo", "text": "**done**", "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2},
        "timings": {"ttft_ms": 1.0, "total_ms": 9.0, "tokens_per_second": 20.0}})
    output = mlx.run("%%mlx --no-stream --seed 1\nHi")
    assert_no_traceback(output)
    assert fake_server.generate_bodies()[0]["stream"] is False
    assert fake_server.generate_bodies()[0]["seed"] == 1
    assert output.markdown_updates()[0] == ("display_data", "**done**")
    assert output.displays[-1]["content"]["data"]["text/plain"] == "demo · 2 tokens · 20.0 tok/s"


def test_default_model_is_configurable(mlx: Kernel, fake_server: FakeServer):
    fake_server.routes[GENERATE] = ndjson_reply([done_event()])
    mlx.run("%config MlxMagics.default_model = 'other'")
    mlx.run("%%mlx\nHi")
    assert fake_server.generate_bodies()[0]["model"] == "other"
    mlx.run("%config MlxMagics.default_model = ''")


def test_a_bad_option_is_one_usage_line(mlx: Kernel, fake_server: FakeServer):
    output = mlx.run("%%mlx --max-tokens lots\nHi")
    assert_no_traceback(output)
    line = one_red_line(output)
    assert "invalid int value: 'lots'" in line and "usage: %%mlx [MODEL]" in line
    assert fake_server.requests == []


def test_an_unknown_model_is_one_red_line(mlx: Kernel, fake_server: FakeServer):
    fake_server.routes[GENERATE] = json_reply(404, {
        "message": "unknown model 'nope'; available models: demo", "reason": "ModelNotFound"})
    output = mlx.run("%%mlx nope\nHi")
    assert_no_traceback(output)
    assert "unknown model 'nope'; available models: demo" in one_red_line(output)
    assert output.displays == []


def test_a_refused_token_is_one_red_line(mlx: Kernel, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLX_JUPYTER_TOKEN", "wrong")
    output = mlx.run("%%mlx\nHi")
    assert_no_traceback(output)
    assert "the Jupyter server refused the token" in one_red_line(output)


def test_an_error_mid_stream_keeps_the_text_and_shows_the_error(mlx: Kernel,
                                                                fake_server: FakeServer):
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": "so far"},
        {"done": True, "request_id": "r", "finish_reason": "error", "error": "worker died"}])
    output = mlx.run("%%mlx\nHi")
    assert_no_traceback(output)
    assert "generation failed: worker died" in one_red_line(output)
    assert output.markdown_updates()[-1][1] == "so far"


def test_interrupting_a_cell_cancels_the_generation(mlx: Kernel, fake_server: FakeServer):
    # A real SIGINT to the main thread, as a kernel interrupt sends, once text flows.
    main_thread = threading.main_thread().ident

    def interrupt_after_some_text(index: int) -> None:
        if index == 20:
            signal.pthread_kill(main_thread, signal.SIGINT)

    fake_server.routes[GENERATE] = ndjson_reply([{"text": "Once upon"}], hang=True,
                                                after_chunk=interrupt_after_some_text)
    output = mlx.run("%%mlx\nTell a long story")
    assert_no_traceback(output)
    assert "KeyboardInterrupt" not in output.stdout + output.stderr
    assert output.displays[-1]["content"]["data"]["text/plain"] == "mlx · cancelled"
    # The interrupt may land before the first event was read: then there is no text yet.
    assert all(text.startswith("Once upon") for _, text in output.markdown_updates()[:-1])
    assert fake_server.disconnected.wait(20), "closing the stream did not reach the server"


def test_no_server_is_one_red_line(kernel: Kernel, monkeypatch: pytest.MonkeyPatch):
    kernel.run("%load_ext mlx_jupyter")
    try:
        output = kernel.run("%%mlx\nHi")  # empty runtime dir, no MLX_JUPYTER_URL
    finally:
        kernel.run("%unload_ext mlx_jupyter")
    assert_no_traceback(output)
    assert "no running Jupyter server was found" in one_red_line(output)


def test_status_command(mlx: Kernel, fake_server: FakeServer):
    gib = 1024**3
    fake_server.routes[STATUS] = json_reply(200, {
        "version": "0.1.0",
        "memory": {"total": 16 * gib, "available": 8 * gib, "budget": 12 * gib,
                   "used_by_models": gib // 2},
        "models": {"loaded_count": 1, "loaded": [
            {"name": "demo", "pid": 42, "status": "loaded", "rss_bytes": gib // 4,
             "budget_bytes": gib // 2,
             "live": {"live_bytes": gib // 4, "prompt_cache_bytes": gib // 8}},
            {"name": "old", "pid": 43, "status": "loaded", "rss_bytes": gib // 4,
             "budget_bytes": gib, "live": None}]},  # a worker yet to report
        "database": {"state": "unavailable",
                     "error": "the database x could not be opened: no; check it"}})
    output = mlx.run("%mlx status")
    assert_no_traceback(output)
    assert f"mlx-jupyter 0.1.0 at {fake_server.url}" in output.stdout
    assert "0.50 GB used by models of a 12.00 GB budget" in output.stdout
    assert "database unavailable: the database x could not be opened: no; check it" \
        in output.stdout
    assert ("demo: loaded (pid 42; estimate 0.50 GB, live 0.25 GB (0.12 GB prompt cache))"
            in output.stdout)
    assert "old: loaded (pid 43; estimate 1.00 GB, live 0.25 GB)" in output.stdout


def test_help_and_unknown_commands(mlx: Kernel):
    help_output = mlx.run("%mlx help")
    assert "%%mlx [MODEL]" in help_output.stdout and "%mlx status" in help_output.stdout
    unknown = mlx.run("%mlx frobnicate")
    assert_no_traceback(unknown)
    assert "unknown command 'frobnicate'" in one_red_line(unknown)


def test_unload_removes_the_magic(kernel: Kernel):
    kernel.run("%load_ext mlx_jupyter")
    kernel.run("%unload_ext mlx_jupyter")
    output = kernel.run("%mlx help")
    assert output.status == "error"
    kernel.run("%load_ext mlx_jupyter")  # and it loads again
    assert "%%mlx [MODEL]" in kernel.run("%mlx help").stdout
    kernel.run("%unload_ext mlx_jupyter")


def test_the_kernel_side_stays_light():
    code = ("import sys, mlx_jupyter.kernel.magics; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('jupyter_server', 'mlx', 'mlx_lm')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# -- structured output, logprobs, reasoning, tools, n (the fake server speaks the contract) ----


def person_model() -> type:
    import pydantic

    class Person(pydantic.BaseModel):
        name: str
        age: int

    return Person


def whole_answer(text: str, **fields: Any) -> dict[str, Any]:
    return {"request_id": "r1", "model": "demo", "text": text, "finish_reason": "stop",
            "usage": {"prompt_tokens": 2, "completion_tokens": 5},
            "timings": {"tokens_per_second": 20.0}, **fields}


def test_a_schema_is_sent_as_json_schema_and_parsed_is_validated(fake_server: FakeServer,
                                                                  client: Any):
    from mlx_jupyter.kernel import StructuredOutputError
    from mlx_jupyter.kernel.structured import closed

    person = person_model()
    fake_server.routes[GENERATE] = json_reply(200, whole_answer(
        '{"name": "Ada", "age": 36}', parsed={"name": "Ada", "age": 36}))
    result = client.generate("Invent a person.", model="demo", schema=person)
    assert fake_server.generate_bodies()[0]["schema"] == closed(person.model_json_schema())
    assert isinstance(result.parsed, person) and result.parsed.age == 36
    fake_server.routes[GENERATE] = json_reply(200, whole_answer('{"name": "Ada"}'))
    with pytest.raises(StructuredOutputError, match="not a valid Person: age: Field required"
                       ) as failed:
        client.generate("Invent a person.", model="demo", schema=person)
    assert failed.value.result.text == '{"name": "Ada"}'
    with pytest.raises(InvalidRequest, match="schema is an instance of Person"):
        client.generate("x", schema=person(name="a", age=1))
    assert len(fake_server.generate_bodies()) == 2  # a bad schema is not sent


def test_the_new_options_pass_through_and_the_answer_exposes_their_fields(
        fake_server: FakeServer, client: Any):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    token = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    fake_server.routes[GENERATE] = json_reply(200, whole_answer(
        "Hi", finish_reason="tool_calls", reasoning="They want weather.", tool_calls=[call],
        logprobs=[token], choices=[
            {"index": 0, "text": "Hi", "reasoning": "They want weather.",
             "tool_calls": [call], "logprobs": [token], "finish_reason": "tool_calls"},
            {"index": 1, "text": "Hello", "finish_reason": "stop"}]))
    tools = [{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
    options = {"tools": tools, "tool_choice": "auto", "parallel_tool_calls": False,
               "logprobs": True, "top_logprobs": 2, "n": 2, "top_k": 40, "min_p": 0.05,
               "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -0.5,
               "logit_bias": {"17": -100}, "chat_template_kwargs": {"enable_thinking": False}}
    result = client.chat([{"role": "user", "content": "Weather in Oslo?"}], model="demo",
                         **options)
    body = fake_server.generate_bodies()[0]
    assert {key: body[key] for key in options} == options
    assert (result.finish_reason, result.reasoning, result.tool_calls, result.logprobs) == \
        ("tool_calls", "They want weather.", [call], [token])
    assert [(c.index, c.text, c.finish_reason, c.tool_calls) for c in result.choices] == \
        [(0, "Hi", "tool_calls", [call]), (1, "Hello", "stop", [])]


def test_a_stream_gathers_reasoning_tool_calls_logprobs_and_choices(fake_server: FakeServer,
                                                                    client: Any):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tokens = [{"token": "A", "logprob": -0.5, "bytes": [65], "top_logprobs": []},
              {"token": "b", "logprob": -1.0, "bytes": [98], "top_logprobs": []}]
    fake_server.routes[GENERATE] = ndjson_reply([
        {"reasoning": "Hmm", "index": 0}, {"reasoning": ", yes.", "index": 0},
        {"text": "A", "index": 0}, {"logprobs": tokens[:1], "index": 0},
        {"text": "X", "index": 1}, {"text": "b", "index": 0},
        {"logprobs": tokens[1:], "index": 0}, {"tool_call": call, "index": 1},
        {**done_event("stop", 2), "choices": [
            {"index": 0, "finish_reason": "stop"},
            {"index": 1, "finish_reason": "tool_calls"}]}])
    with client.stream("Hi", model="demo", n=2, logprobs=True) as events:
        received = list(events)
        assert events.text == "Ab" and events.reasoning == "Hmm, yes."
    # Iteration yields every event, as before: the text pieces read as they always did.
    assert "".join(e.get("text", "") for e in received if e.get("index") == 0) == "Ab"
    result = events.result
    assert (result.text, result.reasoning, result.logprobs, result.tool_calls) == \
        ("Ab", "Hmm, yes.", tokens, [])
    assert [(c.text, c.finish_reason, c.tool_calls, c.logprobs) for c in result.choices] == \
        [("Ab", "stop", [], tokens), ("X", "tool_calls", [call], None)]


def test_a_streamed_schema_answer_is_validated_at_the_end(fake_server: FakeServer,
                                                          client: Any):
    from mlx_jupyter.kernel import StructuredOutputError

    person = person_model()
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": '{"name": "Ada", '}, {"text": '"age": 3}'},
        {**done_event(), "parsed": {"name": "Ada", "age": 3}}])
    with client.stream("Hi", schema=person) as events:
        pieces = [e["text"] for e in events if "text" in e]
    assert "".join(pieces) == '{"name": "Ada", "age": 3}'
    assert events.result.parsed == person(name="Ada", age=3)
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": '{"name": "Ad'},
        {**done_event("length", 4), "parsed": None, "parse_error": "unexpected end"}])
    with client.stream("Hi", schema=person) as events:
        with pytest.raises(StructuredOutputError, match="cut at max_tokens \\(4 tokens\\)"):
            list(events)
    assert events.text == '{"name": "Ad'


def test_a_jobs_result_is_validated_with_its_schema(fake_server: FakeServer, client: Any):
    person = person_model()
    fake_server.routes["mlx/api/requests/j1"] = json_reply(200, {
        "id": "j1", "status": "completed", "model": "demo", "finish_reason": "stop",
        "output_text": '{"name": "Bo", "age": 5}', "parameters": {}})
    assert client.result("j1", schema=person).parsed == person(name="Bo", age=5)
    assert client.result("j1").parsed is None


def define_person(kernel: Kernel) -> None:
    assert kernel.run("import pydantic\n"
                      "class Person(pydantic.BaseModel):\n"
                      "    name: str\n"
                      "    age: int\n").status == "ok"


def test_a_schema_cell_stores_the_instance_and_shows_pretty_json(mlx: Kernel,
                                                                 fake_server: FakeServer):
    define_person(mlx)
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": '{"name":"Ada",'}, {"text": '"age":36}'}, done_event("stop", 9)])
    output = mlx.run("%%mlx --schema Person -o who\nInvent a person.")
    assert_no_traceback(output)
    assert output.stderr == ""
    [body] = fake_server.generate_bodies()
    check = mlx.run("import json\nfrom mlx_jupyter.kernel.structured import closed\n"
                    "print(type(who).__name__, who.name, who.age, "
                    "closed(Person.model_json_schema()) == "
                    f"json.loads({json.dumps(json.dumps(body['schema']))}))")
    assert check.stdout.strip() == "Person Ada 36 True"
    final = output.displays[-2]["content"]["data"]
    assert final["text/plain"] == '{\n  "name": "Ada",\n  "age": 36\n}'
    assert final["text/markdown"].startswith("```json\n{")
    assert output.displays[-2]["content"]["metadata"]["mlx_jupyter"]["schema"] == "Person"


@pytest.mark.parametrize(("cell", "says"), [
    ("%%mlx --schema Nobody\nHi", "--schema Nobody: the notebook has no variable 'Nobody'"),
    ("%%mlx --schema pydantic.Nothing\nHi", "pydantic has no attribute 'Nothing'"),
    ("%%mlx --schema json\nHi", "--schema json is <module 'json'"),
])
def test_a_schema_name_that_is_not_one_is_one_red_line(mlx: Kernel, fake_server: FakeServer,
                                                       cell: str, says: str):
    mlx.run("import json, pydantic")
    output = mlx.run(cell)
    assert_no_traceback(output)
    assert says in one_red_line(output)
    assert fake_server.requests == []


def test_a_schema_answer_cut_short_says_to_raise_max_tokens(mlx: Kernel,
                                                            fake_server: FakeServer):
    define_person(mlx)
    fake_server.routes[GENERATE] = json_reply(200, whole_answer(
        '{"name": "A', finish_reason="length", parsed=None, parse_error="unexpected end"))
    output = mlx.run("%%mlx --schema Person --no-stream --max-tokens 5 -o cut\nHi")
    assert_no_traceback(output)
    assert ("the answer was cut at --max-tokens (5 tokens) before its JSON was complete; "
            "raise --max-tokens") in one_red_line(output)
    assert output.displays[-1]["content"]["data"]["text/plain"] == '{"name": "A'
    assert mlx.run("print('cut' in dir())").stdout.strip() == "False"


def test_a_logprobs_cell_shows_one_shaded_span_per_token(mlx: Kernel,
                                                         fake_server: FakeServer):
    tokens = [{"token": "<b>", "logprob": -0.01, "bytes": [], "top_logprobs": [
        {"token": "<b>", "logprob": -0.01, "bytes": []}]},
        {"token": "ok", "logprob": -2.0, "bytes": [], "top_logprobs": []}]
    fake_server.routes[GENERATE] = ndjson_reply([
        {"text": "<b>"}, {"logprobs": tokens[:1]}, {"text": "ok"}, {"logprobs": tokens[1:]},
        done_event("stop", 2)])
    output = mlx.run("%%mlx --logprobs --top-logprobs 3\nHi")
    assert_no_traceback(output)
    body = fake_server.generate_bodies()[0]
    assert (body["logprobs"], body["top_logprobs"]) == (True, 3)
    final = output.displays[-2]["content"]["data"]
    assert final["text/plain"] == "<b>ok"
    assert final["text/html"].count("<span class='mlx-token'") == 2
    assert "&lt;b&gt;" in final["text/html"] and "<b>" not in final["text/html"]


def test_reasoning_is_shown_folded_above_the_answer(mlx: Kernel, fake_server: FakeServer):
    fake_server.routes[GENERATE] = ndjson_reply([
        {"reasoning": "The user "}, {"reasoning": "greets."}, {"text": "Hello!"},
        done_event("stop", 2)])
    output = mlx.run("%%mlx\nHi")
    assert_no_traceback(output)
    first = output.displays[0]
    assert first["content"]["data"]["text/html"].startswith("<details open>")
    reasoning_id = first["content"]["transient"]["display_id"]
    ours = [d for d in output.displays if d["content"]["transient"].get("display_id")
            == reasoning_id]
    assert ours[-1]["content"]["data"]["text/html"] == (
        "<details><summary>Reasoning</summary><div style='white-space:pre-wrap;"
        "opacity:0.75'>The user greets.</div></details>")
    assert output.markdown_updates()[-2][1] == "Hello!"
