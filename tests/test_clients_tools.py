"""Structured output, tool calls, logprobs and n through real clients against a live server
and the demo model: the openai SDK, LangChain's ChatOpenAI and LiteLLM.

Every client talks to the server through a recording relay (tests/recording_proxy.py), so a
failure shows the exact request bodies the client library sent beside the server's answer.
Tool calls run on two models: the demo, and a random-weight Llama whose chat template has
tool support (Hermes style, tests/model_factory.make_tool_model) and an 8k context. They are
forced (a named tool_choice, or "required"), which the server enforces by grammar on any
model; the tools' parameters are bounded (enums, integer ranges) so that even random weights
end their JSON within max_tokens.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm fetches prices

import json
from contextlib import contextmanager
from typing import Literal

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from model_factory import make_tool_model
from pydantic import BaseModel, ConfigDict, Field
from recording_proxy import RecordingProxy

MODEL = "demo"
TOOL_MODEL = "clients-tools-8k"  # registered by the tool_model fixture
TOOL_MODELS = [MODEL, TOOL_MODEL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """A forecast."""
    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)
    note: str = Field(max_length=12)


# Small (the demo's context is 256 tokens, and the tools go into the prompt) and closed
# (additionalProperties false, as OpenAI's strict tools are): the arguments have nowhere to
# ramble. LangChain's tools below are sent as LangChain sends them, open.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast.",
    "parameters": {"type": "object",
                   "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                       "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def proxy(live_server):
    relay = RecordingProxy(live_server.url)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def base_url(proxy):
    return proxy.url + "mlx/v1"


@pytest.fixture(scope="module")
def client(base_url, live_server):
    return openai.OpenAI(base_url=base_url, api_key=live_server.token, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tool_model(live_server):
    """A random-weight Llama with a tool-capable chat template and an 8k context, registered
    with the live server under TOOL_MODEL; unloaded and forgotten after."""
    folder = make_tool_model(live_server.root_dir / TOOL_MODEL).path
    answer = live_server.request("POST", "mlx/api/models",
                                 json={"name": TOOL_MODEL, "path": str(folder)})
    assert answer.status_code == 201, answer.text
    yield TOOL_MODEL
    # the live server is the session's, and other tests count its models
    assert live_server.request("POST", f"mlx/api/models/{TOOL_MODEL}/unload").status_code == 200
    assert live_server.request("DELETE", f"mlx/api/models/{TOOL_MODEL}").status_code in (200, 204)


@pytest.fixture(params=TOOL_MODELS)
def model(request):
    """Each tool test on the demo and on the tool-template model."""
    if request.param == TOOL_MODEL:
        request.getfixturevalue("tool_model")
    return request.param


def chat_model_for(base_url, live_server, model=MODEL) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key=live_server.token, model=model,
                      temperature=0, max_tokens=60, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_model(base_url, live_server):
    return chat_model_for(base_url, live_server)


@pytest.fixture(scope="module")
def litellm():
    """litellm, imported when a test needs it: its import takes seconds."""
    import litellm

    return litellm


@contextmanager
def exchange(proxy):
    """Whatever fails inside fails with the bodies the client sent and, for an HTTP error,
    the server's answer: what the lead needs to see to fix the server."""
    proxy.clear()
    try:
        yield
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error}\n--- through the relay ---\n"
                    f"{proxy.transcript()}", pytrace=True)


def check_arguments(name: str, arguments: str) -> dict:
    """A tool call's arguments: a JSON object valid for its tool's parameters."""
    value = json.loads(arguments)
    jsonschema.validate(value, PARAMETERS[name])
    return value


def accumulate_tool_calls(chunks) -> tuple[dict[int, dict], str | None, str]:
    """The tool calls of a streamed chat completion put together as OpenAI's clients do: by
    `index`, the id and name from the first delta, the arguments from every piece; with the
    last finish_reason and the streamed text."""
    calls, finish, text = {}, None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] in (None, delta.id), "a call's id changed mid-stream"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    return calls, finish, text


# -- plain chat through each client ---------------------------------------------------------

def test_plain_chat_through_the_openai_sdk_langchain_and_litellm(client, chat_model, base_url,
                                                                 live_server, proxy, litellm):
    with exchange(proxy):
        sdk = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12,
                                             temperature=0)
        assert sdk.choices[0].message.content
        answer = chat_model.invoke("What is the weather in Paris?", max_tokens=12)
        assert isinstance(answer, AIMessage) and answer.content == sdk.choices[0].message.content
        lite = litellm.completion(model=f"openai/{MODEL}", api_base=base_url,
                                  api_key=live_server.token, messages=ASK, max_tokens=12,
                                  temperature=0)
        assert lite.choices[0].message.content == sdk.choices[0].message.content
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in litellm.completion(model=f"openai/{MODEL}", api_base=base_url,
                                            api_key=live_server.token, messages=ASK,
                                            max_tokens=12, temperature=0, stream=True)
            if chunk.choices)
        assert streamed == sdk.choices[0].message.content


