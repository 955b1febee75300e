"""The OpenAI-compatible routes, driven by the official openai SDK against a live server."""

import json
import os
import re
import signal
import time

import httpx
import openai
import pytest

USER = "openai-tests"
CHAT = [{"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "mlx/v1", api_key=live_server.token,
                         max_retries=0, timeout=120)


def native(live_server, **body):
    response = httpx.post(live_server.url + "mlx/api/generate", json=body, timeout=120,
                          headers={"Authorization": f"token {live_server.token}"})
    response.raise_for_status()
    return response.json()


def history_row(live_server, request_id):
    response = live_server.get(f"mlx/api/requests/{request_id}")
    response.raise_for_status()
    return response.json()


def request_id_of(openai_id, prefix):
    """The native request id an OpenAI id carries: `{prefix}-` and the 32 lowercase hex
    digits of every request id."""
    match = re.fullmatch(rf"{prefix}-([0-9a-f]{{32}})", openai_id)
    assert match, f"{openai_id!r} is not {prefix}- and a request id"
    return match.group(1)


def test_models_are_listed_and_retrieved(client):
    assert "demo" in [model.id for model in client.models.list()]
    demo = client.models.retrieve("demo")
    assert demo.id == "demo" and demo.object == "model" and demo.owned_by == "mlx-jupyter"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"


def test_chat_completion_is_the_native_answer_recorded_with_user_and_priority(
        client, live_server):
    answer = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=24,
                                            temperature=0, user=USER,
                                            extra_body={"priority": 7})
    expected = native(live_server, model="demo", messages=CHAT, max_tokens=24, temperature=0)
    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["text"] and choice.message.content
    assert choice.finish_reason == expected["finish_reason"]
    assert answer.object == "chat.completion" and answer.model == "demo"
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert answer.usage.total_tokens == (answer.usage.prompt_tokens
                                         + answer.usage.completion_tokens)
    row = history_row(live_server, request_id_of(answer.id, "chatcmpl"))
    assert row["notebook"] == USER and row["priority"] == 7 and row["status"] == "completed"
    assert row["messages"] == CHAT and row["output_text"] == choice.message.content


def test_streamed_chat_equals_the_whole_answer_and_reports_cached_tokens(client):
    messages = [{"role": "developer", "content": "Answer in one line."},
                {"role": "user", "content": [{"type": "text", "text": "Why is the sky "},
                                             {"type": "text", "text": "blue?"}]}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=20,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    finishing = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishing[-1] == whole.choices[0].finish_reason
    assert all(reason is None for reason in finishing[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    # The same prompt a second time: all but its last token come from the prompt cache.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].object == "chat.completion.chunk"


def test_answers_carry_the_seed_the_server_sampled_with(client, live_server):
    """`seed` is an extension field: in the whole answer and in the chunks that end a
    stream; null at temperature 0."""
    sampled = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=16,
                                             temperature=1)
    seed = sampled.model_extra["seed"]
    assert isinstance(seed, int)  # none given: the server picked it
    assert history_row(live_server, request_id_of(sampled.id, "chatcmpl"))["parameters"][
        "seed"] == seed
    chunks = list(client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=16, temperature=1, seed=seed, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) \
        == sampled.choices[0].message.content
    assert chunks[-1].model_extra["seed"] == seed and chunks[-1].usage is not None
    assert [chunk.model_extra.get("seed") for chunk in chunks if chunk.choices][-1] == seed
    greedy = client.completions.create(model="demo", prompt="The sea", max_tokens=4,
                                       temperature=0, seed=3)
    assert greedy.model_extra["seed"] is None


def test_text_completion_whole_and_streamed(client, live_server):
    whole = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=16,
                                      temperature=0, stop=["\n\n"])
    expected = native(live_server, model="demo", prompt="Once upon a time", max_tokens=16,
                      temperature=0, stop=["\n\n"])
    assert whole.object == "text_completion" and whole.choices[0].text == expected["text"]
    assert history_row(live_server, request_id_of(whole.id, "cmpl"))["output_text"] == \
        expected["text"]
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model="demo", prompt=["Once upon a time"], max_tokens=16, temperature=0,
        stop="\n\n", stream=True)]
    assert "".join(pieces) == expected["text"]


