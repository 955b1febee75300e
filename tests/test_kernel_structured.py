"""Structured output, logprobs and reasoning on the kernel side, without a server: what a
`schema=` may be and the JSON schema sent for it, how an answer is validated back into it,
the `%%mlx` options that ask for them, and how the cell renders tokens and reasoning."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import typing
from html.parser import HTMLParser
from typing import Any

import pydantic
import pytest
import typing_extensions
from IPython.core.error import UsageError

from mlx_jupyter.kernel import Choice, GenerationResult, InvalidRequest, StructuredOutputError
from mlx_jupyter.kernel.options import DEFAULT_TOP_LOGPROBS, parse_cell
from mlx_jupyter.kernel.render import (
    PlainText,
    json_bundle,
    logprobs_bundle,
    logprobs_html,
    probability,
    reasoning_bundle,
)
from mlx_jupyter.kernel.structured import resolve
from mlx_jupyter.limits import MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS


class Person(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=0)


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Movie(typing_extensions.TypedDict):
    title: str
    year: int


class Book(typing.TypedDict, total=False):  # typing's own, which pydantic refuses before 3.12
    title: typing.Required[str]
    pages: int


def answer(text: str, finish_reason: str = "stop", **fields: Any) -> GenerationResult:
    return GenerationResult(text=text, request_id="r1", model="demo",
                            finish_reason=finish_reason,
                            usage={"prompt_tokens": 3, "completion_tokens": 7}, **fields)


# -- the four kinds ------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "kind", "text", "value"), [
    (Person, "pydantic", '{"name": "Ada", "age": 36}', Person(name="Ada", age=36)),
    (Point, "dataclass", '{"x": 1, "y": 2.5}', Point(1.0, 2.5)),
    (Movie, "typeddict", '{"title": "Up", "year": 2009}', {"title": "Up", "year": 2009}),
    (Book, "typeddict", '{"title": "Emma"}', {"title": "Emma"}),
])
def test_each_kind_sends_its_json_schema_and_validates_into_its_type(schema, kind, text,
                                                                     value):
    structured = resolve(schema)
    assert structured.kind == kind and structured.name == schema.__name__
    expected = schema.model_json_schema() if kind == "pydantic" else \
        pydantic.TypeAdapter(schema).json_schema() if schema is not Book else None
    if expected is not None:  # closed to keys it does not declare
        assert structured.json_schema == {**expected, "additionalProperties": False}
    result = structured.apply(answer(text))
    assert result.parsed == value and type(result.parsed) is type(value)
    assert structured.to_json(result.parsed) == json.loads(text) | (
        {"x": 1.0} if schema is Point else {})


def test_a_class_schema_is_closed_to_undeclared_keys_where_it_says_nothing_of_them():
    class Inner(pydantic.BaseModel):
        properties: int  # a field named like the schema's own key

    class Open(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow")
        inner: Inner
        many: list[Inner] | None = None
        table: dict[str, Inner] = {}

    sent = resolve(Open).json_schema
    assert sent["additionalProperties"] is True  # extra="allow" says so: left open
    inner = sent["$defs"]["Inner"]
    assert inner["additionalProperties"] is False
    assert inner["properties"] == {"properties": {"title": "Properties", "type": "integer"}}
    assert sent["properties"]["table"]["additionalProperties"] == {"$ref": "#/$defs/Inner"}
    nested = {"type": "object", "properties": {"p": {"type": "object", "properties": {}}}}
    assert resolve(nested).json_schema is nested  # a dict is sent as it is given
    outer = dataclasses.make_dataclass("Outer", [("p", Point)])
    assert resolve(outer).json_schema["$defs"]["Point"]["additionalProperties"] is False


def test_a_typing_typeddict_keeps_which_keys_are_required():
    structured = resolve(Book)
    assert structured.json_schema["required"] == ["title"]
    assert set(structured.json_schema["properties"]) == {"title", "pages"}
    with pytest.raises(StructuredOutputError, match="title: Field required"):
        structured.apply(answer('{"pages": 3}'))


def test_a_dict_is_sent_as_it_is_and_the_servers_parsed_is_the_value():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "title": "Count"}
    structured = resolve(schema)
    assert (structured.kind, structured.name, structured.json_schema) == \
        ("dict", "Count", schema)
    assert structured.apply(answer('{"n": 2}', parsed={"n": 2})).parsed == {"n": 2}
    # A history row has no `parsed`: the text the server checked is read.
    assert structured.apply(answer('{"n": 5}')).parsed == {"n": 5}
    assert resolve({}).apply(answer("null")).parsed is None  # {} takes any JSON value


@pytest.mark.parametrize(("schema", "says"), [
    (Person(name="a", age=1), "schema is an instance of Person; give the class itself"),
    (Point(1, 2), "schema is an instance of Point; give the class itself"),
    (int, "schema is the class int; give a pydantic model class, a dataclass, a TypedDict "
          "or a JSON-schema dict"),
    ("Person", "schema is 'Person' (of type str); give a pydantic"),
    ([Person], "schema is [<class"),
    ({"type": {1, 2}}, "schema is a dict that is not JSON"),
    ({"const": math.nan}, "schema is a dict that is not JSON"),
])
def test_anything_else_is_a_clear_invalid_request(schema, says):
    with pytest.raises(InvalidRequest, match=re.escape(says)):
        resolve(schema)


def test_a_model_without_a_json_schema_says_so():
    class Odd(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        handle: typing.Callable[[], None]

    with pytest.raises(InvalidRequest, match=r"schema \(Odd\) has no JSON schema: "):
        resolve(Odd)


# -- answers that are not values -------------------------------------------------------------


def test_an_invalid_answer_names_what_is_wrong_and_keeps_the_text():
    text = '{"name": "Ada", "age": -1}'
    with pytest.raises(StructuredOutputError) as failed:
        resolve(Person).apply(answer(text))
    assert str(failed.value) == ("the answer is not a valid Person: age: Input should be "
                                 "greater than or equal to 0")
    assert failed.value.cut is False and failed.value.result.text == text
    assert failed.value.result.parsed is None and failed.value.request_id == "r1"
    with pytest.raises(StructuredOutputError, match="not a valid Point: Invalid JSON"):
        resolve(Point).apply(answer("not json"))


def test_many_errors_are_counted_not_all_listed():
    class Wide(pydantic.BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int

    with pytest.raises(StructuredOutputError) as failed:
        resolve(Wide).apply(answer("{}"))
    message = str(failed.value)
    assert message.count("Field required") == 3 and message.endswith("(and 2 more)")
    assert "\n" not in message


@pytest.mark.parametrize("schema", [Person, {"type": "object"}])
def test_an_answer_cut_at_max_tokens_says_to_raise_it(schema):
    cut = answer('{"name": "Ad', "length", parse_error="unexpected end of the JSON")
    with pytest.raises(StructuredOutputError) as failed:
        resolve(schema).apply(cut)
    assert str(failed.value) == ("the answer was cut at max_tokens (7 tokens) before its "
                                 "JSON was complete; raise max_tokens")
    assert failed.value.cut is True


def test_every_choice_is_validated_and_the_first_is_the_top_level_value():
    choices = [Choice(0, '{"name": "A", "age": 1}', "stop"),
               Choice(1, '{"name": "B", "age": 2}', "stop")]
    result = resolve(Person).apply(answer(choices[0].text, choices=choices))
    assert [c.parsed for c in result.choices] == [Person(name="A", age=1),
                                                  Person(name="B", age=2)]
    assert result.parsed == result.choices[0].parsed
    bad = [choices[0], Choice(1, '{"name": "B"}', "stop")]
    with pytest.raises(StructuredOutputError, match="answer 1 is not a valid Person: age"):
        resolve(Person).apply(answer(bad[0].text, choices=bad))


# -- the magic's options -----------------------------------------------------------------------


def test_the_new_options_parse_into_the_request():
    request = parse_cell("demo --schema models.Person --logprobs --top-k 40 --min-p 0.05 "
                         "--repetition-penalty 1.1 --frequency-penalty -0.5 "
                         "--presence-penalty 2 -o who", "Invent someone.", None)
    assert request.schema == "models.Person" and request.format == "json"
    assert request.logprobs and request.output == "who"
    assert request.options == {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                               "frequency_penalty": -0.5, "presence_penalty": 2.0,
                               "logprobs": True, "top_logprobs": DEFAULT_TOP_LOGPROBS}
    assert parse_cell("--top-logprobs 0", "Hi", None).options == \
        {"logprobs": True, "top_logprobs": 0}  # implies --logprobs
    assert parse_cell(f"--logprobs --top-logprobs {MAX_TOP_LOGPROBS}", "Hi", None
                      ).options["top_logprobs"] == MAX_TOP_LOGPROBS
    assert parse_cell("--schema P -f json", "Hi", None).format == "json"
    plain = parse_cell("", "Hi", None, default_format="code")
    assert (plain.schema, plain.logprobs, plain.format) == (None, False, "code")
    # A configured default format the token view cannot stand for gives way to it.
    assert parse_cell("--logprobs", "Hi", None, default_format="code").format == "markdown"


@pytest.mark.parametrize(("line", "says"), [
    (f"--top-logprobs {MAX_TOP_LOGPROBS + 1}", f"{MAX_TOP_LOGPROBS + 1} is not in [0, "
                                               f"{MAX_TOP_LOGPROBS}]"),
    ("--top-logprobs -1", "-1 is not in [0, 20]"),
    ("--top-logprobs many", "invalid int value: 'many'"),
    ("--top-k -1", "-1 is not at least 0"),
    ("--min-p 1.5", "1.5 is not in [0.0, 1.0]"),
    ("--repetition-penalty 0", f"0 is not in (0.0, {MAX_REPETITION_PENALTY}]"),
    ("--repetition-penalty 11", f"11 is not in (0.0, {MAX_REPETITION_PENALTY}]"),
    ("--frequency-penalty 3", f"3 is not in [{-MAX_PENALTY}, {MAX_PENALTY}]"),
    ("--presence-penalty -2.5", f"-2.5 is not in [{-MAX_PENALTY}, {MAX_PENALTY}]"),
    ("--schema 1x", "'1x' is not a name"),
    ("--schema a..b", "'a..b' is not a name"),
    ("--schema class", "'class' is not a name"),
    ("--schema", "expected one argument"),
    ("--schema P -f markdown", "--schema answers in JSON; leave out -f markdown"),
    ("--logprobs -f code", "--logprobs shows the answer's tokens; it does not go with -f code"),
    ("--top-logprobs 3 -f html", "it does not go with -f html"),
])
def test_bad_new_options_are_usage_errors(line, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        parse_cell(line, "Hi", "demo")


# -- how the cell shows it ---------------------------------------------------------------------


class Spans(HTMLParser):
    """The token spans of a logprobs view: their attributes and text, as a browser reads them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict[str, Any]] = []
        self.other_tags: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "span":
            self.spans.append({**dict(attrs), "text": ""})
            self._inside = True
        elif tag != "div":
            self.other_tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        self._inside = self._inside and tag != "span"

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.spans[-1]["text"] += data


