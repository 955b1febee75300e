"""The Python client against a live server with the demo model (AsyncClient does the same:
test_client_core runs one scenario through both)."""

import dataclasses
import json
import os
import signal
import time
import typing

import pydantic
import pytest
import typing_extensions

from mlx_jupyter import Client
from mlx_jupyter.kernel import (
    Conflict,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RequestNotFound,
    ServerError,
    StructuredOutputError,
)
from mlx_jupyter.kernel.structured import resolve
from mlx_jupyter.limits import MAX_CHOICES

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
def client(live_server):
    with Client(live_server.url, live_server.token) as client:
        yield client


def test_models_load_pin_and_unpin(client):
    assert "demo" in [m["name"] for m in client.models()]
    assert client.load("demo")["status"] == "loaded"
    assert client.pin("demo")["pinned"] is True
    assert client.model("demo")["pinned"] is True
    assert client.unpin("demo")["pinned"] is False
    with pytest.raises(ModelNotFound, match="no-such-model"):
        client.load("no-such-model")


def test_generate_and_chat_are_recorded_in_the_history(client):
    whole = client.chat(CHAT, model="demo", max_tokens=12, temperature=0, priority=3)
    again = client.generate(messages=CHAT, model="demo", max_tokens=12, temperature=0)
    assert whole.text == again.text and whole.text
    row = client.request(whole.request_id)
    assert row["output_text"] == whole.text and row["priority"] == 3
    recent = [r["id"] for r in client.history(5, model="demo")]
    assert recent[:2] == [again.request_id, whole.request_id]


def test_streamed_text_equals_the_whole_answer(client):
    whole = client.generate("Once upon a time", model="demo", max_tokens=16, temperature=0)
    with client.stream("Once upon a time", model="demo", max_tokens=16,
                       temperature=0) as events:
        pieces = [event["text"] for event in events if "text" in event]
    assert "".join(pieces) == whole.text == events.result.text
    assert events.request_id == events.result.request_id


def test_a_background_job_is_submitted_and_its_result_fetched(client):
    job = client.submit("The river", model="demo", max_tokens=10, temperature=0, priority=-1)
    result = client.result(job, timeout=120)
    assert result is not None and result.request_id == job
    expected = client.generate("The river", model="demo", max_tokens=10, temperature=0)
    assert result.text == expected.text
    assert result.usage["completion_tokens"] == expected.usage["completion_tokens"]


def test_a_running_request_is_cancelled_and_its_result_says_so(client):
    client.load("demo")
    pid = client.model("demo")["pid"]
    os.kill(pid, signal.SIGSTOP)  # the job stays running until we let go
    try:
        job = client.submit("The sea", model="demo", max_tokens=400)
        deadline = time.monotonic() + 30
        while client.request(job)["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.result(job, wait=False) is None
        with pytest.raises(Conflict, match="request\\(s\\) in flight") as busy:
            client.unload("demo")
        assert busy.value.status == 409 and "HTTP" not in str(busy.value)
        assert client.cancel(job)["status"] in ("cancelling", "cancelled")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert client.result(job, timeout=60).finish_reason == "cancelled"
    with pytest.raises(Conflict, match=f"request '{job}' is not running: it is cancelled"):
        client.cancel(job)
    with pytest.raises(RequestNotFound, match="no request with id") as unknown:
        client.request("0" * 32)
    assert isinstance(unknown.value, NotFound) and not isinstance(unknown.value, ModelNotFound)


def test_settings_are_read_and_written(client):
    before = client.settings()["default_max_tokens"]["value"]
    try:
        assert client.set_setting("default_max_tokens", 7)["value"] == 7
        assert client.generate("The sea", model="demo", temperature=1, seed=3
                               ).usage["completion_tokens"] <= 7
    finally:
        client.set_setting("default_max_tokens", before)
    with pytest.raises(InvalidRequest):
        client.generate("x", messages=CHAT)


def test_a_failed_background_job_raises_with_its_error(client, live_server):
    client.load("demo")
    pid = client.model("demo")["pid"]
    os.kill(pid, signal.SIGSTOP)
    job = client.submit("The sea", model="demo", max_tokens=400)
    deadline = time.monotonic() + 30
    while client.request(job)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # the worker dies under the job
    with pytest.raises(ServerError, match=f"request {job} failed"):
        client.result(job, timeout=60)


# -- structured output, logprobs, tools, n: what the client reads of the real server's answers --


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)


# Bounded numbers and strings: a toy model left free writes digits until max_tokens.
Small = typing.Annotated[int, pydantic.Field(ge=-100, le=100)]


@dataclasses.dataclass
class Point:
    x: Small
    y: Small


class Pet(typing_extensions.TypedDict):
    kind: typing.Literal["cat", "dog", "fish"]
    legs: Small


