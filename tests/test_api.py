"""The REST API on a real Jupyter server (pytest-jupyter) with real model workers."""

import asyncio
import json
import os
import re
import signal

import pytest
import tornado.web
from tornado.httpclient import HTTPClientError

from mlx_jupyter.api.openapi import METHODS, path_template
from mlx_jupyter.api.routes import ROUTES
from mlx_jupyter.limits import MAX_SEED

CHAT = [{"role": "user", "content": "What is a notebook?"}]


async def post_json(jp_fetch, path, body):
    return await jp_fetch("mlx", "api", path, method="POST", body=json.dumps(body),
                          request_timeout=120)


def error_of(excinfo):
    return excinfo.value.code, json.loads(excinfo.value.response.body)["message"]


def ndjson(response):
    return [json.loads(line) for line in response.body.decode().splitlines() if line]


async def status(jp_fetch):
    return json.loads((await jp_fetch("mlx", "api", "status")).body)


async def loaded(jp_fetch):
    return (await status(jp_fetch))["models"]["loaded"]


def route_table_requests():
    """(method, path) for every method of every route in the route table, the path filled in
    with sample values; the catch-alls (no method of their own) with a GET of a missing path."""
    samples = {"name": "demo", "key": "default_model", "request_id": "0123abcd",
               "action": "load"}
    requests = []
    for pattern, handler in ROUTES:
        path = re.sub(r"\{(\w+)\}", lambda group: samples[group.group(1)],
                      path_template(pattern)).replace(".*", "no-such-route").lstrip("/")
        methods = [m for m in METHODS
                   if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)]
        requests += [(method.upper(), path) for method in methods or ["get"]]
    return requests


@pytest.mark.parametrize("authorization", ["", "token not-the-token"])
async def test_every_route_refuses_requests_without_the_token(jp_fetch, authorization):
    answered = {}
    for method, path in route_table_requests():
        try:
            response = await jp_fetch(path, method=method, allow_nonstandard_methods=True,
                                      body="{}" if method in ("POST", "PUT") else None,
                                      headers={"Authorization": authorization})
            answered[method, path] = response.code
        except HTTPClientError as error:
            answered[method, path] = error.code
    assert len(answered) >= len(ROUTES)
    assert {request: code for request, code in answered.items() if code != 403} == {}


async def test_status_before_any_generation_has_no_worker(jp_fetch):
    answer = await status(jp_fetch)
    assert answer["version"]
    assert answer["models"]["loaded"] == []  # loading the extension started nothing
    assert answer["models"]["loaded_count"] == 0
    memory = answer["memory"]
    assert 0 < memory["budget"] <= memory["total"] and memory["used_by_models"] == 0


async def test_generate_without_stream_answers_with_text_usage_and_timings(jp_fetch):
    response = await post_json(jp_fetch, "generate", {
        "model": "demo", "messages": CHAT, "max_tokens": 48, "temperature": 0})
    answer = json.loads(response.body)
    assert response.headers["Content-Type"].startswith("application/json")
    assert answer["model"] == "demo" and answer["request_id"]
    assert answer["text"].strip()
    assert answer["finish_reason"] in ("stop", "length")
    assert answer["usage"]["prompt_tokens"] > 0
    assert 1 <= answer["usage"]["completion_tokens"] <= 48
    timings = answer["timings"]
    assert 0 <= timings["queue_ms"] <= timings["ttft_ms"] <= timings["total_ms"]
    assert timings["ttft_ms"] > 0 and timings["tokens_per_second"] > 0
    models = await loaded(jp_fetch)
    assert [m["name"] for m in models] == ["demo"] and models[0]["pid"] != os.getpid()
    assert models[0]["status"] == "loaded" and models[0]["rss_bytes"] > 0