# -- openai SDK: structured output -----------------------------------------------------------

def test_parse_with_a_pydantic_model_gives_an_instance(client, proxy):
    with exchange(proxy):
        completion = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Weather, max_tokens=60, temperature=0)
        [choice] = completion.choices
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Weather), choice.message
        assert Weather.model_validate_json(choice.message.content) == choice.message.parsed
        sent = proxy.posted("chat/completions")[-1].json()["response_format"]
        assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True


def test_json_object_mode_answers_a_json_object(client, proxy):
    messages = [{"role": "user", "content": "Give me a JSON object."}]
    with exchange(proxy):
        answer = client.chat.completions.create(
            model=MODEL, messages=messages, response_format={"type": "json_object"},
            max_tokens=80, temperature=0)
        [choice] = answer.choices
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict)


# -- openai SDK: tool calls ------------------------------------------------------------------

@pytest.mark.parametrize("tool_choice", [NAMED, "required"], ids=["named", "required"])
def test_a_forced_tool_call_whole(client, proxy, model, tool_choice):
    with exchange(proxy):
        answer = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
            parallel_tool_calls=False, max_tokens=60, temperature=0)
        [choice] = answer.choices
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id
        if tool_choice == NAMED:
            assert call.function.name == "get_weather"
        check_arguments(call.function.name, call.function.arguments)
        assert not choice.message.content


def test_a_streamed_tool_round_trip(client, proxy, model):
    """The forced call streamed as OpenAI streams it, its result sent back as the `tool`
    message after the assistant's tool_calls, then a final answer in text: tool_choice
    "none" on the demo, "auto" (what clients send) where the template has tools."""
    with exchange(proxy):
        chunks = list(client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=60,
            temperature=0, stream=True))
        calls, finish, text = accumulate_tool_calls(chunks)
        assert finish == "tool_calls" and not text
        assert list(calls) == [0], calls
        call = calls[0]
        assert call["id"] and call["name"] == "get_weather", call
        check_arguments("get_weather", call["arguments"])

        messages = [*ASK,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call["id"], "type": "function",
                         "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                    {"role": "tool", "tool_call_id": call["id"],
                     "content": json.dumps({"forecast": "sunny", "high": 21})}]
        final = list(client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=16, temperature=0,
            tool_choice="none" if model == MODEL else "auto", stream=True))
        calls, finish, text = accumulate_tool_calls(final)
        assert not calls and text and finish in ("stop", "length"), (calls, finish, text)


def test_a_tool_choice_naming_an_unknown_function_is_a_400_that_names_it(client, proxy):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8,
            tool_choice={"type": "function", "function": {"name": "no_such_tool"}})
    assert refused.value.status_code == 400
    assert "no_such_tool" in refused.value.body["message"], refused.value.body
    assert refused.value.body.get("param") == "tool_choice", refused.value.body


# -- openai SDK: logprobs and n --------------------------------------------------------------

def check_token_logprobs(entries, text: str, top: int) -> None:
    """OpenAI's chat logprobs: one entry per token, tokens that spell the text, `top`
    alternatives each, sorted, the greedy choice first (temperature 0)."""
    assert "".join(entry.token for entry in entries) == text
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == top, entry
        tops = [alternative.logprob for alternative in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True), entry
        assert entry.top_logprobs[0].token == entry.token, entry
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4, entry
        if "\ufffd" not in entry.token:
            assert bytes(entry.bytes) == entry.token.encode(), entry


def test_chat_logprobs_whole_and_streamed(client, proxy):
    with exchange(proxy):
        whole = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True,
            top_logprobs=3)
        [choice] = whole.choices
        entries = choice.logprobs.content
        assert len(entries) == whole.usage.completion_tokens, (entries, whole.usage)
        check_token_logprobs(entries, choice.message.content, 3)

        chunks = list(client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True,
            top_logprobs=3, stream=True, stream_options={"include_usage": True}))
        streamed = [entry for chunk in chunks for c in chunk.choices
                    if c.logprobs and c.logprobs.content for entry in c.logprobs.content]
        text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        assert text == choice.message.content
        assert len(streamed) == chunks[-1].usage.completion_tokens
        check_token_logprobs(streamed, text, 3)
        assert [e.token for e in streamed] == [e.token for e in entries]
        assert all(abs(s.logprob - e.logprob) < 1e-3 for s, e in zip(streamed, entries))


