"""The Jupyter server extension: configuration, services, routes, start and stop.

Loading it is cheap on purpose: no mlx, no mlx-lm, no worker. The first generation for a model
starts that model's worker process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Unicode

from ._version import __version__
from .api.routes import ROUTES
from .engine.proxy import worker_environment
from .models.manager import ModelManager, WorkerSettings
from .models.registry import ModelRegistry
from .queue import InferenceQueue


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

    def initialize_settings(self) -> None:
        self._route_logs_to_the_server()
        self.manager = ModelManager(ModelRegistry.with_bundled(), WorkerSettings(
            env=worker_environment(self.blas_to_preload()),
            start_timeout=self.worker_start_timeout,
            stop_timeout=self.worker_stop_timeout))
        self.queue = InferenceQueue(self.manager)
        self.settings.update({"mlx_jupyter.manager": self.manager,
                              "mlx_jupyter.queue": self.queue})

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
            self.log.info("mlx_jupyter: %s not found; model workers use mlx's bundled BLAS "
                          "(install libopenblas0-pthread for much faster CPU generation)",
                          self.openblas_library)
        return None

    async def stop_extension(self) -> None:
        await self.manager.shutdown()