async def test_streamed_answer_arrives_as_ndjson_and_equals_the_whole_answer(jp_fetch):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 48, "temperature": 0}
    whole = json.loads((await post_json(jp_fetch, "generate", body)).body)
    response = await post_json(jp_fetch, "generate", {**body, "stream": True})
    assert response.headers["Content-Type"] == "application/x-ndjson"
    events = ndjson(response)
    *texts, done = events
    assert texts and all(set(event) == {"text"} for event in texts)
    assert done["done"] is True and done["request_id"] == response.headers["X-Request-Id"]
    assert "".join(event["text"] for event in texts) == whole["text"]
    assert done["finish_reason"] == whole["finish_reason"]
    for key in ("prompt_tokens", "completion_tokens"):
        assert done["usage"][key] == whole["usage"][key]
    # The same prompt again: all but its last token come from the worker's prompt cache.
    assert done["usage"]["cached_tokens"] == whole["usage"]["prompt_tokens"] - 1
    assert set(done["timings"]) >= {"queue_ms", "ttft_ms", "total_ms", "tokens_per_second"}


async def test_max_tokens_seed_and_stop_strings_shape_the_answer(jp_fetch):
    base = {"model": "demo", "prompt": "The weather today", "temperature": 1.0, "seed": 11}
    short = json.loads((await post_json(jp_fetch, "generate", {**base, "max_tokens": 5})).body)
    assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 5

    first = json.loads((await post_json(jp_fetch, "generate", {**base, "max_tokens": 40})).body)
    again = json.loads((await post_json(jp_fetch, "generate", {**base, "max_tokens": 40})).body)
    assert first["text"] == again["text"]  # same seed, same answer

    # Stop at a piece of the answer we now know is coming: the text ends just before it.
    stop = first["text"].strip()[3:6]
    assert len(stop) == 3
    cut = json.loads((await post_json(jp_fetch, "generate",
                                      {**base, "max_tokens": 40, "stop": [stop]})).body)
    assert cut["finish_reason"] == "stop"
    assert stop not in cut["text"] and first["text"].startswith(cut["text"])


async def test_the_server_picks_reports_and_records_the_seed_of_a_sampled_request(jp_fetch):
    body = {"model": "demo", "prompt": "The weather today", "max_tokens": 24, "temperature": 1.0}
    first = json.loads((await post_json(jp_fetch, "generate", body)).body)
    seed = first["seed"]
    assert isinstance(seed, int) and 0 <= seed <= MAX_SEED  # none given: the server chose one
    recorded = await history(jp_fetch, first["request_id"])
    assert recorded["parameters"]["seed"] == seed

    # That seed again gives the same answer, whole and streamed; the stream's end reports it.
    again = json.loads((await post_json(jp_fetch, "generate", {**body, "seed": seed})).body)
    assert again["text"] == first["text"] and again["seed"] == seed
    response = await post_json(jp_fetch, "generate", {**body, "seed": seed, "stream": True})
    *texts, done = ndjson(response)
    assert "".join(event["text"] for event in texts) == first["text"] and done["seed"] == seed
    # The stream's figures are the ones stored with it.
    assert (await history(jp_fetch, done["request_id"]))["timings"] == done["timings"]

    # Greedy decoding samples nothing: no seed, given or not, in the answer or the history.
    greedy = json.loads((await post_json(jp_fetch, "generate",
                                         {**body, "temperature": 0, "seed": 5})).body)
    assert greedy["seed"] is None
    assert (await history(jp_fetch, greedy["request_id"]))["parameters"]["seed"] is None


async def history(jp_fetch, request_id):
    return json.loads((await jp_fetch("mlx", "api", "requests", request_id)).body)


