"""Structured output on the kernel side: what `schema=` (and `%%mlx --schema NAME`) may be, the
JSON schema sent for it, and the answer validated back into it.

    class Person(pydantic.BaseModel):
        name: str
        age: int

    client.generate("Invent a person.", schema=Person).parsed   # a Person

Four kinds, each validated the way its library does it:
- a pydantic model class: `Model.model_json_schema()`; `Model.model_validate_json(text)`
- a dataclass or a TypedDict: `pydantic.TypeAdapter(T).json_schema()`; `.validate_json(text)`
  (a class's objects are sent closed to keys it does not declare: see `closed`)
- a dict, a JSON schema as it is: the server checks the answer against it; its `parsed` is kept

pydantic is imported only when a schema is given: a kernel that never asks for one does not
pay for it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest, StructuredOutputError
from .http import Choice, GenerationResult, one_line

KINDS = "a pydantic model class, a dataclass, a TypedDict or a JSON-schema dict"
_MAX_ERRORS_SHOWN = 3  # validation errors named in a message; the rest are counted


@dataclass(frozen=True)
class Structured:
    """A schema given to a request: its kind, its name, the JSON schema sent, and how an
    answer's text becomes the value (None: the server's `parsed` is the value)."""

    kind: str  # "pydantic", "dataclass", "typeddict" or "dict"
    name: str
    json_schema: dict[str, Any]
    validate_json: Callable[[str], Any] | None = None
    dump_json: Callable[[Any], Any] | None = None  # a value -> JSON-able; None: it is already

    def to_json(self, value: Any) -> Any:
        """A validated value as plain JSON data (for showing it)."""
        return value if self.dump_json is None else self.dump_json(value)

    def apply(self, result: GenerationResult) -> GenerationResult:
        """The result with `parsed` (each choice's too) the validated value; raises
        StructuredOutputError when an answer is not one."""
        if result.choices:
            choices = [self._choice(choice, result) for choice in result.choices]
            first = choices[0]
            return dataclasses.replace(result, choices=choices, parsed=first.parsed)
        value = self._value(result.text, result.parsed, result.parse_error,
                            result.finish_reason, result)
        return dataclasses.replace(result, parsed=value)

    def _choice(self, choice: Choice, result: GenerationResult) -> Choice:
        value = self._value(choice.text, choice.parsed, choice.parse_error,
                            choice.finish_reason, result, choice.index)
        return dataclasses.replace(choice, parsed=value)

    def _value(self, text: str, parsed: Any, parse_error: str | None, finish_reason: str,
               result: GenerationResult, index: int | None = None) -> Any:
        which = "the answer" if index is None else f"answer {index}"
        cut = finish_reason == "length"
        try:
            if self.validate_json is not None:
                return self.validate_json(text)
            if parse_error is not None:
                raise ValueError(parse_error)
            # A history row has no `parsed`; the server checked the text it stored.
            return parsed if parsed is not None or not text.strip() else json.loads(text)
        except Exception as exc:  # pydantic's ValidationError, or a JSON error
            if cut:
                message = cut_message(result, which)
            else:
                message = f"{which} is not a valid {self.name}: {_reason(exc)}"
            raise StructuredOutputError(message, result=_unparsed(result), cut=cut) from None


def cut_message(result: GenerationResult, which: str = "the answer",
                option: str = "max_tokens") -> str:
    tokens = result.usage.get("completion_tokens")
    at = f" ({tokens} tokens)" if tokens else ""
    return f"{which} was cut at {option}{at} before its JSON was complete; raise {option}"


def resolve(schema: Any, what: str = "schema") -> Structured:
    """The Structured of a schema of one of the four kinds (or of a Structured: itself);
    InvalidRequest for anything else (an instance instead of its class, a string...), whose
    message calls it `what`."""
    if isinstance(schema, Structured):
        return schema
    import pydantic

    name = getattr(schema, "__name__", None) or type(schema).__name__
    try:
        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            return Structured("pydantic", name, closed(schema.model_json_schema()),
                              schema.model_validate_json,
                              lambda value: value.model_dump(mode="json"))
        kind = ("dataclass" if isinstance(schema, type) and dataclasses.is_dataclass(schema)
                else "typeddict" if _is_typeddict(schema) else None)
        if kind is not None:
            adapter = pydantic.TypeAdapter(_pydantic_typeddict(schema) if kind == "typeddict"
                                           else schema)
            return Structured(kind, name, closed(adapter.json_schema()), adapter.validate_json,
                              lambda value: adapter.dump_python(value, mode="json"))
    # A field pydantic cannot put in a JSON schema, or an annotation naming nothing.
    except (pydantic.PydanticUserError, NameError) as exc:
        message = one_line(str(exc)).split(" For further information")[0]
        raise InvalidRequest(f"{what} ({name}) has no JSON schema: {message}") from None
    if isinstance(schema, dict):
        try:
            json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{what} is a dict that is not JSON ({exc}); a JSON schema "
                                 f"is") from None
        return Structured("dict", str(schema.get("title") or "the JSON schema"), schema)
    if isinstance(schema, pydantic.BaseModel) or (
            dataclasses.is_dataclass(schema) and not isinstance(schema, type)):
        raise InvalidRequest(f"{what} is an instance of {type(schema).__name__}; give the "
                             f"class itself")
    raise InvalidRequest(f"{what} is {_described(schema)}; give {KINDS}")


def closed(schema: Any) -> Any:
    """A class's JSON schema with `additionalProperties: false` on every object that has
    properties and says nothing of others (as OpenAI's strict schemas are): its validation
    would drop other keys anyway, and a model left free to add some (any key is a string)
    may ramble in one until max_tokens. A class that allows extras (pydantic's
    extra="allow") says so, and is left as it is. A dict schema is sent as it is given."""
    if not isinstance(schema, dict):
        return schema
    shut = dict(schema)
    for key in _SCHEMA_MAPS:  # keys naming subschemas: properties, $defs...
        if isinstance(schema.get(key), dict):
            shut[key] = {name: closed(sub) for name, sub in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            shut[key] = [closed(sub) for sub in schema[key]]
    for key in _SCHEMA_ONES:
        if isinstance(schema.get(key), dict):
            shut[key] = closed(schema[key])
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        shut["additionalProperties"] = False
    return shut


# Where a JSON schema holds subschemas: by name, in a list, or one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                "propertyNames", "unevaluatedProperties")


def _is_typeddict(value: Any) -> bool:
    # typing's and typing_extensions' TypedDicts are different classes before Python 3.12
    # (pydantic needs the latter there, and depends on typing_extensions).
    import typing_extensions

    return isinstance(value, type) and (typing.is_typeddict(value)
                                        or typing_extensions.is_typeddict(value))


def _pydantic_typeddict(typeddict: type) -> Any:
    """A typing.TypedDict as typing_extensions' (pydantic takes only the latter before Python
    3.12), each key as required or not as it was."""
    import typing_extensions

    if sys.version_info >= (3, 12) or not typing.is_typeddict(typeddict):
        return typeddict
    hints = typing.get_type_hints(typeddict, include_extras=True)
    fields = {key: (typing_extensions.Required if _required(key, hint, typeddict)
                    else typing_extensions.NotRequired)[_unwrapped(hint)]
              for key, hint in hints.items()}
    twin = typing_extensions.TypedDict(typeddict.__name__, fields)  # type: ignore[operator]
    twin.__doc__, twin.__module__ = typeddict.__doc__, typeddict.__module__
    return twin


def _required(key: str, hint: Any, typeddict: Any) -> bool:
    # Required[...] written as a string (from __future__ import annotations) escapes
    # __required_keys__ before Python 3.12; the hint, evaluated, still says it.
    origin = typing.get_origin(hint)
    if origin is typing.Required:
        return True
    if origin is typing.NotRequired:
        return False
    return key in typeddict.__required_keys__


def _unwrapped(hint: Any) -> Any:
    while typing.get_origin(hint) in (typing.Required, typing.NotRequired):
        hint = typing.get_args(hint)[0]
    return hint


def _described(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return f"{one_line(repr(value))[:60]} (of type {type(value).__name__})"


def _reason(exc: Exception) -> str:
    """One line of why a text is not a value: pydantic's errors (where, what), or JSON's."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return one_line(str(exc))
    found = errors(include_url=False)
    named = [": ".join(filter(None, (".".join(str(part) for part in error["loc"]),
                                     error["msg"])))
             for error in found[:_MAX_ERRORS_SHOWN]]
    more = len(found) - len(named)
    return one_line("; ".join(named) + (f" (and {more} more)" if more > 0 else ""))


def _unparsed(result: GenerationResult) -> GenerationResult:
    choices = result.choices and [dataclasses.replace(c, parsed=None) for c in result.choices]
    return dataclasses.replace(result, parsed=None, choices=choices)
