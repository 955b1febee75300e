"""The OpenAPI document: served, valid, covering every route the server answers, with the real
schema of every answer (tests/test_schemathesis.py checks the server keeps to it)."""

import re

import httpx
import pytest
import tornado.web
from openapi_spec_validator import validate
from pydantic import BaseModel

from mlx_jupyter.api.openapi import METHODS, document, implements, operation, path_template
from mlx_jupyter.api.routes import ROUTES
from mlx_jupyter.api.schemas import GenerateRequest, parse_body
from mlx_jupyter.contracts.models import ModelStatusName
from mlx_jupyter.contracts.requests import RequestStatusName
from mlx_jupyter.errors import InvalidRequest
from mlx_jupyter.limits import MODEL_ACTIONS
from mlx_jupyter.store.records import ModelStatus, RequestStatus


@pytest.fixture(scope="module")
def spec(live_server):
    response = live_server.get("mlx/api/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_the_served_document_is_valid_and_describes_every_route_and_method(spec):
    validate(spec)  # raises on any violation of OpenAPI 3.1
    for pattern, handler in ROUTES:
        served = {m for m in METHODS if implements(handler, m)}
        if not served:  # the catch-all 404s under mlx/
            assert path_template(pattern) not in spec["paths"]
            continue
        name = handler.__name__.removesuffix("Handler")  # operation ids: {name}_{method}...
        documented = {method for item in spec["paths"].values()
                      for method, op in item.items() if op["operationId"].split("_")[0] == name}
        assert documented == served, pattern
    assert {"/mlx/v1/chat/completions", "/mlx/v1/completions", "/mlx/v1/models",
            "/mlx/api/generate", "/mlx/api/models/{name}/{action}"} <= set(spec["paths"])


def test_every_2xx_answer_has_its_real_schema(spec):
    """No answer is loosened to {} or a bare object: each names its properties (or items),
    all the way down; only the metrics are text."""
    schemas = spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if not status.startswith("2"):
                    continue
                for media_type, content in answer["content"].items():
                    schema = _resolved(content["schema"], schemas)
                    if media_type == "text/plain":
                        assert path == "/mlx/metrics" and schema == {"type": "string"}
                        continue
                    assert "properties" in schema or "items" in schema, (path, method)
                    _no_loose_schema(content["schema"], schemas, f"{method} {path}", set())


def _resolved(schema: dict, schemas: dict) -> dict:
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _no_loose_schema(schema, schemas, where, seen):
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                _no_loose_schema(schemas[name], schemas, f"{where} > {name}", seen)
            return
        described = {"type", "anyOf", "oneOf", "allOf", "const", "enum", "$ref"}
        for name, value in schema.get("properties", {}).items():
            assert described & set(value), f"{where}: {name} has no schema: {value}"
        for value in schema.values():
            _no_loose_schema(value, schemas, where, seen)
    elif isinstance(schema, list):
        for value in schema:
            _no_loose_schema(value, schemas, where, seen)


def test_bodies_and_answers_are_the_models_the_handlers_use(spec):
    generate = spec["paths"]["/mlx/api/generate"]["post"]
    schemas = spec["components"]["schemas"]
    body = _resolved(generate["requestBody"]["content"]["application/json"]["schema"], schemas)
    assert set(body["properties"]) == {field.alias or name for name, field
                                       in GenerateRequest.model_fields.items()}
    assert body["additionalProperties"] is False  # unknown fields are refused
    whole = generate["responses"]["200"]["content"]
    assert whole["application/json"]["schema"]["$ref"].endswith("/GenerationAnswer")
    events = whole["application/x-ndjson"]["schema"]["items"]["anyOf"]
    assert {e["$ref"].rsplit("/", 1)[1] for e in events} == {
        "TextEvent", "ReasoningEvent", "ToolCallEvent", "LogprobsEvent", "DoneEvent",
        "ErrorEvent"}
    assert generate["responses"]["202"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/Accepted")
    assert generate["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    chat = spec["paths"]["/mlx/v1/chat/completions"]["post"]
    sse = chat["responses"]["200"]["content"]["text/event-stream"]["schema"]
    data = sse["properties"]["data"]["anyOf"]
    assert data[0]["const"] == "[DONE]"
    assert {e["$ref"].rsplit("/", 1)[1] for e in data[1]["contentSchema"]["anyOf"]} == {
        "ChatCompletionChunk", "OpenAIErrorAnswer"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorAnswer")
    history = {p["name"] for p in spec["paths"]["/mlx/api/requests"]["get"]["parameters"]}
    assert history == {"model", "notebook", "status", "limit", "offset"}


def test_a_model_name_is_the_rest_of_the_path_and_actions_are_post_only(spec):
    one = spec["paths"]["/mlx/api/models/{name}"]
    assert set(one) == {"get", "delete"}
    action = spec["paths"]["/mlx/api/models/{name}/{action}"]
    assert set(action) == {"post"}
    parameters = {p["name"]: p["schema"] for p in action["post"]["parameters"]}
    assert parameters["action"] == {"type": "string", "enum": list(MODEL_ACTIONS)}
    name = re.compile(parameters["name"]["pattern"])
    assert name.match("org/pin") and name.match("mlx-community/Llama-3.2-1B")
    assert not name.match("a/../b") and not name.match("/a")
    assert action["post"]["responses"]["405"]["headers"]["Allow"]["required"] is True


def test_each_setting_has_its_path_with_its_own_value_type(spec):
    from mlx_jupyter.store.settings import SETTINGS

    schemas = spec["components"]["schemas"]
    for key, setting in SETTINGS.items():
        item = spec["paths"][f"/mlx/api/settings/{key}"]
        body = _resolved(item["put"]["requestBody"]["content"]["application/json"]["schema"],
                         schemas)
        value = body["properties"]["value"]
        assert value["type"] == {int: "integer", float: "number", str: "string"}[setting.type]
    assert "/mlx/api/settings/{key}" not in spec["paths"]


def test_the_status_names_are_the_stores():
    assert set(ModelStatusName.__args__) == {status.value for status in ModelStatus}
    assert set(RequestStatusName.__args__) == {status.value for status in RequestStatus}


@pytest.mark.parametrize("body", [b'{"prompt": "x", "max_tokens": 5.0}',
                                  b'{"prompt": "x", "stop": "one"}',
                                  b'{"messages": [{"role": "user", "content": "x"}]}'])
def test_what_the_document_allows_the_body_accepts(body):
    parse_body(GenerateRequest, body)


@pytest.mark.parametrize("body", [b"{}", b'{"prompt": "x", "messages": []}',
                                  b'{"prompt": "x", "stream": true, "background": true}',
                                  b'{"prompt": "x", "max_tokens": "5"}',
                                  b'{"prompt": "x", "stop": [""]}'])
def test_what_the_document_refuses_the_body_refuses(body):
    with pytest.raises(InvalidRequest):
        parse_body(GenerateRequest, body)


def test_route_misses_and_wrong_methods_answer_json_with_allow(live_server):
    auth = {"Authorization": f"token {live_server.token}"}

    def call(method, path):
        return httpx.request(method, live_server.url + path, headers=auth, timeout=30)

    missed = call("GET", "mlx/api/no-such-route")
    assert missed.status_code == 404 and "no such route" in missed.json()["message"]
    assert call("GET", "mlx/v1/no-such-route").json()["error"]["type"] == \
        "invalid_request_error"
    for method, path, allow in [("PATCH", "mlx/api/status", "GET"),
                                ("DELETE", "mlx/api/generate", "POST"),
                                ("TRACE", "mlx/api/models/demo", "GET, DELETE"),
                                ("PUT", "mlx/api/models/org/pin", "GET, DELETE, POST"),
                                ("POST", "mlx/api/models/demo", "GET, DELETE"),
                                ("POST", "mlx/v1/models", "GET")]:
        answer = call(method, path)
        assert answer.status_code == 405, (method, path)
        assert answer.headers["Allow"] == allow, (method, path)
        assert answer.headers["Content-Type"].startswith("application/json")
        answer.json()
    assert httpx.get(live_server.url + "mlx/api/no-such-route").status_code == 403
    # A name's "/" may come encoded (as clients of the document send it): the same name.
    encoded = call("GET", "mlx/api/models/org%2Fpin")
    assert encoded.status_code == 404 and "'org/pin'" in encoded.json()["message"]


def test_an_undescribed_route_method_is_an_error():
    class Described(tornado.web.RequestHandler):
        @operation("described", tag="t", answer=Thing)
        async def get(self):
            pass

        async def post(self):  # not described
            pass

    with pytest.raises(TypeError, match=re.escape("Described.post has no @operation")):
        document([(r"mlx/api/thing/(?P<id>\d+)", Described)])
    Described.post = operation("now described", tag="t", answer=Thing)(Described.post)
    spec = document([(r"mlx/api/thing/(?P<id>\d+)", Described)])
    validate(spec)
    assert set(spec["paths"]["/mlx/api/thing/{id}"]) == {"get", "post"}


class Thing(BaseModel):
    id: int