@pytest.mark.parametrize("body, field", [
    ({"model": "", "prompt": "hi"}, "model"),
    ({"model": 3, "prompt": "hi"}, "model"),
    ({"model": "demo"}, "exactly one of 'prompt' or 'messages'"),
    ({"model": "demo", "prompt": "hi", "messages": CHAT}, "exactly one of"),
    ({"model": "demo", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "demo", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": "demo", "prompt": "hi", "temperature": 9}, "temperature"),
    ({"model": "demo", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "demo", "prompt": "hi", "seed": -1}, "seed"),
    ({"model": "demo", "prompt": "hi", "stop": [""]}, "stop"),
    ({"model": "demo", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "demo", "prompt": "hi", "max_token": 5}, "max_token: unknown field"),
    ([1, 2], "Input should be an object"),
])
async def test_bad_bodies_are_refused_with_400_naming_the_field(jp_fetch, body, field):
    with pytest.raises(HTTPClientError) as excinfo:
        await post_json(jp_fetch, "generate", body)
    code, message = error_of(excinfo)
    assert code == 400 and field in message


async def test_malformed_json_and_unknown_model(jp_fetch):
    with pytest.raises(HTTPClientError) as excinfo:
        await jp_fetch("mlx", "api", "generate", method="POST", body="{not json")
    code, message = error_of(excinfo)
    assert code == 400 and "not valid JSON" in message

    with pytest.raises(HTTPClientError) as excinfo:
        await post_json(jp_fetch, "generate", {"model": "no-such-model", "prompt": "hi"})
    code, message = error_of(excinfo)
    assert code == 404 and "'no-such-model'" in message and "demo" in message
    assert (await loaded(jp_fetch)) == []  # nothing was started for it


async def test_a_worker_that_dies_fails_its_requests_and_is_replaced(jp_fetch):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 16, "temperature": 0}
    await post_json(jp_fetch, "generate", body)
    [model] = await loaded(jp_fetch)
    # Freeze the worker so the next requests are surely in flight when it dies.
    os.kill(model["pid"], signal.SIGSTOP)
    streamed = asyncio.ensure_future(post_json(jp_fetch, "generate", {**body, "stream": True}))
    whole = asyncio.ensure_future(post_json(jp_fetch, "generate", body))
    while (await loaded(jp_fetch))[0]["active_requests"] < 2:
        await asyncio.sleep(0.05)
    os.kill(model["pid"], signal.SIGKILL)

    *_, last = ndjson(await streamed)
    assert last["finish_reason"] == "error" and "exited" in last["error"]
    with pytest.raises(HTTPClientError) as excinfo:
        await whole
    code, message = error_of(excinfo)
    assert code == 503 and "worker process for model 'demo' exited" in message
    assert (await loaded(jp_fetch)) == []
    failed = json.loads((await jp_fetch("mlx", "api", "requests",
                                        params={"status": "failed"})).body)["requests"]
    assert len(failed) == 2 and all("exited" in row["error"] for row in failed)

    answer = json.loads((await post_json(jp_fetch, "generate", body)).body)
    assert answer["text"].strip()
    [fresh] = await loaded(jp_fetch)
    assert fresh["pid"] != model["pid"]
    metrics = (await jp_fetch("mlx", "metrics")).body.decode()
    assert 'mlx_jupyter_faults_total{kind="worker_exited"} 1.0' in metrics  # counted once


async def test_status_answers_from_counters_while_four_streams_are_in_flight(jp_fetch):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 64, "stream": True}
    await post_json(jp_fetch, "generate", {**body, "stream": False})  # loads the model
    [model] = await loaded(jp_fetch)
    os.kill(model["pid"], signal.SIGSTOP)  # all four are surely in flight together
    try:
        streams = [asyncio.ensure_future(post_json(jp_fetch, "generate", body))
                   for _ in range(4)]
        while (await status(jp_fetch))["queue"]["models"].get("demo") != {
                "queued_requests": 0, "active_requests": 4}:
            await asyncio.sleep(0.05)
    finally:
        os.kill(model["pid"], signal.SIGCONT)
    for stream in streams:
        assert ndjson(await stream)[-1]["finish_reason"] in ("stop", "length")
    assert (await status(jp_fetch))["queue"]["models"] == {}
