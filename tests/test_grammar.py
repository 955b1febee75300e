"""The grammar side of constrained decoding, without a server: schema checks, closed schemas,
the output router, and the worker's compiler (its cache bounded) and mask, on the demo's
tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_factory import DEMO

from mlx_jupyter.engine.grammar.constraints import check_parameters, check_schema, closed
from mlx_jupyter.engine.grammar.syntax import OutputRouter, ToolSyntax


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "thing"}, "not a valid JSON schema at type"),
    ({"not": {"type": "string"}}, 'cannot be enforced: Unimplemented keys: ["not"]'),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ([], "a JSON schema is an object"),
])
def test_schemas_the_engine_cannot_enforce_are_refused_saying_why(schema, says):
    with pytest.raises(ValueError) as refused:
        check_schema(schema)
    assert says in str(refused.value)


def test_a_function_takes_an_object_of_parameters():
    with pytest.raises(ValueError, match="an object schema"):
        check_parameters({"type": "array"})
    assert check_parameters({"type": "object", "properties": {}})


def test_listed_objects_are_closed_unless_they_say_otherwise():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "properties": {"type": "string"}}}}, "$defs": {"x": {"properties": {}}}}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["a"]["properties"]["properties"]
    assert out["$defs"]["x"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's own is left as it was
    kept = {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}}
    assert closed(kept) == kept
    assert closed({"allOf": [{"properties": {"a": {}}}]}) == {"allOf": [{"properties": {"a": {}}}]}
    assert "additionalProperties" not in closed({"properties": {"a": {}}, "required": ["b"]})


def test_the_router_splits_text_thinking_and_calls_across_pieces():
    router = OutputRouter(think=("<think>", "</think>"), tools=ToolSyntax(),
                          parse=lambda text, _: json.loads(text))
    pieces = []
    for text in ["Hi <thi", "nk>hmm</think> ok <tool", '_call>{"name": "f", ',
                 '"arguments": {}}</tool_call>', "\n", '<tool_call>{"name": "g", "arguments": {}}',
                 "</tool_call>", "\n", " <tool_call>{cut"]:
        pieces += router.feed(text)
    pieces += router.close()
    assert pieces == [("text", "Hi "), ("reasoning", "hmm"), ("text", " ok "),
                      ("tool_call", {"name": "f", "arguments": {}}),
                      ("tool_call", {"name": "g", "arguments": {}}),
                      ("text", "<tool_call>{cut")]  # the blank between calls is no text


def test_a_call_the_parser_cannot_read_stays_in_the_answer_as_text():
    router = OutputRouter(tools=ToolSyntax(), parse=lambda text, _: json.loads(text))
    assert router.feed("<tool_call>not json</tool_call>") == [
        ("text", "<tool_call>not json</tool_call>")]


@pytest.fixture(scope="module")
def compiler():
    from transformers import PreTrainedTokenizerFast

    from mlx_jupyter.engine.grammar.processor import GrammarCompiler

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(DEMO))
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id], len(tokenizer.get_vocab()))
    yield compiler
    compiler.close()


def test_the_compilers_cache_is_bounded_and_hands_out_fresh_matchers(compiler):
    from mlx_jupyter.engine.grammar import processor
    from mlx_jupyter.engine.grammar.constraints import compiled_grammar

    def grammar(i):
        return compiled_grammar({"kind": "json", "schema": {"const": f"value {i}"}}, ToolSyntax())

    for i in range(processor._CACHED_GRAMMARS + 10):
        compiler.compile(grammar(i)).result()
    assert len(compiler._matchers) == processor._CACHED_GRAMMARS
    first, second = compiler.compile(grammar(70)).result(), compiler.compile(grammar(70)).result()
    assert first is not second  # each request advances a matcher of its own
    with pytest.raises(ValueError):
        compiler.compile("start: nonsense(").result()


def test_the_mask_allows_only_what_the_grammar_does(compiler):
    import mlx.core as mx

    from mlx_jupyter.engine.grammar.constraints import compiled_grammar
    from mlx_jupyter.engine.grammar.processor import GrammarProcessor

    matcher = compiler.compile(compiled_grammar(
        {"kind": "json", "schema": {"enum": ["yes"]}}, ToolSyntax())).result()
    eos = compiler._eos_token_ids
    mask = GrammarProcessor(matcher, compiler.vocab_size, eos)
    logits = mx.zeros((1, compiler.vocab_size))
    allowed = np.isfinite(np.array(mask(mx.array([7]), logits))[0])
    tokens = [compiler.token_bytes(int(t)) for t in np.nonzero(allowed)[0]]
    assert tokens and all(b'"yes"'.startswith(token) for token in tokens)


def test_a_forced_call_is_spelled_as_the_demos_template_writes_calls(compiler):
    """One syntax for forced and free calls: the grammar accepts a call exactly as the chat
    template renders one (json.dumps spacing), and not the compact spelling."""
    from transformers import PreTrainedTokenizerFast

    from mlx_jupyter.engine.grammar.constraints import compiled_grammar

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(DEMO))
    asked = tokenizer.apply_chat_template([{"role": "user", "content": "2 plus 3?"}],
                                          add_generation_prompt=True, tokenize=False)
    answered = tokenizer.apply_chat_template([
        {"role": "user", "content": "2 plus 3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}],
        tokenize=False)
    call = answered[len(asked):].removesuffix(tokenizer.eos_token)
    assert call == '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    grammar = compiled_grammar({"kind": "tool_calls", "parallel": False, "functions": [
        {"name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}}}}]}, ToolSyntax())
    for text, accepted in ((call, True), (call.replace(", ", ",").replace(": ", ":"), False)):
        matcher = compiler.compile(grammar).result()
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert (matcher.consume_tokens(ids) and matcher.is_accepting()) is accepted, text
