"""Soak: thousands of mixed requests against a live server, and what its processes hold.

A real Jupyter server with the extension serves a random-weight Llama (4 layers, 256 wide,
~16 MB of float32 weights, the demo's tokenizer) to 8 concurrent clients: short prompts, long
prompts (~150 tokens), and chat conversations whose every turn resends the conversation so far
(prompt-cache hits), half of them streamed. Every `--interval` requests it prints the server's
and the worker's resident memory, open descriptors and threads, beside the prompt cache's own
count of its bytes and MLX's active and cache memory (the worker's report).

The same load runs twice in one go: with the prompt cache (the default) and, as the baseline,
without it (`prompt_cache_bytes=0`): the memory a worker needs for the model and the batch
alone. The bound to hold: the worker's RSS after the run, less its RSS after the warm-up, within
prompt_cache_bytes + the KV reservation + worker_base_memory (what the server counts for it
beyond its weights).

Faults run in the mix, one after every `--fault-every` requests (after the warm-up), in turn:
a stream left unread (cancelled as slow_client past stream_buffer_bytes), a stream cancelled
through the API after its first text, a client that disconnects mid-stream, hostile bodies
(malformed JSON, NaN), a body past max_body_bytes (413), and the model's worker killed
(SIGKILL; the requests it was running fail, the next request gets a fresh worker). The
server's resident memory, descriptors and threads must not grow over them; the faults injected
are counted beside the server's own count of them (`mlx_jupyter_faults_total`). After a kill
the worker figures are the fresh worker's, so the worker's bound is the one of a run without
faults: `--fault-every 0` (saved as results/soak.md; with faults, results/soak_faults.md).

    .venv/bin/python benchmarks/bench_soak.py [--requests 2000] [--interval 250] [--fault-every 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import save, table  # noqa: E402
from live_server import start_server, stop_server  # noqa: E402
from model_factory import make_model  # noqa: E402

MIB = 1024**2
MODEL = "soak"
WARM_UP = 20
CONCURRENCY = 8
WORDS = ("river stone cloud notebook kernel garden window lantern harbour meadow copper violet "
         "signal thunder paper orbit valley ember quartz willow").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Load:
    """The mixed requests, made up in order from one seed: the same in both runs."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.conversations: list[list[dict[str, str]]] = []

    def next(self, i: int) -> dict:
        rng = self.rng
        body = {"model": MODEL, "max_tokens": 12, "temperature": 0.8, "seed": i,
                "stream": i % 2 == 0}
        kind = rng.random()
        if kind < 0.4:
            body["prompt"] = words(rng, rng.randint(3, 12))
        elif kind < 0.6:
            body["prompt"] = words(rng, 120)
        else:  # a chat turn: a conversation so far, and a new question
            if not self.conversations or rng.random() < 0.2 or len(self.conversations[-1]) > 8:
                self.conversations.append([{"role": "system", "content": words(rng, 30)}])
            conversation = rng.choice(self.conversations[-4:])
            conversation.append({"role": "user", "content": words(rng, rng.randint(4, 10))})
            body["messages"] = list(conversation)
            # The answer is not known yet; a fixed reply keeps the next turn's prefix cached.
            conversation.append({"role": "assistant", "content": words(rng, 6)})
        return body


# Each fault the soak injects, and the kind the server counts it as in faults_total (None: no
# fault of the server's, only a request that ends early).
FAULTS = {"slow_reader": "slow_client", "cancel_mid_stream": None,
          "disconnect_mid_stream": None, "malformed_json": "bad_body", "nan": "bad_body",
          "oversized_body": "body_too_large", "kill_worker": "worker_exited"}
# Smaller than the defaults, so that the faults cost little: a body past 1 MiB is oversized,
# and a stream may leave 4 KiB unread.
MAX_BODY_BYTES = MIB
STREAM_BUFFER_BYTES = 4096
# A stream left unread passes its buffer and the kernel's (TCP_NOTSENT_LOWAT, 16 KiB) after
# about 1,500 tokens: greedy, this prompt runs to max_tokens on the soak's model (sampled,
# an answer may end sooner), within its 4,096-position context.
SLOW_READER_BODY = {"prompt": "an endless story", "temperature": 0, "max_tokens": 3000}
SLOW_READER_PATIENCE = 180  # seconds a stream left unread may wait for the server to end it
FINAL = ("completed", "cancelled", "failed")
JSON = {"Content-Type": "application/json"}


