"""Structured output, tool calls, log-probabilities, n and the sampling set, against a live
server and the demo model (native route and the openai SDK).

The demo is a ~1M-parameter toy: what it writes inside a constraint is nonsense, but always
nonsense the schema accepts. The schemas here bound their strings and numbers so that an answer
ends well within max_tokens (an unbounded integer lets a toy write digits forever)."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import jsonschema
import openai
import pytest
from model_factory import DEMO, make_model

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["cat", "dog", "fish"]}}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
ADD = {"type": "function",
       "function": {"name": "add", "description": "Add two numbers.",
                    "parameters": {"type": "object",
                                   "properties": {"a": {"type": "integer", "minimum": 0,
                                                        "maximum": 999},
                                                  "b": {"type": "integer", "minimum": 0,
                                                        "maximum": 999}},
                                   "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function",
           "function": {"name": "weather", "description": "The weather in a city.",
                        "parameters": {"type": "object",
                                       "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                       "required": ["city"]}}}
ASK = [{"role": "user", "content": "Tell me about a person called Ada."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "mlx/v1", api_key=live_server.token,
                         max_retries=0, timeout=120)


def generate(live_server, **body):
    response = live_server.request("POST", "mlx/api/generate", json={"model": "demo", **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(live_server, **body):
    events = []
    with httpx.stream("POST", live_server.url + "mlx/api/generate", timeout=120,
                      json={"model": "demo", "stream": True, **body},
                      headers={"Authorization": f"token {live_server.token}"}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            events.append(json.loads(line))
    return events


def test_a_schema_answer_always_parses_and_validates(live_server):
    for seed in range(4):
        answer = generate(live_server, messages=ASK, schema=PERSON, max_tokens=120,
                          temperature=1.0, seed=seed)
        assert answer["finish_reason"] == "stop", answer
        value = json.loads(answer["text"])
        jsonschema.validate(value, PERSON)
        assert answer["parsed"] == value and answer["parse_error"] is None


def test_any_json_object_and_the_stream_ends_with_the_parsed_value(live_server):
    events = stream(live_server, messages=ASK, schema={"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
        max_tokens=40, temperature=0)
    *pieces, done = events
    text = "".join(event["text"] for event in pieces)
    assert done["done"] and done["finish_reason"] == "stop"
    assert json.loads(text) == done["parsed"] and isinstance(done["parsed"]["ok"], bool)


def test_an_answer_cut_by_max_tokens_says_so(live_server):
    answer = generate(live_server, messages=ASK, schema=PERSON, max_tokens=3, temperature=0)
    assert answer["finish_reason"] == "length" and answer["parsed"] is None
    assert "max_tokens (3) cut the answer" in answer["parse_error"]


def test_a_constrained_request_batched_with_seven_others_answers_as_alone(live_server):
    alone = generate(live_server, messages=ASK, schema=PERSON, max_tokens=80, temperature=0)

    async def together():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120, headers={
                "Authorization": f"token {live_server.token}"}) as http:
            bodies = [{"model": "demo", "messages": ASK, "schema": PERSON, "max_tokens": 80,
                       "temperature": 0}]
            bodies += [{"model": "demo", "max_tokens": 60, "temperature": 0.8, "seed": i,
                        "messages": [{"role": "user", "content": f"Say {i} things."}]}
                       for i in range(7)]
            answers = await asyncio.gather(*(http.post("mlx/api/generate", json=body)
                                             for body in bodies))
            return [answer.json() for answer in answers]

    batched, *others = asyncio.run(together())
    assert batched["text"] == alone["text"] and batched["parsed"] == alone["parsed"]
    assert all(other["parsed"] is None and other["text"] for other in others)


def test_a_forced_call_streams_over_the_openai_sdk_and_the_tool_loop_completes(client):
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What is 2 plus 3?"}],
            tools=[ADD, WEATHER], tool_choice={"type": "function", "function": {"name": "add"}},
            stream=True, max_tokens=60, temperature=0):
        choice = chunk.choices[0] if chunk.choices else None
        for call in (choice.delta.tool_calls or []) if choice else []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        if choice and choice.finish_reason:
            finish = choice.finish_reason
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["name"] == "add" and call["id"].startswith("call_")
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, ADD["function"]["parameters"])
    final = client.chat.completions.create(model="demo", max_tokens=20, temperature=0, messages=[
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": "add", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "5"}], tools=[ADD])
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.choices[0].message.content or final.choices[0].message.tool_calls


def test_required_calls_one_of_the_functions_and_its_call_validates(live_server):
    answer = generate(live_server, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                      tools=[ADD, WEATHER], tool_choice="required", parallel_tool_calls=False,
                      max_tokens=80, temperature=0)
    assert answer["finish_reason"] == "tool_calls" and len(answer["tool_calls"]) == 1, answer
    assert answer["text"] == ""
    tools = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (ADD, WEATHER)}
    for call in answer["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            tools[call["function"]["name"]])
    row = live_server.get(f"mlx/api/requests/{answer['request_id']}").json()
    assert row["finish_reason"] == "tool_calls" and row["status"] == "completed"
    assert json.loads(row["output_text"])[0]["function"]["name"] == \
        answer["tool_calls"][0]["function"]["name"]


def test_auto_tools_on_a_model_without_tool_support_is_a_400_that_says_what_works(
        live_server):
    folder = live_server.root_dir / "no-tools"
    make_model(folder)
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}assistant:")
    config.pop("tool_parser_type", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    registered = live_server.request("POST", "mlx/api/models",
                                     json={"name": "no-tools", "path": str(folder)})
    assert registered.status_code in (200, 201), registered.text
    try:
        body = {"model": "no-tools", "messages": ASK, "tools": [ADD], "max_tokens": 30}
        refused = live_server.request("POST", "mlx/api/generate", json=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()
        assert "no tool support" in error["message"] and "\"required\"" in error["message"]
        forced = live_server.request("POST", "mlx/api/generate",
                                     json={**body, "tool_choice": "required",
                                           "temperature": 0, "max_tokens": 60})
        assert forced.status_code == 200, forced.text
        [call] = forced.json()["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            ADD["function"]["parameters"])
    finally:
        live_server.request("DELETE", "mlx/api/models/no-tools")
        shutil.rmtree(folder, ignore_errors=True)


def test_logprobs_whole_and_streamed_over_the_openai_sdk(client):
    answer = client.chat.completions.create(model="demo", messages=ASK, max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=3)
    [choice] = answer.choices
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:  # greedy: the chosen token is the likeliest
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = [entry for chunk in client.chat.completions.create(
        model="demo", messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        stream=True) if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]


def test_legacy_completions_take_an_integer_logprobs(client):
    answer = client.completions.create(model="demo", prompt="The sea is", max_tokens=5,
                                       temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == answer.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == answer.choices[0].text
    assert answer.choices[0].text.startswith(" ")  # it continues the prompt, space and all


def test_n_answers_each_from_the_seed_plus_its_index(client, live_server):
    answer = client.chat.completions.create(model="demo", messages=ASK, max_tokens=12,
                                            temperature=1.5, seed=40, n=3)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    for choice in answer.choices:
        alone = generate(live_server, messages=ASK, max_tokens=12, temperature=1.5,
                         seed=40 + choice.index)
        assert choice.message.content == alone["text"]
    assert answer.usage.completion_tokens == sum(
        generate(live_server, messages=ASK, max_tokens=12, temperature=1.5,
                 seed=40 + i)["usage"]["completion_tokens"] for i in range(3))
    native = generate(live_server, messages=ASK, max_tokens=6, temperature=1.5, seed=40, n=2)
    assert [choice["index"] for choice in native["choices"]] == [0, 1]
    assert native["text"] == native["choices"][0]["text"]


def test_n_above_the_batch_is_refused(live_server):
    response = live_server.request("POST", "mlx/api/generate",
                                   json={"model": "demo", "prompt": "x", "n": 9})
    assert response.status_code == 400
    assert response.json()["message"] == "n: Input should be less than or equal to 8"


def test_logit_bias_and_penalties_change_what_is_sampled(live_server):
    plain = generate(live_server, messages=ASK, max_tokens=6, temperature=0, logprobs=True)
    first = plain["logprobs"][0]
    from tokenizers import Tokenizer

    token_id = Tokenizer.from_file(str(DEMO / "tokenizer.json")).token_to_id(
        bytes(first["bytes"]).decode().replace(" ", "\u0120"))
    assert token_id is not None
    biased = generate(live_server, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                      logit_bias={str(token_id): -100})
    assert biased["logprobs"][0]["token"] != first["token"]
    long_plain = generate(live_server, messages=ASK, max_tokens=60, temperature=0)
    penalised = generate(live_server, messages=ASK, max_tokens=60, temperature=0,
                         repetition_penalty=3.0, frequency_penalty=1.5)
    assert penalised["text"] != long_plain["text"]
    sampled = generate(live_server, messages=ASK, max_tokens=10, temperature=1.0, seed=3,
                       top_k=1)
    assert sampled["text"] == generate(live_server, messages=ASK, max_tokens=10,
                                       temperature=0)["text"]  # top_k 1: the argmax


def test_cache_control_is_accepted_and_other_unknown_fields_are_not(client):
    answer = client.chat.completions.create(model="demo", max_tokens=4, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                        "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}])
    assert answer.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="demo", max_tokens=4, messages=[
            {"role": "user", "content": "Hi", "cache_hint": {}}])
    assert refused.value.body["param"] == "messages.0.cache_hint"


THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + "
    "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% if enable_thinking "
    "is defined and not enable_thinking %}<think></think>{% else %}<think>{% endif %}{% endif %}")


def make_thinking_model(folder):
    """A random-weight Llama whose tokenizer has thinking markers (<think>, </think>: mlx-lm
    finds them in the vocabulary) and whose template opens a thinking block unless
    enable_thinking is false, as Qwen 3's does."""
    import numpy as np
    from model_factory import llama_tensors
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    make_model(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens(["<think>", "</think>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    tensors = llama_tensors(64, 2)
    tensors["model.embed_tokens.weight"] = (
        np.random.default_rng(2).standard_normal((vocab, 64), dtype=np.float32) * 0.02)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = THINKING_TEMPLATE
    tokenizer_config.pop("tool_parser_type", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return {str(tokenizer.token_to_id(marker)): -100 for marker in ("<think>", "</think>")}


def test_thinking_is_returned_apart_and_chat_template_kwargs_reach_the_template(
        live_server, client):
    folder = live_server.root_dir / "thinker"
    no_markers = make_thinking_model(folder)
    registered = live_server.request("POST", "mlx/api/models",
                                     json={"name": "thinker", "path": str(folder)})
    assert registered.status_code in (200, 201), registered.text
    try:
        body = {"model": "thinker", "messages": ASK, "max_tokens": 12, "temperature": 0,
                "logit_bias": no_markers}  # random weights: never close the block by chance
        thinking = stream(live_server, **body)
        assert {key for event in thinking[:-1] for key in event} == {"reasoning"}
        whole = generate(live_server, **body)
        assert whole["reasoning"] == "".join(e["reasoning"] for e in thinking[:-1])
        assert whole["text"] == "" and whole["reasoning"]
        direct = generate(live_server, **body,
                          chat_template_kwargs={"enable_thinking": False})
        assert direct["reasoning"] is None and direct["text"]
        answer = client.chat.completions.create(
            model="thinker", messages=ASK, max_tokens=12, temperature=0,
            logit_bias=no_markers)
        assert answer.choices[0].message.model_extra["reasoning_content"] == whole["reasoning"]
    finally:
        live_server.request("DELETE", "mlx/api/models/thinker")
        shutil.rmtree(folder, ignore_errors=True)
