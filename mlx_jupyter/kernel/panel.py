"""The control panel: an ipywidgets view of the shared models, queue, history and settings,
with a playground that streams answers into it.

    from mlx_jupyter import panel
    panel()

It refreshes itself from a background thread (so the kernel stays free) every few seconds,
stops when closed, and shows errors inside itself instead of raising.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..limits import MAX_SEED, MAX_TEMPERATURE, MAX_TOKENS, MODEL_ACTIONS
from .client import Client, EventStream
from .errors import MlxError
from .render import (
    QUEUE_HEADERS,
    SETTINGS_HEADERS,
    footer,
    gigabytes,
    html_table,
    live_memory,
    prompt_preview,
    queue_rows,
    settings_rows,
    tokens_per_second,
    when,
)

REFRESH_SECONDS = 2.0


def panel(client: Client | None = None, *, refresh_seconds: float = REFRESH_SECONDS) -> Panel:
    """A new control panel of this kernel's Jupyter server (display it: it is a widget)."""
    return Panel(client, refresh_seconds=refresh_seconds)


class Panel(widgets.VBox):
    """Tabs Models, Queue, Playground, History, Settings, and a line for messages."""

    def __init__(self, client: Client | None = None, *,
                 refresh_seconds: float = REFRESH_SECONDS):
        self._owns_client = client is None  # closed with the panel
        self.client = client if client is not None else Client()
        self.message = widgets.HTML()
        self._lock = threading.Lock()  # one refresh at a time, from any thread
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._poll_client: Client | None = None
        self.models_tab = _ModelsTab(self)
        self.queue_tab = _QueueTab(self)
        self.playground = _Playground(self)
        self.history_tab = _HistoryTab(self)
        self.settings_tab = _SettingsTab(self)
        tabs = widgets.Tab(children=[self.models_tab.box, self.queue_tab.box,
                                     self.playground.box, self.history_tab.box,
                                     self.settings_tab.box])
        for index, title in enumerate(["Models", "Queue", "Playground", "History",
                                       "Settings"]):
            tabs.set_title(index, title)
        super().__init__([widgets.HTML(f"<b>mlx-jupyter</b> · {html.escape(self.client.url)}"),
                          tabs, self.message])
        self.refresh(self.client)
        if refresh_seconds > 0:
            self._poller = threading.Thread(target=self._poll, args=(refresh_seconds,),
                                            name="mlx-jupyter-panel", daemon=True)
            self._poller.start()

    @property
    def refreshing(self) -> bool:
        return self._poller is not None and self._poller.is_alive()

    def refresh(self, client: Client | None = None) -> None:
        """Reads models, memory, queue and history again (settings only on request)."""
        client = client or self.client
        with self._lock:
            self.attempt(lambda: self._refresh_with(client), clear=False)

    def close(self) -> None:
        """Stops refreshing and any generation, then closes the widgets."""
        self._stop.set()
        self.playground.stop()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(10)
        if self._owns_client:
            self.client.close()
        super().close()

    def attempt(self, action: Callable[[], Any], *, clear: bool = True) -> Any:
        """Runs an action; an error from the server shows in the panel's message line."""
        try:
            result = action()
        except MlxError as exc:
            self.message.value = (f"<span style='color:#c62828'>"
                                  f"{html.escape(str(exc), quote=False)}</span>")
            return None
        if clear:
            self.message.value = ""
        return result

    def say(self, text: str) -> None:
        self.message.value = html.escape(text, quote=False)

    def _refresh_with(self, client: Client) -> None:
        status = client.status()
        self.models_tab.show(client.models(), status)
        self.queue_tab.show(client.queue())
        self.history_tab.show(client.history(self.history_tab.count))
        if self.message.value.startswith("<span"):  # the server answers again
            self.message.value = ""

    def _poll(self, seconds: float) -> None:
        self._poll_client = self.client.clone()  # httpx clients stay in one thread
        try:
            while not self._stop.wait(seconds):
                self.refresh(self._poll_client)
        finally:
            self._poll_client.close()


