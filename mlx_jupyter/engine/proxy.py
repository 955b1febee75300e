"""The server's asynchronous handle on one model worker process.

Never blocks the event loop: the worker is an asyncio subprocess, commands are written to its
stdin and a reader task routes its messages (`protocol`) to per-request queues. When the
process ends, the reader sees EOF at once and fails every open request with a `WorkerError`
carrying the exit status and the last lines the worker wrote to stderr. The worker's memory
reports are kept as `memory` (the latest) and its trims are passed to `on_trim`.

A worker that hangs (stopped, or stuck in native code holding the GIL) is found by its
heartbeat: its heartbeat thread beats several times per `heartbeat_seconds`, and a watchdog
kills a worker that sent nothing for that long; its requests then fail as for any other exit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import psutil

from ..errors import PromptTooLong, RequestDoesNotFit, WorkerError
from ..limits import DEFAULT_KV_RESERVE_TOKENS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_PROMPT_CACHE_BYTES
from .context import prompt_field
from .protocol import (
    MAX_LINE_BYTES,
    CancelCommand,
    Command,
    DoneMessage,
    ErrorMessage,
    GenerateCommand,
    GenerationParams,
    MemoryReport,
    Message,
    ReadyEvent,
    RequestMessage,
    ShutdownCommand,
    TextMessage,
    decode_message,
    encode,
    memory_report,
)

log = logging.getLogger(__name__)
worker_log = logging.getLogger("mlx_jupyter.engine.worker")

STDERR_TAIL_LINES = 20
# Heartbeats a worker sends per heartbeat_seconds: a few may be late without it counting as hung.
BEATS_PER_WINDOW = 5


def worker_environment(preload_blas: str | None) -> dict[str, str]:
    """The worker's environment: the server's, plus a faster BLAS preloaded when asked for."""
    env = dict(os.environ)
    if preload_blas:
        env["LD_PRELOAD"] = " ".join(filter(None, [preload_blas, env.get("LD_PRELOAD")]))
    return env


class WorkerProxy:
    def __init__(self, model_name: str, model_path: Path, *, env: dict[str, str] | None = None,
                 start_timeout: float = 300.0, stop_timeout: float = 10.0,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
                 memory_limit_bytes: int = 0, mlx_cache_limit_bytes: int | None = None,
                 heartbeat_seconds: float = 0.0,
                 on_exit: Callable[[WorkerProxy], None] | None = None,
                 on_trim: Callable[[WorkerProxy], None] | None = None):
        """The sizes are the worker's options (see `worker.main`)."""
        self.model_name = model_name
        self._options = {"--max-batch-size": max_batch_size,
                         "--prompt-cache-bytes": prompt_cache_bytes,
                         "--kv-reserve-tokens": kv_reserve_tokens,
                         "--memory-limit-bytes": memory_limit_bytes,
                         "--mlx-cache-limit-bytes": mlx_cache_limit_bytes,
                         "--heartbeat-interval": (heartbeat_seconds / BEATS_PER_WINDOW
                                                  if heartbeat_seconds > 0 else None)}
        self._heartbeat_seconds = heartbeat_seconds  # 0: no watchdog
        self._on_exit = on_exit  # told when the process ends unasked (a crash, a kill)
        self._on_trim = on_trim
        self.memory: MemoryReport | None = None  # the worker's latest report
        self.model_path = model_path
        self._env = env
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[ReadyEvent] | None = None
        self._requests: dict[str, asyncio.Queue[RequestMessage | WorkerError]] = {}
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._tasks: list[asyncio.Task[None]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self.started_at: float | None = None
        self.load_ms: float | None = None
        self.context_tokens: int | None = None  # the model's context, once loaded
        self.max_token_bytes = 1  # at least the most prompt bytes one token stands for
        self.tool_parser: str | None = None  # its tool-call syntax (mlx-lm's parser), if any
        self.vocab_size: int | None = None  # the width of its logits, once loaded
        self.hung = False  # killed by the watchdog
        self._last_heard = time.monotonic()  # the worker's latest line, of any kind

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        """Running. A worker killed an instant ago is a zombie until the event loop reaps it
        and reads its pipe's end; it is not alive for a request that arrives meanwhile."""
        if self._process is None or self._process.returncode is not None:
            return False
        try:
            return psutil.Process(self._process.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    @property
    def exit_error(self) -> str:
        """Why the process ended: exit status and its last words on stderr."""
        return str(self._death_error())

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the process and waits until the model is loaded (or fails to load)."""
        started = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlx_jupyter.engine.worker", str(self.model_path),
            *(str(part) for option, value in self._options.items() if value is not None
              for part in (option, value)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self._env, limit=MAX_LINE_BYTES)
        log.info("started worker pid %s for model %s", self._process.pid, self.model_name)
        self._ready = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._read_events()),
                       asyncio.create_task(self._read_stderr())]
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), self._start_timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise WorkerError(f"model {self.model_name!r} did not load within "
                              f"{self._start_timeout:g} s") from None
        except BaseException:
            await self.stop()
            raise
        self.started_at = time.time()
        self.load_ms = ready["load_ms"]
        self.context_tokens = ready["context_tokens"]
        self.max_token_bytes = max(1, ready["max_token_bytes"])
        self.tool_parser = ready.get("tool_parser")
        self.vocab_size = ready.get("vocab_size")
        if self._heartbeat_seconds > 0:
            self._watchdog = asyncio.create_task(self._watch_heartbeat())
        log.info("model %s ready in worker pid %s after %.1f s", self.model_name,
                 self._process.pid, time.monotonic() - started)

    async def stop(self) -> None:
        """Asks the worker to exit, then kills it if it does not within the stop timeout."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if process.returncode is None:
            try:
                process.stdin.write(encode(ShutdownCommand(op="shutdown")))
                await process.stdin.drain()
                process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                await asyncio.wait_for(process.wait(), self._stop_timeout)
            except asyncio.TimeoutError:
                log.warning("worker pid %s for %s ignored shutdown; killing it",
                            process.pid, self.model_name)
                process.kill()
                await process.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("worker pid %s for model %s stopped", process.pid, self.model_name)

    # -- requests -------------------------------------------------------------------------

    async def generate(self, request_id: str, params: GenerationParams
                       ) -> AsyncIterator[TextMessage | DoneMessage]:
        """Yields the worker's messages for one request: its text, then its DoneMessage.
        A request the worker refuses raises RequestDoesNotFit before any message; one that fails
        raises WorkerError.

        Leaving the iteration early (a client that went away) cancels the request in the worker.
        """
        messages: asyncio.Queue[RequestMessage | WorkerError] = asyncio.Queue()
        self._requests[request_id] = messages
        finished = False
        try:
            await self._send(GenerateCommand(op="generate", id=request_id, **params))
            while True:
                message = await messages.get()
                if isinstance(message, WorkerError):
                    raise message
                if "done" not in message:  # a piece of output
                    yield cast(TextMessage, message)
                    continue
                finished = True  # done or failed: the worker has forgotten it
                if message["finish_reason"] == "error":
                    error = cast(ErrorMessage, message)
                    if error["refused"] == "context":
                        raise PromptTooLong(error["error"], param=prompt_field(params))
                    if error["refused"]:
                        raise RequestDoesNotFit(error["error"])
                    raise WorkerError(f"generation failed in model {self.model_name!r}: "
                                      f"{error['error']}")
                yield cast(DoneMessage, message)
                return
        finally:
            self._requests.pop(request_id, None)
            if not finished and self.alive:
                await self.cancel(request_id)

    async def cancel(self, request_id: str) -> None:
        try:
            await self._send(CancelCommand(op="cancel", id=request_id))
        except WorkerError:
            pass  # a dead worker has nothing left to cancel

    async def _send(self, message: Command) -> None:
        if not self.alive:
            raise self._death_error()
        try:
            self._process.stdin.write(encode(message))
            await self._process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self._death_error() from None

    # -- reader tasks ---------------------------------------------------------------------

    async def _read_events(self) -> None:
        stdout = self._process.stdout
        while line := await stdout.readline():
            self._last_heard = time.monotonic()
            try:
                self._dispatch(decode_message(line))
            except ValueError:
                log.warning("worker %s sent a malformed line: %r", self.model_name, line[:200])
        # EOF: the process is gone (or going). Wait for its status so the error can say why.
        await self._process.wait()
        if self._watchdog is not None:
            self._watchdog.cancel()
        error = self._death_error()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for events in self._requests.values():
            events.put_nowait(error)
        if not self._stopping:
            log.error("%s", error)
            if self._on_exit is not None:
                self._on_exit(self)

    def _dispatch(self, event: Message) -> None:
        if "id" in event:  # about one request
            if (messages := self._requests.get(event["id"])) is not None:
                messages.put_nowait(event)
            return
        kind = event["event"]
        if kind == "ready":
            if not self._ready.done():
                self._ready.set_result(event)
        elif kind == "fatal":
            if not self._ready.done():
                self._ready.set_exception(WorkerError(
                    f"model {self.model_name!r} failed to load: {event['message']}"))
        elif kind == "memory":
            self.memory = memory_report(event)
        elif kind == "trim":
            log.warning("model %s: worker pid %s held %d bytes, past its estimate of %d; "
                        "trimmed %d prompt cache entries (%d bytes), now %d bytes",
                        self.model_name, self.pid, event["live_bytes_before"],
                        event["limit_bytes"], event["prompt_cache_entries_freed"],
                        event["prompt_cache_bytes_freed"], event["live_bytes_after"])
            if self._on_trim is not None:
                self._on_trim(self)

    async def _watch_heartbeat(self) -> None:
        """Kills the worker once it has sent nothing for heartbeat_seconds. A tick that comes
        late means the event loop itself was held up (its reader too): that round is skipped."""
        period = self._heartbeat_seconds / BEATS_PER_WINDOW
        while self._process.returncode is None and not self._stopping:
            tick = time.monotonic()
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - tick > 2 * period:
                continue
            silent = now - self._last_heard
            if silent > self._heartbeat_seconds and self._process.returncode is None:
                self.hung = True
                log.error("worker pid %s for model %s sent no heartbeat for %.1f s (the limit "
                          "is c.MlxApp.worker_heartbeat_seconds = %g): taken for hung, killing "
                          "it; its %d request(s) fail", self.pid, self.model_name, silent,
                          self._heartbeat_seconds, len(self._requests))
                self._process.kill()
                return

    async def _read_stderr(self) -> None:
        while line := await self._process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(text)
            worker_log.debug("[%s] %s", self.model_name, text)

    def _death_error(self) -> WorkerError:
        code = self._process.returncode if self._process else None
        if self.hung:
            return WorkerError(f"the worker process for model {self.model_name!r} stopped "
                               f"answering (no heartbeat for {self._heartbeat_seconds:g} s) "
                               f"and was killed; the next request starts a fresh one")
        tail = " | ".join(line for line in list(self._stderr_tail)[-3:] if line.strip())
        detail = f"; last output: {tail}" if tail else ""
        return WorkerError(f"the worker process for model {self.model_name!r} exited "
                           f"(code {code}){detail}")
