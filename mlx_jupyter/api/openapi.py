"""The OpenAPI 3.1 document of every mlx route, built from the route table and the contracts.

Each handler method carries an `@operation(...)` describing it (summary, body and query schemas,
its answer's model, the errors it can answer); `document()` walks the route table, so a route
cannot exist without being described (it raises for an undescribed method). Bodies are the
models the handlers validate with and answers the models they render (pydantic's JSON Schema,
which OpenAPI 3.1 uses as is), so the document cannot drift from what the server does.

Streams: NDJSON is described as the array of its lines' objects (what OpenAPI 3.2 calls the
whole stream); server-sent events, as one event whose `data` is JSON of the given models or
`[DONE]` (OpenAPI 3.1's reading of `schema` for text/event-stream).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from .._version import __version__
from ..contracts.errors import ErrorAnswer

METHODS = ("get", "post", "put", "delete")
NDJSON, SSE = "application/x-ndjson", "text/event-stream"
_GROUP = re.compile(r"\(\?P<(\w+)>([^()]*(?:\([^()]*\)[^()]*)*)\)")
_REF = "#/components/schemas/{model}"
ERROR_TEXT = {400: "invalid input; the message names the field",
              403: "no valid token, or a path outside the allowed roots", 404: "not found",
              405: "the path names a model, not one of its actions: see Allow",
              409: "conflicts with the current state: the model, the memory budget, the "
                   "KV reservation or the settings",
              413: "the body is past c.MlxApp.max_body_bytes (the message says the limit); "
                   "refused before it is read whole",
              429: "the queue is full; see Retry-After",
              503: "a model worker failed, or the database cannot be used (the message says "
                   "what to fix)"}
ERROR_HEADERS = {
    405: {"Allow": {"description": "the methods the path takes", "required": True,
                    "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "required": True,
                          "schema": {"type": "integer", "minimum": 1}}}}


@dataclass(frozen=True)
class Stream:
    media_type: str  # NDJSON or SSE
    when: str
    events: tuple[type[BaseModel], ...]


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    answer: type[BaseModel] | None = None  # the JSON answer; None with a text media_type
    # The body the handler validates with; for a route expanded over a path parameter's
    # values (see `expand`), a function of that value.
    body: type[BaseModel] | Callable[[str], type[BaseModel]] | None = None
    query: type[BaseModel] | None = None
    ok: int = 200
    description: str = ""  # of the ok answer
    media_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)  # of the ok answer: name -> what
    streams: tuple[Stream, ...] = ()
    also: tuple[tuple[int, str, type[BaseModel]], ...] = ()  # other 2xx: status, when, answer
    errors: tuple[int, ...] = ()
    subpath: str = ""  # appended to the route's path: "/{action}"
    path_params: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # of the subpath

    def body_for(self, value: str | None) -> type[BaseModel] | None:
        if self.body is None or isinstance(self.body, type):
            return self.body
        return self.body(value)


def operation(summary: str, *, tag: str, **details: Any) -> Callable[[Callable], Callable]:
    """Describes a handler method for the OpenAPI document."""
    def described(method: Callable) -> Callable:
        method.__openapi__ = Operation(summary, tag, **details)
        return method
    return described


def implements(handler: type, method: str) -> bool:
    return getattr(handler, method) is not getattr(tornado.web.RequestHandler, method)


def path_template(pattern: str) -> str:
    """mlx/api/models/(?P<name>...) -> /mlx/api/models/{name}"""
    return "/" + _GROUP.sub(lambda match: "{" + match.group(1) + "}", pattern)


def document(routes: Iterable[tuple[str, type]], *, base_url: str = "/") -> dict[str, Any]:
    """Routes whose handler implements no method (the catch-all 404s) are not operations."""
    entries = []  # (path, parameters of the route's pattern, expanded value, method, op)
    for pattern, handler in routes:
        own = getattr(handler, "openapi_params", {})  # path parameters' schemas, by name
        groups = {name: own.get(name) or _path_schema(inner)
                  for name, inner in _GROUP.findall(pattern)}
        expand = getattr(handler, "openapi_expand", None)  # (parameter, its values)
        for path, value in _expanded(path_template(pattern), expand):
            params = {k: v for k, v in groups.items() if expand is None or k != expand[0]}
            entries += [(path, params, value, handler, method, _described(handler, method))
                        for method in METHODS if implements(handler, method)]
    read: set[type[BaseModel]] = set()  # what the server reads, and what it writes
    written: set[type[BaseModel]] = {ErrorAnswer}
    for _, _, value, handler, _, op in entries:
        read |= {model for model in (op.body_for(value),) if model}
        written |= {model for model in (op.answer, getattr(handler, "error_model", None))
                    if model}
        written |= {model for stream in op.streams for model in stream.events}
        written |= {model for *_, model in op.also}
    schemas, refs = _schemas(read, written)
    paths: dict[str, dict[str, Any]] = {}
    for path, params, value, handler, method, op in entries:
        name = handler.__name__.removesuffix("Handler")
        paths.setdefault(path + op.subpath, {})[method] = _operation(
            f"{name}_{method}" + (f"_{value}" if value else ""), op, params, value, refs,
            error_ref=refs[getattr(handler, "error_model", ErrorAnswer)],
            limits_body=method in getattr(handler, "body_methods", ()))
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlx-jupyter", "version": __version__,
                 "description": "Local language models shared by every kernel of a Jupyter "
                                "server: native routes under mlx/api, OpenAI-compatible ones "
                                "under mlx/v1, Prometheus metrics at mlx/metrics."},
        "servers": [{"url": base_url.rstrip("/") or "/"}],
        "security": [{"JupyterToken": []}, {"Bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "JupyterToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                                 "description": "`token <the Jupyter server's token>`"},
                "Bearer": {"type": "http", "scheme": "bearer",
                           "description": "the Jupyter server's token (OpenAI clients send "
                                          "their API key this way)"}}},
    }


def _expanded(path: str, expand: tuple[str, Callable[[], Iterable[str]]] | None,
              ) -> list[tuple[str, str | None]]:
    if expand is None:
        return [(path, None)]
    name, values = expand
    return [(path.replace("{" + name + "}", value), value) for value in values()]


def _described(handler: type, method: str) -> Operation:
    op = getattr(getattr(handler, method), "__openapi__", None)
    if op is None:
        raise TypeError(f"{handler.__name__}.{method} has no @operation: every route must be "
                        f"described in the OpenAPI document")
    return op


def _schemas(read: set[type[BaseModel]], written: set[type[BaseModel]],
             ) -> tuple[dict[str, Any], dict[type, dict]]:
    """The components' schemas, and the reference to each model's: bodies and queries as the
    server reads them (validation), answers as it writes them (serialization)."""
    def ordered(models: set[type[BaseModel]]) -> list[type[BaseModel]]:
        return sorted(models, key=lambda model: model.__name__)

    refs, top = models_json_schema(
        [(model, "validation") for model in ordered(read)]
        + [(model, "serialization") for model in ordered(written - read)], ref_template=_REF,
        schema_generator=_Untitled)
    return top.get("$defs", {}), {model: ref for (model, _), ref in refs.items()}


class _Untitled(GenerateJsonSchema):
    """Fields without pydantic's titles ("Max Tokens" for max_tokens): their names say it."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _operation(operation_id: str, op: Operation, params: dict[str, dict[str, Any]],
               value: str | None, refs: dict[type, dict], *, error_ref: dict,
               limits_body: bool) -> dict[str, Any]:
    body = op.body_for(value)
    params = {**params, **op.path_params}
    responses = {str(op.ok): _ok_answer(op, refs)}
    for status, when, model in op.also:
        responses[str(status)] = {"description": when,
                                  "content": {"application/json": {"schema": refs[model]}}}
    inputs = body is not None or op.query is not None or bool(params)
    for status in sorted({403, *([400] if inputs else []), *([413] if limits_body else []),
                          *op.errors}):
        responses[str(status)] = {"description": ERROR_TEXT.get(status, "error"),
                                  "content": {"application/json": {"schema": error_ref}}}
        if status in ERROR_HEADERS:
            responses[str(status)]["headers"] = ERROR_HEADERS[status]
    result: dict[str, Any] = {
        "operationId": operation_id,
        "summary": op.summary, "tags": [op.tag], "responses": responses}
    parameters = [{"name": name, "in": "path", "required": True, "schema": schema}
                  for name, schema in params.items()]
    if op.query is not None:
        properties = op.query.model_json_schema(schema_generator=_Untitled)["properties"]
        parameters += [{"name": name, "in": "query", "required": False, "schema": schema}
                       for name, schema in properties.items()]
    if parameters:
        result["parameters"] = parameters
    if body is not None:
        result["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[body]}}}
    return result


def _ok_answer(op: Operation, refs: dict[type, dict]) -> dict[str, Any]:
    if op.answer is not None:
        content = {op.media_type: {"schema": refs[op.answer]}}
    else:
        content = {op.media_type: {"schema": {"type": "string"}}}
    for stream in op.streams:
        content[stream.media_type] = {"schema": _stream_schema(stream, refs)}
    answer: dict[str, Any] = {"description": op.description or op.summary, "content": content}
    if op.headers:
        answer["headers"] = {name: {"description": what, "required": True,
                                    "schema": {"type": "string"}}
                             for name, what in op.headers.items()}
    return answer


def _stream_schema(stream: Stream, refs: dict[type, dict]) -> dict[str, Any]:
    events = {"anyOf": [refs[model] for model in stream.events]}
    if stream.media_type == NDJSON:
        return {"type": "array", "items": events, "description": stream.when}
    if stream.media_type == SSE:
        return {"type": "object", "required": ["data"], "description": stream.when,
                "properties": {"data": {"anyOf": [
                    {"const": "[DONE]", "description": "the end of the stream"},
                    {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": events}]}}}
    raise ValueError(f"no stream schema for {stream.media_type}")


def _path_schema(pattern: str) -> dict[str, Any]:
    """A path parameter's schema from its pattern: an enum for an alternation of words
    (load|unload), else the pattern."""
    if re.fullmatch(r"\w+(?:\|\w+)+", pattern):
        return {"type": "string", "enum": pattern.split("|")}
    return {"type": "string", "pattern": f"^{pattern}$"}
