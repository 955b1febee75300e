"""Model families' markers, and the router that splits an answer as it streams.

A model writes three kinds of text into one stream: its answer, its thinking between thinking
markers (`<think>…</think>`), and tool calls between tool-call markers (`<tool_call>…
</tool_call>`). `OutputRouter` reads the stream piece by piece and hands each kind on apart:
answer text as it comes, thinking as it comes, and each tool call whole once its closing marker
came, parsed by the model family's parser (mlx-lm's, which the worker passes in).

Pure Python: the server imports the markers (forcing a call needs them known).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The tool-call syntax a forced call is written in: JSON {"name", "arguments"} between markers.
# mlx-lm's "json_tools" parser reads it (Hermes, Qwen 2.5, the demo model); a model with no
# tool syntax of its own is given this one. Other families' syntaxes are read, not forced.
JSON_TOOL_PARSER = "json_tools"


@dataclass(frozen=True)
class ToolSyntax:
    call_start: str = "<tool_call>"
    call_end: str = "</tool_call>"


def can_force_calls(tool_parser: str | None) -> bool:
    """Whether calls can be forced in this family's syntax (None: the model has none, and is
    given the JSON one)."""
    return tool_parser in (None, JSON_TOOL_PARSER)


# A piece of routed output: (kind, value), kind "text", "reasoning" or "tool_call" (a dict
# {"name", "arguments"} as the parser read it, arguments a JSON object).
Piece = tuple[str, Any]
ToolParser = Callable[[str, Any], Any]


class OutputRouter:
    """Splits one answer's text into text, thinking and tool calls.

    `feed` takes the next text and returns the pieces it completes; `close` returns what is
    left at the end (an unfinished tool call is returned as text: nothing is dropped). Text
    that may be the beginning of a marker is held back until the next piece says.
    """

    def __init__(self, *, think: tuple[str, str] | None = None, thinking: bool = False,
                 tools: ToolSyntax | None = None, parse: ToolParser | None = None,
                 tool_specs: Any = None):
        """think: the thinking markers, if the model has them; thinking: the prompt ended
        inside a thinking block (its template opened it); tools: the tool-call markers, when
        calls are to be parsed, with `parse`."""
        self._think = think
        self._tools = tools
        self._parse = parse
        self._tool_specs = tool_specs
        self._state = "reasoning" if thinking and think else "text"
        self._held = ""  # text not yet routed
        self._call = ""  # the tool call being read
        self._blank = ""  # whitespace since the last call: what separates calls, not text
        self._called = False  # a call was read

    def _markers(self) -> dict[str, str]:
        """The markers that may come now: marker -> the state it leads to."""
        if self._state == "reasoning":
            return {self._think[1]: "text"} if self._think else {}
        if self._state == "tool_call":
            return {self._tools.call_end: "text"} if self._tools else {}
        markers = {}
        if self._think:
            markers[self._think[0]] = "reasoning"
        if self._tools:
            markers[self._tools.call_start] = "tool_call"
        return markers

    def feed(self, text: str) -> list[Piece]:
        self._held += text
        pieces: list[Piece] = []
        while self._held:
            markers = self._markers()
            found = [(self._held.find(m), m) for m in markers if m in self._held]
            if found:
                at, marker = min(found)
                self._emit(self._held[:at], pieces)
                self._held = self._held[at + len(marker):]
                self._switch(markers[marker], pieces)
                continue
            keep = _partial_marker(self._held, markers)
            self._emit(self._held[:len(self._held) - keep], pieces)
            self._held = self._held[len(self._held) - keep:]
            break
        return pieces

    def close(self) -> list[Piece]:
        pieces: list[Piece] = []
        self._emit(self._held, pieces)
        self._held = ""
        if self._state == "tool_call":  # cut before its closing marker: kept as text
            pieces.append(("text", self._tools.call_start + self._call))
            self._call = ""
        return pieces

    def _emit(self, text: str, pieces: list[Piece]) -> None:
        if not text:
            return
        if self._state == "tool_call":
            self._call += text
        elif self._state == "text" and self._called and not (self._blank + text).strip():
            self._blank += text  # between or after calls: dropped unless text follows
        else:
            if self._state == "text" and self._blank:
                text, self._blank = self._blank + text, ""
            pieces.append((self._state, text))

    def _switch(self, state: str, pieces: list[Piece]) -> None:
        if self._state == "tool_call":
            read = self._read_call(self._call)
            self._called = self._called or any(kind == "tool_call" for kind, _ in read)
            pieces.extend(read)
            self._call = ""
        elif state == "tool_call":
            self._blank = ""  # what separated it from the call before
        self._state = state

    def _read_call(self, text: str) -> list[Piece]:
        try:
            parsed = self._parse(text, self._tool_specs) if self._parse else None
        except Exception:  # a call the parser cannot read stays in the answer as text
            parsed = None
        calls = parsed if isinstance(parsed, list) else [parsed]
        if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                for c in calls):
            assert self._tools is not None
            return [("text", self._tools.call_start + text + self._tools.call_end)]
        return [("tool_call", call) for call in calls]


def _partial_marker(text: str, markers: dict[str, str]) -> int:
    """How many characters at the end of text may begin one of the markers."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest
