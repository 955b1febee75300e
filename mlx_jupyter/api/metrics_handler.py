"""GET mlx/metrics: Prometheus' text format, behind Jupyter's token like every other route."""

from __future__ import annotations

from .handlers import MlxHandler, endpoint
from .openapi import operation


class MetricsHandler(MlxHandler):
    # A scrape every few seconds is not use: it must not keep an idle server from culling.
    _track_activity = False

    @operation("Prometheus metrics: requests, latencies, tokens, models, memory, database pool",
               tag="status", description="Prometheus' text exposition format",
               media_type="text/plain")
    @endpoint
    async def get(self) -> None:
        # Read on the event loop, where the queue and the manager keep their state.
        self.finish(self.metrics.exposition(), set_content_type=self.metrics.content_type)