def spans_of(markup: str) -> Spans:
    parser = Spans()
    parser.feed(markup)
    return parser


TOKENS = [
    {"token": "<script>", "logprob": math.log(0.9), "bytes": [60],
     "top_logprobs": [{"token": "<script>", "logprob": math.log(0.9)},
                      {"token": "it's \"x\"", "logprob": math.log(0.05)}]},
    {"token": " & ", "logprob": math.log(0.3), "top_logprobs": []},
    {"token": "\n", "logprob": 0.0},
    {"token": "end'", "logprob": -30.0},
]


def test_one_span_per_token_with_its_text_escaped():
    markup = logprobs_html(TOKENS)
    parsed = spans_of(markup)
    assert [span["text"] for span in parsed.spans] == [t["token"] for t in TOKENS]
    assert parsed.other_tags == []  # "<script>" is text, not a tag
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert all(span["class"] == "mlx-token" for span in parsed.spans)


def test_each_token_is_shaded_by_its_probability():
    parsed = spans_of(logprobs_html(TOKENS))
    probabilities = [float(span["data-p"]) for span in parsed.spans]
    assert probabilities == pytest.approx([0.9, 0.3, 1.0, math.exp(-30)], abs=1e-4)
    hues = [int(re.search(r"background-color:hsl\((\d+),", span["style"]).group(1))
            for span in parsed.spans]
    assert hues == [108, 36, 120, 0]  # red (unlikely) through yellow to green (certain)
    assert all("color:#111" in span["style"] for span in parsed.spans)  # legible on any theme


