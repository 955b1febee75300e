"""The model manager with real worker processes on small random-weight models."""

import asyncio
import dataclasses
import functools
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from mlx_jupyter.engine.proxy import worker_environment
from mlx_jupyter.errors import ModelBusy, ModelDoesNotFit, WorkerError
from mlx_jupyter.models.manager import Limits, ModelManager, WorkerSettings
from mlx_jupyter.models.memory import MemoryEstimator
from mlx_jupyter.models.registry import ModelEntry, ModelRegistry
from model_factory import make_model

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
POOL = ThreadPoolExecutor(2)


async def run_blocking(function, *args):
    return await asyncio.get_running_loop().run_in_executor(
        POOL, functools.partial(function, *args))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: make_model(root / name, hidden=64, layers=2) for name in "abc"}


def manager_for(models, *, models_fitting=3, max_loaded=3, idle=0.0, statuses=None):
    registry = ModelRegistry(allowed_roots={m.path.parent for m in models.values()}, hf_cache=False)
    for name, model in models.items():
        registry.add(ModelEntry(name, model.path, "registered"))
    limits = Limits(budget_bytes=1, max_loaded_models=max_loaded, idle_unload_seconds=idle)
    on_status = (lambda name, status, error: statuses.append((name, status))
                 ) if statuses is not None else None
    manager = ModelManager(registry, WorkerSettings(env=worker_environment(OPENBLAS)), limits,
                           run_blocking=run_blocking, on_status=on_status)
    # What one model is counted for, with its prompt cache, KV reservation and process.
    one = manager.footprint(MemoryEstimator().estimate(next(iter(models.values())).path)).total_bytes
    manager.limits = dataclasses.replace(limits, budget_bytes=int(one * (models_fitting + 0.5)))
    return manager


def loaded_names(manager):
    return sorted(slot.name for slot in manager.loaded())


async def use(manager, name):
    await manager.acquire(name)
    manager.release(name)


async def test_a_load_beyond_the_limit_evicts_the_least_recently_used_idle_model(models):
    statuses = []
    manager = manager_for(models, max_loaded=2, statuses=statuses)
    try:
        await use(manager, "a")
        await use(manager, "b")
        await use(manager, "a")  # now b is the least recently used
        b_pid = manager.slot("b").worker.pid
        await manager.load("c")
        assert loaded_names(manager) == ["a", "c"]
        assert manager.slot("b").status == "unloaded" and not psutil.pid_exists(b_pid)
        assert statuses[-4:] == [("b", "unloading"), ("b", "unloaded"),
                                 ("c", "loading"), ("c", "loaded")]
    finally:
        await manager.shutdown()


async def test_a_load_that_cannot_fit_is_refused_and_disturbs_nothing(models):
    manager = manager_for(models, models_fitting=1)
    try:
        await manager.load("a")
        manager.pin("a")
        a_pid = manager.slot("a").worker.pid
        with pytest.raises(ModelDoesNotFit) as refused:
            await manager.load("b")
        assert "'b' needs about" in str(refused.value) and "a (pinned" in str(refused.value)
        assert loaded_names(manager) == ["a"] and manager.slot("a").worker.pid == a_pid
        assert manager.slot("b").status == "unloaded"

        manager.pin("a", False)
        await manager.acquire("a")  # a request in flight: still not evictable
        with pytest.raises(ModelDoesNotFit, match="busy"):
            await manager.load("b")
        with pytest.raises(ModelBusy):
            await manager.unload("a")
        manager.release("a")
        await manager.load("b")  # idle and unpinned now: evicted for b
        assert loaded_names(manager) == ["b"] and not psutil.pid_exists(a_pid)
    finally:
        await manager.shutdown()


async def test_idle_models_unload_themselves_and_pinned_ones_stay(models):
    manager = manager_for(models, idle=0.3)
    try:
        await manager.load("b")
        manager.pin("b")
        await use(manager, "a")
        a_pid = manager.slot("a").worker.pid
        deadline = time.monotonic() + 20
        while manager.slot("a").status != "unloaded" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert loaded_names(manager) == ["b"] and not psutil.pid_exists(a_pid)
    finally:
        await manager.shutdown()


