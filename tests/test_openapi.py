"""The OpenAPI document: served, valid, and covering every route the server answers."""

import re

import pytest
import tornado.web
from openapi_spec_validator import validate

from mlx_jupyter.api.openapi import METHODS, document, operation, path_template
from mlx_jupyter.api.routes import ROUTES
from mlx_jupyter.api.schemas import GenerateRequest


def test_the_served_document_is_valid_and_describes_every_route_and_method(live_server):
    response = live_server.get("mlx/api/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    validate(spec)  # raises on any violation of OpenAPI 3.1
    for pattern, handler in ROUTES:
        served = {m for m in METHODS
                  if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)}
        assert set(spec["paths"][path_template(pattern)]) == served, pattern
    assert {"/mlx/v1/chat/completions", "/mlx/v1/completions", "/mlx/v1/models",
            "/mlx/api/generate"} <= set(spec["paths"])


def test_bodies_are_the_schemas_the_handlers_validate_with(live_server):
    spec = live_server.get("mlx/api/openapi.json").json()
    generate = spec["paths"]["/mlx/api/generate"]["post"]
    ref = generate["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(schema["properties"]) == set(GenerateRequest.model_fields)
    assert schema["additionalProperties"] is False  # unknown fields are refused
    assert "application/x-ndjson" in generate["responses"]["200"]["content"]
    chat = spec["paths"]["/mlx/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIError")
    action = spec["paths"]["/mlx/api/models/{name}/{action}"]["post"]["parameters"]
    assert {"name": "action", "in": "path", "required": True,
            "schema": {"type": "string", "enum": ["load", "unload", "pin", "unpin"]}} in action
    history = {p["name"] for p in spec["paths"]["/mlx/api/requests"]["get"]["parameters"]}
    assert history == {"model", "notebook", "status", "limit", "offset"}


def test_an_undescribed_route_method_is_an_error():
    class Described(tornado.web.RequestHandler):
        @operation("described", tag="t")
        async def get(self):
            pass

        async def post(self):  # not described
            pass

    with pytest.raises(TypeError, match=re.escape("Described.post has no @operation")):
        document([(r"mlx/api/thing/(?P<id>\d+)", Described)])
    Described.post = operation("now described", tag="t")(Described.post)
    spec = document([(r"mlx/api/thing/(?P<id>\d+)", Described)])
    validate(spec)
    assert set(spec["paths"]["/mlx/api/thing/{id}"]) == {"get", "post"}
