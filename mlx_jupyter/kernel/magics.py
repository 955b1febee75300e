"""The `%%mlx` cell magic and the `%mlx` line magic.

    %load_ext mlx_jupyter

    %%mlx demo --max-tokens 64 --system "Answer briefly."
    What is MLX?

Errors are shown as one red line, never as a traceback, and do not raise.
"""

from __future__ import annotations

import argparse
import html
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display, update_display
from traitlets import Unicode

from .client import Client, EventStream, GenerationResult
from .errors import AuthenticationError, ConnectionFailed, MlxError, ServerNotFound

USAGE = ("%%mlx [MODEL] [--max-tokens N] [--temperature F] [--top-p F] [--seed N] "
         "[--stop S]... [--system TEXT] [--no-stream]")

HELP = f"""\
{USAGE}
    Sends the cell to MODEL as the user message and streams the answer as Markdown.
    --max-tokens N     most tokens to generate
    --temperature F    sampling temperature (0 = greedy)
    --top-p F          nucleus sampling threshold
    --seed N           random seed, for reproducible sampling
    --stop S           stop at S (repeatable)
    --system TEXT      a system message before the cell
    --no-stream        show the answer only once it is complete
%mlx status            the server's version and its loaded models
%mlx help              this help
From Python: `from mlx_jupyter import Client`. Interrupt the kernel to cancel a generation."""

# At most this many display updates per second while tokens stream in.
UPDATES_PER_SECOND = 12

# Errors after which the next call discovers the server again: it may have restarted.
_STALE_CLIENT_ERRORS = (ServerNotFound, ConnectionFailed, AuthenticationError)


@dataclass(frozen=True)
class CellRequest:
    """What one `%%mlx` cell asks for."""

    model: str
    messages: list[dict[str, str]]
    options: dict[str, Any] = field(default_factory=dict)  # only the options given
    stream: bool = True


class _ArgumentParser(argparse.ArgumentParser):
    # argparse would print to stderr and exit the kernel; a UsageError becomes one line.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise UsageError(message or "")


def _cell_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="%%mlx", usage=USAGE, add_help=False, allow_abbrev=False,
                             exit_on_error=False)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append")
    parser.add_argument("--system")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    return parser


