"""Keeps one worker process per model in use, started on first demand.

For now every model that was asked for stays loaded until the server stops; the memory budget,
eviction and idle unload plug in here later.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ..engine.proxy import WorkerProxy
from .registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    env: dict[str, str] | None = None  # None: inherit the server's environment
    start_timeout: float = 300.0
    stop_timeout: float = 10.0


class ModelManager:
    def __init__(self, registry: ModelRegistry, worker_settings: WorkerSettings):
        self.registry = registry
        self._settings = worker_settings
        self._workers: dict[str, WorkerProxy] = {}
        self._start_locks: dict[str, asyncio.Lock] = {}

    async def worker(self, name: str) -> WorkerProxy:
        """The running worker for a model, starting a fresh one if it is not running (or died)."""
        entry = self.registry.get(name)
        lock = self._start_locks.setdefault(name, asyncio.Lock())
        async with lock:  # concurrent first requests share one start
            proxy = self._workers.get(name)
            if proxy is not None and proxy.alive:
                return proxy
            if proxy is not None:
                log.warning("worker for model %s is gone; starting a new one", name)
            proxy = WorkerProxy(name, entry.path, env=self._settings.env,
                                start_timeout=self._settings.start_timeout,
                                stop_timeout=self._settings.stop_timeout)
            self._workers.pop(name, None)
            await proxy.start()
            self._workers[name] = proxy
            return proxy

    def loaded_models(self) -> list[dict[str, Any]]:
        return [{"name": name, "pid": proxy.pid, "state": "loaded",
                 "active_requests": proxy.active_requests, "load_ms": proxy.load_ms}
                for name, proxy in sorted(self._workers.items()) if proxy.alive]

    async def shutdown(self) -> None:
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(proxy.stop() for proxy in workers), return_exceptions=True)