PERSON = [{"role": "user", "content": "Invent a person: a name and an age."}]
STRICT = {"model": "demo", "max_tokens": 60, "temperature": 0}


@pytest.mark.parametrize(("schema", "kind"), [
    (Person, Person), (Point, Point), (Pet, dict),
    ({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
      "additionalProperties": False}, dict),
])
def test_a_schema_answer_is_parsed_into_its_type(client, schema, kind):
    result = client.chat(PERSON, schema=schema, **STRICT)
    assert result.finish_reason == "stop", result
    assert type(result.parsed) is kind
    assert result.parsed == resolve(schema).apply(result).parsed  # the text says the same
    if kind is dict and "kind" in result.parsed:
        assert result.parsed["kind"] in ("cat", "dog", "fish")


def test_a_schema_answer_cut_by_max_tokens_says_so(client):
    with pytest.raises(StructuredOutputError, match="cut at max_tokens .* raise max_tokens"
                       ) as cut:
        client.chat(PERSON, schema=Person, model="demo", max_tokens=3, temperature=0)
    assert cut.value.cut and cut.value.result.finish_reason == "length"
    assert cut.value.result.text and cut.value.result.parsed is None


def test_a_streamed_schema_answer_is_the_whole_ones(client):
    whole = client.chat(PERSON, schema=Person, **STRICT)
    with client.stream(messages=PERSON, schema=Person, **STRICT) as events:
        pieces = [event["text"] for event in events if "text" in event]
    assert "".join(pieces) == whole.text and events.result.parsed == whole.parsed
    job = client.submit(messages=PERSON, schema=Person, **STRICT)
    assert client.result(job, timeout=120, schema=Person).parsed == whole.parsed


def test_logprobs_come_one_per_token_with_the_alternatives_asked(client):
    result = client.generate("The sea", model="demo", max_tokens=12, temperature=0,
                             logprobs=True, top_logprobs=3)
    assert len(result.logprobs) == result.usage["completion_tokens"]
    # The tokens spell the text (the first may keep a space its detokenized text drops).
    spelled = "".join(entry["token"] for entry in result.logprobs)
    assert spelled.endswith(result.text) and not spelled[:-len(result.text)].strip()
    for entry in result.logprobs:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # Greedy: the token taken is the likeliest.
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
    with client.stream("The sea", model="demo", max_tokens=12, temperature=0,
                       logprobs=True, top_logprobs=3) as events:
        pieces = [event["text"] for event in events if "text" in event]
    assert "".join(pieces) == result.text and events.result.logprobs == result.logprobs


def test_n_answers_come_as_choices_and_the_sampling_options_are_taken(client):
    result = client.generate("The sea", model="demo", max_tokens=10, temperature=1.0,
                             seed=5, n=3, top_k=20, min_p=0.01, repetition_penalty=1.1,
                             frequency_penalty=0.2, presence_penalty=0.1,
                             logit_bias={"5": -1.0})
    assert [choice.index for choice in result.choices] == [0, 1, 2]
    assert result.text == result.choices[0].text
    assert all(choice.finish_reason in ("stop", "length") for choice in result.choices)
    with client.stream("The sea", model="demo", max_tokens=10, temperature=1.0, seed=5, n=3,
                       top_k=20, min_p=0.01, repetition_penalty=1.1, frequency_penalty=0.2,
                       presence_penalty=0.1, logit_bias={"5": -1.0}) as events:
        list(events)
    assert [c.text for c in events.result.choices] == [c.text for c in result.choices]
    with pytest.raises(InvalidRequest, match="n"):
        client.generate("The sea", model="demo", n=MAX_CHOICES + 1)


# Small: the demo's context is 256 tokens, and the tools are written into the prompt.
WEATHER = [{"type": "function", "function": {
    "name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}},
        "required": ["city"], "additionalProperties": False}}}]


def test_a_required_tool_call_is_read_as_calls(client):
    asked = [{"role": "user", "content": "What is the weather in Oslo?"}]
    one = {"tools": WEATHER, "tool_choice": "required", "parallel_tool_calls": False}
    result = client.chat(asked, **one, **STRICT)
    assert result.finish_reason == "tool_calls", result
    [call] = result.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Oslo", "Rome")
    with client.stream(messages=asked, **one, **STRICT) as events:
        received = list(events)
    streamed = [event["tool_call"] for event in received if "tool_call" in event]
    assert streamed == events.result.tool_calls
    assert [c["function"] for c in streamed] == [c["function"] for c in result.tool_calls]
    # The answer goes back as the conversation's next turns.
    follow = client.chat([*asked, {"role": "assistant", "content": None,
                                   "tool_calls": result.tool_calls},
                          {"role": "tool", "tool_call_id": call["id"],
                           "content": '{"sky": "clear"}'}],
                         tools=WEATHER, tool_choice="none", **STRICT)
    assert follow.tool_calls == [] and follow.finish_reason in ("stop", "length")
