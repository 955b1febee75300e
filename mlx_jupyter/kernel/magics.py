"""The `%%mlx` cell magic and the `%mlx` commands.

    %load_ext mlx_jupyter

    %%mlx demo --max-tokens 64 --system "Answer briefly."
    What is {topic}?

Errors are shown as one red line, never as a traceback, and do not raise.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Bool, Enum, Float, Int, Unicode

from ..limits import MAX_PENALTY, MAX_REPETITION_PENALTY, MODEL_ACTIONS
from . import render
from .client import Client, EventStream
from .errors import (
    AuthenticationError,
    ConnectionFailed,
    InvalidRequest,
    MlxError,
    ServerNotFound,
    StructuredOutputError,
)
from .http import GenerationResult
from .options import DEFAULT_TOP_LOGPROBS, FORMATS, USAGE, CellRequest, parse_cell
from .structured import Structured, cut_message, resolve

COMMANDS = """\
%mlx list                  the models the server knows
%mlx status                version, memory, loaded models
%mlx load|unload|pin|unpin MODEL
%mlx queue                 requests running and waiting, per model
%mlx cancel REQUEST_ID     cancel a queued or running request
%mlx history [N]           the last N requests (default 10)
%mlx settings              the server's settings
%mlx chat [list | reset [NAME]]   the conversations of --chat
%mlx panel                 the control panel (models, queue, playground, history, settings)
%mlx help                  this help"""

HELP = f"""\
{USAGE}
    Sends the cell to MODEL (default: the server's default model) and streams the answer;
    what the model thinks first (its reasoning) is shown folded away above it.
    -f, --format F     markdown (default), text, code (also put in a new cell below),
                       html, json, math
    --max-tokens N     most tokens to generate
    --temperature F    sampling temperature (0 = greedy)
    --top-p F          nucleus sampling threshold
    --top-k N          sample among the N likeliest tokens (0: all)
    --min-p F          drop tokens less likely than F times the likeliest one
    --repetition-penalty F
                       above 1 discourages repeating recent tokens (at most
                       {MAX_REPETITION_PENALTY:g})
    --frequency-penalty F, --presence-penalty F
                       from -{MAX_PENALTY:g} to {MAX_PENALTY:g}, as OpenAI defines them
    --seed N           random seed, for reproducible sampling (without it, the server picks
                       one and the output's metadata records it)
    --stop S           stop at S (repeatable)
    --system TEXT      a system message before the cell
    --priority N       higher runs first when the server is busy
    --schema NAME      answer in JSON valid for NAME (a pydantic model class, a dataclass,
                       a TypedDict or a JSON-schema dict of the notebook), checked, shown
                       pretty-printed; -o VAR gets the value (a NAME instance, or a dict)
    --logprobs         show each token shaded by its probability, its likeliest
                       alternatives on hover
    --top-logprobs K   how many alternatives (default {DEFAULT_TOP_LOGPROBS}); implies --logprobs
    -o, --output VAR   also store the answer's text in VAR (with --schema, its value)
    --chat [NAME]      continue the conversation NAME (default "default")
    --no-stream        show the answer only once it is complete
    --no-interpolate   send {{var}}, {{In[n]}}, {{Out[n]}} as written instead of their values
{COMMANDS}
From Python: `from mlx_jupyter import Client, panel`. Interrupt the kernel to cancel.
`%config MlxMagics.default_model = "..."` (also default_format, default_max_tokens,
default_temperature, system_prompt, interpolate)."""

# Errors after which the next call discovers the server again: it may have restarted.
_STALE_CLIENT_ERRORS = (ServerNotFound, ConnectionFailed, AuthenticationError)


@magics_class
class MlxMagics(Magics):
    default_model = Unicode(
        "", help="The model %%mlx uses when the cell names none; empty: the server's "
                 "default_model setting.").tag(config=True)
    default_format = Enum(FORMATS, "markdown", help="The format of answers without -f."
                          ).tag(config=True)
    default_max_tokens = Int(0, help="--max-tokens when not given; 0: the server's setting."
                             ).tag(config=True)
    default_temperature = Float(None, allow_none=True,
                                help="--temperature when not given; None: the server's "
                                     "setting.").tag(config=True)
    system_prompt = Unicode("", help="A system message for cells without --system."
                            ).tag(config=True)
    interpolate = Bool(True, help="Fill {var}, {In[n]} and {Out[n]} in cells (unless "
                                  "--no-interpolate).").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self._client: Client | None = None
        self._panel: Any = None  # the last `%mlx panel`
        self.conversations: dict[str, list[dict[str, str]]] = {}

    def close(self) -> None:
        self._close_panel()
        self._forget_client()

    @line_cell_magic
    def mlx(self, line: str, cell: str | None = None) -> None:
        """Generate with a local MLX model: `%%mlx [MODEL] [options]`; `%mlx help`."""
        try:
            if cell is None:
                self._run_command(line)
            else:
                self._run_cell(line, cell)
        except UsageError as exc:
            _show_error(f"{exc}; usage: {USAGE if cell is not None else '%mlx help'}")
        except MlxError as exc:
            if isinstance(exc, _STALE_CLIENT_ERRORS):
                self._forget_client()
            _show_error(str(exc))

    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    # -- %%mlx --------------------------------------------------------------------------

    def _run_cell(self, line: str, cell: str) -> None:
        namespace = self.shell.user_ns if self.shell is not None and self.interpolate else None
        request = self._with_defaults(parse_cell(line, cell, self.default_model, namespace,
                                                 default_format=self.default_format))
        structured = self._structured(request)
        messages = self._conversation_messages(request)
        output = self._new_output(request.format)
        options = request.options if structured is None else \
            {**request.options, "schema": structured}
        try:
            text, result, request_id = (_stream_to if request.stream else _generate_to)(
                output, self.client(), request, messages, options)
        except StructuredOutputError as exc:
            if exc.cut:
                raise MlxError(cut_message(exc.result, option="--max-tokens")) from None
            raise
        if result is None:  # interrupted: show what came, keep nothing
            bundle, _ = render.final_bundle(text, request.format)
            output.finish(bundle, f"{request.model or 'mlx'} · cancelled",
                          _metadata(request, result, request_id))
            return
        if result.reasoning:
            output.reason(result.reasoning, done=True)
        bundle, problem = _final_bundle(request, result, structured)
        output.finish(bundle, render.footer(request.model or "", result),
                      _metadata(request, result))
        if problem:
            _show_error(problem)
        if request.chat is not None:
            self.conversations[request.chat] = [*messages, {"role": "assistant",
                                                            "content": text}]
        if request.output is not None:
            self.shell.user_ns[request.output] = text if structured is None else result.parsed
        if request.format == "code" and text and self.shell is not None:
            self.shell.set_next_input(render.code_of(text), replace=False)

    def _structured(self, request: CellRequest) -> Structured | None:
        """The schema --schema names, from the notebook's namespace."""
        if request.schema is None:
            return None
        namespace = self.shell.user_ns if self.shell is not None else {}
        first, *attributes = request.schema.split(".")
        if first not in namespace:
            raise UsageError(f"--schema {request.schema}: the notebook has no variable "
                             f"{first!r}; define the schema (e.g. a pydantic model) first")
        value, path = namespace[first], first
        for attribute in attributes:
            if not hasattr(value, attribute):
                raise UsageError(f"--schema {request.schema}: {path} has no attribute "
                                 f"{attribute!r}")
            value, path = getattr(value, attribute), f"{path}.{attribute}"
        try:
            return resolve(value, what=request.schema)
        except InvalidRequest as exc:
            raise UsageError(f"--schema {exc}") from None

    def _with_defaults(self, request: CellRequest) -> CellRequest:
        options = dict(request.options)
        if self.default_max_tokens and "max_tokens" not in options:
            options["max_tokens"] = self.default_max_tokens
        if self.default_temperature is not None and "temperature" not in options:
            options["temperature"] = self.default_temperature
        messages = request.messages
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return dataclasses.replace(request, messages=messages, options=options)

    def _conversation_messages(self, request: CellRequest) -> list[dict[str, str]]:
        """The messages to send: the named conversation so far, then this cell's."""
        if request.chat is None:
            return request.messages
        history = self.conversations.get(request.chat, [])
        if history and request.messages[0]["role"] == "system":
            # A conversation keeps its first system message; a new one replaces it.
            history = [m for m in history if m["role"] != "system"]
        return [*request.messages[:-1], *history, request.messages[-1]] \
            if request.messages[0]["role"] == "system" else [*history, *request.messages]

    def _new_output(self, answer_format: str) -> render.Output:
        # A kernel's frontend can redraw a display in place; a terminal cannot.
        if getattr(self.shell, "kernel", None) is not None:
            return render.LiveDisplay(render.live_mime(answer_format))
        return render.PlainText()

    def _forget_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- %mlx COMMAND -------------------------------------------------------------------

    def _run_command(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        command, args = (words[0], words[1:]) if words else ("help", [])
        if command == "help":
            print(HELP)
        elif command in MODEL_ACTIONS:
            self._model_action(command, args)
        elif command in ("list", "status", "queue", "settings", "panel"):
            _no_arguments(command, args)
            getattr(self, f"_show_{command}")()
        elif command == "cancel":
            request_id = _one_argument(command, args, "REQUEST_ID")
            answer = self.client().cancel(request_id)
            print(f"request {request_id}: {answer.get('status')} (it was {answer.get('was')})")
        elif command == "history":
            self._show_history(_count(args))
        elif command == "chat":
            self._chat_command(args)
        else:
            raise UsageError(f"unknown command {command!r}")

    def _model_action(self, action: str, args: list[str]) -> None:
        name = _one_argument(action, args, "MODEL")
        model = getattr(self.client(), action)(name)
        pid = f", pid {model['pid']}" if model.get("pid") else ""
        print(f"{model['name']}: {model['status']}{pid}"
              f"{', pinned' if model.get('pinned') else ''}")

    def _show_list(self) -> None:
        render.table(
            ["model", "status", "source", "memory estimate", "live memory", "pinned", "uses",
             "last used"],
            [[m["name"], m["status"], m.get("source"), render.gigabytes(m.get("budget_bytes")),
              render.live_memory(m), m.get("pinned"), m.get("use_count"),
              render.when(m.get("last_used_at"))]
             for m in self.client().models()], empty="no models")

    def _show_status(self) -> None:
        client = self.client()
        status = client.status()
        print(f"mlx-jupyter {status.get('version', '?')} at {client.url}")
        database = status.get("database") or {}
        if database.get("state") == "unavailable":
            print(f"database unavailable: {database.get('error')}")
        elif database.get("state") == "opening":
            print("database: opening (history and settings answer once it is open)")
        memory = status.get("memory") or {}
        if memory:
            print(f"memory: {render.gigabytes(memory.get('used_by_models'))} used by models of "
                  f"a {render.gigabytes(memory.get('budget'))} budget; "
                  f"{render.gigabytes(memory.get('available'))} of "
                  f"{render.gigabytes(memory.get('total'))} available")
        models = (status.get("models") or {}).get("loaded") or []
        if not models:
            print("no models loaded")
        for model in models:
            print(f"  {model.get('name')}: {model.get('status')} (pid {model.get('pid')}; "
                  f"estimate {render.gigabytes(model.get('budget_bytes'))}, live "
                  f"{render.live_memory(model) or '?'})")

    def _show_queue(self) -> None:
        render.table(render.QUEUE_HEADERS, render.queue_rows(self.client().queue()),
                     empty="the queue is empty")

    def _show_history(self, count: int) -> None:
        render.table(
            ["created", "model", "status", "tokens", "tok/s", "prompt", "request"],
            [[render.when(row.get("created_at")), row.get("model"), row.get("status"),
              row.get("completion_tokens"), render.tokens_per_second(row.get("timings")),
              render.prompt_preview(row.get("prompt_preview"), 60), row["id"]]
             for row in self.client().history(count)], empty="no requests yet")

    def _show_settings(self) -> None:
        render.table(render.SETTINGS_HEADERS, render.settings_rows(self.client().settings()),
                     empty="no settings")

    def _show_panel(self) -> None:
        from .panel import Panel

        # Running the cell again replaces its output, but a widget's refresh thread would
        # outlive its view: the previous panel is closed first.
        self._close_panel()
        self._panel = Panel()  # its own client: the magic's may be replaced after an error
        display(self._panel)

    def _close_panel(self) -> None:
        if self._panel is not None:
            self._panel.close()
            self._panel = None

    def _chat_command(self, args: list[str]) -> None:
        if not args or args == ["list"]:
            render.table(["conversation", "messages"],
                         [[name, len(messages)] for name, messages in
                          sorted(self.conversations.items())], empty="no conversations")
        elif args[0] == "reset" and len(args) <= 2:
            if len(args) == 2 and args[1] not in self.conversations:
                raise UsageError(f"no conversation named {args[1]!r}; `%mlx chat` lists them")
            names = args[1:] or sorted(self.conversations)
            for name in names:
                del self.conversations[name]
            print(f"forgot {', '.join(names)}" if names else "there were no conversations")
        else:
            raise UsageError("use %mlx chat [list | reset [NAME]]")


# What a cell got: the text, the result (None when interrupted) and the request's id if known.
_Answer = tuple[str, GenerationResult | None, str | None]


def _stream_to(output: render.Output, client: Client, request: CellRequest,
               messages: list[dict[str, str]], options: dict[str, Any]) -> _Answer:
    events: EventStream | None = None
    try:
        events = client.stream(model=request.model, messages=messages, **options)
        for event in events:
            if "reasoning" in event:
                output.reason(events.reasoning)
            if "text" in event:
                output.update(events.text)
        result = events.result
        return events.text, result, result.request_id if result else events.request_id
    except KeyboardInterrupt:
        if events is None:
            return "", None, None
        return events.text, None, events.request_id  # the id came with the headers
    except MlxError:
        if events is not None:  # keep what arrived before the error
            output.reason(events.reasoning, done=True)
            output.finish({"text/plain": events.text, "text/markdown": events.text}, None)
        raise
    finally:
        if events is not None:
            events.close()  # before the end: the server cancels the generation


def _generate_to(output: render.Output, client: Client, request: CellRequest,
                 messages: list[dict[str, str]], options: dict[str, Any]) -> _Answer:
    try:
        result = client.generate(model=request.model, messages=messages, **options)
    except KeyboardInterrupt:
        # httpx drops the connection on the way out, which cancels the request. A whole
        # answer has no headers before it, so its id is not known here.
        return "", None, None
    except StructuredOutputError as exc:  # show the answer that is not valid
        if exc.result.reasoning:
            output.reason(exc.result.reasoning, done=True)
        output.finish({"text/plain": exc.result.text}, None)
        raise
    return result.text, result, result.request_id


def _final_bundle(request: CellRequest, result: GenerationResult,
                  structured: Structured | None) -> tuple[dict[str, Any], str | None]:
    """The answer as the cell shows it at the end, and a problem to report, if any: its
    tokens shaded by probability (--logprobs), its value as JSON (--schema), or its format."""
    if request.logprobs:
        if result.logprobs:
            return render.logprobs_bundle(result.text, result.logprobs), None
        if result.text:
            bundle, _ = render.final_bundle(result.text, "text")
            return bundle, "the server sent no logprobs with this answer"
    if structured is not None:
        return render.json_bundle(structured.to_json(result.parsed)), None
    return render.final_bundle(result.text, request.format)


def _metadata(request: CellRequest, result: GenerationResult | None,
              request_id: str | None = None) -> dict[str, Any]:
    """What the notebook keeps of how the answer was made (or cancelled): the options the cell
    gave, and the seed the server sampled with (`--seed` with it gives the same answer)."""
    return {"mlx_jupyter": {
        "model": (result.model if result else None) or request.model,
        "request_id": result.request_id if result else request_id,
        "parameters": request.options, "schema": request.schema,
        "seed": result.seed if result else request.options.get("seed"),
        "format": request.format, "chat": request.chat,
        "finish_reason": result.finish_reason if result else "cancelled",
        "usage": result.usage if result else {}}}


def _no_arguments(command: str, args: list[str]) -> None:
    if args:
        raise UsageError(f"%mlx {command} takes no arguments")


def _one_argument(command: str, args: list[str], what: str) -> str:
    if len(args) != 1:
        raise UsageError(f"use %mlx {command} {what}")
    return args[0]


def _count(args: list[str]) -> int:
    if not args:
        return 10
    if len(args) > 1 or not args[0].isdigit() or not 1 <= int(args[0]) <= 500:
        raise UsageError("use %mlx history [N], N from 1 to 500")
    return int(args[0])


def _show_error(message: str) -> None:
    # Red via ANSI: Jupyter frontends and terminals both render it.
    print(f"\x1b[31mmlx: {message}\x1b[0m", file=sys.stderr)


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
