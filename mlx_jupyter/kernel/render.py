"""How answers and tables appear in a cell: live displays, the final format, footers, tables.

Every rich output also carries text/plain, so terminals, nbconvert and tests read it too.
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from IPython.display import display, update_display

from .http import GenerationResult

# At most this many display updates per second while tokens stream in.
UPDATES_PER_SECOND = 12
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


class Output(Protocol):
    def update(self, text: str) -> None:
        """Shows the text so far; may skip updates that come too fast."""

    def reason(self, reasoning: str, done: bool = False) -> None:
        """Shows what the model thought so far, before its answer; folded away once done.
        May skip updates that come too fast, but not the one that is done."""

    def finish(self, bundle: dict[str, Any], footer: str | None,
               metadata: dict[str, Any] | None = None) -> None:
        """Shows the final answer (a MIME bundle), then the footer line if any."""


class LiveDisplay:
    """One display updated in place while the answer grows, for kernels with a frontend.
    Markdown renders as it streams; other formats stream as plain text and render at the end."""

    def __init__(self, mime: str = "text/markdown",
                 updates_per_second: float = UPDATES_PER_SECOND):
        self._mime = mime
        self._interval = 1.0 / updates_per_second
        self._last_update = float("-inf")
        self._display_id: str | None = None
        self._last_reasoning = float("-inf")
        self._reasoning_id: str | None = None  # a display of its own, above the answer's

    def update(self, text: str) -> None:
        now = time.monotonic()
        if text and now - self._last_update >= self._interval:
            self._last_update = now
            self._show({self._mime: text, "text/plain": text})

    def reason(self, reasoning: str, done: bool = False) -> None:
        now = time.monotonic()
        if not reasoning or (not done and now - self._last_reasoning < self._interval):
            return
        self._last_reasoning = now
        bundle = reasoning_bundle(reasoning, folded=done)
        if self._reasoning_id is None:
            self._reasoning_id = display(bundle, raw=True, display_id=True).display_id
        else:
            update_display(bundle, raw=True, display_id=self._reasoning_id)

    def finish(self, bundle: dict[str, Any], footer: str | None,
               metadata: dict[str, Any] | None = None) -> None:
        if bundle.get("text/plain") or self._display_id is not None:
            self._show(bundle, metadata)
        if footer:
            # A separate display: an unclosed code fence in the text cannot swallow it.
            display({"text/markdown": f"<sub>{html.escape(footer)}</sub>",
                     "text/plain": footer}, raw=True, metadata=metadata)

    def _show(self, bundle: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        if self._display_id is None:
            handle = display(bundle, raw=True, display_id=True, metadata=metadata)
            self._display_id = handle.display_id
        else:
            update_display(bundle, raw=True, display_id=self._display_id, metadata=metadata)


class PlainText:
    """Prints the text as it grows, for terminal IPython."""

    def __init__(self) -> None:
        self._printed = ""
        self._reasoned = 0  # characters of reasoning printed; -1 once closed by a blank line

    def update(self, text: str) -> None:
        if text == self._printed:
            return
        self._end_reasoning()
        # The final form of an answer may differ from what streamed (pretty-printed JSON):
        # then it is printed whole, on a line of its own.
        grown = text.startswith(self._printed)
        sys.stdout.write(text[len(self._printed):] if grown else f"\n{text}")
        sys.stdout.flush()
        self._printed = text

    def reason(self, reasoning: str, done: bool = False) -> None:
        if self._reasoned < 0 or self._printed:
            return  # the answer has begun: its reasoning was printed before it
        if not self._reasoned and reasoning:
            sys.stdout.write("Reasoning: ")
        sys.stdout.write(reasoning[self._reasoned:])
        sys.stdout.flush()
        self._reasoned = len(reasoning)
        if done:
            self._end_reasoning()

    def _end_reasoning(self) -> None:
        if self._reasoned > 0:
            sys.stdout.write("\n\n")
        self._reasoned = -1

    def finish(self, bundle: dict[str, Any], footer: str | None,
               metadata: dict[str, Any] | None = None) -> None:
        self.update(bundle.get("text/plain", ""))
        if self._printed:
            sys.stdout.write("\n")
        if footer:
            sys.stdout.write(f"[{footer}]\n")
        sys.stdout.flush()


def live_mime(answer_format: str) -> str:
    return "text/markdown" if answer_format in ("markdown", "code") else "text/plain"


def final_bundle(text: str, answer_format: str) -> tuple[dict[str, str], str | None]:
    """The answer as its format's MIME bundle, and a problem to report (the answer is not
    the JSON it was asked to be), if any."""
    bundle = {"text/plain": text}
    if answer_format == "markdown":
        bundle["text/markdown"] = text
    elif answer_format == "code":
        bundle["text/markdown"] = f"```\n{code_of(text)}\n```"
    elif answer_format == "html":
        bundle["text/html"] = text
    elif answer_format == "math":
        body = text.strip()
        bundle["text/latex"] = body if body.startswith("$") else f"$$\n{body}\n$$"
    elif answer_format == "json":
        try:
            bundle["application/json"] = json.loads(code_of(text))
        except ValueError as exc:
            return bundle, f"the answer is not valid JSON ({exc})"
    return bundle, None


def json_bundle(value: Any) -> dict[str, str]:
    """A structured answer's value (JSON-able), pretty-printed: highlighted in notebooks."""
    pretty = json.dumps(value, indent=2, ensure_ascii=False)
    return {"text/plain": pretty, "text/markdown": f"```json\n{pretty}\n```"}


