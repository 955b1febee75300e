"""The messages between the server and a model worker, typed: one JSON object per line.

Server -> worker (stdin): commands, each naming its "op".

    GenerateCommand   {"op": "generate", "id", "prompt" | "messages", ...GenerationParams}:
                       every parameter resolved by the server (its defaults, its seed, its
                       constraint); the worker checks them (`check_generate`) and applies
                       none of its own (a field it does not get takes PARAM_DEFAULTS)
    CancelCommand     {"op": "cancel", "id"}
    ShutdownCommand   {"op": "shutdown"}

Worker -> server (the protocol pipe, the worker's original stdout), two families:

- About one request: the message carries its "id", and otherwise speaks the vocabulary of the
  answers the HTTP clients get (`contracts.generation`): a piece of text is {"text"}, the end is
  {"done": true, "finish_reason", ...}.

    TextMessage       {"id", "index"?, "text" | "reasoning" | "tool_call" | "logprobs"}
                                                           the next piece of answer `index`
                                                           (of the request's n): its text, its
                                                           thinking, a whole tool call, or the
                                                           log-probabilities of its tokens
    DoneMessage       {"id", "done": true, "finish_reason": "stop" | "length" | "cancelled",
                       "usage", "timings", "max_tokens", "choices"}
                                                           its end, once every answer ended
                                                           (choices: how each did); timings
                                                           are the worker's own
                                                           measurements (decode and prefill
                                                           speed); max_tokens is less than asked
                                                           when the model's context was short
    ErrorMessage      {"id", "done": true, "finish_reason": "error", "error", "refused"}
                                                           it failed (refused null), or cannot
                                                           run here as asked, the client's to
                                                           fix: its prompt fills the model's
                                                           context ("context"), or its KV cache
                                                           cannot fit ("kv_reservation")

  A generate command is answered by its text and then one DoneMessage, or by one ErrorMessage.

- About the worker itself: the message names its "event".

    ReadyEvent        {"event": "ready", "pid", "load_ms", "context_tokens", "max_token_bytes",
                       "tool_parser", "thinking", "vocab_size"}
                                                           loaded: its context (None when the
                                                           config gives none), the most
                                                           UTF-8 bytes one token of its
                                                           tokenizer stands for (at least),
                                                           its tool-call syntax, whether it
                                                           has thinking markers, and the
                                                           width of its logits
    HeartbeatEvent    {"event": "heartbeat"}               from a thread that does no MLX work,
                                                           every --heartbeat-interval seconds
    FatalEvent        {"event": "fatal", "message"}        the model could not load; it exits
    MemoryEvent       {"event": "memory", ...MemoryReport} live memory, after requests end
    TrimEvent         {"event": "trim", ...}               live memory passed the estimate and
                                                           the prompt cache was trimmed

The worker imports this module: typing and json only, nothing of the server.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Required, TypedDict, Union, cast

from ..limits import (
    MAX_CHOICES,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
)

# Lines can carry a whole prompt; asyncio's 64 KiB default line limit is too small for that.
MAX_LINE_BYTES = 64 * 1024 * 1024

# -- server -> worker -----------------------------------------------------------------------------


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(TypedDict):
    """A call of one function, in OpenAI's shape (what the chat template reads too)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(TypedDict, total=False):
    role: Required[str]  # system, user, assistant or tool
    content: Required[str | None]  # None: an assistant message that only calls tools
    tool_calls: list[ToolCall]  # an assistant message's calls
    tool_call_id: str  # a tool message: the call it answers
    name: str  # a tool message: the function that answered


class FunctionSpec(TypedDict):
    """A function a tool-call constraint may call."""

    name: str
    parameters: dict[str, Any]  # a JSON schema of an object


class JsonConstraint(TypedDict):
    """The answer is one JSON value valid for the schema ({}: any JSON value)."""

    kind: Literal["json"]
    schema: dict[str, Any]


class ToolCallConstraint(TypedDict):
    """The answer is one call (or, parallel, one or more calls) of these functions, in the
    model family's tool-call syntax, arguments valid for the function's parameters."""

    kind: Literal["tool_calls"]
    functions: list[FunctionSpec]
    parallel: bool


Constraint = Union[JsonConstraint, ToolCallConstraint]


