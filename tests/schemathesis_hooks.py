"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): how to read an NDJSON answer,
so that a stream's events are checked against the document like any other answer; and the
rules of a generation's body that JSON Schema cannot state (the document says them in words),
so that the fuzzer's "valid" bodies are the ones the server documents as valid."""

import json

import schemathesis

from mlx_jupyter.engine.grammar.constraints import check_parameters, check_schema

DEMO_VOCABULARY = 2048  # the demo's token ids are below it (logit_bias)


@schemathesis.deserializer("application/x-ndjson")
def ndjson(_context, response):
    return [json.loads(line) for line in response.content.decode().splitlines() if line]


@schemathesis.hook
def filter_body(context, body):
    """A named tool_choice names one of the tools, the tools' names differ, a schema is one
    the grammar engine can enforce, logit_bias names tokens of the model. (Bodies the
    document already refuses are the negative tests': kept as they are.)"""
    try:
        return _documented_valid(body)
    except (AttributeError, KeyError, TypeError, ValueError):
        return True


def _documented_valid(body) -> bool:
    if not isinstance(body, dict):
        return True
    tools = body.get("tools") or []
    names = [tool["function"]["name"] for tool in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        return False
    if len(set(names)) < len(names):
        return False
    response_format = body.get("response_format") or {}
    schemas = [body.get("schema"), (response_format.get("json_schema") or {}).get("schema")]
    try:
        for schema in schemas:
            if isinstance(schema, dict):
                check_schema(schema)
        for tool in tools:
            if isinstance(tool["function"].get("parameters"), dict):
                check_parameters(tool["function"]["parameters"])
    except ValueError:
        return False
    bias = body.get("logit_bias") or {}
    # Its keys are token ids (the document's propertyNames, which the fuzzer does not keep to).
    return all(token.isdigit() and len(token) <= 9 and int(token) < DEMO_VOCABULARY
               and isinstance(value, (int, float)) and not isinstance(value, bool)
               for token, value in bias.items())
