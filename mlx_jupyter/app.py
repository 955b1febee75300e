"""The Jupyter server extension: configuration, services, routes, start and stop.

Loading it is cheap on purpose: no mlx, no mlx-lm, no worker. The first generation for a model
starts that model's worker process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from tornado.ioloop import IOLoop
from traitlets import Bool, Dict, Float, Int, List, TraitError, Unicode, Union, validate

from ._version import __version__
from .api.routes import ROUTES
from .engine.proxy import worker_environment
from .limits import (
    DEFAULT_KV_RESERVE_TOKENS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PROMPT_CACHE_BYTES,
    DEFAULT_STREAM_BUFFER_BYTES,
    DEFAULT_WORKER_BASE_BYTES,
    DEFAULT_WORKER_HEARTBEAT_SECONDS,
)
from .metrics import Metrics
from .models.manager import Limits, ModelManager, WorkerSettings
from .models.memory import (
    KIND_OVERHEADS,
    InvalidMemoryBudget,
    MemoryEstimator,
    budget_bytes,
    system_memory,
)
from .models.registry import ModelRegistry
from .models.service import ModelService
from .queue import InferenceQueue
from .services import BlockingPool, HistoryCleanup, StoreService, StoreUnavailable

if TYPE_CHECKING:  # the store's modules load when it opens, off the start path
    from .store import Store


class MlxApp(ExtensionApp):
    name = "mlx_jupyter"
    version = __version__
    description = "A shared local-model host on MLX for every notebook of this server."
    load_other_extensions = True

    preload_openblas = Bool(
        True, config=True,
        help="On Linux, start model workers with the system's OpenBLAS preloaded (LD_PRELOAD) "
             "when it is installed: the mlx CPU wheel's bundled BLAS is many times slower.")
    openblas_library = Unicode(
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0", config=True,
        help="The OpenBLAS shared library to preload into model workers on Linux "
             "(Debian: package libopenblas0-pthread).")
    worker_start_timeout = Float(
        300.0, config=True,
        help="Seconds a model worker may take to start and load its model before it is killed.")
    worker_stop_timeout = Float(
        10.0, config=True,
        help="Seconds a model worker gets to exit after a shutdown request before it is killed.")
    worker_heartbeat_seconds = Float(
        DEFAULT_WORKER_HEARTBEAT_SECONDS, min=0.0, config=True,
        help="Seconds a model worker may go without a heartbeat before it is taken for hung: "
             "it is killed, its requests end with an error and the next request starts a "
             "fresh one. The heartbeat comes from a thread that does no model work, so a long "
             "prefill still beats. 0: no heartbeat check.")
    max_body_bytes = Int(
        DEFAULT_MAX_BODY_BYTES, min=1, config=True,
        help="Largest request body the mlx routes take, in bytes; a larger one is refused "
             "with a 413 before it is read whole (beside Jupyter's own server-wide limit).")
    stream_buffer_bytes = Int(
        DEFAULT_STREAM_BUFFER_BYTES, min=1, config=True,
        help="Bytes of a streamed answer that may wait for a client that does not read them; "
             "past this its request is cancelled (reason slow_client) so that it stops "
             "holding a place in its model's batch.")

    database_url = Unicode(
        "", config=True,
        help="SQLAlchemy URL of the database, e.g. postgresql+psycopg://user:pw@host/db. "
             "Empty: a SQLite file, mlx_jupyter.db, in Jupyter's data directory.")
    db_pool_size = Int(10, config=True, help="Connections the database pool keeps open.")
    db_max_overflow = Int(20, config=True,
                          help="Connections the pool may open beyond db_pool_size under load.")
    db_pool_recycle = Int(3600, config=True,
                          help="Seconds after which a pooled connection is replaced.")
    db_pool_pre_ping = Bool(True, config=True,
                            help="Check a pooled connection is alive before handing it out.")
    db_busy_timeout_ms = Int(5000, config=True,
                             help="SQLite: milliseconds a writer waits for a lock before failing.")
    settings_cache_ttl = Float(30.0, config=True,
                               help="Seconds a setting read from the database stays cached "
                                    "(a write invalidates it at once).")
    cleanup_interval_seconds = Float(
        60.0, min=0.0, config=True,
        help="Seconds between two passes that prune the request history by the settings "
             "history_retention_days and max_history_rows (the first runs at start-up). "
             "0: never.")
    thread_pool_workers = Int(4, config=True,
                              help="Threads for blocking work (database, file scans), so the "
                                   "event loop never waits on it.")

    memory_budget = Union(
        [Int(), Float(), Unicode()], default_value="", config=True,
        help="Memory the loaded models may use together, by estimate: bytes (int), a fraction "
             "of RAM (0.5), or text such as '12GB', '8GiB', '75%'. Empty: 80% of RAM.")
    max_loaded_models = Int(3, config=True, help="Most models loaded at once.")
    idle_unload_seconds = Float(
        300.0, config=True,
        help="Unload a model nobody used for this long (pinned models stay). 0: never.")
    memory_overheads = Dict(
        default_value=dict(KIND_OVERHEADS), key_trait=Unicode(), value_trait=Float(min=1.0),
        config=True,
        help="Estimated memory of a loaded model = weight bytes x this factor (at least 1), "
             "by model kind (kinds not given keep their defaults); on the command line "
             "--MlxApp.memory_overheads=text=1.5.")
    worker_base_memory = Int(
        DEFAULT_WORKER_BASE_BYTES, min=0, config=True,
        help="Bytes a model worker holds beyond its model (Python, mlx, mlx-lm; ~86 MiB "
             "measured on Linux), counted against the memory budget for each loaded model.")
    memory_estimate_ttl = Float(300.0, config=True,
                                help="Seconds a model's memory estimate stays cached (a change "
                                     "to its files invalidates it at once).")

    blas_threads = Int(
        0, min=0, config=True,
        help="Threads of the BLAS library in each model worker. 0: one thread for models "
             "estimated under 64 MiB (their matrices are too small to gain from more; the "
             "demo decodes as fast with one), the library's default (all cores) for larger "
             "ones, unless OPENBLAS_NUM_THREADS is set in the server's environment.")

    max_batch_size = Int(
        DEFAULT_MAX_BATCH_SIZE, min=1, config=True,
        help="Requests a model generates at once, batched in its worker (a new one joins "
             "between decode steps); more wait in the queue by priority.")
    prompt_cache_bytes = Int(
        DEFAULT_PROMPT_CACHE_BYTES, min=0, config=True,
        help="Bytes of KV cache each model worker keeps for prompt prefixes it has seen, so a "
             "request sharing a prefix (a system message, a conversation) skips recomputing "
             "it; least recently used entries go first. Counted against the memory budget "
             "for each loaded model. 0: no prompt cache.")
    kv_reserve_tokens = Int(
        DEFAULT_KV_RESERVE_TOKENS, min=1, config=True,
        help="KV cache positions reserved per batch slot. A loaded model is counted against "
             "the memory budget for max_batch_size x this x its KV bytes per token (from its "
             "config), and its batch holds no more: a request whose prompt plus max_tokens "
             "fits only with fewer companions waits for them, one that needs more than the "
             "whole reservation is refused with a 409.")
    max_queued_requests = Int(
        256, config=True,
        help="Requests that may wait in the queue; beyond it a request gets 429 Retry-After.")
    priority_aging_seconds = Float(
        30.0, config=True,
        help="A waiting request gains one priority level per this many seconds, so low "
             "priorities never starve.")
    model_dirs = List(
        Unicode(), config=True,
        help="Folders whose subfolders are MLX models, each listed under its folder's name.")
    allowed_model_roots = List(
        Unicode(), config=True,
        help="Folders under which POST mlx/api/models may register a model (links are "
             "followed before the check). Empty: the server's root_dir.")
    scan_huggingface_cache = Bool(
        True, config=True,
        help="List the MLX-format models in the Hugging Face cache (HF_HUB_CACHE).")

    @validate("memory_budget")
    def _valid_budget(self, proposal: dict) -> int | float | str:
        try:
            budget_bytes(proposal["value"], system_memory().total)
        except InvalidMemoryBudget as exc:
            raise TraitError(f"c.MlxApp.memory_budget: {exc}") from None
        return proposal["value"]

    def initialize_settings(self) -> None:
        self._route_logs_to_the_server()
        estimator = MemoryEstimator(self.memory_estimate_ttl,
                                    {**KIND_OVERHEADS, **self.memory_overheads})
        registry = ModelRegistry.with_bundled(
            model_dirs=self.model_dirs, estimator=estimator,
            allowed_roots=self.allowed_model_roots or [self.serverapp.root_dir],
            hf_cache=self.scan_huggingface_cache)
        self.pool = BlockingPool(self.thread_pool_workers)
        metrics = Metrics()
        store_service = StoreService(self.pool, count_fault=metrics.fault)
        limits = Limits(budget_bytes=budget_bytes(self.memory_budget, system_memory().total),
                        max_loaded_models=self.max_loaded_models,
                        worker_base_bytes=self.worker_base_memory,
                        idle_unload_seconds=self.idle_unload_seconds)
        self.manager = ModelManager(
            registry, WorkerSettings(env=worker_environment(self.blas_to_preload()),
                                     start_timeout=self.worker_start_timeout,
                                     stop_timeout=self.worker_stop_timeout,
                                     max_batch_size=self.max_batch_size,
                                     prompt_cache_bytes=self.prompt_cache_bytes,
                                     kv_reserve_tokens=self.kv_reserve_tokens,
                                     blas_threads=self.blas_threads,
                                     heartbeat_seconds=self.worker_heartbeat_seconds),
            limits, run_blocking=self.pool.run, on_status=store_service.record_model_status,
            metrics=metrics)
        models = ModelService(registry, self.manager, store_service, self.pool)
        self.queue = InferenceQueue(self.manager, store_service,
                                    max_active_per_model=self.max_batch_size,
                                    max_queued=self.max_queued_requests,
                                    aging_seconds=self.priority_aging_seconds,
                                    metrics=metrics)
        metrics.watch(queue=self.queue, manager=self.manager)
        self.cleanup = HistoryCleanup(store_service, self.cleanup_interval_seconds)
        # Off the start path: the server answers at once; what needs the store waits for it.
        IOLoop.current().add_callback(self._open_store, store_service, models, metrics)
        self.settings.update({"mlx_jupyter.manager": self.manager,
                              "mlx_jupyter.queue": self.queue,
                              "mlx_jupyter.models": models,
                              "mlx_jupyter.store": store_service,
                              "mlx_jupyter.metrics": metrics,
                              "mlx_jupyter.max_body_bytes": self.max_body_bytes,
                              "mlx_jupyter.stream_buffer_bytes": self.stream_buffer_bytes})

    async def _open_store(self, store: StoreService, models: ModelService,
                          metrics: Metrics) -> None:
        """Once the event loop runs: opens and migrates the database on the thread pool, then
        restores what earlier runs left (registered models and pins, unfinished background
        jobs) before letting the requests that wait for the store through."""
        jobs: list[dict] = []

        async def prepare(opened: Store) -> None:
            metrics.watch(engine=opened.engine)
            recovered, interrupted = await self.pool.run(opened.recover_unfinished)
            if interrupted:
                self.log.warning("mlx_jupyter: %d request(s) were unfinished when the server "
                                 "last stopped; marked interrupted", interrupted)
            jobs.extend(recovered)
            await models.restore(opened)

        if await store.open(self._connect_database, prepare):  # else logged and counted there
            self.queue.resume(jobs)
            self.cleanup.start()

    def _connect_database(self) -> Store:
        """On the thread pool: the database opened and migrated; StoreUnavailable, saying
        what to fix, when it cannot be."""
        from .store import Store, default_database_url, mask_url

        url, fix = self.database_url, "check c.MlxApp.database_url"
        try:
            if not url:
                data_dir = Path(jupyter_data_dir())
                url, fix = str(data_dir), "check Jupyter's data directory (JUPYTER_DATA_DIR)"
                data_dir.mkdir(parents=True, exist_ok=True)
                url = default_database_url(data_dir)
            store = Store.open(url, settings_ttl=self.settings_cache_ttl,
                               pool_size=self.db_pool_size, max_overflow=self.db_max_overflow,
                               pool_recycle=self.db_pool_recycle,
                               pool_pre_ping=self.db_pool_pre_ping,
                               busy_timeout_ms=self.db_busy_timeout_ms)
        except Exception as exc:
            try:
                shown = mask_url(url)
            except Exception:  # not a URL SQLAlchemy can parse: shown as given
                shown = repr(url)
            raise StoreUnavailable.opening(shown, exc, fix) from exc
        self.log.info("mlx_jupyter: database %s", store.url)
        return store

    def _route_logs_to_the_server(self) -> None:
        # Our modules log under "mlx_jupyter.*"; show those lines where the server's own go.
        package_log = logging.getLogger("mlx_jupyter")
        for handler in self.serverapp.log.handlers:
            if handler not in package_log.handlers:
                package_log.addHandler(handler)
        package_log.setLevel(self.serverapp.log.level)

    def initialize_handlers(self) -> None:
        self.handlers.extend(ROUTES)

    def blas_to_preload(self) -> str | None:
        if self.preload_openblas and sys.platform == "linux":
            if Path(self.openblas_library).is_file():
                return self.openblas_library
            self.log.warning("mlx_jupyter: %s not found; model workers use mlx's bundled "
                             "BLAS (install libopenblas0-pthread for much faster CPU "
                             "generation)", self.openblas_library)
        return None

    async def stop_extension(self) -> None:
        await self.cleanup.stop()
        await self.manager.shutdown()
        store = self.settings["mlx_jupyter.store"]
        await store.flush()
        self.pool.shutdown()
        store.close()
