"""The wire format between the server and a model worker: one JSON object per line.

Server -> worker (stdin):
    {"op": "generate", "id": str, "prompt": str | null, "messages": [...] | null,
     "max_tokens": int, "temperature": float, "top_p": float, "seed": int | null, "stop": [str]}
    {"op": "cancel", "id": str}
    {"op": "shutdown"}

Worker -> server (the protocol pipe, the worker's original stdout):
    {"event": "ready", "pid": int, "load_ms": float}
    {"event": "fatal", "message": str}                      model could not be loaded; worker exits
    {"event": "text", "id": str, "text": str}               the next piece of a request's output
    {"event": "done", "id": str, "finish_reason": str, "usage": {...}, "worker_timings": {...}}
    {"event": "error", "id": str, "message": str, "kind"?: "invalid_request"}
                                                            one request failed (or, with kind,
                                                            was refused); the worker goes on
    {"event": "memory", "rss_bytes": int, "mlx_active_bytes": int, "mlx_cache_bytes": int,
     "mlx_peak_bytes": int, "prompt_cache_bytes": int, "prompt_cache_entries": int,
     "live_bytes": int}                                     live memory, after requests end
    {"event": "trim", "limit_bytes": int, "live_bytes_before": int, "live_bytes_after": int,
     "prompt_cache_bytes_freed": int, "prompt_cache_entries_freed": int}
                                                            live memory passed the estimate

A generate command the worker cannot hold is answered at once by an error of kind
invalid_request; otherwise by its text, then "done".
"""

from __future__ import annotations

import json
from typing import Any

# The kind of an error event for a request that cannot run here as asked (the client's to fix).
INVALID_REQUEST = "invalid_request"

# Lines can carry a whole prompt; asyncio's 64 KiB default line limit is too small for that.
MAX_LINE_BYTES = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def decode(line: bytes | str) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"protocol message is not an object: {line!r:.200}")
    return message