def test_the_tooltip_gives_the_probability_and_the_top_alternatives():
    first, second, newline, unlikely = (span["title"]
                                        for span in spans_of(logprobs_html(TOKENS)).spans)
    assert first.splitlines() == ['"<script>"  90.0%', "top:", '  "<script>"  90.0%',
                                  '  "it\'s \\"x\\""  5.0%']
    assert second == '" & "  30.0%' and newline == '"\\n"  100.0%'
    assert unlikely == "\"end'\"  9.4e-12%"


def test_a_token_without_a_number_is_left_unshaded():
    [span] = spans_of(logprobs_html([{"token": "?", "logprob": None}])).spans
    assert "transparent" in span["style"] and "data-p" not in span and span["title"] == '"?"  ?'
    assert probability(float("nan")) is None and probability(True) is None
    assert probability(0.5) == 1.0  # rounding above 0 is still certain


def test_the_bundles_fall_back_to_plain_text():
    bundle = logprobs_bundle("<b>hi</b>", TOKENS)
    assert bundle["text/plain"] == "<b>hi</b>" and bundle["text/html"].startswith("<div")
    pretty = json_bundle({"name": "Zoë", "tags": ["a"]})
    assert pretty["text/plain"] == json.dumps({"name": "Zoë", "tags": ["a"]}, indent=2,
                                              ensure_ascii=False)
    assert pretty["text/markdown"] == f"```json\n{pretty['text/plain']}\n```"