async def send(client: httpx.AsyncClient, body: dict, answers: Counter[str]) -> None:
    """One request of the load; its answer is counted, not raised: the requests a killed
    worker was running fail (a 503, or a stream's last event an error)."""
    if body["stream"]:
        async with client.stream("POST", "mlx/api/generate", json=body) as answer:
            last = ""
            async for line in answer.aiter_lines():
                last = line or last
        ended_in_error = answer.status_code == 200 and '"finish_reason":"error"' in last
        answers["200, ended in an error" if ended_in_error else str(answer.status_code)] += 1
    else:
        answers[str((await client.post("mlx/api/generate", json=body)).status_code)] += 1


class Faults:
    """The faults, each a coroutine that returns what came of it (a status code, or what
    happened)."""

    def __init__(self, server, client: httpx.AsyncClient, seed: int):
        self.server, self.client = server, client
        self.rng = random.Random(seed)
        # Held by a stream left unread until the server ends it, and by a kill, which would
        # end that stream first: each fault is seen for itself.
        self.unread_or_kill = asyncio.Lock()

    def body(self, **extra: object) -> dict:
        return {"model": MODEL, "prompt": words(self.rng, 8), "max_tokens": 64,
                "temperature": 0.8, **extra}

    async def kill_worker(self) -> str:
        """SIGKILL to the model's worker once it is loaded (one killed while it loads is a
        load that failed, not a worker that died under the server); done once the server has
        noticed, so that the next fault does not meet the same death."""
        async with self.unread_or_kill:
            model = await self.model_when(lambda model: model["status"] == "loaded")
            if model is None:
                return "no loaded worker to kill"
            try:
                os.kill(model["pid"], signal.SIGKILL)
            except ProcessLookupError:
                return "no loaded worker to kill (it had just exited)"
            noticed = await self.model_when(lambda now: now["pid"] != model["pid"])
            return "killed" if noticed else "killed, but the server did not notice within 60 s"

    async def model_when(self, condition: Callable[[dict], bool],
                         seconds: float = 60) -> dict | None:
        """The model's description once it meets condition; None if it did not in time."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            model = (await self.client.get(f"mlx/api/models/{MODEL}")).json()
            if condition(model):
                return model
            await asyncio.sleep(0.1)
        return None

    async def cancel_mid_stream(self) -> str:
        async with self.client.stream("POST", "mlx/api/generate",
                                      json=self.body(stream=True)) as answer:
            if answer.status_code != 200:
                return str(answer.status_code)
            lines = answer.aiter_lines()
            await anext(lines, None)  # its first text: it is running
            cancel = await self.client.delete(
                f"mlx/api/requests/{answer.headers['X-Request-Id']}")
            async for _ in lines:
                pass
        return f"DELETE {cancel.status_code}"

    async def disconnect_mid_stream(self) -> str:
        async with self.client.stream("POST", "mlx/api/generate",
                                      json=self.body(stream=True)) as answer:
            if answer.status_code != 200:
                return str(answer.status_code)
            await anext(answer.aiter_lines(), None)
        return "disconnected"  # leaving the block closed the connection mid-stream

    async def malformed_json(self) -> str:
        return await self.post_raw(b'{"model": "' + MODEL.encode() + b'", "prompt": ')

    async def nan(self) -> str:
        return await self.post_raw(json.dumps(self.body()).encode()[:-1]
                                   + b', "temperature": NaN}')

    async def oversized_body(self) -> str:
        """A body declared past max_body_bytes, of which a part is sent before the answer is
        read: the server refuses it without waiting for the rest."""
        body = json.dumps(self.body(prompt="x" * MAX_BODY_BYTES)).encode()
        reader, writer = await self.connect()
        try:
            writer.write(self.head(len(body)) + body[:64 * 1024])
            status = await asyncio.wait_for(reader.readline(), 60)
        except (OSError, asyncio.TimeoutError) as exc:
            return f"no answer ({type(exc).__name__})"
        finally:
            writer.close()
        return status.decode(errors="replace").split(" ")[1] if status else "closed unanswered"

    async def post_raw(self, content: bytes) -> str:
        answer = await self.client.post("mlx/api/generate", content=content, headers=JSON)
        return str(answer.status_code)

    async def slow_reader(self) -> str:
        """A stream whose client reads its headers and then nothing: a socket with a small
        receive buffer, so that what the server writes soon waits on the server's side."""
        body = json.dumps(self.body(stream=True, **SLOW_READER_BODY)).encode()
        async with self.unread_or_kill:
            reader, writer = await self.connect(receive_buffer=1024)
            writer.write(self.head(len(body)) + body)
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode(errors="replace")
                found = re.search(r"(?im)^X-Request-Id: *(\S+)", head)
                if not found:
                    return head.split("\r\n", 1)[0]
                return await self.wait_until_ended(found.group(1), SLOW_READER_PATIENCE)
            finally:
                writer.close()

    async def connect(self, receive_buffer: int | None = None) -> tuple[
            asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection of our own to the server (asyncio reads at most 2 KiB ahead)."""
        sock = socket.socket()
        if receive_buffer:  # before connecting: it sets the window the server sees
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        address = httpx.URL(self.server.url)
        await asyncio.get_running_loop().sock_connect(sock, (address.host, address.port))
        return await asyncio.open_connection(sock=sock, limit=1024)

    def head(self, content_length: int) -> bytes:
        """A POST to mlx/api/generate, up to its body."""
        address = httpx.URL(self.server.url)
        return (f"POST /mlx/api/generate HTTP/1.1\r\nHost: {address.host}:{address.port}\r\n"
                f"Authorization: token {self.server.token}\r\n"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {content_length}\r\n\r\n").encode()

    async def wait_until_ended(self, request_id: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            row = (await self.client.get(f"mlx/api/requests/{request_id}")).json()
            if row["status"] in FINAL:
                # The reason's first clause: the rest names figures that differ every time.
                reason = re.split("[:;]", row["error"] or row["finish_reason"])[0]
                return f"{row['status']}: {reason}"
            await asyncio.sleep(0.5)
        return f"not ended by the server within {seconds} s (closed by the client)"


def fault_plan(requests: int, every: int) -> list[tuple[str, int | str]]:
    """The soak's order of work: its requests, and after every `every` of them (once warm)
    the next fault in turn."""
    plan: list[tuple[str, int | str]] = []
    kinds = list(FAULTS)
    for i in range(WARM_UP + requests):
        plan.append(("request", i))
        after_warm_up = i + 1 - WARM_UP
        if every and after_warm_up > 0 and after_warm_up % every == 0:
            plan.append(("fault", kinds[(after_warm_up // every - 1) % len(kinds)]))
    return plan


def proc_status_bytes(pid: int, field: str) -> int:
    """A size of Linux's /proc/PID/status: VmHWM (the highest resident memory the process has
    had), RssAnon (its resident heap and stacks, without mapped files); 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def counter(metrics: str, name: str, label: str) -> dict[str, float]:
    """A labelled counter of the metrics text, by its label's value."""
    return {value: float(count) for value, count in re.findall(
        rf'mlx_jupyter_{name}\{{{label}="([^"]+)"[^}}]*\}} (\S+)', metrics)}