class GenerationParams(TypedDict):
    """What a request generates with, every field resolved by the server."""

    prompt: str | None
    messages: list[ChatMessage] | None  # exactly one of prompt and messages
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None  # the sampling seed: given when temperature > 0, None when greedy
    stop: list[str]
    n: int  # answers to generate, each from the seed plus its index
    top_k: int  # 0: off
    min_p: float  # 0: off
    repetition_penalty: float | None  # None: off
    frequency_penalty: float  # 0: off
    presence_penalty: float  # 0: off
    logit_bias: dict[str, float]  # token id (as text: JSON's keys) -> added to its logit
    logprobs: int | None  # None: none; k: each token's log-probability and its k best rivals
    tools: list[dict[str, Any]] | None  # OpenAI tools, for the chat template; None: none
    parse_tool_calls: bool  # tool calls in the output become ToolCallMessages
    constraint: Constraint | None  # what the output must be, enforced token by token
    chat_template_kwargs: dict[str, Any]


# What a request that gives none of the newer fields generates with (a background job stored by
# an older version, a worker command written by hand).
PARAM_DEFAULTS: dict[str, Any] = {
    "n": 1, "top_k": 0, "min_p": 0.0, "repetition_penalty": None, "frequency_penalty": 0.0,
    "presence_penalty": 0.0, "logit_bias": {}, "logprobs": None, "tools": None,
    "parse_tool_calls": False, "constraint": None, "chat_template_kwargs": {}}


class GenerateCommand(GenerationParams):
    op: Literal["generate"]
    id: str


class CancelCommand(TypedDict):
    op: Literal["cancel"]
    id: str


class ShutdownCommand(TypedDict):
    op: Literal["shutdown"]


Command = Union[GenerateCommand, CancelCommand, ShutdownCommand]

# -- worker -> server: about one request ---------------------------------------------------------


class Usage(TypedDict):
    """contracts.generation.Usage"""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from the prompt cache


class WorkerTimings(TypedDict, total=False):
    """The worker's part of contracts.generation.Timings; absent before a first token."""

    tokens_per_second: float  # decode, first token to the end
    prompt_tokens_per_second: float  # prefill, over the prompt tokens not taken from the cache


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class TextMessage(TypedDict, total=False):
    """The next piece of one answer: any of its kinds, in the order they came."""

    id: Required[str]
    index: int  # the answer (of n) it belongs to; absent: 0
    text: str  # the answer's text
    reasoning: str  # text inside the model family's thinking markers
    tool_call: ToolCall  # one whole call, once its closing marker came
    logprobs: list[TokenLogprob]  # the tokens sampled since the last such piece


class ChoiceEnd(TypedDict):
    index: int
    finish_reason: Ending
    completion_tokens: int


# How a request the worker ran to its end ended (the server turns a cancel past its timeout
# into "timeout").
Ending = Literal["stop", "length", "cancelled"]


class DoneMessage(TypedDict):
    id: str
    done: Literal[True]
    finish_reason: Ending  # the first answer's
    usage: Usage  # completion_tokens: all answers'
    timings: WorkerTimings
    max_tokens: int  # what it was generated with: less than asked when the context was short
    choices: list[ChoiceEnd]  # how each answer ended, by index


# Why a request cannot run here as asked (the client's to fix): its prompt and max_tokens need
# more KV cache than the model reserves, or its prompt fills the model's context.
Refusal = Literal["kv_reservation", "context"]


class ErrorMessage(TypedDict):
    id: str
    done: Literal[True]
    finish_reason: Literal["error"]
    error: str
    refused: Refusal | None  # None: it failed; else it cannot run here as asked


RequestMessage = Union[TextMessage, DoneMessage, ErrorMessage]

# -- worker -> server: about the worker -----------------------------------------------------------


class ReadyEvent(TypedDict):
    event: Literal["ready"]
    pid: int
    load_ms: float
    context_tokens: int | None
    max_token_bytes: int
    tool_parser: str | None  # the model family's tool-call syntax (mlx-lm's parser); None: none
    thinking: bool  # its tokenizer has thinking markers
    vocab_size: int  # the width of its logits: token ids are below it


class HeartbeatEvent(TypedDict):
    event: Literal["heartbeat"]


class FatalEvent(TypedDict):
    event: Literal["fatal"]
    message: str