def reasoning_bundle(reasoning: str, *, folded: bool = True) -> dict[str, str]:
    """What a model thought before its answer: a "Reasoning" fold (open while it streams)."""
    opened = "" if folded else " open"
    return {"text/plain": f"Reasoning: {reasoning}",
            "text/html": f"<details{opened}><summary>Reasoning</summary>"
                         f"<div style='white-space:pre-wrap;opacity:0.75'>"
                         f"{html.escape(reasoning)}</div></details>"}


def logprobs_bundle(text: str, logprobs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The answer with each token shaded by its probability (HTML), and as text."""
    return {"text/plain": text, "text/html": logprobs_html(logprobs)}


def logprobs_html(logprobs: Sequence[Mapping[str, Any]]) -> str:
    """One span per token, its background from red (improbable) through yellow to green
    (certain), its title the token's probability and its top alternatives'."""
    spans = "".join(_token_span(entry) for entry in logprobs)
    return ("<div class='mlx-logprobs' style='white-space:pre-wrap;line-height:1.7;"
            "font-family:var(--jp-code-font-family,monospace)'>" + spans + "</div>")


def probability(logprob: object) -> float | None:
    """exp(logprob), within [0, 1]; None for what is not a number."""
    if not isinstance(logprob, int | float) or isinstance(logprob, bool) or \
            math.isnan(logprob):
        return None
    return min(1.0, max(0.0, math.exp(min(float(logprob), 0.0))))


def shade(p: float | None) -> str:
    """The background of a token of probability p: hue 0 (red) at 0 to 120 (green) at 1."""
    if p is None:
        return "transparent"
    return f"hsl({round(120 * p)},85%,82%)"


def percent(p: float | None) -> str:
    if p is None:
        return "?"
    if p == 0 or p >= 0.001:
        return f"{p:.1%}"
    return f"{p * 100:.2g}%"


def _token_span(entry: Mapping[str, Any]) -> str:
    token = str(entry.get("token", ""))
    p = probability(entry.get("logprob"))
    lines = [f"{_shown(token)}  {percent(p)}"]
    alternatives = [alt for alt in entry.get("top_logprobs") or () if isinstance(alt, Mapping)]
    if alternatives:
        lines.append("top:")
        lines += [f"  {_shown(str(alt.get('token', '')))}  "
                  f"{percent(probability(alt.get('logprob')))}" for alt in alternatives]
    data = "" if p is None else f" data-p='{p:.4f}'"
    return (f"<span class='mlx-token'{data} title='{html.escape(chr(10).join(lines))}' "
            f"style='background-color:{shade(p)};color:#111;border-radius:2px'>"
            f"{html.escape(token)}</span>")


def _shown(token: str) -> str:
    """A token as the tooltip names it: quoted, its spaces and newlines visible."""
    return json.dumps(token, ensure_ascii=False)


def code_of(text: str) -> str:
    """The first fenced block of an answer, or the whole answer when it has none."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip("\n")


def tokens_per_second(timings: Mapping[str, Any] | None) -> str:
    """The decode speed the server computed for a request, to a tenth (an answer's figure is
    the one its history row stores); "" where it has none."""
    value = (timings or {}).get("tokens_per_second")
    return f"{value:.1f}" if isinstance(value, int | float) else ""


def footer(model: str, result: GenerationResult | None) -> str:
    """E.g. "demo · 42 tokens · 31.5 tok/s", plus the finish reason unless "stop", and the
    max_tokens the model's context cut the answer to, if it did."""
    if result is None:
        return model
    parts = [result.model or model]
    tokens = result.usage.get("completion_tokens")
    if tokens is not None:
        parts.append(f"{tokens} token{'' if tokens == 1 else 's'}")
    if speed := tokens_per_second(result.timings):
        parts.append(f"{speed} tok/s")
    if result.finish_reason != "stop":
        parts.append(result.finish_reason)
    if result.max_tokens_clipped_to is not None:
        parts.append(f"max tokens cut to {result.max_tokens_clipped_to} by the model's context")
    return " · ".join(part for part in parts if part)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> None:
    """Displays a table: HTML for notebooks, aligned text for everything else."""
    if not rows:
        print(empty)
        return
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    text = "\n".join("  ".join(value.ljust(w) for value, w in zip(row, widths)).rstrip()
                     for row in [list(headers), ["-" * w for w in widths], *cells])
    display({"text/html": html_table(headers, rows, empty), "text/plain": text}, raw=True)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    if not rows:
        return f"<i>{html.escape(empty)}</i>"
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(value))}</td>" for value in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def when(value: object) -> str:
    """A time from the server (ISO 8601, UTC) in this machine's time zone, to the second."""
    if not isinstance(value, str) or not value:
        return "" if value is None else str(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # the server keeps UTC
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


_MESSAGE = re.compile(r'"role":\s*"(\w+)",\s*"content":\s*"((?:[^"\\]|\\.)*)"')


def prompt_preview(preview: str | None, chars: int) -> str:
    """What a history row asked, in at most `chars` characters. A chat request's preview is
    the start of its messages as JSON, cut short by the server: the last user message that
    is whole in it stands for the request, not the brackets and keys."""
    text = preview or ""
    if text.startswith("[{"):
        messages = _MESSAGE.findall(text)
        users = [content for role, content in messages if role == "user"]
        if messages:
            content = (users or [messages[-1][1]])[-1]
            try:
                text = json.loads(f'"{content}"')  # its escapes, \n and \uXXXX
            except ValueError:
                text = content
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars - 1] + "…"