def worker_figures(model: dict) -> dict:
    """The worker's process figures; None while it has none (killed, not yet replaced)."""
    try:
        worker = psutil.Process(model["pid"]) if model.get("pid") else None
        if worker is not None:
            return {"worker_rss": worker.memory_info().rss,
                    "worker_peak": proc_status_bytes(worker.pid, "VmHWM"),
                    "worker_fds": worker.num_fds(), "worker_threads": worker.num_threads()}
    except psutil.NoSuchProcess:
        pass
    return dict.fromkeys(("worker_rss", "worker_peak", "worker_fds", "worker_threads"))


def sample(server, done: int) -> dict:
    headers = {"Authorization": f"token {server.token}"}
    model = httpx.get(f"{server.url}mlx/api/models/{MODEL}", headers=headers, timeout=30).json()
    metrics = httpx.get(f"{server.url}mlx/metrics", headers=headers, timeout=30).text
    database = httpx.get(f"{server.url}mlx/api/database", headers=headers, timeout=30).json()
    server_process = psutil.Process(server.process.pid)
    live = model["live"] or {}
    return {"requests": done,
            "server_rss": server_process.memory_info().rss,
            # SQLite maps its file (mmap_size): those pages count in RSS, not in the heap.
            "server_heap": proc_status_bytes(server_process.pid, "RssAnon"),
            "database": (database["size_bytes"] or 0) + (database["wal_size_bytes"] or 0),
            "server_fds": server_process.num_fds(), "server_threads": server_process.num_threads(),
            **worker_figures(model),
            "prompt_cache": live.get("prompt_cache_bytes", 0),
            "entries": live.get("prompt_cache_entries", 0),
            "mlx_active": live.get("mlx_active_bytes", 0),
            "mlx_cache": live.get("mlx_cache_bytes", 0),
            "trims": counter(metrics, "prompt_cache_trims_total", "model").get(MODEL, 0.0),
            "loads": counter(metrics, "model_loads_total", "model").get(MODEL, 0.0),
            "faults_total": counter(metrics, "faults_total", "kind"),
            "footprint": model["footprint"]}


class Soak:
    """One run's load, its faults, and what came back."""

    def __init__(self, server, requests: int, interval: int, seed: int, fault_every: int):
        self.server, self.interval = server, interval
        load = Load(seed)
        self.plan = fault_plan(requests, fault_every)
        self.bodies = [load.next(i) for i in range(WARM_UP + requests)]
        self.seed = seed
        self.samples: list[dict] = []
        self.answers: Counter[str] = Counter()  # the load's requests, by what they got
        self.faults: Counter[tuple[str, str]] = Counter()  # (fault, what came of it)
        self.tracebacks = 0  # in the server's log

    async def run(self) -> None:
        headers = {"Authorization": f"token {self.server.token}"}
        async with httpx.AsyncClient(base_url=self.server.url, headers=headers,
                                     timeout=300) as client:
            faults = Faults(self.server, client, self.seed)
            # The warm-up, then its sample, before any fault: the baseline of every figure.
            await self.phase(client, faults, self.plan[:WARM_UP], lambda done: None)
            self.samples.append(await asyncio.to_thread(sample, self.server, 0))
            checkpoints: asyncio.Queue[int] = asyncio.Queue()

            def checkpoint(done: int) -> None:
                if done % self.interval == 0:
                    checkpoints.put_nowait(done)

            async def sampler() -> None:
                # Taken while the next requests run, off the event loop of the clients.
                while True:
                    mark = await checkpoints.get()
                    self.samples.append(await asyncio.to_thread(sample, self.server, mark))

            sampling = asyncio.create_task(sampler())
            done = await self.phase(client, faults, self.plan[WARM_UP:], checkpoint)
            while not checkpoints.empty():
                await asyncio.sleep(0.1)
            # One request after the load: a worker killed last is replaced, and reports.
            await client.post("mlx/api/generate", json={"model": MODEL, "prompt": "the end",
                                                        "max_tokens": 1})
            await asyncio.sleep(0.5)  # the worker's report after the last request
            sampling.cancel()
            self.samples.append(await asyncio.to_thread(sample, self.server, done))

    async def phase(self, client: httpx.AsyncClient, faults: Faults,
                    plan: list[tuple[str, int | str]], checkpoint: Callable[[int], None]) -> int:
        """Runs a part of the plan from CONCURRENCY clients; calls checkpoint with the count
        of its requests done after each one. Returns that count."""
        work: asyncio.Queue[tuple[str, int | str]] = asyncio.Queue()
        for item in plan:
            work.put_nowait(item)
        done = 0

        async def client_loop() -> None:
            nonlocal done
            while not work.empty():
                what, item = work.get_nowait()
                if what == "fault":
                    self.faults[item, await getattr(faults, item)()] += 1
                    continue
                await send(client, self.bodies[item], self.answers)
                done += 1
                checkpoint(done)

        await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))
        return done


