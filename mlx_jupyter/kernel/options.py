"""What a `%%mlx` cell asks for: its options (parsed with shlex and argparse) and its prompt,
with `{var}`, `{In[n]}` and `{Out[n]}` taken from the user's namespace."""

from __future__ import annotations

import argparse
import keyword
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError

from ..limits import (
    MAX_PENALTY,
    MAX_PRIORITY,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
    MIN_PRIORITY,
)

FORMATS = ("markdown", "text", "code", "html", "json", "math")
USAGE = ("%%mlx [MODEL] [-f markdown|text|code|html|json|math] [--max-tokens N] "
         "[--temperature F] [--top-p F] [--top-k N] [--min-p F] [--repetition-penalty F] "
         "[--frequency-penalty F] [--presence-penalty F] [--seed N] [--stop S]... "
         "[--system TEXT] [--priority N] [--schema NAME] [--logprobs] [--top-logprobs K] "
         "[-o VAR] [--chat [NAME]] [--no-stream] [--no-interpolate]")
DEFAULT_CHAT = "default"
DEFAULT_TOP_LOGPROBS = 5  # the alternatives --logprobs shows per token without --top-logprobs
# What --logprobs shows (the tokens) stands in for these formats' rendering only.
LOGPROBS_FORMATS = ("markdown", "text")
# The sampling options sent as they are: (option's field, what it takes).
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "frequency_penalty", "presence_penalty", "seed", "stop", "priority")

# {name} or {name[3]} / {name[-1]}: names and indexes only, never arbitrary expressions.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\[(-?\d+)\])?\}")
_CHAT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class CellRequest:
    """What one `%%mlx` cell asks for."""

    model: str | None  # None: the server's default_model setting
    messages: list[dict[str, str]]
    options: dict[str, Any] = field(default_factory=dict)  # only the options given
    stream: bool = True
    format: str = "markdown"
    output: str | None = None  # the variable that receives the answer (its text, or value)
    chat: str | None = None  # the named conversation this cell continues
    schema: str | None = None  # --schema: the name, in the user's namespace, of the schema

    @property
    def logprobs(self) -> bool:
        return bool(self.options.get("logprobs"))

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


class _ArgumentParser(argparse.ArgumentParser):
    # argparse would print to stderr and exit the kernel; a UsageError becomes one line.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise UsageError(message or "")


def _bounded(kind: type, low: float | None = None, high: float | None = None,
             low_open: bool = False) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {kind.__name__} value: {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            where = f"{'above' if low_open else 'at least'} {low}" if high is None else \
                f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text} is not {where}")
        return value
    convert.__name__ = kind.__name__
    return convert


def _variable(text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


def _schema_name(text: str) -> str:
    if not all(part.isidentifier() and not keyword.iskeyword(part)
               for part in text.split(".")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a name (a variable of the notebook, or its attribute: a.B)")
    return text


def _chat_name(text: str) -> str:
    if not _CHAT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a conversation name (letters, digits, _ . -; up to 64)")
    return text


def _cell_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="%%mlx", usage=USAGE, add_help=False, allow_abbrev=False,
                             exit_on_error=False)
    parser.add_argument("model", nargs="?")
    parser.add_argument("-f", "--format", choices=FORMATS)
    parser.add_argument("--max-tokens", type=_bounded(int, 1, MAX_TOKENS))
    parser.add_argument("--temperature", type=_bounded(float, 0.0, MAX_TEMPERATURE))
    parser.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True))
    parser.add_argument("--top-k", type=_bounded(int, 0))
    parser.add_argument("--min-p", type=_bounded(float, 0.0, 1.0))
    parser.add_argument("--repetition-penalty",
                        type=_bounded(float, 0.0, MAX_REPETITION_PENALTY, low_open=True))
    parser.add_argument("--frequency-penalty", type=_bounded(float, -MAX_PENALTY, MAX_PENALTY))
    parser.add_argument("--presence-penalty", type=_bounded(float, -MAX_PENALTY, MAX_PENALTY))
    parser.add_argument("--seed", type=_bounded(int, 0, MAX_SEED))
    parser.add_argument("--stop", action="append")
    parser.add_argument("--system")
    parser.add_argument("--priority", type=_bounded(int, MIN_PRIORITY, MAX_PRIORITY))
    parser.add_argument("--schema", type=_schema_name)
    parser.add_argument("--logprobs", action="store_true")
    parser.add_argument("--top-logprobs", type=_bounded(int, 0, MAX_TOP_LOGPROBS))
    parser.add_argument("-o", "--output", type=_variable)
    parser.add_argument("--chat", nargs="?", const=DEFAULT_CHAT, type=_chat_name)
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    parser.add_argument("--no-interpolate", dest="interpolate", action="store_false")
    return parser


def parse_cell(line: str, cell: str, default_model: str | None,
               namespace: Mapping[str, Any] | None = None, *,
               default_format: str = "markdown") -> CellRequest:
    """Parses a `%%mlx` line and its cell; raises UsageError on a bad option. With a
    namespace, placeholders in the cell are filled from it (unless --no-interpolate)."""
    try:
        args = _cell_parser().parse_args(shlex.split(line))
    except ValueError as exc:  # shlex: an unclosed quote
        raise UsageError(str(exc)) from None
    except argparse.ArgumentError as exc:
        raise UsageError(str(exc)) from None
    if any(not stop for stop in args.stop or ()):
        raise UsageError("--stop strings must not be empty")
    if args.schema is not None and args.format not in (None, "json"):
        raise UsageError(f"--schema answers in JSON; leave out -f {args.format}")
    logprobs = args.logprobs or args.top_logprobs is not None  # --top-logprobs implies it
    if logprobs and args.format not in (None, *LOGPROBS_FORMATS):
        raise UsageError(f"--logprobs shows the answer's tokens; it does not go with "
                         f"-f {args.format}")
    prompt = cell.strip()
    if not prompt:
        raise UsageError("the cell is empty; write the prompt below the %%mlx line")
    if namespace is not None and args.interpolate:
        prompt = interpolate(prompt, namespace)
    messages = [{"role": "user", "content": prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    options = {name: getattr(args, name) for name in _SAMPLING
               if getattr(args, name) is not None}
    if logprobs:
        options["logprobs"] = True
        options["top_logprobs"] = DEFAULT_TOP_LOGPROBS if args.top_logprobs is None \
            else args.top_logprobs
    answer_format = "json" if args.schema is not None else args.format or default_format
    if logprobs and answer_format not in LOGPROBS_FORMATS and args.schema is None:
        answer_format = "markdown"  # a configured default the token view stands in for
    return CellRequest(model=args.model or default_model or None, messages=messages,
                       options=options, stream=args.stream, format=answer_format,
                       output=args.output, chat=args.chat, schema=args.schema)


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Replaces `{name}` with str(namespace[name]) and `{name[i]}` with str(namespace[name][i])
    (so `{In[3]}`, `{Out[2]}`); a placeholder that does not resolve stays as written."""
    def value(match: re.Match[str]) -> str:
        name, index = match.group(1), match.group(2)
        if name not in namespace:
            return match.group(0)
        found = namespace[name]
        if index is not None:
            try:
                found = found[int(index)]
            except (LookupError, TypeError, ValueError):
                return match.group(0)
        return str(found)

    return _PLACEHOLDER.sub(value, text)
