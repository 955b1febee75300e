"""The requests of the mlx-jupyter API, as data: what to send and how to read the answer.

The methods in `core` yield these `Call`s; `Client` and `AsyncClient` send them, one over a
blocking and one over an async transport, so each request is written once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .errors import InvalidRequest, ModelNotFound, NotFound, RequestNotFound, ServerError
from .http import GenerationResult, one_line, result_from_json
from .structured import Structured, resolve

GENERATE_PATH = "mlx/api/generate"
STATUS_PATH = "mlx/api/status"
FINAL_STATUSES = ("completed", "cancelled", "failed", "interrupted")

Message = dict[str, Any]  # {"role": ..., "content": a string or a list of parts}


def _same(body: dict[str, Any]) -> Any:
    return body


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    read: Callable[[dict[str, Any]], Any] = _same  # the answer's JSON -> what the method returns
    # What a 404 of ours means here (an unknown model, request, ...); None: the API is missing.
    not_found: type[NotFound] | None = None
    stream: bool = False  # an NDJSON stream of events: the client hands back an event stream


def status() -> Call:
    return Call("GET", STATUS_PATH)


def models() -> Call:
    return Call("GET", "mlx/api/models", read=lambda body: body.get("models", []))


def model(name: str) -> Call:
    return Call("GET", f"mlx/api/models/{_name(name)}", not_found=ModelNotFound)


def model_action(name: str, action: str) -> Call:
    """load, unload, pin or unpin."""
    return Call("POST", f"mlx/api/models/{_name(name)}/{action}", not_found=ModelNotFound)


def queue() -> Call:
    return Call("GET", "mlx/api/queue")


def history(limit: int, offset: int, **filters: str | None) -> Call:
    params = {"limit": limit, "offset": offset,
              **{key: value for key, value in filters.items() if value is not None}}
    return Call("GET", "mlx/api/requests", params=params,
                read=lambda body: body.get("requests", []))


def request(request_id: str) -> Call:
    return Call("GET", f"mlx/api/requests/{quote(request_id, safe='')}",
                not_found=RequestNotFound)


def cancel(request_id: str) -> Call:
    return Call("DELETE", f"mlx/api/requests/{quote(request_id, safe='')}",
                not_found=RequestNotFound)


def settings() -> Call:
    return Call("GET", "mlx/api/settings", read=lambda body: body.get("settings", {}))


def set_setting(key: str, value: Any) -> Call:
    return Call("PUT", f"mlx/api/settings/{quote(key, safe='')}", json={"value": value})


def generate(prompt: str | None, *, model: str | None, messages: Sequence[Message] | None,
             stream: bool = False, background: bool = False, schema: Any = None,
             **options: Any) -> Call:
    """`schema`: a pydantic model class, a dataclass, a TypedDict or a JSON-schema dict (see
    `structured`); the JSON schema is sent, and the answer's `parsed` is validated into it."""
    structured = None if schema is None else resolve(schema)
    body = generate_body(prompt, model=model, messages=messages, stream=stream,
                         background=background,
                         schema=structured.json_schema if structured else None, **options)
    if background:
        return Call("POST", GENERATE_PATH, json=body, not_found=ModelNotFound,
                    read=lambda answer: str(answer["request_id"]))
    return Call("POST", GENERATE_PATH, json=body, not_found=ModelNotFound, stream=stream,
                read=lambda answer: structured_result(result_from_json(answer, model or ""),
                                                      structured))


def structured_result(result: GenerationResult, structured: Structured | None
                      ) -> GenerationResult:
    """The result with `parsed` validated into the schema, if one was given."""
    return result if structured is None else structured.apply(result)


def generate_body(prompt: str | None, *, model: str | None, messages: Sequence[Message] | None,
                  stream: bool, stop: str | Sequence[str] | None = None,
                  background: bool = False, **options: Any) -> dict[str, Any]:
    """The request body, with only the options that were given (None: the server's default,
    the stored settings, model included)."""
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of a prompt or messages")
    body: dict[str, Any] = {"stream": stream}
    if model is not None:
        body["model"] = model
    # Jupyter tells a kernel which notebook it serves; the server keeps it in the history.
    if notebook := os.environ.get("JPY_SESSION_NAME"):
        body["notebook"] = notebook
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [dict(message) for message in messages]
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if background:
        body["background"] = True
        del body["stream"]
    body.update({name: value for name, value in options.items() if value is not None})
    return body


def finished_result(row: dict[str, Any]) -> GenerationResult | None:
    """The result of a request from its history row; None while it is not finished."""
    status = row.get("status")
    if status not in FINAL_STATUSES:
        return None
    if status in ("failed", "interrupted") and row.get("finish_reason") != "timeout":
        message = one_line(str(row.get("error") or status)).rstrip(".")
        raise ServerError(f"request {row.get('id')} {status}: {message}",
                          request_id=row.get("id"))
    return GenerationResult(
        text=str(row.get("output_text") or ""), request_id=str(row.get("id", "")),
        model=str(row.get("model") or ""), finish_reason=str(row.get("finish_reason") or status),
        usage={key: row[key] for key in ("prompt_tokens", "completion_tokens")
               if row.get(key) is not None},
        timings={key: value for key, value in (row.get("timings") or {}).items()
                 if value is not None},
        seed=(row.get("parameters") or {}).get("seed"))


def _name(name: str) -> str:
    # Hugging Face names hold one "/", which the routes accept as it is.
    return quote(name, safe="/")