def run(label: str, model_dir: Path, extra: tuple[str, ...], requests: int, interval: int,
        seed: int, fault_every: int) -> tuple[Soak, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_server(root, root / "server.log", args=(
            f"--MlxApp.model_dirs={model_dir}", "--MlxApp.idle_unload_seconds=0",
            f"--MlxApp.max_body_bytes={MAX_BODY_BYTES}",
            f"--MlxApp.stream_buffer_bytes={STREAM_BUFFER_BYTES}", *extra))
        soak = Soak(server, requests, interval, seed, fault_every)
        try:
            started = time.perf_counter()
            asyncio.run(soak.run())
            seconds = time.perf_counter() - started
        finally:
            stop_server(server)
            soak.tracebacks = (root / "server.log").read_text(errors="replace").count("Traceback")
    print(f"{label}: {requests} requests, {sum(soak.faults.values())} faults in {seconds:.0f} s",
          flush=True)
    return soak, seconds


def mib(value: int | None) -> float | str:
    return "—" if value is None else value / MIB


def rows(label: str, samples: list[dict]) -> list[list[object]]:
    out = []
    # The last sample of a count wins: the one taken once the load had ended.
    for s in {s["requests"]: s for s in samples}.values():
        out.append([label, s["requests"], mib(s["server_rss"]), mib(s["server_heap"]),
                    mib(s["database"]), mib(s["worker_rss"]),
                    mib(s["worker_peak"]), mib(s["footprint"]["total_bytes"]),
                    mib(s["prompt_cache"]), s["entries"], mib(s["mlx_active"]),
                    mib(s["mlx_cache"]), s["server_fds"], s["server_threads"],
                    s["worker_fds"] or "—", s["worker_threads"] or "—", int(s["trims"]),
                    int(s["loads"]), int(sum(s["faults_total"].values()))])
    return out


def over_run(soak: Soak) -> dict[str, float]:
    """The server's faults_total by kind over the run: at the end, less after the warm-up."""
    warm, last = soak.samples[0]["faults_total"], soak.samples[-1]["faults_total"]
    return {kind: n - warm.get(kind, 0) for kind, n in last.items() if n - warm.get(kind, 0)}


def fault_rows(label: str, soak: Soak) -> list[list[object]]:
    """Per fault: how often it was injected, what came of it, and the server's count of its
    kind over the run."""
    counts = over_run(soak)
    out = []
    for fault, kind in FAULTS.items():
        outcomes = {what: n for (name, what), n in soak.faults.items() if name == fault}
        counted = "—" if kind is None else f"{kind}: {counts.get(kind, 0):g}"
        what = "; ".join(f"{what} × {n}" for what, n in sorted(outcomes.items())) or "—"
        out.append([label, fault, sum(outcomes.values()), what, counted])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--interval", type=int, default=250)
    parser.add_argument("--fault-every", type=int, default=25,
                        help="one fault after every N requests; 0: none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        make_model(model_dir / MODEL, hidden=256, layers=4)
        runs = {"prompt cache on": (), "baseline: cache off": ("--MlxApp.prompt_cache_bytes=0",)}
        results = {label: run(label, model_dir, extra, args.requests, args.interval, args.seed,
                              args.fault_every)
                   for label, extra in runs.items()}

    headers = ["run", "requests", "server RSS MiB", "server heap MiB", "database MiB",
               "worker RSS MiB", "worker peak MiB",
               "estimate MiB", "prompt cache MiB",
               "entries", "MLX active MiB", "MLX cache MiB", "server fds", "server threads",
               "worker fds", "worker threads", "trims", "worker starts", "faults_total"]
    body_rows = [row for label, (soak, _) in results.items() for row in rows(label, soak.samples)]
    summary = []
    for label, (soak, seconds) in results.items():
        warm, last = soak.samples[0], soak.samples[-1]
        footprint = last["footprint"]
        bound = (footprint["prompt_cache_bytes"] + footprint["kv_reserve_bytes"]
                 + footprint["worker_bytes"])
        grown = last["worker_rss"] - warm["worker_rss"]
        summary.append([label, args.requests, sum(soak.faults.values()), seconds,
                        args.requests / seconds, warm["worker_rss"] / MIB,
                        last["worker_rss"] / MIB, grown / MIB, bound / MIB,
                        "yes" if grown <= bound else "NO",
                        (last["server_rss"] - warm["server_rss"]) / MIB,
                        (last["server_heap"] - warm["server_heap"]) / MIB,
                        f"{warm['server_fds']} → {last['server_fds']}",
                        f"{warm['server_threads']} → {last['server_threads']}",
                        ", ".join(f"{what}: {n}" for what, n in sorted(soak.answers.items()))])
    faults = [row for label, (soak, _) in results.items() for row in fault_rows(label, soak)]
    counted = [[label, ", ".join(f"{kind}: {n:g}" for kind, n in sorted(over_run(soak).items())),
                soak.tracebacks] for label, (soak, _) in results.items()]
    body = (table(headers, body_rows) + "\n\n" + table(
        ["run", "requests", "faults", "seconds", "requests/s", "worker RSS after warm-up MiB",
         "worker RSS at end MiB", "growth MiB", "bound MiB", "within", "server growth MiB",
         "server heap growth MiB",
         "server fds", "server threads", "the load's answers"],
        summary) + "\n\n" + table(
        ["run", "fault", "injected", "what came of it", "faults_total over the run"], faults)
        + "\n\n" + table(["run", "faults_total over the run, every kind",
                           "tracebacks in the server's log"], counted))
    # Without faults the worker's figures are one process's throughout: its memory bound.
    name, title = (("soak_faults", "Soak: memory, descriptors and threads over mixed requests "
                    "and faults") if args.fault_every else
                   ("soak", "Soak: memory, descriptors and threads over mixed requests"))
    save(name, title, body,
         "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
