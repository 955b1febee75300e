"""Memory that is counted is memory that is used: live servers, real workers, real requests.

A 4-layer, 256-wide random Llama (~10 MB) serves hundreds of requests; its worker's resident
memory after them, less its memory after 20 warm-up requests, must stay within what the server
counts for it beyond its weights: the prompt cache, the KV reservation and the worker process.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import psutil
import pytest

from live_server import start_server, stop_server
from mlx_jupyter.limits import DEFAULT_WORKER_BASE_BYTES
from mlx_jupyter.models.memory import process_rss
from model_factory import make_model

MIB = 1024**2
PROMPT_CACHE_BYTES = 64 * MIB
KV_RESERVE_TOKENS = 256
KV_BYTES_PER_TOKEN = 2 * 4 * 256 * 4  # keys and values × 4 layers × 256 wide × float32
# What the server counts for a model beyond its weights: how much its worker may grow.
GROWTH_BOUND = (PROMPT_CACHE_BYTES + 8 * KV_RESERVE_TOKENS * KV_BYTES_PER_TOKEN
                + DEFAULT_WORKER_BASE_BYTES)
WORDS = ("river stone cloud notebook kernel garden window lantern harbour meadow copper "
         "violet signal thunder paper orbit").split()


def server_args(model_dir, *extra):
    return (f"--MlxApp.model_dirs={model_dir}", "--MlxApp.idle_unload_seconds=0",
            *extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-models")
    make_model(root / "m256", hidden=256, layers=4)
    make_model(root / "big", hidden=1024, layers=8)  # ~0.4 GB of float32 weights
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-server")
    live = start_server(root, root / "server.log", args=server_args(
        models, f"--MlxApp.prompt_cache_bytes={PROMPT_CACHE_BYTES}",
        f"--MlxApp.kv_reserve_tokens={KV_RESERVE_TOKENS}"))
    yield live
    stop_server(live)


def headers(live):
    return {"Authorization": f"token {live.token}"}


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def send(client: httpx.AsyncClient, body: dict) -> dict:
    """One generation, streamed or whole; the final answer (or the stream's last event)."""
    if body.get("stream"):
        async with client.stream("POST", "mlx/api/generate", json=body) as answer:
            assert answer.status_code == 200, await answer.aread()
            lines = [line async for line in answer.aiter_lines() if line]
        done = json.loads(lines[-1])
        assert done["done"] is True and done["finish_reason"] in ("stop", "length"), done
        return done
    answer = await client.post("mlx/api/generate", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def run_requests(live, bodies, concurrency=8):
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=live.url, headers=headers(live),
                                 timeout=120) as client:
        async def one(body):
            async with semaphore:
                return await send(client, body)

        return await asyncio.gather(*(one(body) for body in bodies))


def short_requests(n, seed):
    rng = random.Random(seed)
    return [{"model": "m256", "prompt": prompt(rng, rng.randint(3, 12)), "max_tokens": 8,
             "temperature": 0.8, "seed": i, "stream": i % 2 == 0} for i in range(n)]


def model_state(live, name="m256"):
    return live.get(f"mlx/api/models/{name}").json()


def worker_rss(live, name="m256"):
    return psutil.Process(model_state(live, name)["pid"]).memory_info().rss


def trims(live, name="m256"):
    found = re.search(rf'mlx_jupyter_prompt_cache_trims_total\{{model="{name}"\}} (\S+)',
                      live.get("mlx/metrics").text)
    return float(found.group(1)) if found else 0


def test_the_prompt_cache_stays_within_its_bound_over_500_requests(server):
    asyncio.run(run_requests(server, short_requests(20, seed=1)))
    warm = worker_rss(server)
    pid = model_state(server)["pid"]
    asyncio.run(run_requests(server, short_requests(500, seed=2)))
    model = model_state(server)
    assert model["pid"] == pid  # the same worker served them all
    grown = worker_rss(server) - warm
    assert grown <= GROWTH_BOUND, (
        f"the worker grew by {grown / MIB:.0f} MiB over 500 requests, past the "
        f"{GROWTH_BOUND / MIB:.0f} MiB counted for its caches and process")
    live = model["live"]
    assert 0 < live["prompt_cache_bytes"] <= PROMPT_CACHE_BYTES
    assert live["prompt_cache_entries"] > 100
    # The cache's count is what its entries really keep alive: MLX's live arrays are the
    # weights, the entries and at most the running batch's KV (entries that kept whole batch
    # buffers alive held five times what they counted).
    assert (live["mlx_active_bytes"] - model["weight_bytes"]
            <= live["prompt_cache_bytes"] + model["footprint"]["kv_reserve_bytes"]), live


def test_long_prompts_near_the_cache_limit_keep_the_bound(server):
    # ~150-token prompts: 1.3 MB of KV each (8 KB a token); fifty fill the 64 MiB cache.
    rng = random.Random(3)
    bodies = [{"model": "m256", "prompt": prompt(rng, 120), "max_tokens": 16,
               "temperature": 0.0, "stream": i % 2 == 1} for i in range(20)]
    asyncio.run(run_requests(server, bodies))
    warm = worker_rss(server)
    bodies = [{"model": "m256", "prompt": prompt(rng, 120), "max_tokens": 16,
               "temperature": 0.0, "stream": i % 2 == 1} for i in range(200)]
    answers = asyncio.run(run_requests(server, bodies))
    assert min(a["usage"]["prompt_tokens"] for a in answers) > 100
    model = model_state(server)
    grown = worker_rss(server) - warm
    assert grown <= GROWTH_BOUND, f"grew by {grown / MIB:.0f} MiB"
    # (Eight prefills of this length at once can pass the estimate for a moment, so a trim
    # may happen here.)
    assert 0 < model["live"]["prompt_cache_bytes"] <= PROMPT_CACHE_BYTES


def test_the_status_shows_the_estimate_beside_the_live_memory(server):
    asyncio.run(run_requests(server, short_requests(4, seed=4)))
    status = server.get("mlx/api/status").json()
    (model,) = [m for m in status["models"]["loaded"] if m["name"] == "m256"]
    footprint = model["footprint"]
    # 8 slots × 512 tokens × (2 × 4 layers × 256 wide × 4 bytes) of KV.
    assert footprint["kv_reserve_bytes"] == 8 * KV_RESERVE_TOKENS * KV_BYTES_PER_TOKEN
    assert footprint["prompt_cache_bytes"] == PROMPT_CACHE_BYTES
    assert footprint["total_bytes"] == model["budget_bytes"]
    live = model["live"]
    assert live["rss_bytes"] > 0 and live["live_bytes"] >= live["rss_bytes"]
    assert live["mlx_active_bytes"] > 0 and live["prompt_cache_entries"] > 0
    metrics = server.get("mlx/metrics").text
    assert re.search(r'mlx_jupyter_prompt_cache_bytes\{model="m256"\} [1-9]', metrics)


def test_a_request_its_kv_reservation_cannot_hold_is_refused_with_a_409(server):
    """A 409, not a 400: the request is well formed; the server's configuration (its KV
    reservation, or a default_max_tokens setting above it) is what cannot hold it."""
    capacity = 8 * KV_RESERVE_TOKENS

    def generate(**body):
        return httpx.post(server.url + "mlx/api/generate", headers=headers(server),
                          json={"model": "m256", "prompt": "hello there", **body}, timeout=60)

    for stream in (False, True):  # max_tokens alone: refused before it is queued
        answer = generate(stream=stream, max_tokens=capacity + 10)
        assert answer.status_code == 409, answer.text
        message = answer.json()["message"]
        assert f"max_tokens {capacity + 10}" in message and f"{capacity} this model" in message
        assert "kv_reserve_tokens" in message
    # The prompt's share counts too, once its worker has tokenized it: a 409 when whole, the
    # last event of a stream (whose status line left before the prompt was read).
    long_prompt = " ".join(["river stone"] * 60)
    answer = generate(prompt=long_prompt, max_tokens=capacity - 10)
    assert answer.status_code == 409, answer.text
    assert re.search(rf"needs KV cache for \d+ tokens \(\d+ of prompt \+ {capacity - 10} "
                     rf"max_tokens\), more than the {capacity}", answer.json()["message"])
    streamed = generate(prompt=long_prompt, max_tokens=capacity - 10, stream=True)
    last = json.loads(streamed.text.splitlines()[-1])
    assert last["finish_reason"] == "error" and "kv_reserve_tokens" in last["error"]
    # More than half the whole reservation: it runs, but nothing can share the batch with it
    # (two rows would need more than the reservation): short requests sent while it
    # generates wait for it to end.
    ended = asyncio.run(a_long_request_then_short_ones(server, capacity // 2 + 100))
    assert ended["long"]["usage"]["completion_tokens"] == capacity // 2 + 100  # greedy: no EOS
    assert all(at > ended["long_at"] for at in ended["short_at"])
    history = server.get("mlx/api/requests", params={"limit": 50, "model": "m256"}).json()
    refused = [r for r in history["requests"] if r["status"] == "failed"]
    assert len(refused) == 2 and all("kv_reserve_tokens" in r["error"] for r in refused)


async def a_long_request_then_short_ones(live, long_tokens):
    """Streams a long greedy request; once its first text arrives, sends three short ones.
    When each ended (monotonic seconds) and the long one's last event."""
    body = {"model": "m256", "prompt": "hello there", "max_tokens": long_tokens,
            "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=live.url, headers=headers(live), timeout=300) as client:
        async def short(request):
            await send(client, request)
            return time.monotonic()

        async with client.stream("POST", "mlx/api/generate", json=body) as answer:
            lines = answer.aiter_lines()
            await anext(lines)  # it is generating
            shorts = asyncio.gather(*(short(r) for r in short_requests(3, seed=5)))
            async for line in lines:
                if line and json.loads(line).get("done"):
                    last, long_at = line, time.monotonic()
        return {"long": json.loads(last), "long_at": long_at, "short_at": await shorts}


def test_a_worker_past_its_estimate_trims_its_prompt_cache(models, tmp_path):
    # Counted for less than a worker process takes: every check finds it over its estimate.
    live = start_server(tmp_path, tmp_path / "server.log", args=server_args(
        models, "--MlxApp.worker_base_memory=0", f"--MlxApp.prompt_cache_bytes={8 * MIB}",
        "--MlxApp.kv_reserve_tokens=64"))
    try:
        asyncio.run(run_requests(live, short_requests(40, seed=6)))
        assert trims(live) >= 1
        # It gives memory back at most every half second; one more request after that: the
        # excess is far more than its cache holds, so every entry goes, its own included.
        time.sleep(0.6)
        asyncio.run(run_requests(live, short_requests(1, seed=7)))
        deadline = time.monotonic() + 10  # its report follows the answer by a moment
        while (model := model_state(live))["live"]["prompt_cache_entries"]:
            assert time.monotonic() < deadline, f"the cache was not trimmed: {model['live']}"
            time.sleep(0.05)
        assert model["live"]["live_bytes"] > model["footprint"]["total_bytes"]
    finally:
        stop_server(live)
    log = (tmp_path / "server.log").read_text()
    assert re.search(r"model m256: worker pid \d+ held \d+ bytes, past its estimate", log)


def test_unload_returns_the_memory_to_the_system(server):
    tree = server.process.pid
    before = process_rss(tree)
    loaded = httpx.post(server.url + "mlx/api/models/big/load", headers=headers(server),
                        json={}, timeout=300).json()
    assert loaded["status"] == "loaded"
    during = process_rss(tree)
    weights = loaded["weight_bytes"]
    assert during - before >= 0.8 * weights  # the weights live in the server's process tree
    unloaded = httpx.post(server.url + "mlx/api/models/big/unload", headers=headers(server),
                          json={}, timeout=60).json()
    assert unloaded["status"] == "unloaded" and not psutil.pid_exists(loaded["pid"])
    after = process_rss(tree)
    assert after - before < 0.1 * weights, (
        f"the tree held {before / MIB:.0f} MiB before, {during / MIB:.0f} MiB loaded and "
        f"{after / MIB:.0f} MiB after the unload")