async def test_simultaneous_loads_of_one_model_start_one_worker(models):
    manager = manager_for(models)
    try:
        workers = await asyncio.gather(manager.acquire("a"), manager.acquire("a"),
                                       manager.acquire("a"))
        assert len({id(worker) for worker in workers}) == 1
        assert manager.slot("a").active_requests == 3
        children = [p for p in psutil.Process().children()
                    if "mlx_jupyter.engine.worker" in " ".join(p.cmdline())]
        assert len(children) == 1
    finally:
        await manager.shutdown()


async def test_a_model_that_fails_to_load_keeps_its_error(models, tmp_path):
    broken = make_model(tmp_path / "broken")
    (broken.path / "tokenizer.json").write_text("{not json")
    manager = manager_for({**models, "broken": broken})
    try:
        with pytest.raises(WorkerError, match="failed to load"):
            await manager.load("broken")
        slot = manager.slot("broken")
        assert slot.status == "failed" and "failed to load" in slot.error
        assert manager.slot("broken").active_requests == 0
    finally:
        await manager.shutdown()


async def test_unload_ends_the_worker_and_returns_its_memory(tmp_path):
    big = make_model(tmp_path / "big", hidden=1024, layers=8)  # ~0.4 GB of float32 weights
    manager = manager_for({"big": big}, models_fitting=2)
    try:
        await manager.load("big")
        pid = manager.slot("big").worker.pid
        rss = psutil.Process(pid).memory_info().rss
        assert rss > 0.8 * big.weight_bytes  # the weights really live in the worker
        # The worker's own memory; the weights file's pages stay in the page cache after it.
        private = psutil.Process(pid).memory_full_info().uss
        # "used" leaves out the page cache, where the weights file stays after the unload.
        used_loaded = psutil.virtual_memory().used
        assert manager.get_system_status().models.loaded[0].rss_bytes >= rss * 0.9

        await manager.unload("big")
        assert not psutil.pid_exists(pid)
        deadline = time.monotonic() + 10  # the kernel may take a moment to reclaim it all
        while (used_loaded - psutil.virtual_memory().used < 0.4 * private
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        assert used_loaded - psutil.virtual_memory().used >= 0.4 * private
        assert manager.get_system_status().models.loaded_count == 0
    finally:
        await manager.shutdown()


@pytest.mark.parametrize(("configured", "inherited", "size", "expected"), [
    (0, {}, 10 * 1024**2, "1"),  # small: one thread
    (0, {}, 500 * 1024**2, None),  # large: the library's default
    (0, {"OPENBLAS_NUM_THREADS": "2"}, 10 * 1024**2, "2"),  # the server's setting wins
    (3, {"OPENBLAS_NUM_THREADS": "2"}, 500 * 1024**2, "3"),  # configured: always
])
def test_blas_threads_follow_the_model_size_unless_configured(configured, inherited, size,
                                                              expected):
    settings = WorkerSettings(env={"PATH": "/bin", **inherited}, blas_threads=configured)
    assert (settings.environment(size) or {}).get("OPENBLAS_NUM_THREADS") == expected


async def test_a_small_model_worker_runs_with_one_blas_thread(models):
    manager = manager_for({"a": models["a"]})
    try:
        worker = await manager.acquire("a")
        manager.release("a")
        assert psutil.Process(worker.pid).environ().get("OPENBLAS_NUM_THREADS") == "1"
    finally:
        await manager.shutdown()


async def test_a_request_right_after_an_idle_worker_died_gets_a_fresh_worker(models):
    """Killed while idle, a worker is a zombie until the event loop reads its exit; a request
    in that instant must not be handed the dead one (and answered 503)."""
    manager = manager_for({"a": models["a"]})
    try:
        await use(manager, "a")
        dead = manager.slot("a").worker
        os.kill(dead.pid, signal.SIGKILL)
        time.sleep(0.5)  # blocking: the event loop cannot read the worker's exit meanwhile
        assert not dead.alive
        fresh = await manager.acquire("a")
        try:
            assert fresh is not dead and fresh.alive and fresh.pid != dead.pid
            assert manager.slot("a").status == "loaded"
        finally:
            manager.release("a")
        await asyncio.sleep(0.5)  # the dead one's exit, read late, leaves the fresh one alone
        assert manager.slot("a").worker is fresh and manager.slot("a").status == "loaded"
    finally:
        await manager.shutdown()
