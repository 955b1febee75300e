"""A byte-for-byte TCP relay in front of a live server that keeps the HTTP requests its
clients send: a test can then show the exact body a client library (litellm, LangChain,
jupyter-ai) sent, whatever HTTP stack that library uses. Answers pass through untouched,
streams included, and are kept raw beside the requests for a failure's message.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class RecordedRequest:
    method: str
    target: str  # the path and query, as sent
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class _Parser:
    """Cuts the client's side of one connection into requests (Content-Length or chunked
    bodies, keep-alive)."""
    buffer: bytes = b""
    requests: list[RecordedRequest] = field(default_factory=list)

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while (request := self._next()) is not None:
            self.requests.append(request)

    def _next(self) -> RecordedRequest | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = self.buffer[end + 4:]
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, position = b"", 0
            while True:
                line_end = rest.find(b"\r\n", position)
                if line_end < 0:
                    return None
                size = int(rest[position:line_end].split(b";")[0], 16)
                if len(rest) < line_end + 2 + size + 2:
                    return None
                body += rest[line_end + 2:line_end + 2 + size]
                position = line_end + 2 + size + 2
                if size == 0:
                    break
            consumed = position
        else:
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                return None
            body, consumed = rest[:length], length
        self.buffer = rest[consumed:]
        return RecordedRequest(method, target, headers, body)


class RecordingProxy:
    """Listens on a free loopback port and relays every connection to `target_url`'s host and
    port. `url` is `target_url` with the proxy's port: the same paths work through it."""

    def __init__(self, target_url: str):
        parts = urlsplit(target_url)
        self._upstream = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.url = parts._replace(netloc=f"127.0.0.1:{port}").geturl()
        self._parsers: list[_Parser] = []
        self._answers: list[bytearray] = []  # each connection's bytes from the server, raw
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every complete request so far, in the order their connections opened."""
        with self._lock:
            return [request for parser in self._parsers for request in parser.requests]

    def posted(self, path_end: str) -> list[RecordedRequest]:
        """The POSTs whose path ends with `path_end` (e.g. "chat/completions")."""
        return [r for r in self.requests
                if r.method == "POST" and r.target.split("?")[0].endswith(path_end)]

    def clear(self) -> None:
        with self._lock:
            for parser in self._parsers:
                parser.requests.clear()
            for answer in self._answers:
                answer.clear()

    def transcript(self, limit: int = 6000) -> str:
        """What went through since the last clear(), connection by connection: each request
        (method, path, body) and the server's bytes as they came (status line, headers,
        chunked framing and all), each cut to `limit` characters."""
        with self._lock:
            pairs = [(list(p.requests), bytes(a)) for p, a in zip(self._parsers, self._answers)]
        parts = []
        for requests, answer in pairs:
            if not requests and not answer:
                continue
            for request in requests:
                parts.append(f">>> {request.method} {request.target}\n"
                             f"{request.body.decode(errors='replace')[:limit]}")
            if answer:
                parts.append(f"<<< {answer.decode(errors='replace')[:limit]}")
        return "\n".join(parts)

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            parser, answer = _Parser(), bytearray()
            with self._lock:
                self._parsers.append(parser)
                self._answers.append(answer)
            threading.Thread(target=self._pump, args=(client, upstream, parser.feed),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, answer.extend),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, keep) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    keep(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