def test_n_gives_that_many_choices_whole_and_streamed(client, proxy):
    with exchange(proxy):
        answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                                temperature=1, seed=5, n=3, logprobs=True)
        assert [choice.index for choice in answer.choices] == [0, 1, 2]
        assert all(choice.message.content for choice in answer.choices)
        # usage counts the tokens of every choice, as OpenAI's does
        assert answer.usage.completion_tokens == sum(
            len(choice.logprobs.content) for choice in answer.choices), answer

        chunks = list(client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8, temperature=1, seed=5, n=3,
            stream=True))
        texts, finished = {}, {}
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    finished[choice.index] = choice.finish_reason
        assert sorted(texts) == [0, 1, 2] and sorted(finished) == [0, 1, 2], (texts, finished)
        assert texts == {c.index: c.message.content for c in answer.choices}


def test_legacy_completion_logprobs(client, proxy):
    with exchange(proxy):
        answer = client.completions.create(model=MODEL, prompt="The sea", max_tokens=8,
                                           temperature=0, logprobs=2)
        [choice] = answer.choices
        logprobs = choice.logprobs
        count = answer.usage.completion_tokens
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == count, logprobs
        assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == count, logprobs
        assert "".join(logprobs.tokens) == choice.text
        for token, logprob, tops in zip(logprobs.tokens, logprobs.token_logprobs,
                                        logprobs.top_logprobs):
            assert logprob <= 0 and 2 <= len(tops) <= 3, tops  # the chosen one may be added
            assert max(tops, key=tops.get) == token  # temperature 0: the likeliest
        steps = [b - a for a, b in zip(logprobs.text_offset, logprobs.text_offset[1:])]
        assert steps == [len(token) for token in logprobs.tokens[:-1]], logprobs


# -- LangChain -------------------------------------------------------------------------------

class GetWeather(BaseModel):
    """The forecast."""
    city: Literal["Paris", "Oslo"]
    days: int = Field(ge=1, le=7)


@tool(args_schema=GetWeather)
def get_forecast(city: str, days: int) -> str:
    """The forecast."""
    return f"sunny in {city} for {days} days"


@pytest.mark.parametrize("schema", [GetWeather, get_forecast], ids=["pydantic", "tool"])
def test_langchain_bind_tools_with_a_forced_choice(base_url, live_server, proxy, model,
                                                  schema):
    name = convert_to_openai_tool(schema)["function"]["name"]
    with exchange(proxy):
        chat = chat_model_for(base_url, live_server, model)
        message = chat.bind_tools([schema], tool_choice=name).invoke(
            "What is the weather in Paris?")
        assert isinstance(message, AIMessage)
        [call] = message.tool_calls
        assert call["name"] == name and call["id"], message
        assert not message.invalid_tool_calls, message.invalid_tool_calls
        jsonschema.validate(call["args"],
                            convert_to_openai_tool(schema)["function"]["parameters"])
        GetWeather.model_validate(call["args"])


class Loose(BaseModel):
    """json_mode constrains the answer to a JSON object, not to a schema: what a model this
    small writes in it is any object."""
    model_config = ConfigDict(extra="allow")
    city: str | None = None


@pytest.mark.parametrize("model, method", [
    (MODEL, "json_schema"), (MODEL, "function_calling"), (MODEL, "json_mode"),
    # json_mode is any JSON object: random weights would not end one within max_tokens
    (TOOL_MODEL, "json_schema"), (TOOL_MODEL, "function_calling")], indirect=["model"])
def test_langchain_with_structured_output(base_url, live_server, proxy, model, method):
    schema = Loose if method == "json_mode" else GetWeather
    prompt = ("Give me a JSON object." if method == "json_mode"
              else "What is the weather in Paris?")
    with exchange(proxy):
        chat = chat_model_for(base_url, live_server, model)
        answer = chat.with_structured_output(schema, method=method).invoke(prompt)
        assert isinstance(answer, schema), answer


# -- LiteLLM ---------------------------------------------------------------------------------

def test_litellm_forced_tool_call_whole_and_streamed(base_url, live_server, proxy, litellm,
                                                     model):
    options = dict(model=f"openai/{model}", api_base=base_url, api_key=live_server.token,
                   messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=60, temperature=0)
    with exchange(proxy):
        answer = litellm.completion(**options)
        [choice] = answer.choices
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id
        check_arguments("get_weather", call.function.arguments)

        chunks = list(litellm.completion(**options, stream=True))
        rebuilt = litellm.stream_chunk_builder(chunks, messages=ASK)
        [streamed_call] = rebuilt.choices[0].message.tool_calls
        assert streamed_call.function.name == "get_weather"
        assert json.loads(streamed_call.function.arguments) == json.loads(
            call.function.arguments)
        assert rebuilt.choices[0].finish_reason == "tool_calls"
