"""What a request's output must be, as an llguidance grammar, and the checks of its schemas.

llguidance (the grammar engine) takes a Lark grammar in which `%json {...}` stands for "a JSON
value valid for this schema"; a JSON constraint is that alone, a tool-call constraint wraps one
such value per call in the model family's markers. The request bodies call `check_schema` on
every schema a request carries (response_format, a tool's parameters), so that one the engine
cannot enforce is refused (400, naming the field) before anything is queued; the worker builds
the same grammar with its tokenizer's markers (`grammar`) and compiles it.

Pure Python and llguidance (no mlx): the server imports this module.
"""

from __future__ import annotations

import json
from typing import Any

from ...limits import MAX_PARALLEL_CALLS, MAX_SCHEMA_BYTES
from ..protocol import (
    Constraint,
    FunctionSpec,
    GenerationParams,
    JsonConstraint,
    ToolCallConstraint,
)
from .syntax import ToolSyntax, can_force_calls

# Compact JSON: a small model wanders off into whitespace that a flexible grammar allows.
_COMPILE_OPTIONS = {"whitespace_flexible": False}
# A forced call is spaced the way chat templates write calls (json.dumps' ", " and ": ", as the
# Hermes, Qwen and demo templates do), so that it reads to the model like the calls it learned.
_CALL_OPTIONS = {**_COMPILE_OPTIONS, "item_separator": ", ", "key_separator": ": "}


def check_schema(schema: Any) -> dict[str, Any]:
    """The schema, if it is a JSON Schema (2020-12) that the grammar engine can enforce; else
    ValueError saying what is wrong (which keyword the engine cannot enforce). The request
    bodies call it, so that the error names the field."""
    import jsonschema
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema is an object, not {type(schema).__name__}")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is over {MAX_SCHEMA_BYTES} bytes of JSON")
    try:
        jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator) \
            .check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        raise ValueError(f"not a valid JSON schema{f' at {where}' if where else ''}: "
                         f"{exc.message}") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(_json_grammar(schema))
    if failed:
        raise ValueError(f"this schema cannot be enforced: {'; '.join(messages)}")
    return schema


def check_parameters(parameters: Any) -> dict[str, Any]:
    """A function's parameters: an object schema (OpenAI's rule), enforceable."""
    schema = check_schema(parameters)
    if schema.get("type", "object") != "object":
        raise ValueError(f"a function's parameters are an object schema (\"type\": "
                         f"\"object\"), not {schema.get('type')!r}")
    return schema


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else",
              "additionalProperties", "propertyNames", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: Any, *, may_close: bool = True) -> Any:
    """The schema with every object that lists its properties (all it requires among them),
    and says nothing of others, closed to them (additionalProperties: false), as OpenAI's strict schemas are. What the
    closed schema accepts, the open one accepts too; a small model left free rambles in keys
    of its own until max_tokens. Objects under allOf stay as they are (their properties may be
    listed in another branch)."""
    if isinstance(schema, list):
        return [closed(item, may_close=may_close) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = closed(out[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    if isinstance(out.get("allOf"), list):
        out["allOf"] = closed(out["allOf"], may_close=False)
        may_close = False
    listed = out.get("properties")
    if may_close and isinstance(listed, dict) and not any(k in out for k in _OPEN_KEYWORDS) \
            and set(out.get("required") or ()) <= set(listed):
        out["additionalProperties"] = False
    return out


def grammar(constraint: Constraint, syntax: ToolSyntax) -> str:
    """The llguidance grammar of a constraint (tool calls in `syntax`'s markers), its
    schemas closed."""
    if constraint["kind"] == "json":
        return _json_grammar(closed(constraint["schema"]))
    call = _call_schema(constraint["functions"])
    calls = (f"call (SEPARATOR call){{0,{MAX_PARALLEL_CALLS - 1}}}" if constraint["parallel"]
             else "call")
    return "\n".join((
        f"start: {calls}",
        f"call: {json.dumps(syntax.call_start)} arguments {json.dumps(syntax.call_end)}",
        f"arguments: %json {json.dumps(call)}",
        'SEPARATOR: "\\n"',
    ))


def compiled_grammar(constraint: Constraint, syntax: ToolSyntax) -> str:
    """What the worker hands llguidance's matcher."""
    return _lark(grammar(constraint, syntax))


def _json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, overrides=_COMPILE_OPTIONS)


def _lark(text: str) -> str:
    from llguidance import LLMatcher

    if text.startswith("{"):  # already llguidance's JSON form (a JSON constraint)
        return text
    return LLMatcher.grammar_from_lark(text)


def _call_schema(functions: list[FunctionSpec]) -> dict[str, Any]:
    """One call of any of the functions, as the json_tools syntax writes it:
    {"name": ..., "arguments": {...}}."""
    options = [{"type": "object",
                "properties": {"name": {"const": function["name"]},
                               "arguments": closed(function["parameters"])},
                "required": ["name", "arguments"], "additionalProperties": False}
               for function in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": _CALL_OPTIONS}


def for_request(*, schema: dict[str, Any] | None, tools: list[dict[str, Any]] | None,
                tool_choice: str | dict[str, Any] | None, parallel_tool_calls: bool
                ) -> tuple[Constraint | None, bool, list[dict[str, Any]] | None]:
    """(the constraint, whether tool calls are parsed, the tools the chat template shows) of a
    request's schema and tools, both checked already. tool_choice: "none", "auto" (the
    default with tools), "required", or {"type": "function", "function": {"name"}}."""
    if schema is not None:
        return JsonConstraint(kind="json", schema=schema), False, None
    if not tools or tool_choice == "none":
        return None, False, None
    if tool_choice in (None, "auto"):
        return None, True, tools
    functions = [FunctionSpec(name=tool["function"]["name"],
                              parameters=tool["function"].get("parameters")
                              or {"type": "object"})
                 for tool in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        functions = [function for function in functions if function["name"] == name]
    # "required" may call several at once (parallel_tool_calls); a named function, once.
    parallel = parallel_tool_calls and tool_choice == "required"
    return (ToolCallConstraint(kind="tool_calls", functions=functions, parallel=parallel),
            True, tools)


def model_refusal(params: GenerationParams, tool_parser: str | None) -> str | None:
    """Why this model cannot do what the request asks of its tools (its chat template has no
    tool support, or calls cannot be forced in its syntax), or None."""
    constraint = params["constraint"]
    if params["parse_tool_calls"] and constraint is None and tool_parser is None:
        return ("tools with tool_choice \"auto\": this model's chat template has no tool "
                "support, so it would never call one; tool_choice \"required\" or a named "
                "function works on any model (the call is then enforced)")
    if constraint is not None and constraint["kind"] == "tool_calls" \
            and not can_force_calls(tool_parser):
        return (f"tool_choice: this model writes tool calls in its own syntax "
                f"({tool_parser}), in which calls cannot be forced yet; use tool_choice "
                f"\"auto\"")
    return None