class _ModelsTab:
    def __init__(self, panel: Panel):
        self.panel = panel
        self.memory = widgets.FloatProgress(min=0.0, max=1.0, description="memory",
                                            bar_style="info")
        self.memory_text = widgets.Label()
        self.rows = widgets.VBox()
        self.buttons: dict[str, dict[str, widgets.Button]] = {}
        self._labels: dict[str, widgets.HTML] = {}
        self.box = widgets.VBox([widgets.HBox([self.memory, self.memory_text]), self.rows])

    def show(self, models: list[dict[str, Any]], status: dict[str, Any]) -> None:
        memory = status.get("memory") or {}
        budget = memory.get("budget") or 1
        self.memory.max = float(budget)
        self.memory.value = float(min(memory.get("used_by_models") or 0, budget))
        self.memory_text.value = (f"{gigabytes(memory.get('used_by_models'))} of a "
                                  f"{gigabytes(budget)} budget · "
                                  f"{gigabytes(memory.get('total'))} RAM")
        rows = []
        for model in models:
            name = model["name"]
            if name not in self.buttons:
                self._add_row(name)
            self._labels[name].value = (
                f"<b>{html.escape(name)}</b> · {html.escape(model['status'])} · "
                f"estimate {gigabytes(model.get('budget_bytes'))}"
                + (f" · live {html.escape(live)}" if (live := live_memory(model)) else "")
                + f"{' · pinned' if model.get('pinned') else ''}"
                + (f" · <span style='color:#c62828'>{html.escape(model['error'])}</span>"
                   if model.get("error") else ""))
            loaded = model["status"] == "loaded"
            self.buttons[name]["load"].disabled = loaded
            self.buttons[name]["unload"].disabled = not loaded
            self.buttons[name]["pin"].disabled = bool(model.get("pinned"))
            self.buttons[name]["unpin"].disabled = not model.get("pinned")
            rows.append(widgets.HBox([self._labels[name],
                                      *(self.buttons[name][a] for a in MODEL_ACTIONS)]))
        self.rows.children = rows

    def _add_row(self, name: str) -> None:
        self._labels[name] = widgets.HTML(layout=widgets.Layout(width="45%"))
        self.buttons[name] = {}
        for action in MODEL_ACTIONS:
            button = widgets.Button(description=action.capitalize(),
                                    layout=widgets.Layout(width="80px"))
            button.on_click(lambda _button, action=action: self._act(name, action))
            self.buttons[name][action] = button

    def _act(self, name: str, action: str) -> None:
        self.panel.say(f"{action} {name}…")
        done = self.panel.attempt(lambda: getattr(self.panel.client, action)(name))
        if done is not None:
            self.panel.say(f"{name}: {done['status']}{' (pinned)' if done.get('pinned') else ''}")
            self.panel.refresh()


class _QueueTab:
    def __init__(self, panel: Panel):
        self.panel = panel
        self.table = widgets.HTML()
        self.request_id = widgets.Text(placeholder="request id")
        self.cancel = widgets.Button(description="Cancel")
        self.cancel.on_click(lambda _button: self._cancel())
        self.box = widgets.VBox([self.table, widgets.HBox([self.request_id, self.cancel])])

    def show(self, queue: dict[str, Any]) -> None:
        self.table.value = html_table(QUEUE_HEADERS, queue_rows(queue), "The queue is empty.")

    def _cancel(self) -> None:
        request_id = self.request_id.value.strip()
        if not request_id:
            self.panel.say("give the id of the request to cancel")
            return
        answer = self.panel.attempt(lambda: self.panel.client.cancel(request_id))
        if answer is not None:
            self.panel.say(f"request {request_id}: {answer['status']}")
            self.panel.refresh()


