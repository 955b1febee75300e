"""Model workers that die or hang under a live server, on purpose.

A worker killed in the middle of a batch of 8 streams fails exactly those 8, with an error that
names the exit; the requests queued behind them run on a fresh worker; another model's stream
goes on untouched; the memory the server counts returns to what it was. A worker stopped with
SIGSTOP is found by its heartbeat, killed and replaced, and a long prefill is not taken for a
hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from live_server import start_server, stop_server
from model_factory import make_model

HEARTBEAT_SECONDS = 1.0
BATCH = 8
QUEUED = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker-faults")
    models = root / "models"
    make_model(models / "tiny", hidden=64, layers=2)  # random weights: answers rarely end early
    make_model(models / "other", hidden=64, layers=2)
    make_model(models / "wide", hidden=512, layers=8)  # slow enough for a long prefill
    live = start_server(root, root / "server.log", args=(
        f"--MlxApp.model_dirs={models}", "--MlxApp.idle_unload_seconds=0",
        f"--MlxApp.max_batch_size={BATCH}", "--MlxApp.prompt_cache_bytes=0",
        f"--MlxApp.worker_heartbeat_seconds={HEARTBEAT_SECONDS}"))
    live.log_path = root / "server.log"
    yield live
    stop_server(live)


def client(live) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=live.url, timeout=120,
                             headers={"Authorization": f"token {live.token}"})


def model_state(live, name: str) -> dict:
    return live.get(f"mlx/api/models/{name}").json()


def fault_count(live, kind: str) -> float:
    for line in live.get("mlx/metrics").text.splitlines():
        if line.startswith(f'mlx_jupyter_faults_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Stream:
    """One NDJSON stream read to its end in the background; `started` once its first event
    came."""

    def __init__(self, http: httpx.AsyncClient, body: dict):
        self.started = asyncio.Event()
        self.events: list[dict] = []
        self.request_id: str | None = None
        self.task = asyncio.ensure_future(self._read(http, body))

    async def _read(self, http: httpx.AsyncClient, body: dict) -> list[dict]:
        async with http.stream("POST", "mlx/api/generate", json={**body, "stream": True}) as answer:
            assert answer.status_code == 200, await answer.aread()
            self.request_id = answer.headers["X-Request-Id"]
            async for line in answer.aiter_lines():
                if line:
                    self.events.append(json.loads(line))
                    self.started.set()
        return self.events

    @property
    def last(self) -> dict:
        return self.events[-1]


async def load(http: httpx.AsyncClient, name: str) -> None:
    answer = await http.post(f"mlx/api/models/{name}/load")
    assert answer.status_code == 200, answer.text


async def test_a_worker_killed_mid_batch_fails_its_8_streams_and_nothing_else(server):
    long = {"prompt": "a river of stones", "max_tokens": 3000, "temperature": 0}
    async with client(server) as http:
        await load(http, "tiny")
        await load(http, "other")
        counted_before = server.get("mlx/api/status").json()["memory"]["used_by_models"]
        victim, bystander = model_state(server, "tiny")["pid"], model_state(server, "other")["pid"]
        other = Stream(http, {**long, "model": "other"})
        batch = [Stream(http, {**long, "model": "tiny"}) for _ in range(BATCH)]
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in batch)), 120)
        # The batch is full: these wait in the queue behind it.
        queued = [Stream(http, {"model": "tiny", "prompt": "after the storm",
                                "max_tokens": 8, "temperature": 0}) for _ in range(QUEUED)]
        await asyncio.to_thread(wait_for, lambda: len(server.get("mlx/api/queue").json()
                                ["models"].get("tiny", {}).get("queued", [])) == QUEUED,
                                "the queued requests")
        await other.started.wait()
        os.kill(victim, signal.SIGKILL)

        for stream in batch:
            await stream.task
            assert stream.last["done"] is True and stream.last["finish_reason"] == "error"
            assert "exited (code -9)" in stream.last["error"], stream.last
        for stream in queued:  # on a fresh worker, not refused
            await stream.task
            assert stream.last["finish_reason"] in ("stop", "length"), stream.last
        await other.task
        assert other.last["finish_reason"] in ("stop", "length"), other.last

    fresh = model_state(server, "tiny")
    assert fresh["status"] == "loaded" and fresh["pid"] not in (None, victim)
    assert model_state(server, "other")["pid"] == bystander
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    assert server.get("mlx/api/status").json()["memory"]["used_by_models"] == counted_before
    failed = server.get("mlx/api/requests", params={"status": "failed", "model": "tiny"}).json()
    assert {row["id"] for row in failed["requests"]} >= {s.request_id for s in batch}
    assert fault_count(server, "worker_exited") >= 1


async def test_a_stopped_worker_is_found_by_its_heartbeat_and_replaced(server):
    async with client(server) as http:
        await load(http, "tiny")
        hung = model_state(server, "tiny")["pid"]
        before = fault_count(server, "worker_hung")
        stream = Stream(http, {"model": "tiny", "prompt": "a long night", "max_tokens": 3000,
                               "temperature": 0})
        await stream.started.wait()
        os.kill(hung, signal.SIGSTOP)
        try:
            await asyncio.wait_for(stream.task, 60)
        finally:
            if psutil.pid_exists(hung):
                os.kill(hung, signal.SIGCONT)
        assert stream.last["finish_reason"] == "error"
        assert f"no heartbeat for {HEARTBEAT_SECONDS:g} s" in stream.last["error"]

        answer = await http.post("mlx/api/generate", json={
            "model": "tiny", "prompt": "the morning after", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
    assert model_state(server, "tiny")["pid"] not in (None, hung)
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == "zombie"
    assert fault_count(server, "worker_hung") == before + 1
    assert "taken for hung" in server.log_path.read_text()


async def test_a_long_prefill_is_not_a_hang(server):
    async with client(server) as http:
        await load(http, "wide")
        pid = model_state(server, "wide")["pid"]
        answer = await http.post("mlx/api/generate", json={
            "model": "wide", "prompt": "the " * 3800, "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    # 3,800 tokens through the 8-layer, 512-wide model: several heartbeat windows of prefill
    # on these machines (its speed is the benchmarks' to measure, not asserted here).
    assert result["usage"]["prompt_tokens"] >= 3800
    assert result["finish_reason"] == "length"
    assert model_state(server, "wide")["pid"] == pid
