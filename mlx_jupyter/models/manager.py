"""Keeps models loaded, each in its own worker process, within a memory budget.

A model is loaded on demand (a generation, or an explicit load). It is counted against the
budget for its `Footprint`: weights × its kind's overhead, plus its worker's prompt cache, KV
reservation and process; its worker is told that total and trims its prompt cache when its
live memory passes it. A load that does not fit the budget or the loaded-model limit first
evicts the least recently used models that are idle and not pinned; if it still would not fit, it is refused and nothing is disturbed. A model with
requests in flight is never evicted. An idle model unloads itself after `idle_unload_seconds`:
each loaded model holds one timer, re-armed whenever its last request ends, so nothing polls.

All state lives on the event loop; `_placement` (an asyncio lock) makes load decisions one at a
time, so two loads never both count the same free memory, and two simultaneous loads of one
model share a single load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..contracts.models import ModelState
from ..contracts.status import LoadedModels, Memory, SystemStatus
from ..engine.proxy import WorkerProxy
from ..errors import MlxJupyterError, ModelBusy, ModelDoesNotFit
from ..limits import (
    DEFAULT_KV_RESERVE_TOKENS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_PROMPT_CACHE_BYTES,
    DEFAULT_WORKER_BASE_BYTES,
    DEFAULT_WORKER_HEARTBEAT_SECONDS,
    kv_capacity,
    kv_refusal,
)
from ..metrics import Metrics
from ..store.records import ModelStatus, utcnow
from .memory import Footprint, MemoryEstimate, RssSampler, system_memory
from .registry import ModelRegistry

log = logging.getLogger(__name__)

GB = 1024**3
# Below this estimate a model's matrices are too small for BLAS threads to pay: on 2 cores the
# demo decoded as fast with one thread as with two, using 92% of a core instead of 150%.
SMALL_MODEL_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class WorkerSettings:
    env: dict[str, str] | None = None  # None: inherit the server's environment
    start_timeout: float = 300.0
    stop_timeout: float = 10.0
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # requests a worker generates at once
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES  # prompt prefixes kept; 0: off
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS  # KV positions per batch slot
    blas_threads: int = 0  # 0: one for small models, the BLAS library's default for others
    heartbeat_seconds: float = DEFAULT_WORKER_HEARTBEAT_SECONDS  # silent this long: hung; 0: off

    def environment(self, estimate_bytes: int) -> dict[str, str] | None:
        """The environment of a worker for a model of this estimated size."""
        threads = self.blas_threads or (1 if estimate_bytes < SMALL_MODEL_BYTES else 0)
        env = dict(os.environ if self.env is None else self.env)
        if not threads or (not self.blas_threads and "OPENBLAS_NUM_THREADS" in env):
            return self.env  # the library's default, or what the server was started with
        return {**env, "OPENBLAS_NUM_THREADS": str(threads)}


@dataclass(frozen=True)
class Limits:
    budget_bytes: int
    max_loaded_models: int = 3
    idle_unload_seconds: float = 300.0  # 0: never unload idle models
    worker_base_bytes: int = DEFAULT_WORKER_BASE_BYTES  # a worker process beyond its model


@dataclass
class ModelSlot:
    """What the manager knows of one model while it has dealings with it."""

    name: str
    path: Path
    status: ModelStatus = ModelStatus.UNLOADED
    worker: WorkerProxy | None = None
    footprint: Footprint | None = None  # what it is counted for, once located
    pinned: bool = False
    active_requests: int = 0
    last_used: float = 0.0  # monotonic, for LRU order
    last_used_at: datetime | None = None
    error: str | None = None
    loading: asyncio.Task[None] | None = None
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def budget_bytes(self) -> int:
        return self.footprint.total_bytes if self.footprint is not None else 0

    @property
    def loaded(self) -> bool:
        return self.status == ModelStatus.LOADED and self.worker is not None \
            and self.worker.alive

    @property
    def evictable(self) -> bool:
        return self.loaded and not self.pinned and self.active_requests == 0


class ModelManager:
    def __init__(self, registry: ModelRegistry, worker_settings: WorkerSettings, limits: Limits,
                 *, run_blocking: Callable[..., Any],
                 on_status: Callable[..., Any] | None = None, metrics: Metrics | None = None):
        """File work (resolving and estimating a model) runs on the thread pool through
        `run_blocking`; `on_status(name, status, error)` persists status changes."""
        self.registry = registry
        self.metrics = metrics if metrics is not None else Metrics()
        self.limits = limits
        self._settings = worker_settings
        self._run_blocking = run_blocking
        self._on_status = on_status
        self._slots: dict[str, ModelSlot] = {}
        self._placement = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._rss = RssSampler()

    # -- queries --------------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        if name not in self._slots:
            entry = self.registry.get(name)  # raises ModelNotFound
            self._slots[name] = ModelSlot(name, entry.path)
        return self._slots[name]

    def slots(self) -> dict[str, ModelSlot]:
        return dict(self._slots)

    def forget(self, name: str) -> None:
        """Drops what the manager knew of an unloaded model (it was unregistered)."""
        slot = self._slots.get(name)
        if slot is not None and not slot.loaded and slot.loading is None:
            del self._slots[name]

    def loaded(self) -> list[ModelSlot]:
        return [slot for slot in self._slots.values() if slot.loaded]

    def loaded_worker(self, name: str) -> WorkerProxy | None:
        """The worker of a loaded model, or None."""
        slot = self._slots.get(name)
        return slot.worker if slot is not None and slot.loaded else None

    def used_bytes(self) -> int:
        """Memory held by models, by estimate: loaded ones and those being loaded."""
        return sum(slot.budget_bytes for slot in self._slots.values()
                   if slot.loaded or slot.status == ModelStatus.LOADING)

    def kv_refusal(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request can never fit a worker's KV reservation, or None (see limits)."""
        return kv_refusal(prompt_tokens, max_tokens, self._settings.max_batch_size,
                          self._settings.kv_reserve_tokens)

    def footprint(self, estimate: MemoryEstimate) -> Footprint:
        """What a model of this estimate is counted for while loaded (the one place it is
        computed: loads, listings and status all use it)."""
        settings = self._settings
        return Footprint(
            model_bytes=estimate.estimate_bytes,
            prompt_cache_bytes=settings.prompt_cache_bytes,
            kv_reserve_bytes=(kv_capacity(settings.max_batch_size, settings.kv_reserve_tokens)
                              * estimate.kv_bytes_per_token),
            worker_bytes=self.limits.worker_base_bytes)

    def describe(self, slot: ModelSlot) -> ModelState:
        """A slot's state, with its memory: the estimate it is counted for beside what its
        worker really holds (`live`: the worker's latest report; None while not loaded)."""
        worker = slot.worker
        alive = worker is not None and worker.alive
        return ModelState(
            name=slot.name, status=slot.status.value, pid=worker.pid if worker else None,
            budget_bytes=slot.budget_bytes,
            footprint=slot.footprint.to_dict() if slot.footprint else None,
            rss_bytes=self._rss(worker.pid) if alive else None,
            live=worker.memory if alive else None, pinned=slot.pinned,
            active_requests=slot.active_requests, last_used_at=slot.last_used_at,
            error=slot.error)

    def get_system_status(self) -> SystemStatus:
        """Memory and loaded models; cheap (a /proc read, RSS sampled every 2 s, no database)."""
        memory = system_memory()
        loaded = [self.describe(slot) for slot in self.loaded()]
        used = self.used_bytes()
        return SystemStatus(
            memory=Memory(total=memory.total, available=memory.available,
                          budget=self.limits.budget_bytes, used_by_models=used,
                          rss_of_models=sum(m.rss_bytes or 0 for m in loaded)),
            models=LoadedModels(loaded_count=len(loaded), total_memory_gb=round(used / GB, 3),
                                max_loaded=self.limits.max_loaded_models, loaded=loaded))

    # -- requests' use of a model ---------------------------------------------------------

    async def acquire(self, name: str) -> WorkerProxy:
        """The model's worker, loading the model first if needed; counts a request in flight
        until `release`. A model in use is never evicted or unloaded for idleness."""
        slot = self.slot(name)
        slot.active_requests += 1  # before loading: a concurrent load must not evict it
        self._stop_idle_timer(slot)
        try:
            await self.load(name)
        except BaseException:
            self.release(name)
            raise
        self._touch(slot)
        return slot.worker

    def release(self, name: str) -> None:
        slot = self._slots[name]
        slot.active_requests = max(0, slot.active_requests - 1)
        self._touch(slot)
        if slot.active_requests == 0:
            self._start_idle_timer(slot)

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self, name: str) -> ModelSlot:
        slot = self.slot(name)
        if slot.loaded:
            return slot
        if slot.loading is None:
            slot.loading = asyncio.create_task(self._load(slot))
            slot.loading.add_done_callback(lambda _task: setattr(slot, "loading", None))
        await asyncio.shield(slot.loading)  # a caller that gives up does not stop the load
        return slot

    async def unload(self, name: str, *, reason: str = "requested") -> ModelSlot:
        """`reason`: "requested", or "forgotten" when the model is being unregistered."""
        slot = self.slot(name)
        if slot.loading is not None:
            await asyncio.shield(slot.loading)
        if slot.active_requests:
            raise ModelBusy(f"model {name!r} has {slot.active_requests} request(s) in flight; "
                            f"cancel them or wait, then unload")
        if slot.loaded:
            await self._stop(slot, reason)
        return slot

    def pin(self, name: str, pinned: bool = True) -> ModelSlot:
        slot = self.slot(name)
        slot.pinned = pinned
        if pinned:
            self._stop_idle_timer(slot)
        elif slot.loaded and slot.active_requests == 0:
            self._start_idle_timer(slot)
        log.info("model %s %s", name, "pinned" if pinned else "unpinned")
        return slot

    async def shutdown(self) -> None:
        for slot in self._slots.values():
            self._stop_idle_timer(slot)
        workers = [slot.worker for slot in self._slots.values() if slot.worker is not None]
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)

    async def _load(self, slot: ModelSlot) -> None:
        async with self._placement:
            if slot.loaded:
                return
            if slot.worker is not None:  # it died an instant ago, before its exit was read
                log.warning("model %s: its worker (pid %s) has died; starting a fresh one",
                            slot.name, slot.worker.pid)
                self._worker_exited(slot.worker)
            try:  # the folder is checked again (cached unless it changed): it may have moved
                slot.path, estimate = await self._run_blocking(self._locate, slot.name)
                slot.footprint = self.footprint(estimate)
            except MlxJupyterError as exc:
                self._set_status(slot, ModelStatus.FAILED, error=str(exc))
                self.metrics.model_load_failed(slot.name)
                raise
            for victim in self._eviction_plan(slot):
                await self._stop(victim, "evicted", f"to make room for {slot.name!r}")
            self._set_status(slot, ModelStatus.LOADING)
            footprint = slot.footprint
            worker = WorkerProxy(
                slot.name, slot.path, env=self._settings.environment(estimate.estimate_bytes),
                start_timeout=self._settings.start_timeout,
                stop_timeout=self._settings.stop_timeout,
                max_batch_size=self._settings.max_batch_size,
                prompt_cache_bytes=self._settings.prompt_cache_bytes,
                kv_reserve_tokens=self._settings.kv_reserve_tokens,
                memory_limit_bytes=footprint.total_bytes,
                # Freed buffers worth keeping for reuse are those of the batch's KV caches.
                mlx_cache_limit_bytes=footprint.kv_reserve_bytes or None,
                heartbeat_seconds=self._settings.heartbeat_seconds,
                on_exit=self._worker_exited, on_trim=self._worker_trimmed)
            try:
                await worker.start()
            except BaseException as exc:
                self._set_status(slot, ModelStatus.FAILED, error=str(exc))
                self.metrics.model_load_failed(slot.name)
                raise
            slot.worker = worker
            self._touch(slot)
            self._set_status(slot, ModelStatus.LOADED)
            self.metrics.model_loaded(slot.name)
            if slot.active_requests == 0:
                self._start_idle_timer(slot)

    def _locate(self, name: str) -> tuple[Path, MemoryEstimate]:
        """A model's checked folder and its memory estimate (both cached by the registry)."""
        path = self.registry.resolve(name)
        return path, self.registry.estimator.estimate(path)

    def _eviction_plan(self, slot: ModelSlot) -> list[ModelSlot]:
        """The least recently used idle models to unload so that `slot` fits; raises
        ModelDoesNotFit, having touched nothing, when no such set exists."""
        budget, used = self.limits.budget_bytes, self.used_bytes()
        loaded = [s for s in self.loaded() if s is not slot]
        plan: list[ModelSlot] = []
        candidates = sorted((s for s in loaded if s.evictable), key=lambda s: s.last_used)
        while (used + slot.budget_bytes > budget
               or len(loaded) - len(plan) + 1 > self.limits.max_loaded_models):
            if not candidates:
                raise ModelDoesNotFit(self._refusal(slot, loaded, used))
            victim = candidates.pop(0)
            plan.append(victim)
            used -= victim.budget_bytes
        return plan

    def _refusal(self, slot: ModelSlot, loaded: list[ModelSlot], used: int) -> str:
        budget = self.limits.budget_bytes
        kept = ", ".join(f"{s.name} ({'pinned' if s.pinned else 'busy'}, "
                         f"{s.budget_bytes / GB:.2f} GB)" for s in loaded if not s.evictable)
        if slot.budget_bytes > budget:
            return (f"model {slot.name!r} needs about {slot.budget_bytes / GB:.2f} GB, more "
                    f"than the whole memory budget of {budget / GB:.2f} GB")
        if len(loaded) + 1 > self.limits.max_loaded_models and kept:
            return (f"cannot load {slot.name!r}: {len(loaded)} models are loaded (the limit is "
                    f"{self.limits.max_loaded_models}) and none can be unloaded now: {kept}")
        return (f"model {slot.name!r} needs about {slot.budget_bytes / GB:.2f} GB but only "
                f"{max(0, budget - used) / GB:.2f} GB of the {budget / GB:.2f} GB budget is "
                f"free, and the models holding the rest cannot be unloaded now: {kept or 'none'}")

    async def _stop(self, slot: ModelSlot, reason: str, detail: str = "") -> None:
        """`reason` is one of metrics.UNLOAD_REASONS; `detail` only goes to the log."""
        self._stop_idle_timer(slot)
        self._set_status(slot, ModelStatus.UNLOADING)
        worker, slot.worker = slot.worker, None
        if worker is not None:
            await worker.stop()
        log.info("model %s unloaded (%s)", slot.name, f"{reason} {detail}".strip())
        self._set_status(slot, ModelStatus.UNLOADED)
        self.metrics.model_unloaded(slot.name, reason)

    def _worker_trimmed(self, worker: WorkerProxy) -> None:
        self.metrics.prompt_cache_trimmed(worker.model_name)

    def _worker_exited(self, worker: WorkerProxy) -> None:
        slot = self._slots.get(worker.model_name)
        if slot is not None and slot.worker is worker:
            slot.worker = None
            self._stop_idle_timer(slot)
            self._set_status(slot, ModelStatus.FAILED, error=worker.exit_error)
            self.metrics.model_unloaded(slot.name, "worker_exited")
            self.metrics.fault("worker_hung" if worker.hung else "worker_exited")

    # -- idle unload ----------------------------------------------------------------------

    def _start_idle_timer(self, slot: ModelSlot) -> None:
        self._stop_idle_timer(slot)
        if slot.pinned or not slot.loaded or self.limits.idle_unload_seconds <= 0:
            return
        slot.idle_timer = asyncio.get_running_loop().call_later(
            self.limits.idle_unload_seconds, self._unload_idle, slot)

    def _stop_idle_timer(self, slot: ModelSlot) -> None:
        if slot.idle_timer is not None:
            slot.idle_timer.cancel()
            slot.idle_timer = None

    def _unload_idle(self, slot: ModelSlot) -> None:
        slot.idle_timer = None
        if slot.evictable:
            task = asyncio.create_task(self._stop(
                slot, "idle", f"for {self.limits.idle_unload_seconds:g} s"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- bookkeeping ----------------------------------------------------------------------

    def _touch(self, slot: ModelSlot) -> None:
        slot.last_used = time.monotonic()
        slot.last_used_at = utcnow()

    def _set_status(self, slot: ModelSlot, status: ModelStatus, error: str | None = None) -> None:
        slot.status = status
        slot.error = error if status == ModelStatus.FAILED else None
        if error:
            log.warning("model %s %s: %s", slot.name, status, error)
        else:
            log.debug("model %s %s", slot.name, status)
        if self._on_status is not None:
            self._on_status(slot.name, status.value, slot.error)
