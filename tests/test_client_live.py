"""The Python client against a live server with the demo model (AsyncClient does the same:
test_client_core runs one scenario through both)."""

import os
import signal
import time

import pytest

from mlx_jupyter import Client
from mlx_jupyter.kernel import (
    Conflict,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RequestNotFound,
    ServerError,
)

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
