"""The OpenAPI 3.1 document of every mlx route, built from the route table and the schemas.

Each handler method carries an `@operation(...)` describing it (summary, body and query schemas,
answers); `document()` walks the route table, so a route cannot exist without being described
(it raises for an undescribed method) and the body schemas are the ones the handlers validate
with (pydantic's JSON Schema, which OpenAPI 3.1 uses as is).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .._version import __version__

METHODS = ("get", "post", "put", "delete")
_GROUP = re.compile(r"\(\?P<(\w+)>([^()]*(?:\([^()]*\)[^()]*)*)\)")
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    ok: int = 200
    answer: str = "a JSON object"
    media_type: str = "application/json"
    streams: dict[str, str] = field(default_factory=dict)  # content type -> when it is used
    errors: tuple[int, ...] = ()


def operation(summary: str, *, tag: str, **details: Any) -> Callable[[Callable], Callable]:
    """Describes a handler method for the OpenAPI document."""
    def describe(method: Callable) -> Callable:
        method.__openapi__ = Operation(summary, tag, **details)
        return method
    return describe


def path_template(pattern: str) -> str:
    """mlx/api/models/(?P<name>...) -> /mlx/api/models/{name}"""
    return "/" + _GROUP.sub(lambda match: "{" + match.group(1) + "}", pattern)


def document(routes: Iterable[tuple[str, type]], *, base_url: str = "/") -> dict[str, Any]:
    routes = list(routes)
    operations = [(pattern, handler, method, _described(handler, method))
                  for pattern, handler in routes for method in METHODS
                  if _implements(handler, method)]
    bodies = {op.body for *_, op in operations if op.body is not None}
    schemas, refs = _schemas(bodies)
    paths: dict[str, dict[str, Any]] = {}
    for pattern, handler, method, op in operations:
        paths.setdefault(path_template(pattern), {})[method] = _operation(
            pattern, handler, method, op, refs)
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
            "schemas": {**schemas, **ERROR_SCHEMAS},
            "securitySchemes": {
                "JupyterToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                                 "description": "`token <the Jupyter server's token>`"},
                "Bearer": {"type": "http", "scheme": "bearer",
                           "description": "the Jupyter server's token (OpenAI clients send "
                                          "their API key this way)"}}},
    }


ERROR_SCHEMAS = {
    "Error": {"type": "object", "required": ["message"],
              "properties": {"message": {"type": "string"},
                             "reason": {"type": ["string", "null"]}}},
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}},
}
_ERROR_TEXT = {400: "invalid input; the message names the field", 403: "no valid token",
               404: "not found", 409: "conflicts with the current state",
               429: "the queue is full; see Retry-After", 503: "a model worker failed"}


def _implements(handler: type, method: str) -> bool:
    return getattr(handler, method) is not getattr(tornado.web.RequestHandler, method)


def _described(handler: type, method: str) -> Operation:
    op = getattr(getattr(handler, method), "__openapi__", None)
    if op is None:
        raise TypeError(f"{handler.__name__}.{method} has no @operation: every route must be "
                        f"described in the OpenAPI document")
    return op


def _schemas(models: set[type[BaseModel]]) -> tuple[dict[str, Any], dict[type, dict]]:
    """The components' schemas, and the reference to each model's."""
    ordered = sorted(models, key=lambda model: model.__name__)
    refs, top = models_json_schema([(model, "validation") for model in ordered],
                                   ref_template=_REF)
    return top.get("$defs", {}), {model: ref for (model, _), ref in refs.items()}


def _operation(pattern: str, handler: type, method: str, op: Operation,
               refs: dict[type, dict]) -> dict[str, Any]:
    error_schema = getattr(handler, "error_schema", "Error")
    content: dict[str, Any] = {op.media_type: {"schema": {
        "type": "object" if op.media_type == "application/json" else "string"}}}
    for media_type, when in op.streams.items():
        content[media_type] = {"schema": {"type": "string", "description": when}}
    responses: dict[str, Any] = {str(op.ok): {"description": op.answer, "content": content}}
    for status in sorted({400, 403, *op.errors}):
        responses[str(status)] = {
            "description": _ERROR_TEXT.get(status, "error"),
            "content": {"application/json": {
                "schema": {"$ref": _REF.format(model=error_schema)}}}}
    result: dict[str, Any] = {
        "operationId": f"{handler.__name__.removesuffix('Handler')}_{method}",
        "summary": op.summary, "tags": [op.tag], "responses": responses}
    parameters = [{"name": name, "in": "path", "required": True, "schema": _path_schema(inner)}
                  for name, inner in _GROUP.findall(pattern)]
    if op.query is not None:
        properties = op.query.model_json_schema()["properties"]
        parameters += [{"name": name, "in": "query", "required": False, "schema": schema}
                       for name, schema in properties.items()]
    if parameters:
        result["parameters"] = parameters
    if op.body is not None:
        result["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[op.body]}}}
    return result


def _path_schema(pattern: str) -> dict[str, Any]:
    """A path parameter's schema: an enum for an alternation of words (load|unload)."""
    if re.fullmatch(r"\w+(?:\|\w+)+", pattern):
        return {"type": "string", "enum": pattern.split("|")}
    return {"type": "string", "pattern": f"^{pattern}$"}