def parse_cell(line: str, cell: str, default_model: str) -> CellRequest:
    """Parses a `%%mlx` line and its cell; raises UsageError on a bad option."""
    try:
        args = _cell_parser().parse_args(shlex.split(line))
    except ValueError as exc:  # shlex: an unclosed quote
        raise UsageError(str(exc)) from None
    except argparse.ArgumentError as exc:
        raise UsageError(str(exc)) from None
    prompt = cell.strip()
    if not prompt:
        raise UsageError("the cell is empty; write the prompt below the %%mlx line")
    messages = [{"role": "user", "content": prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    options = {name: getattr(args, name)
               for name in ("max_tokens", "temperature", "top_p", "seed", "stop")
               if getattr(args, name) is not None}
    return CellRequest(model=args.model or default_model, messages=messages, options=options,
                       stream=args.stream)


@magics_class
class MlxMagics(Magics):
    default_model = Unicode("demo", help="The model %%mlx uses when the cell names none."
                            ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self._client: Client | None = None

    def close(self) -> None:
        self._forget_client()

    @line_cell_magic
    def mlx(self, line: str, cell: str | None = None) -> None:
        """Generate with a local MLX model: `%%mlx [MODEL] [options]`; `%mlx help`."""
        try:
            if cell is None:
                self._run_command(line.strip())
            else:
                self._run_cell(line, cell)
        except UsageError as exc:
            _show_error(f"{exc}; usage: {USAGE}")
        except MlxError as exc:
            if isinstance(exc, _STALE_CLIENT_ERRORS):
                self._forget_client()
            _show_error(str(exc))

    # -- %mlx COMMAND -------------------------------------------------------------------

    def _run_command(self, command: str) -> None:
        if command in ("", "help"):
            print(HELP)
        elif command == "status":
            self._print_status()
        else:
            _show_error(f"unknown command {command!r}; `%mlx help` lists the commands")

    def _print_status(self) -> None:
        client = self._get_client()
        status = client.status()
        print(f"mlx-jupyter {status.get('version', '?')} at {client.url}")
        memory = status.get("memory") or {}
        if memory:
            print(f"memory: {_gb(memory.get('used_by_models'))} used by models of a "
                  f"{_gb(memory.get('budget'))} budget; {_gb(memory.get('available'))} of "
                  f"{_gb(memory.get('total'))} available")
        models = (status.get("models") or {}).get("loaded") or []
        if not models:
            print("no models loaded")
        for model in models:
            print(f"  {model.get('name')}: {model.get('status')} (pid {model.get('pid')}, "
                  f"{_gb(model.get('rss_bytes'))} resident)")

    # -- %%mlx --------------------------------------------------------------------------

    def _run_cell(self, line: str, cell: str) -> None:
        request = parse_cell(line, cell, self.default_model)
        client = self._get_client()
        output = self._new_output()
        if request.stream:
            _stream_to(output, client, request)
        else:
            _generate_to(output, client, request)

    def _get_client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def _forget_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _new_output(self) -> _Output:
        # A kernel's frontend can redraw a display in place; a terminal cannot.
        if getattr(self.shell, "kernel", None) is not None:
            return LiveMarkdown()
        return PlainText()


def _stream_to(output: _Output, client: Client, request: CellRequest) -> None:
    events: EventStream | None = None
    try:
        events = client.stream(model=request.model, messages=request.messages,
                               **request.options)
        for event in events:
            if "text" in event:
                output.update(events.text)
        output.finish(events.text, _footer(request.model, events.result))
    except KeyboardInterrupt:
        if events is not None:
            events.close()  # the server cancels the generation when the response closes
        output.finish(events.text if events is not None else "", f"{request.model} · cancelled")
    except MlxError:
        output.finish(events.text if events is not None else "", None)  # keep what arrived
        raise
    finally:
        if events is not None:
            events.close()


def _generate_to(output: _Output, client: Client, request: CellRequest) -> None:
    try:
        result = client.generate(model=request.model, messages=request.messages,
                                 **request.options)
    except KeyboardInterrupt:
        # httpx drops the connection on the way out, which cancels the request.
        output.finish("", f"{request.model} · cancelled")
        return
    output.finish(result.text, _footer(request.model, result))


def _footer(model: str, result: GenerationResult | None) -> str:
    """E.g. "demo · 42 tokens · 31.5 tok/s", plus the finish reason unless "stop"."""
    if result is None:
        return model
    parts = [result.model or model]
    tokens = result.usage.get("completion_tokens")
    if tokens is not None:
        parts.append(f"{tokens} token{'' if tokens == 1 else 's'}")
    speed = result.timings.get("tokens_per_second")
    if speed is not None:
        parts.append(f"{speed:.1f} tok/s")
    if result.finish_reason != "stop":
        parts.append(result.finish_reason)
    return " · ".join(parts)


def _gb(value: object) -> str:
    return f"{value / 1024**3:.2f} GB" if isinstance(value, int | float) else "?"


def _show_error(message: str) -> None:
    # Red via ANSI: Jupyter frontends and terminals both render it.
    print(f"\x1b[31mmlx: {message}\x1b[0m", file=sys.stderr)


# -- output -------------------------------------------------------------------------------


class _Output(Protocol):
    def update(self, text: str) -> None:
        """Shows the text so far; may skip updates that come too fast."""

    def finish(self, text: str, footer: str | None) -> None:
        """Shows the final text, then the footer line if any."""


class LiveMarkdown:
    """A Markdown display updated in place, for kernels with a rich frontend."""

    def __init__(self, updates_per_second: float = UPDATES_PER_SECOND):
        self._interval = 1.0 / updates_per_second
        self._last_update = float("-inf")
        self._display_id: str | None = None

    def update(self, text: str) -> None:
        now = time.monotonic()
        if text and now - self._last_update >= self._interval:
            self._last_update = now
            self._show(text)

    def finish(self, text: str, footer: str | None) -> None:
        if text or self._display_id is not None:
            self._show(text)
        if footer:
            # A separate display: an unclosed code fence in the text cannot swallow it.
            display({"text/markdown": f"<sub>{html.escape(footer)}</sub>",
                     "text/plain": footer}, raw=True)

    def _show(self, text: str) -> None:
        bundle = {"text/markdown": text, "text/plain": text}
        if self._display_id is None:
            handle = display(bundle, raw=True, display_id=True)
            self._display_id = handle.display_id
        else:
            update_display(bundle, raw=True, display_id=self._display_id)


class PlainText:
    """Prints the text as it grows, for terminal IPython."""

    def __init__(self) -> None:
        self._printed = 0

    def update(self, text: str) -> None:
        sys.stdout.write(text[self._printed:])
        sys.stdout.flush()
        self._printed = len(text)

    def finish(self, text: str, footer: str | None) -> None:
        self.update(text)
        if self._printed:
            sys.stdout.write("\n")
        if footer:
            sys.stdout.write(f"[{footer}]\n")
        sys.stdout.flush()


# -- extension entry points ---------------------------------------------------------------


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(MlxMagics(shell=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    manager = ipython.magics_manager
    magics = manager.registry.pop(MlxMagics.__name__, None)
    if magics is None:
        return
    for kind in ("line", "cell"):
        if getattr(manager.magics[kind].get("mlx"), "__self__", None) is magics:
            del manager.magics[kind]["mlx"]
    if magics in getattr(ipython, "configurables", []):
        ipython.configurables.remove(magics)
    magics.close()
