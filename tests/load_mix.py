"""A mixed load on a live server, and what it got: clients in threads, each sending its share of
native streams and whole answers, OpenAI chats (the official SDK), cancellations of running and
of queued requests, background jobs and polls of the status, queue and history; then the
history's account of every generation. Shared by tests/test_load.py and
benchmarks/bench_load.py, which run the same mix at different sizes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai

from live_server import LiveServer

MODEL = "demo"
LOCKED = "database is locked"  # SQLite's error when a writer gives up waiting for the lock
FINAL = ("completed", "cancelled", "failed")
# Kinds of request and how often each comes, relative to the others.
MIX = {"stream": 4, "whole": 3, "chat": 2, "chat_stream": 2, "cancel_running": 2,
       "cancel_queued": 2, "background": 3, "status": 1, "queue": 1, "history": 1, "request": 1}
GENERATIONS = ("stream", "whole", "chat", "chat_stream", "cancel_running", "cancel_queued",
               "background")
# What each kind may answer; anything else is counted as unexpected. A generation may meet a
# full queue (429); a cancellation may find its request ended meanwhile (409).
EXPECTED = {kind: {200, 429} for kind in ("stream", "whole", "chat", "chat_stream")}
EXPECTED |= {"cancel_running": {200, 409, 429}, "cancel_queued": {200, 202, 409, 429},
             "background": {202, 429}, "status": {200}, "queue": {200}, "history": {200},
             "request": {200}}
WORDS = ("river stone cloud notebook kernel garden window lantern harbour meadow copper "
         "violet signal thunder paper orbit valley ember quartz willow sea weather").split()
TRANSPORT_ERROR = 0  # the code of an answer that never came (a connection error)


@dataclass
class Answer:
    """One request of the mix: every HTTP status it got (a cancellation has two: its
    generation's and the DELETE's), how long it took, and what it said."""

    kind: str
    codes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    request_id: str | None = None
    cancel_was: str | None = None  # the DELETE's `was`: queued, active, finished
    text: str = ""  # every body it got, joined: searched for LOCKED

    @property
    def unexpected(self) -> list[int]:
        return [code for code in self.codes if code not in EXPECTED[self.kind]]


@dataclass
class LoadReport:
    answers: list[Answer]
    seconds: float
    history: dict[str, dict]  # request id -> its history row, once all were final (or not)
    settled_seconds: float = 0.0  # from the start until the history was final (or given up)

    @property
    def server_errors(self) -> list[Answer]:
        return [a for a in self.answers if any(code >= 500 for code in a.codes)]

    @property
    def locked(self) -> list[Answer]:
        return [a for a in self.answers if LOCKED in a.text.lower()]

    @property
    def generation_ids(self) -> set[str]:
        return {a.request_id for a in self.answers if a.request_id}

    def not_final(self) -> dict[str, str]:
        """Generation ids whose history row is missing or not in a final state."""
        return {rid: self.history.get(rid, {}).get("status", "missing")
                for rid in sorted(self.generation_ids)
                if self.history.get(rid, {}).get("status") not in FINAL}

    def failed_without_reason(self) -> list[str]:
        return [rid for rid in self.generation_ids
                if self.history.get(rid, {}).get("status") == "failed"
                and not self.history[rid].get("error")]

    def codes(self) -> Counter[int]:
        return Counter(code for a in self.answers for code in a.codes)

    def statuses(self) -> Counter[str]:
        return Counter(self.history.get(rid, {}).get("status", "missing")
                       for rid in self.generation_ids)


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


class LoadClient:
    """One client: its own HTTP connection, its own OpenAI SDK client (no retries, so that a
    5xx is seen rather than retried away), its own seeded choice of kinds."""

    def __init__(self, server: LiveServer, number: int, seed: int, max_tokens: int):
        self.rng = random.Random(seed * 1000 + number)
        self.max_tokens = max_tokens
        self.notebook = f"load-{number}"
        self.http = httpx.Client(base_url=server.url, timeout=120,
                                 headers={"Authorization": f"token {server.token}"})
        self.openai = openai.OpenAI(base_url=server.url + "mlx/v1", api_key=server.token,
                                    max_retries=0, timeout=120)
        self.last_id: str | None = None

    def close(self) -> None:
        self.http.close()
        self.openai.close()

    def run(self, count: int) -> list[Answer]:
        kinds = self.rng.choices(list(MIX), weights=list(MIX.values()), k=count)
        return [self.one(kind) for kind in kinds]

    def one(self, kind: str) -> Answer:
        answer = Answer(kind)
        started = time.perf_counter()
        try:
            getattr(self, kind)(answer)
        except (httpx.TransportError, openai.APIConnectionError) as exc:
            answer.codes.append(TRANSPORT_ERROR)
            answer.text += f"{type(exc).__name__}: {exc}"
        answer.seconds = time.perf_counter() - started
        if answer.request_id:
            self.last_id = answer.request_id
        return answer

    def body(self, **extra: object) -> dict:
        return {"model": MODEL, "prompt": words(self.rng, 2, 10), "max_tokens": self.max_tokens,
                "temperature": 0.8, "notebook": self.notebook, **extra}

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": words(self.rng, 2, 10)}]

    # -- the kinds -----------------------------------------------------------------------------

    def stream(self, answer: Answer) -> None:
        with self.http.stream("POST", "mlx/api/generate", json=self.body(stream=True)) as got:
            self._took(answer, got)
            answer.text += "".join(got.iter_lines())

    def whole(self, answer: Answer) -> None:
        got = self.http.post("mlx/api/generate", json=self.body())
        self._took(answer, got)
        answer.text += got.text

    def chat(self, answer: Answer) -> None:
        try:
            raw = self.openai.chat.completions.with_raw_response.create(
                model=MODEL, messages=self.messages(), max_tokens=self.max_tokens,
                temperature=0.8, user=self.notebook)
        except openai.APIStatusError as exc:
            self._took(answer, exc.response)
            answer.text += exc.response.text
            return
        self._took(answer, raw.http_response)
        answer.text += raw.parse().model_dump_json()

    def chat_stream(self, answer: Answer) -> None:
        try:
            chunks = self.openai.chat.completions.create(
                model=MODEL, messages=self.messages(), max_tokens=self.max_tokens,
                temperature=0.8, user=self.notebook, stream=True)
        except openai.APIStatusError as exc:
            self._took(answer, exc.response)
            answer.text += exc.response.text
            return
        with chunks:
            self._took(answer, chunks.response)
            answer.text += "".join(chunk.model_dump_json() for chunk in chunks)

    def cancel_running(self, answer: Answer) -> None:
        """A stream cancelled through the API once its first text arrived (it is running)."""
        body = self.body(stream=True, max_tokens=max(64, self.max_tokens))
        with self.http.stream("POST", "mlx/api/generate", json=body) as got:
            self._took(answer, got)
            lines = got.iter_lines()
            answer.text += next(lines, "")
            if got.status_code == 200 and answer.request_id:
                self._cancel(answer)
            answer.text += "".join(lines)

    def cancel_queued(self, answer: Answer) -> None:
        """A background job of the lowest priority, cancelled at once: it waits behind
        everything else, so it is usually still queued."""
        got = self.http.post("mlx/api/generate", json=self.body(background=True,
                                                                priority=-1000))
        self._took(answer, got)
        answer.text += got.text
        if got.status_code == 202:
            self._cancel(answer)

    def background(self, answer: Answer) -> None:
        got = self.http.post("mlx/api/generate", json=self.body(background=True))
        self._took(answer, got)
        answer.text += got.text

    def status(self, answer: Answer) -> None:
        self._poll(answer, "mlx/api/status")

    def queue(self, answer: Answer) -> None:
        self._poll(answer, "mlx/api/queue")

    def history(self, answer: Answer) -> None:
        self._poll(answer, "mlx/api/requests", params={"limit": 20})

    def request(self, answer: Answer) -> None:
        """This client's latest request: a read sees every write queued before it."""
        if self.last_id is None:
            return self.status(answer)
        self._poll(answer, f"mlx/api/requests/{self.last_id}")

    # -- helpers -------------------------------------------------------------------------------

    def _took(self, answer: Answer, response: httpx.Response) -> None:
        answer.codes.append(response.status_code)
        if response.status_code in (200, 202):
            answer.request_id = response.headers.get("X-Request-Id") or _accepted_id(response)

    def _cancel(self, answer: Answer) -> None:
        got = self.http.delete(f"mlx/api/requests/{answer.request_id}")
        answer.codes.append(got.status_code)
        answer.text += got.text
        answer.cancel_was = got.json()["was"] if got.status_code == 200 else "ended"

    def _poll(self, answer: Answer, path: str, params: dict | None = None) -> None:
        got = self.http.get(path, params=params)
        answer.codes.append(got.status_code)
        answer.text += got.text