class MemoryReport(TypedDict):
    rss_bytes: int
    mlx_active_bytes: int
    mlx_cache_bytes: int
    mlx_peak_bytes: int
    prompt_cache_bytes: int  # the prompt cache's own count of the bytes its entries hold
    prompt_cache_entries: int
    live_bytes: int  # what is compared with the estimate


class MemoryEvent(MemoryReport):
    event: Literal["memory"]


class TrimEvent(TypedDict):
    event: Literal["trim"]
    limit_bytes: int
    live_bytes_before: int
    live_bytes_after: int
    prompt_cache_bytes_freed: int
    prompt_cache_entries_freed: int


WorkerEvent = Union[ReadyEvent, HeartbeatEvent, FatalEvent, MemoryEvent, TrimEvent]
Message = Union[RequestMessage, WorkerEvent]


def memory_report(event: MemoryEvent) -> MemoryReport:
    return cast(MemoryReport, {key: value for key, value in event.items() if key != "event"})


# -- the wire ------------------------------------------------------------------------------------


def encode(message: Command | Message) -> bytes:
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _object(line: bytes | str) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"protocol message is not an object: {line!r:.200}")
    return message


def decode_command(line: bytes | str) -> Command:
    """A command from the server; ValueError for a line that is not one. A generate command's
    parameters are checked where it is accepted (`check_generate`), so that its failure is
    answered to its request."""
    command = _object(line)
    op = command.get("op")
    if op not in ("generate", "cancel", "shutdown"):
        raise ValueError(f"unknown op {op!r}")
    if op != "shutdown" and not isinstance(command.get("id"), str):
        raise ValueError(f"a {op} command needs a string id")
    return cast(Command, command)


def decode_message(line: bytes | str) -> Message:
    """A message from a worker; ValueError for a line that is neither family's."""
    message = _object(line)
    if not isinstance(message.get("id"), str) and message.get("event") not in (
            "ready", "heartbeat", "fatal", "memory", "trim"):
        raise ValueError(f"neither a request's message nor a worker event: {line!r:.200}")
    return cast(Message, message)


def check_generate(command: GenerateCommand) -> None:
    """Raises ValueError naming the first parameter of a generate command that is missing or
    out of range. The server resolved every one; a failure here is a bug on its side."""
    def number(name: str, kind: type | tuple[type, ...], low: float, high: float,
               *, low_open: bool = False) -> None:
        value = command.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name} must be a number, not {value!r}")
        if value > high or value < low or (low_open and value == low):
            raise ValueError(f"{name} {value!r} is out of range")

    if (command.get("prompt") is None) == (command.get("messages") is None):
        raise ValueError("give exactly one of prompt and messages")
    number("max_tokens", int, 1, MAX_TOKENS)
    number("temperature", (int, float), 0.0, MAX_TEMPERATURE)
    number("top_p", (int, float), 0.0, 1.0, low_open=True)
    if command.get("seed") is not None or command["temperature"] > 0:
        number("seed", int, 0, MAX_SEED)  # sampling needs its seed: the server picks one
    stop = command.get("stop")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, not {stop!r}")
    for name, default in PARAM_DEFAULTS.items():
        command.setdefault(name, default)  # type: ignore[misc]
    number("n", int, 1, MAX_CHOICES)
    number("top_k", int, 0, 2**31)
    number("min_p", (int, float), 0.0, 1.0)
    number("frequency_penalty", (int, float), -MAX_PENALTY, MAX_PENALTY)
    number("presence_penalty", (int, float), -MAX_PENALTY, MAX_PENALTY)
    if command["repetition_penalty"] is not None:
        number("repetition_penalty", (int, float), 0.0, MAX_REPETITION_PENALTY, low_open=True)
    if command["logprobs"] is not None:
        number("logprobs", int, 0, MAX_TOP_LOGPROBS)
    bias = command["logit_bias"]
    if not isinstance(bias, dict) or not all(
            key.isdigit() and isinstance(value, (int, float)) for key, value in bias.items()):
        raise ValueError("logit_bias must map token ids to numbers")
    constraint = command["constraint"]
    if constraint is not None and constraint.get("kind") not in ("json", "tool_calls"):
        raise ValueError(f"unknown constraint {constraint!r:.100}")
