"""The inference queue: priorities, aging, back-pressure and cancellation on a real server."""

import asyncio
import contextlib
import json
import os
import signal
import time

import pytest
from tornado.httpclient import HTTPClientError

from mlx_jupyter.engine.protocol import PARAM_DEFAULTS
from mlx_jupyter.queue import Admission, Ticket

BODY = {"model": "demo", "prompt": "The sea", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"mlx_jupyter": True}},
            "MlxApp": {"max_batch_size": 1, "max_queued_requests": 3}}


async def api(jp_fetch, *path, method="GET", body=None):
    response = await jp_fetch("mlx", "api", *path, method=method, request_timeout=120,
                              body=None if body is None else json.dumps(body))
    return json.loads(response.body)


async def wait_for(check, seconds=30):
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "the queue never reached the expected state"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def one_request_stuck(jp_fetch):
    """The model loaded and its worker paused with one request admitted (max_batch_size 1), so
    whatever comes next waits; yields that request's future. The worker resumes on exit."""
    await api(jp_fetch, "generate", method="POST", body=BODY)  # loads the model
    [model] = (await api(jp_fetch, "status"))["models"]["loaded"]
    os.kill(model["pid"], signal.SIGSTOP)  # the running request cannot finish: others wait
    try:
        blocker = asyncio.ensure_future(api(jp_fetch, "generate", method="POST", body=BODY))
        await wait_for(lambda: _active_is(jp_fetch, 1))
        yield blocker
    finally:
        os.kill(model["pid"], signal.SIGCONT)


async def test_saturated_queue_admits_by_priority_refuses_overflow_and_cancels(jp_fetch):
    async with one_request_stuck(jp_fetch) as blocker:
        waiting = {}
        for name, priority in [("low", 0), ("high", 5), ("mid", 2)]:
            waiting[name] = asyncio.ensure_future(api(jp_fetch, "generate", method="POST",
                                                      body={**BODY, "priority": priority}))
            await wait_for(lambda: _queued_is(jp_fetch, len(waiting)))

        queue = (await api(jp_fetch, "queue"))["models"]["demo"]
        assert [r["priority"] for r in queue["queued"]] == [5, 2, 0]
        assert [r["position"] for r in queue["queued"]] == [1, 2, 3]
        status = await api(jp_fetch, "status")
        assert status["queue"]["models"]["demo"] == {"queued_requests": 3,
                                                     "active_requests": 1}

        with pytest.raises(HTTPClientError) as full:
            await api(jp_fetch, "generate", method="POST", body=BODY)
        assert full.value.code == 429 and int(full.value.response.headers["Retry-After"]) >= 1

        mid_id = next(r["request_id"] for r in queue["queued"] if r["priority"] == 2)
        cancelled = await api(jp_fetch, "requests", mid_id, method="DELETE")
        assert cancelled == {"request_id": mid_id, "was": "queued", "status": "cancelled"}

    mid = await waiting["mid"]
    assert mid["finish_reason"] == "cancelled" and mid["text"] == ""
    high, low = await waiting["high"], await waiting["low"]
    await blocker
    started = {name: (await api(jp_fetch, "requests", answer["request_id"]))["started_at"]
               for name, answer in [("high", high), ("low", low)]}
    assert started["high"] < started["low"]
    record = await api(jp_fetch, "requests", mid_id)
    assert record["status"] == "cancelled" and record["started_at"] is None

    with pytest.raises(HTTPClientError) as finished:
        await api(jp_fetch, "requests", high["request_id"], method="DELETE")
    assert finished.value.code == 409 and "completed" in json.loads(
        finished.value.response.body)["message"]
    with pytest.raises(HTTPClientError) as unknown:
        await api(jp_fetch, "requests", "0123abcd", method="DELETE")
    assert unknown.value.code == 404


async def _active_is(jp_fetch, count):
    queue = (await api(jp_fetch, "queue"))["models"].get("demo", {"active": []})
    return len(queue["active"]) == count


async def _queued_is(jp_fetch, count):
    return (await api(jp_fetch, "queue"))["queued"] == count


async def test_waiting_raises_priority_so_low_priorities_never_starve():
    admitted = []
    admission = Admission(max_active_per_model=1, aging_seconds=1.0, on_admit=admitted.append)
    running = Ticket("running", "m", 0)
    admission.enqueue(running)  # takes the only place: the others wait
    now = time.perf_counter()
    # old-low waited ten aging periods: now above a fresh priority 5.
    for ticket in [Ticket("new-low", "m", 0, submitted=now),
                   Ticket("new-high", "m", 5, submitted=now),
                   Ticket("old-low", "m", 0, submitted=now - 10)]:
        admission.enqueue(ticket)
    assert [t.id for t in admission.order("m")] == ["old-low", "new-high", "new-low"]
    snapshot = admission.snapshot()["models"]["m"]
    assert [r["request_id"] for r in snapshot["queued"]] == ["old-low", "new-high", "new-low"]
    assert [r["position"] for r in snapshot["queued"]] == [1, 2, 3]
    for expected in ["old-low", "new-high", "new-low"]:  # each end admits the next in order
        admission.finished(admitted[-1])
        assert admitted[-1].id == expected and await admitted[-1].admitted is True
    assert admission.model_counts("m") == {"queued_requests": 0, "active_requests": 1}


async def test_a_withdrawn_request_leaves_the_line_and_is_told_so():
    admission = Admission(max_active_per_model=1, aging_seconds=30.0)
    running, waiting = Ticket("running", "m", 0), Ticket("waiting", "m", 0)
    admission.enqueue(running)
    admission.enqueue(waiting)
    assert admission.withdraw(waiting) and await waiting.admitted is False
    assert not admission.withdraw(running)  # admitted already: cancelled in its worker instead
    assert admission.queued_count() == 0


