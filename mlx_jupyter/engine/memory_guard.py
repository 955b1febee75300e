"""A worker's own account of its memory, and what it gives back when it holds more than the
server counts it for.

Runs inside the model worker (it imports mlx). The server counts a loaded model for its
estimate (`models.memory.Footprint`); the worker measures what it really holds:

- its resident memory (RSS), which on a CPU backend includes every MLX buffer;
- MLX's own figures: active memory (live arrays), cache memory (freed buffers MLX keeps for
  reuse) and the peak. On Metal and CUDA the buffers live outside RSS, so there the live total
  is RSS plus active plus cache.

When the live total passes the estimate, the guard first hands back what holds no data (MLX's
buffer cache, and the C allocator's free pages); if that is not enough, it trims the prompt
cache (least recently used entries first) by the excess, and reports what it freed. MLX's
buffer cache is also capped (`mx.set_cache_limit`) to the KV reservation: the buffers worth
keeping for reuse are those of the requests' KV caches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from typing import Any

import mlx.core as mx
import psutil

from .protocol import MemoryEvent, MemoryReport, TrimEvent, WorkerEvent

# A report goes out at most this often while requests finish (a trim always reports at once).
REPORT_INTERVAL_SECONDS = 0.5


def _buffers_outside_rss() -> bool:
    """True where MLX's buffers are device memory that RSS does not see (Metal, CUDA)."""
    cuda = getattr(mx, "cuda", None)
    return mx.metal.is_available() or bool(cuda is not None and cuda.is_available())


def _malloc_trim() -> Any:
    """glibc's malloc_trim, which hands freed heap pages back to the system; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl has no malloc_trim)


class MemoryGuard:
    def __init__(self, limit_bytes: int, mlx_cache_limit_bytes: int | None,
                 prompt_cache: Any = None, *, clock=time.monotonic):
        """limit_bytes: the server's estimate for this worker (0: no limit, never trims);
        mlx_cache_limit_bytes: None leaves MLX's own limit; prompt_cache: mlx-lm's
        LRUPromptCache, or None when the cache is off."""
        self.limit_bytes = limit_bytes
        self.prompt_cache = prompt_cache
        self._process = psutil.Process()
        self._outside_rss = _buffers_outside_rss()
        self._malloc_trim = _malloc_trim()
        self._clock = clock
        self._last_report = self._last_release = float("-inf")
        if mlx_cache_limit_bytes is not None:
            mx.set_cache_limit(mlx_cache_limit_bytes)

    def measure(self) -> MemoryReport:
        rss = self._process.memory_info().rss
        active, cache = mx.get_active_memory(), mx.get_cache_memory()
        prompt_cache = self.prompt_cache
        return MemoryReport(
            rss_bytes=rss, mlx_active_bytes=active, mlx_cache_bytes=cache,
            mlx_peak_bytes=mx.get_peak_memory(),
            prompt_cache_bytes=prompt_cache.nbytes if prompt_cache is not None else 0,
            prompt_cache_entries=len(prompt_cache) if prompt_cache is not None else 0,
            live_bytes=rss + (active + cache if self._outside_rss else 0))

    def check(self, *, force_report: bool = False) -> list[WorkerEvent]:
        """The events to send now: a trim (when over the limit even after giving back free
        memory), and a memory report (at most every REPORT_INTERVAL_SECONDS, unless forced).
        Memory is given back at most that often too: a worker counted for too little would
        otherwise empty its caches after every request."""
        events: list[WorkerEvent] = []
        now = self._clock()
        live = self.measure()
        if (self.limit_bytes and live["live_bytes"] > self.limit_bytes
                and now - self._last_release >= REPORT_INTERVAL_SECONDS):
            self._last_release = now
            trim, live = self._give_back(live)
            if trim is not None:
                events.append(trim)
                force_report = True
        if force_report or now - self._last_report >= REPORT_INTERVAL_SECONDS:
            self._last_report = now
            events.append(MemoryEvent(event="memory", **live))
        return events

    def _release_free_memory(self) -> MemoryReport:
        """Hands back what holds no data: MLX's buffer cache and the allocator's free pages."""
        mx.clear_cache()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        return self.measure()

    def _give_back(self, before: MemoryReport) -> tuple[TrimEvent | None, MemoryReport]:
        """Free memory first; then, if still over, the least recently used prompt-cache
        entries worth the excess. A trim event only when entries had to go."""
        after = self._release_free_memory()
        excess = after["live_bytes"] - self.limit_bytes
        if excess <= 0 or self.prompt_cache is None or not after["prompt_cache_entries"]:
            return None, after
        self.prompt_cache.trim_to(n_bytes=max(0, after["prompt_cache_bytes"] - excess))
        after = self._release_free_memory()
        return (TrimEvent(event="trim", limit_bytes=self.limit_bytes,
                          live_bytes_before=before["live_bytes"],
                          live_bytes_after=after["live_bytes"],
                          prompt_cache_bytes_freed=(before["prompt_cache_bytes"]
                                                    - after["prompt_cache_bytes"]),
                          prompt_cache_entries_freed=(before["prompt_cache_entries"]
                                                      - after["prompt_cache_entries"])), after)