def _accepted_id(response: httpx.Response) -> str | None:
    """A background job's id, from its 202 answer (which has no X-Request-Id)."""
    if response.status_code != 202:
        return None
    response.read()
    return response.json().get("request_id")


def run_load(server: LiveServer, clients: int, per_client: int, *, seed: int = 0,
             max_tokens: int = 16, settle_seconds: float = 300) -> LoadReport:
    """Runs `clients` threads of `per_client` requests each, then waits up to `settle_seconds`
    for every generation (background jobs included) to reach a final state in the history."""
    results: list[list[Answer]] = [[] for _ in range(clients)]
    load_clients = [LoadClient(server, n, seed, max_tokens) for n in range(clients)]

    def client_thread(n: int) -> None:
        results[n] = load_clients[n].run(per_client)

    threads = [threading.Thread(target=client_thread, args=(n,), name=f"load-{n}")
               for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for client in load_clients:
        client.close()
    answers = [answer for per in results for answer in per]
    report = LoadReport(answers, seconds, {})
    deadline = time.monotonic() + settle_seconds
    while True:
        report.history = history_rows(server)
        report.settled_seconds = time.perf_counter() - started
        if not report.not_final() or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def history_rows(server: LiveServer) -> dict[str, dict]:
    """Every row of the history, by request id (pages of 500)."""
    rows: dict[str, dict] = {}
    offset = 0
    while True:
        page = server.get("mlx/api/requests", params={"limit": 500, "offset": offset})
        page.raise_for_status()
        found = page.json()
        rows.update((row["id"], row) for row in found["requests"])
        offset += len(found["requests"])
        if not found["requests"] or offset >= found["total"]:
            return rows