async def test_requests_that_outlive_their_timeout_end_with_timeout(jp_fetch):
    await api(jp_fetch, "generate", method="POST", body=BODY)
    [model] = (await api(jp_fetch, "status"))["models"]["loaded"]
    os.kill(model["pid"], signal.SIGSTOP)
    try:
        running = asyncio.ensure_future(api(jp_fetch, "generate", method="POST",
                                            body={**BODY, "timeout": 0.5}))
        await wait_for(lambda: _active_is(jp_fetch, 1))
        waiting = await api(jp_fetch, "generate", method="POST",
                            body={**BODY, "timeout": 0.5, "stream": False})
        # The queued one ended on its own while the worker was frozen.
        assert waiting["finish_reason"] == "timeout" and waiting["text"] == ""
    finally:
        os.kill(model["pid"], signal.SIGCONT)
    answer = await running
    assert answer["finish_reason"] == "timeout"
    record = await api(jp_fetch, "requests", answer["request_id"])
    assert record["status"] == "failed" and "timeout" in record["error"]


async def test_cancelling_a_running_request_stops_it_and_spares_the_others(jp_fetch):
    await api(jp_fetch, "generate", method="POST", body=BODY)
    [model] = (await api(jp_fetch, "status"))["models"]["loaded"]
    os.kill(model["pid"], signal.SIGSTOP)
    try:
        doomed = asyncio.ensure_future(api(jp_fetch, "generate", method="POST", body=BODY))
        await wait_for(lambda: _active_is(jp_fetch, 1))
        spared = asyncio.ensure_future(api(jp_fetch, "generate", method="POST", body=BODY))
        await wait_for(lambda: _queued_is(jp_fetch, 1))
        [active] = (await api(jp_fetch, "queue"))["models"]["demo"]["active"]
        answer = await api(jp_fetch, "requests", active["request_id"], method="DELETE")
        assert answer["was"] == "active" and answer["status"] == "cancelling"
    finally:
        os.kill(model["pid"], signal.SIGCONT)
    assert (await doomed)["finish_reason"] == "cancelled"
    assert (await spared)["finish_reason"] in ("stop", "length")
    record = await api(jp_fetch, "requests", active["request_id"])
    assert record["status"] == "cancelled"


async def test_a_stream_whose_client_left_while_its_model_loaded_ends_and_frees_its_place(
        jp_fetch, jp_http_port, jp_base_url, jp_auth_header):
    # The client sends a streamed request for a model not loaded yet and goes away at once:
    # the stream's headers, written once the model is loaded, find the connection closed.
    notebook = "left-while-loading"
    body = json.dumps({**BODY, "stream": True, "notebook": notebook}).encode()
    headers = "".join(f"{name}: {value}\r\n" for name, value in jp_auth_header.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
    writer.write(f"POST {jp_base_url}mlx/api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"{headers}Content-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()

    async def rows():
        response = await jp_fetch("mlx", "api", "requests", params={"notebook": notebook})
        return json.loads(response.body)["requests"]

    async def ended():
        return [row for row in await rows() if row["status"] not in ("queued", "running")]

    await wait_for(ended, seconds=60)
    [row] = await rows()
    assert row["status"] == "cancelled" and row["finish_reason"] == "cancelled"
    assert await _active_is(jp_fetch, 0)
    # Its model was given back: nothing holds it any more.
    unloaded = await api(jp_fetch, "models", "demo", "unload", method="POST", body={})
    assert unloaded["status"] == "unloaded"



class _Unstartable:
    """Workers whose model cannot start for a reason of the system's (no domain error)."""

    async def acquire(self, model):
        raise OSError(24, "Too many open files")

    def release(self, model):
        raise AssertionError("a model that was never acquired is not given back")


class _Lifecycle:
    """What the queue does when a generation tells it, over a real Admission."""

    def __init__(self, admission):
        self.admission = admission
        self.outcomes = []

    def withdraw(self, generation):
        return self.admission.withdraw(generation.ticket)

    def started(self, generation):
        pass

    def ended(self, generation, outcome):
        self.admission.finished(generation.ticket)
        self.outcomes.append(outcome)


async def test_a_request_whose_model_fails_to_start_for_any_reason_still_ends():
    from mlx_jupyter.queue import Generation

    admission = Admission(max_active_per_model=1, aging_seconds=30.0)
    lifecycle = _Lifecycle(admission)
    params = {**PARAM_DEFAULTS, "prompt": "x", "messages": None, "max_tokens": 1,
              "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    first, second = Ticket("first", "m", 0), Ticket("second", "m", 0)
    generation = Generation(first, params, workers=_Unstartable(), lifecycle=lifecycle)
    admission.enqueue(first)
    admission.enqueue(second)
    with pytest.raises(OSError):
        await generation.start()
    [outcome] = lifecycle.outcomes
    assert outcome.status == "failed" and "Too many open files" in outcome.error
    assert await second.admitted  # its place went to the next request


async def test_requests_arriving_together_never_queue_past_the_limit(jp_fetch):
    async with one_request_stuck(jp_fetch) as blocker:
        # Background requests are recorded before they are queued: they arrive together.
        answers = await asyncio.gather(*(
            api(jp_fetch, "generate", method="POST", body={**BODY, "background": True})
            for _ in range(6)), return_exceptions=True)
        accepted = [answer for answer in answers if isinstance(answer, dict)]
        refused = [answer for answer in answers if isinstance(answer, HTTPClientError)]
        assert len(accepted) == 3 and [error.code for error in refused] == [429] * 3
        assert (await api(jp_fetch, "queue"))["queued"] == 3
    await blocker
