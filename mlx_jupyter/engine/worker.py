"""The model worker: one process per loaded model, doing all of that model's MLX work.

Started by the server as ``python -m mlx_jupyter.engine.worker MODEL_PATH``. Commands arrive
as JSON lines on stdin (see `protocol`); events leave on the process's original stdout. fd 1 is
then pointed at stderr, so a library that prints cannot corrupt the protocol.

Threads: a reader thread only parses commands; every MLX computation runs on the main thread
(MLX streams are thread-local). Requests run one after another; a cancel or shutdown is seen
between two decode steps.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from typing import IO, Any

from .protocol import decode, encode
from .stops import StopMatcher

_SHUTDOWN = object()


class Worker:
    def __init__(self, model_path: str, events: IO[bytes]):
        self.model_path = model_path
        self._events = events
        self._commands: queue.Queue[Any] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._shutting_down = threading.Event()
        self.model = self.tokenizer = None

    # -- commands -------------------------------------------------------------------------

    def read_commands(self, stream: IO[bytes]) -> None:
        """Reader thread: queue work, record cancels at once, stop on shutdown or EOF."""
        for line in stream:
            try:
                command = decode(line)
            except ValueError as exc:
                print(f"mlx-jupyter worker: ignoring malformed command: {exc}", file=sys.stderr)
                continue
            op = command.get("op")
            if op == "generate":
                self._commands.put(command)
            elif op == "cancel":
                with self._lock:
                    self._cancelled.add(str(command.get("id")))
            elif op == "shutdown":
                break
        # EOF too: the server is gone or asked us to go.
        self._shutting_down.set()
        self._commands.put(_SHUTDOWN)

    def _is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.discard(request_id)

    def send(self, message: dict[str, Any]) -> None:
        self._events.write(encode(message))
        self._events.flush()

    # -- model ----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        from mlx_lm import load  # the costly import (~3 s) happens here, never in the server

        self.model, self.tokenizer = load(self.model_path)
        self.send({"event": "ready", "pid": os.getpid(),
                   "load_ms": round((time.perf_counter() - started) * 1000, 1)})

    def serve(self) -> None:
        while True:
            command = self._commands.get()
            if command is _SHUTDOWN:
                return
            request_id = str(command.get("id"))
            try:
                if self._is_cancelled(request_id):
                    self._finish(request_id, "cancelled", prompt_tokens=0, completion_tokens=0)
                else:
                    self.generate(request_id, command)
            except Exception as exc:  # one bad request must not take the model down
                traceback.print_exc()
                self.send({"event": "error", "id": request_id,
                           "message": f"{type(exc).__name__}: {exc}"})
            finally:
                self._forget(request_id)

    def _prompt_tokens(self, command: dict[str, Any]) -> list[int]:
        if command.get("messages"):
            text = self.tokenizer.apply_chat_template(
                command["messages"], add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(command.get("prompt") or "")

    def generate(self, request_id: str, command: dict[str, Any]) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        tokens = self._prompt_tokens(command)
        if command.get("seed") is not None:
            mx.random.seed(int(command["seed"]))
        sampler = make_sampler(temp=float(command.get("temperature", 0.0)),
                               top_p=float(command.get("top_p", 1.0)))
        stops = StopMatcher(list(command.get("stop") or []))
        finish_reason, completion_tokens, response = "length", 0, None
        for response in stream_generate(self.model, self.tokenizer, tokens,
                                        max_tokens=int(command["max_tokens"]), sampler=sampler):
            completion_tokens = response.generation_tokens
            if self._is_cancelled(request_id) or self._shutting_down.is_set():
                finish_reason = "cancelled"
                break
            self._send_text(request_id, stops.feed(response.text))
            if stops.stopped:
                finish_reason = "stop"
                break
            if response.finish_reason:
                finish_reason = response.finish_reason
        self._send_text(request_id, stops.flush())
        timings = {}
        if response is not None:
            timings = {"prompt_tokens_per_second": round(response.prompt_tps, 2),
                       "tokens_per_second": round(response.generation_tps, 2)}
        self._finish(request_id, finish_reason, prompt_tokens=len(tokens),
                     completion_tokens=completion_tokens, timings=timings)

    def _send_text(self, request_id: str, text: str) -> None:
        if text:
            self.send({"event": "text", "id": request_id, "text": text})

    def _finish(self, request_id: str, finish_reason: str, *, prompt_tokens: int,
                completion_tokens: int, timings: dict[str, float] | None = None) -> None:
        self.send({"event": "done", "id": request_id, "finish_reason": finish_reason,
                   "usage": {"prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens},
                   "worker_timings": timings or {}})


def _protocol_stream() -> IO[bytes]:
    """Keeps the real stdout for events and sends everything else written to fd 1 to stderr."""
    events = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mlx_jupyter.engine.worker MODEL_PATH", file=sys.stderr)
        return 2
    worker = Worker(args[0], _protocol_stream())
    try:
        worker.load()
    except Exception as exc:
        traceback.print_exc()
        worker.send({"event": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    threading.Thread(target=worker.read_commands, args=(sys.stdin.buffer,),
                     name="commands", daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
