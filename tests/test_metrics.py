"""GET mlx/metrics: real traffic on a live server, read back with prometheus_client's parser."""

import asyncio
import functools
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from mlx_jupyter.engine.proxy import worker_environment
from mlx_jupyter.errors import WorkerError
from mlx_jupyter.metrics import Metrics
from mlx_jupyter.models.manager import Limits, ModelManager, WorkerSettings
from mlx_jupyter.models.memory import MemoryEstimator
from mlx_jupyter.models.registry import ModelEntry, ModelRegistry
from mlx_jupyter.store.database import create_engine_for
from model_factory import make_model

PROMPT = "Tell me about the sea."
BODY = {"model": "demo", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
POOL = ThreadPoolExecutor(2)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by its name and sorted labels."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name, **labels) -> float:
    """A sample's value; 0 for a series not yet created (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series(samples, name) -> dict[tuple, float]:
    return {labels: v for (sample_name, labels), v in samples.items() if sample_name == name}


# -- the live server ---------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "token not-the-token", "Bearer not-the-token"])
def test_metrics_refuse_requests_without_the_token(live_server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.get(live_server.url + "mlx/metrics", headers=headers, timeout=30)
    assert response.status_code == 403
    assert "mlx_jupyter_" not in response.text


async def test_metrics_count_real_traffic(live_server):
    # Bearer, as Prometheus sends `authorization: {credentials: <token>}`.
    async with httpx.AsyncClient(base_url=live_server.url, timeout=120, headers={
            "Authorization": f"Bearer {live_server.token}"}) as client:

        async def scrape():
            response = await client.get("mlx/metrics")
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(response.text)

        async def generate(**fields):
            response = await client.post("mlx/api/generate", json={**BODY, **fields})
            response.raise_for_status()
            if fields.get("stream"):
                *pieces, done = [json.loads(line) for line in response.text.splitlines()]
                return {"text": "".join(p["text"] for p in pieces), **done}
            return response.json()

        async def queue():
            snapshot = (await client.get("mlx/api/queue")).json()
            return snapshot, snapshot["models"].get("demo", {"active": [], "queued": []})

        async def wait_for(condition):
            deadline = time.monotonic() + 60
            while not condition(*await queue()):
                assert time.monotonic() < deadline, "the queue never reached the expected state"
                await asyncio.sleep(0.05)

        (await client.post("mlx/api/models/demo/unload")).raise_for_status()  # a known start
        before = await scrape()

        answers = [await generate(), await generate(stream=True)]  # loads demo once
        assert answers[1]["usage"]["cached_tokens"] > 0  # the same prompt again: a cache hit

        batch = (await queue())[0]["max_active_per_model"]
        [model] = [m for m in (await client.get("mlx/api/status")).json()["models"]["loaded"]
                   if m["name"] == "demo"]
        os.kill(model["pid"], signal.SIGSTOP)  # nothing can finish: requests stay in flight
        try:
            held = [asyncio.ensure_future(generate()) for _ in range(batch)]
            await wait_for(lambda _, demo: len(demo["active"]) == batch)
            waiting = asyncio.ensure_future(generate(priority=5))
            await wait_for(lambda _, demo: len(demo["queued"]) == 1)
            during = await scrape()
            _, demo = await queue()
            for request in (demo["queued"][0], demo["active"][0]):
                (await client.delete(f"mlx/api/requests/{request['request_id']}")
                 ).raise_for_status()
        finally:
            os.kill(model["pid"], signal.SIGCONT)
        answers += await asyncio.gather(*held, waiting)
        (await client.post("mlx/api/models/demo/unload")).raise_for_status()
        after = await scrape()

    assert value(during, "mlx_jupyter_requests_running", model="demo", priority="0") == batch
    assert value(during, "mlx_jupyter_requests_queued", model="demo", priority="5") == 1
    assert value(during, "mlx_jupyter_model_memory_estimate_bytes", model="demo") > 0
    assert value(during, "mlx_jupyter_model_rss_bytes", model="demo") > 0
    assert value(during, "mlx_jupyter_models_loaded") >= 1
    assert not series(after, "mlx_jupyter_requests_running")  # nothing in flight any more
    assert not series(after, "mlx_jupyter_requests_queued")
    assert value(after, "mlx_jupyter_model_rss_bytes", model="demo") == 0  # unloaded

    reasons = [answer["finish_reason"] for answer in answers]
    # The running one may have finished before its worker, woken up, read the cancel.
    cancelled = reasons.count("cancelled")
    assert len(answers) == batch + 3 and 1 <= cancelled <= 2
    assert set(reasons) <= {"cancelled", "stop", "length"}
    assert delta(before, after, "mlx_jupyter_requests_total", model="demo",
                 status="cancelled") == cancelled
    assert delta(before, after, "mlx_jupyter_requests_total", model="demo",
                 status="completed") == len(answers) - cancelled
    assert delta(before, after, "mlx_jupyter_requests_total", model="demo",
                 status="failed") == 0
    usage = {key: sum(answer["usage"].get(key, 0) for answer in answers)
             for key in ("prompt_tokens", "completion_tokens", "cached_tokens")}
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert delta(before, after, "mlx_jupyter_prompt_tokens_total",
                 model="demo") == usage["prompt_tokens"]
    assert delta(before, after, "mlx_jupyter_completion_tokens_total",
                 model="demo") == usage["completion_tokens"]
    assert delta(before, after, "mlx_jupyter_cached_prompt_tokens_total",
                 model="demo") == usage["cached_tokens"]
    assert delta(before, after, "mlx_jupyter_prompt_cache_hits_total", model="demo") == sum(
        1 for answer in answers if answer["usage"].get("cached_tokens", 0) > 0)

    # Every request ended once; all but the one cancelled while it waited were admitted.
    count = functools.partial(delta, before, after, model="demo")
    assert count("mlx_jupyter_request_duration_seconds_count") == len(answers)
    assert count("mlx_jupyter_request_queue_seconds_count") == len(answers) - 1
    assert count("mlx_jupyter_request_ttft_seconds_count") == sum(
        1 for answer in answers if answer["text"])
    assert count("mlx_jupyter_request_duration_seconds_sum") > 0
    assert value(after, "mlx_jupyter_request_duration_seconds_bucket", model="demo",
                 le="+Inf") == value(after, "mlx_jupyter_request_duration_seconds_count",
                                     model="demo")

    assert count("mlx_jupyter_model_loads_total") == 1
    assert count("mlx_jupyter_model_unloads_total", reason="requested") == 1
    assert count("mlx_jupyter_model_load_failures_total") == 0

    for name in ("total", "available", "budget"):
        assert value(after, f"mlx_jupyter_memory_{name}_bytes") > 0
    assert value(after, "mlx_jupyter_memory_budget_bytes") <= value(
        after, "mlx_jupyter_memory_total_bytes")
    assert ("mlx_jupyter_memory_used_by_models_bytes", ()) in after
    assert value(after, "mlx_jupyter_db_pool_size") == 10  # c.MlxApp.db_pool_size's default
    for name in ("checked_out", "checked_in", "overflow"):
        assert ("mlx_jupyter_db_pool_" + name, ()) in after


# -- the model manager's events, with real workers ---------------------------------------


async def run_blocking(function, *args):
    return await asyncio.get_running_loop().run_in_executor(
        POOL, functools.partial(function, *args))


async def test_loads_evictions_exits_idle_unloads_and_failures_are_counted(tmp_path):
    models = {name: make_model(tmp_path / name) for name in ("a", "b", "broken")}
    (models["broken"].path / "tokenizer.json").write_text("{not json")
    registry = ModelRegistry(allowed_roots={tmp_path}, hf_cache=False)
    for name, model in models.items():
        registry.add(ModelEntry(name, model.path, "registered"))
    budget = 64 * 1024**3
    metrics = Metrics()
    manager = ModelManager(
        registry, WorkerSettings(env=worker_environment(None)),
        Limits(budget_bytes=budget, max_loaded_models=1, idle_unload_seconds=2.0),
        run_blocking=run_blocking, metrics=metrics)
    estimate = manager.footprint(MemoryEstimator().estimate(models["a"].path)).total_bytes
    metrics.watch(manager=manager)
    try:
        await manager.load("a")
        loaded_a = parse(metrics.exposition().decode())
        await manager.load("b")  # one model at most: a is evicted
        worker = manager.slot("b").worker
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while manager.slot("b").status != "failed":
            assert time.monotonic() < deadline, "the dead worker was never noticed"
            await asyncio.sleep(0.05)
        await manager.load("a")
        deadline = time.monotonic() + 30
        while manager.slot("a").status != "unloaded":  # idle for 2 s
            assert time.monotonic() < deadline, "the idle model never unloaded"
            await asyncio.sleep(0.1)
        with pytest.raises(WorkerError):
            await manager.load("broken")
    finally:
        await manager.shutdown()
    samples = parse(metrics.exposition().decode())

    assert value(loaded_a, "mlx_jupyter_models_loaded") == 1
    assert value(loaded_a, "mlx_jupyter_model_memory_estimate_bytes", model="a") == estimate
    assert value(loaded_a, "mlx_jupyter_model_rss_bytes", model="a") > 0
    assert value(loaded_a, "mlx_jupyter_memory_used_by_models_bytes") == estimate
    assert value(loaded_a, "mlx_jupyter_memory_budget_bytes") == budget

    assert series(samples, "mlx_jupyter_model_loads_total") == {
        (("model", "a"),): 2, (("model", "b"),): 1}
    assert series(samples, "mlx_jupyter_model_unloads_total") == {
        (("model", "a"), ("reason", "evicted")): 1,
        (("model", "b"), ("reason", "worker_exited")): 1,
        (("model", "a"), ("reason", "idle")): 1}
    assert series(samples, "mlx_jupyter_model_evictions_total") == {(("model", "a"),): 1}
    assert series(samples, "mlx_jupyter_faults_total") == {(("kind", "worker_exited"),): 1}
    assert series(samples, "mlx_jupyter_model_load_failures_total") == {
        (("model", "broken"),): 1}
    assert value(samples, "mlx_jupyter_models_loaded") == 0
    assert not series(samples, "mlx_jupyter_model_memory_estimate_bytes")


# -- the Metrics class alone -------------------------------------------------------------


def test_request_events_fill_counters_and_histograms():
    metrics = Metrics()
    metrics.request_admitted("m", 0.002)
    metrics.request_ended("m", "completed", duration_seconds=1.5, ttft_seconds=0.2,
                          usage={"prompt_tokens": 10, "completion_tokens": 5,
                                 "cached_tokens": 9})
    metrics.request_ended("m", "completed", duration_seconds=0.5, ttft_seconds=0.1,
                          usage={"prompt_tokens": 7, "completion_tokens": 3,
                                 "cached_tokens": 0})
    metrics.request_ended("m", "cancelled", duration_seconds=0.01, ttft_seconds=None,
                          usage=None)  # cancelled while it waited: no text, no worker count
    samples = parse(metrics.exposition().decode())

    assert value(samples, "mlx_jupyter_requests_total", model="m", status="completed") == 2
    assert value(samples, "mlx_jupyter_requests_total", model="m", status="cancelled") == 1
    assert value(samples, "mlx_jupyter_prompt_tokens_total", model="m") == 17
    assert value(samples, "mlx_jupyter_completion_tokens_total", model="m") == 8
    assert value(samples, "mlx_jupyter_cached_prompt_tokens_total", model="m") == 9
    assert value(samples, "mlx_jupyter_prompt_cache_hits_total", model="m") == 1
    assert value(samples, "mlx_jupyter_request_duration_seconds_count", model="m") == 3
    assert value(samples, "mlx_jupyter_request_duration_seconds_sum",
                 model="m") == pytest.approx(2.01)
    assert value(samples, "mlx_jupyter_request_ttft_seconds_count", model="m") == 2
    assert value(samples, "mlx_jupyter_request_queue_seconds_count", model="m") == 1
    assert value(samples, "mlx_jupyter_request_queue_seconds_bucket", model="m",
                 le="0.001") == 0
    assert value(samples, "mlx_jupyter_request_queue_seconds_bucket", model="m",
                 le="0.0025") == 1
    with pytest.raises(ValueError, match="unknown unload reason"):
        metrics.model_unloaded("m", "because")


def test_each_metrics_object_has_its_own_registry():
    first, second = Metrics(), Metrics()  # two servers in one process must not collide
    first.model_loaded("m")
    assert value(parse(first.exposition().decode()), "mlx_jupyter_model_loads_total",
                 model="m") == 1
    assert value(parse(second.exposition().decode()), "mlx_jupyter_model_loads_total",
                 model="m") == 0


def test_pool_gauges_come_from_pools_that_keep_connections(tmp_path):
    pooled = create_engine_for(f"sqlite:///{tmp_path / 'metrics.db'}", pool_size=3)
    single = create_engine("sqlite://")  # SingletonThreadPool: no size to report
    try:
        with pooled.connect():
            metrics = Metrics()
            metrics.watch(engine=pooled)
            samples = parse(metrics.exposition().decode())
        assert value(samples, "mlx_jupyter_db_pool_size") == 3
        assert value(samples, "mlx_jupyter_db_pool_checked_out") == 1
        assert value(samples, "mlx_jupyter_db_pool_overflow") == 0

        metrics = Metrics()
        metrics.watch(engine=single)
        assert not [name for name, _ in parse(metrics.exposition().decode())
                    if name.startswith("mlx_jupyter_db_pool")]
    finally:
        pooled.dispose()
        single.dispose()
