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
    {"event": "error", "id": str, "message": str}           one request failed; the worker goes on
"""

from __future__ import annotations

import json
from typing import Any

# Lines can carry a whole prompt; asyncio's 64 KiB default line limit is too small for that.
MAX_LINE_BYTES = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def decode(line: bytes | str) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"protocol message is not an object: {line!r:.200}")
    return message