class _Playground:
    """Sends only what is filled in: the server applies its own defaults (its settings) to
    the rest, and picks the seed of a sampled answer, which the footer then shows."""

    def __init__(self, panel: Panel):
        self.panel = panel
        self.model = widgets.Text(description="model", placeholder="the server's default")
        self.system = widgets.Text(description="system", placeholder="optional")
        self.prompt = widgets.Textarea(description="prompt", layout=widgets.Layout(width="95%"))
        self.max_tokens = widgets.Text(description="max tokens",
                                       placeholder=f"the server's default (1 to {MAX_TOKENS})")
        self.temperature = widgets.Text(
            description="temperature", placeholder=f"the server's default (0 to "
                                                   f"{MAX_TEMPERATURE:g}; 0 is greedy)")
        self.seed = widgets.Text(description="seed", placeholder="picked by the server")
        self.generate = widgets.Button(description="Generate", button_style="primary")
        self.stop_button = widgets.Button(description="Stop", disabled=True)
        self.answer = widgets.Textarea(layout=widgets.Layout(width="95%", height="12em"),
                                       disabled=True)
        self.footer = widgets.Label()
        self.generate.on_click(lambda _button: self.start())
        self.stop_button.on_click(lambda _button: self.stop())
        self._events: EventStream | None = None
        self._thread: threading.Thread | None = None
        self.box = widgets.VBox([
            widgets.HBox([self.model, self.max_tokens]),
            widgets.HBox([self.temperature, self.seed]), self.system, self.prompt,
            widgets.HBox([self.generate, self.stop_button]), self.answer, self.footer])

    def start(self) -> None:
        """Starts streaming an answer into the panel, in a thread: the kernel stays free."""
        if not self.prompt.value.strip():
            self.panel.say("write a prompt first")
            return
        options: dict[str, Any] = {}
        for name, widget, kind, low, high in [
                ("max_tokens", self.max_tokens, int, 1, MAX_TOKENS),
                ("temperature", self.temperature, float, 0.0, MAX_TEMPERATURE),
                ("seed", self.seed, int, 0, MAX_SEED)]:
            text = widget.value.strip()
            if not text:
                continue  # the server's to choose
            value = _number(text, kind, low, high)
            if value is None:
                what = "a whole number" if kind is int else "a number"
                self.panel.say(f"{widget.description} must be {what} from {low} to {high}, "
                               f"not {text!r}")
                return
            options[name] = value
        messages = ([{"role": "system", "content": self.system.value}]
                    if self.system.value.strip() else [])
        messages.append({"role": "user", "content": self.prompt.value})
        if model := self.model.value.strip():
            options["model"] = model
        options["messages"] = messages
        self.answer.value, self.footer.value = "", "…"
        self.generate.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._run, args=(options,), daemon=True,
                                        name="mlx-jupyter-playground")
        self._thread.start()

    def stop(self) -> None:
        """Cancels the generation on the server; its stream then ends by itself, with its last
        event, so the footer still shows what was made."""
        events = self._events
        if events is None or events.request_id is None:
            return
        try:
            self.panel.client.cancel(events.request_id)
        except MlxError:
            pass  # it has just finished
        self.panel.say("stopping…")

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, options: dict[str, Any]) -> None:
        client = self.panel.client.clone()
        try:
            def stream() -> None:
                self._events = client.stream(**options)
                for event in self._events:
                    if "text" in event:
                        self.answer.value = self._events.text
                result = self._events.result
                seed = f" · seed {result.seed}" if result and result.seed is not None else ""
                self.footer.value = footer(options.get("model", ""), result) + seed
                self.panel.say("")

            self.panel.attempt(stream)
        finally:
            self._events = None
            client.close()
            self.generate.disabled, self.stop_button.disabled = False, True


class _HistoryTab:
    count = 20

    def __init__(self, panel: Panel):
        self.panel = panel
        self.table = widgets.HTML()
        self.box = widgets.VBox([self.table])

    def show(self, rows: list[dict[str, Any]]) -> None:
        self.table.value = html_table(
            ["created", "model", "notebook", "status", "tokens", "tok/s", "prompt"],
            [[when(r.get("created_at")), r.get("model"), r.get("notebook"), r.get("status"),
              r.get("completion_tokens"), tokens_per_second(r.get("timings")),
              prompt_preview(r.get("prompt_preview"), 80)]
             for r in rows],
            "No requests yet.")


class _SettingsTab:
    def __init__(self, panel: Panel):
        self.panel = panel
        self.table = widgets.HTML()
        self.key = widgets.Dropdown(description="setting")
        self.value = widgets.Text(description="value")
        self.save = widgets.Button(description="Save")
        self.reload = widgets.Button(description="Reload")
        self.save.on_click(lambda _button: self._save())
        self.reload.on_click(lambda _button: self.load())
        self._kinds: dict[str, str] = {}
        self.box = widgets.VBox([self.table, widgets.HBox([self.key, self.value, self.save,
                                                           self.reload])])
        self.load()

    def load(self) -> None:
        settings = self.panel.attempt(self.panel.client.settings, clear=False)
        if settings is None:
            return
        self._kinds = {key: s["type"] for key, s in settings.items()}
        self.key.options = sorted(settings)
        self.table.value = html_table(SETTINGS_HEADERS, settings_rows(settings), "No settings.")

    def _save(self) -> None:
        key, text = self.key.value, self.value.value.strip()
        if not key:
            return
        value = _typed(text, self._kinds.get(key, "str"))
        if value is _INVALID:
            self.panel.say(f"{key} takes a value of type {self._kinds.get(key)}, not {text!r}")
            return
        saved = self.panel.attempt(lambda: self.panel.client.set_setting(key, value))
        if saved is not None:
            self.panel.say(f"{key} = {saved['value']!r}")
            self.load()


_INVALID = object()


def _number(text: str, kind: type, low: float, high: float) -> Any:
    """text as a number of `kind` within [low, high], or None."""
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _typed(text: str, kind: str) -> Any:
    """A setting's text as its type (the server validates ranges and says what is wrong)."""
    try:
        return {"int": int, "float": float, "bool": lambda t: {"true": True, "false": False}[
            t.lower()]}.get(kind, str)(text)
    except (KeyError, ValueError):
        return _INVALID