@pytest.mark.parametrize(("change", "param", "says"), [
    ({"n": 9}, "n", "less than or equal to 8"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
     "'g', which is not among the tools (f)"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "an object schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}},
     "response_format.json_schema.schema", 'cannot be enforced: Unimplemented keys: ["not"]'),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "thing"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"messages": [{"role": "user", "content": "x", "surprise": 1}]},
     "messages.0.surprise", "unknown field"),
    ({"stop": ["ok", ""]}, "stop.1", "must not be empty"),
])
def test_bad_chat_requests_are_400s_in_openai_shape(client, change, param, says):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**body)
    error = bad.value.body
    assert error["type"] == "invalid_request_error" and says in error["message"]
    if param is not None:
        assert error["param"] == param


def test_unknown_fields_models_and_bodies_are_refused_in_openai_shape(client, live_server):
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"temprature": 1})
    assert unknown.value.body["param"] == "temprature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.body == {"message": missing.value.body["message"],
                                  "type": "invalid_request_error", "param": "model",
                                  "code": "model_not_found"}
    broken = httpx.post(live_server.url + "mlx/v1/chat/completions", content=b"{not json",
                        headers={"Authorization": f"Bearer {live_server.token}"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_a_wrong_or_missing_key_is_refused(live_server):
    wrong = openai.OpenAI(base_url=live_server.url + "mlx/v1", api_key="not-the-token",
                          max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        wrong.models.list()
    assert refused.value.body["type"] == "permission_error"
    bare = httpx.post(live_server.url + "mlx/v1/completions", json={"prompt": "x"})
    assert bare.status_code == 403 and "token" in bare.json()["error"]["message"]


def test_a_client_that_disconnects_cancels_its_streamed_completion(live_server):
    headers = {"Authorization": f"Bearer {live_server.token}"}
    body = {"model": "demo", "prompt": "The sea", "max_tokens": 4000, "temperature": 1,
            "seed": 1, "stream": True}
    native(live_server, model="demo", prompt="warm", max_tokens=1)  # the model is loaded
    [model] = [m for m in live_server.get("mlx/api/status").json()["models"]["loaded"]
               if m["name"] == "demo"]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live_server.url + "mlx/v1/completions", json=body,
                         headers=headers) as response:
            request_id = response.headers["X-Request-Id"]
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] is not None
            os.kill(model["pid"], signal.SIGSTOP)  # nothing more is made until we look
    try:
        deadline = time.monotonic() + 30
        while history_row(live_server, request_id)["status"] == "running":
            assert time.monotonic() < deadline, "the disconnect did not cancel the request"
            os.kill(model["pid"], signal.SIGCONT)
            time.sleep(0.05)
    finally:
        os.kill(model["pid"], signal.SIGCONT)
    row = history_row(live_server, request_id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None


def test_a_worker_that_dies_mid_stream_ends_the_stream_with_an_openai_error(client,
                                                                               live_server):
    client.completions.create(model="demo", prompt="warm", max_tokens=1)  # loaded
    [model] = [m for m in live_server.get("mlx/api/status").json()["models"]["loaded"]
               if m["name"] == "demo"]
    stream = client.completions.create(model="demo", prompt="The sea", max_tokens=4000,
                                       temperature=1, seed=2, stream=True)
    with pytest.raises(openai.APIError) as died:
        for number, _chunk in enumerate(stream):
            if number == 0:
                os.kill(model["pid"], signal.SIGKILL)
    assert "worker" in died.value.message and died.value.body["type"] == "server_error"
    # The next request starts a fresh worker.
    assert client.completions.create(model="demo", prompt="again", max_tokens=2).choices