def gigabytes(value: object) -> str:
    return f"{value / 1024**3:.2f} GB" if isinstance(value, int | float) else "?"


def live_memory(model: Mapping[str, Any]) -> str:
    """What a loaded model's worker holds now, by its own report (else its RSS), with the
    part its prompt cache holds; "" for a model that is not loaded."""
    live = model.get("live") or {}
    held = live.get("live_bytes", model.get("rss_bytes"))
    if held is None:
        return ""
    cache = live.get("prompt_cache_bytes")
    return gigabytes(held) + (f" ({gigabytes(cache)} prompt cache)" if cache else "")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    return " ".join(str(value).split())


QUEUE_HEADERS = ["model", "state", "request", "priority", "position", "ETA s", "waited s"]
SETTINGS_HEADERS = ["setting", "value", "default", "what it does"]


def queue_rows(queue: dict[str, Any]) -> list[list[Any]]:
    """The rows of `GET mlx/api/queue` under QUEUE_HEADERS: running, then waiting, per model."""
    rows: list[list[Any]] = []
    for name, model in sorted(queue.get("models", {}).items()):
        rows += [[name, "running", r["request_id"], r["priority"], "", "", r["waited_seconds"]]
                 for r in model.get("active", [])]
        rows += [[name, "queued", r["request_id"], r["priority"], r["position"],
                  r.get("eta_seconds"), r["waited_seconds"]] for r in model.get("queued", [])]
    return rows


def settings_rows(settings: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """The rows of `GET mlx/api/settings` under SETTINGS_HEADERS."""
    return [[key, s["value"], s["default"], s["description"]]
            for key, s in sorted(settings.items())]