def test_reasoning_is_folded_away_and_escaped():
    folded = reasoning_bundle("if a < b & c\nthen")
    assert folded["text/html"].startswith("<details><summary>Reasoning</summary>")
    assert html.escape("if a < b & c\nthen") in folded["text/html"]
    assert "<b &" not in folded["text/html"]
    assert folded["text/plain"] == "Reasoning: if a < b & c\nthen"
    assert reasoning_bundle("x", folded=False)["text/html"].startswith("<details open>")


def test_a_terminal_prints_the_reasoning_then_the_answer(capsys: pytest.CaptureFixture):
    output = PlainText()
    output.reason("Think")
    output.reason("Thinking.")
    output.update("Hi")
    output.reason("Thinking. More", done=True)  # the answer began: nothing more of it
    output.finish({"text/plain": "Hi!"}, "demo")
    assert capsys.readouterr().out == "Reasoning: Thinking.\n\nHi!\n[demo]\n"
    output = PlainText()
    output.update('{"a":1}')
    output.finish(json_bundle({"a": 1}), None)  # pretty JSON is not what streamed
    assert capsys.readouterr().out == '{"a":1}\n{\n  "a": 1\n}\n'


def test_every_option_is_in_the_help_and_the_readme():
    from pathlib import Path

    from mlx_jupyter.kernel.magics import HELP
    from mlx_jupyter.kernel.options import USAGE, _cell_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| `%%mlx [MODEL] [options]` |"):readme.index("| `%mlx …` |")]
    actions = [action.option_strings for action in _cell_parser()._actions
               if action.option_strings]
    longs = {option for options in actions for option in options if option.startswith("--")}
    assert {"--schema", "--logprobs", "--top-logprobs", "--top-k", "--min-p"} <= longs
    for options in actions:
        assert any(re.search(rf"\[{option}[] ]", USAGE) for option in options), options
    for option in longs:
        assert option in HELP, option
        assert re.search(rf"`{option}[ `]", table), option
