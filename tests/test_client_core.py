"""Client and AsyncClient cannot drift: the same methods, signatures and documentation, and
the same outcomes of one scenario against one live server with the demo model."""

from __future__ import annotations

import inspect
import os
import signal
import threading
from typing import Any

import pytest

from mlx_jupyter.kernel import (
    AsyncClient,
    AsyncEventStream,
    Client,
    EventStream,
    MlxError,
)
from mlx_jupyter.kernel.core import ClientBase, Methods, StreamBase, plans
from twins import blocking_async_client

# The protocols that differ by nature: `with` against `async with`, `for` against `async for`
# (and `aclose`, the name contextlib.aclosing calls, for an async stream's close).
SYNC_ONLY = {"__enter__", "__exit__", "__iter__", "__next__"}
ASYNC_ONLY = {"__aenter__", "__aexit__", "__aiter__", "__anext__", "aclose"}
DUNDERS_WE_WRITE = SYNC_ONLY | ASYNC_ONLY | {"__init__", "__repr__"}


def public(cls: type) -> dict[str, Any]:
    """The names a user reaches (methods, properties, and the dunders we write), but for the
    protocols that differ by nature."""
    return {name: getattr(cls, name) for name in dir(cls)
            if (not name.startswith("_") or name in DUNDERS_WE_WRITE)
            and name not in SYNC_ONLY | ASYNC_ONLY}


@pytest.mark.parametrize(("sync", "async_", "awaited", "protocols"), [
    (Client, AsyncClient, set(plans()), ({"__enter__"}, {"__aenter__"})),
    (EventStream, AsyncEventStream, {"close"},
     ({"__enter__", "__iter__", "__next__"}, {"__aenter__", "__aiter__", "__anext__", "aclose"})),
])
def test_the_two_have_the_same_methods_and_signatures(sync: type, async_: type,
                                                      awaited: set[str],
                                                      protocols: tuple[set[str], set[str]]):
    ours, theirs = public(sync), public(async_)
    assert sorted(ours) == sorted(theirs)
    for name, member in ours.items():
        assert inspect.getdoc(member) and inspect.getdoc(member) == inspect.getdoc(theirs[name])
        if not callable(member):
            continue  # a property: text, result
        assert inspect.signature(member).parameters == \
            inspect.signature(theirs[name]).parameters, name
        # What waits is a coroutine in the async one; nothing is one in the sync one.
        assert not inspect.iscoroutinefunction(member), name
        assert inspect.iscoroutinefunction(theirs[name]) is (name in awaited), name
    assert protocols[0] <= set(dir(sync)) and protocols[1] <= set(dir(async_))


def test_every_method_is_written_once_in_the_core():
    written = set(plans())
    assert written >= {"status", "models", "model", "load", "unload", "pin", "unpin", "queue",
                       "history", "request", "cancel", "settings", "set_setting", "generate",
                       "chat", "stream", "submit", "result", "close"}
    for client in (Client, AsyncClient):
        # Nothing public in a client but the core's methods and what ClientBase holds.
        assert set(public(client)) - written == set(public(ClientBase)), client
        for name in written:
            assert inspect.iscoroutinefunction(getattr(client, name)) is (client is AsyncClient)
            assert getattr(client, name).__doc__ == getattr(Methods, name).__doc__
    assert inspect.signature(Client.stream).return_annotation is EventStream
    assert inspect.signature(AsyncClient.stream).return_annotation is AsyncEventStream
    assert issubclass(EventStream, StreamBase) and issubclass(AsyncEventStream, StreamBase)


def test_a_method_written_by_hand_in_one_client_is_refused():
    from mlx_jupyter.kernel.core import client_methods

    with pytest.raises(TypeError, match="written by hand"):
        @client_methods
        class Drifting(Client):  # noqa: F841
            def status(self) -> dict[str, Any]:
                return {}


# -- one scenario, both clients, one live server ------------------------------------------

PROMPT = "Once upon a time"
GREEDY = {"model": "demo", "max_tokens": 12, "temperature": 0}


def scenario(client: Any) -> dict[str, Any]:
    """Every method once, through `client` (a Client, or a twins.Blocking AsyncClient); what
    it returns must not depend on which. Request ids, different each run, are left out."""
    seen: dict[str, Any] = {}
    loaded = client.load("demo")
    seen["model actions"] = (loaded["status"], client.pin("demo")["pinned"],
                             client.model("demo")["pinned"], client.unpin("demo")["pinned"],
                             "demo" in [model["name"] for model in client.models()])
    seen["keys"] = (sorted(client.status()), sorted(client.queue()),
                    sorted(client.settings()))

    whole = client.generate(PROMPT, **GREEDY)
    chat = client.chat([{"role": "user", "content": PROMPT}], **GREEDY)
    with client.stream(PROMPT, **GREEDY) as events:
        pieces = [event["text"] for event in events if "text" in event]
    seen["answers"] = [outcome(whole), outcome(chat), outcome(events.result),
                       "".join(pieces) == whole.text,
                       events.request_id == events.result.request_id]
    with client.stream(PROMPT, **GREEDY) as partly:  # left before its end
        first = next(partly)
    seen["left early"] = (whole.text.startswith(partly.text), "text" in first)

    seen["closed from another thread"], stopped = stop_a_stream_from_another_thread(client)

    job = client.submit(PROMPT, **GREEDY)
    seen["job"] = outcome(client.result(job, timeout=120))
    # A sampled job's result, read from its history row, carries the seed the server picked
    # and the figures it stored.
    sampled = client.result(client.submit(PROMPT, model="demo", max_tokens=12,
                                          temperature=0.8), timeout=120)
    stored = client.request(sampled.request_id)
    seen["sampled job"] = (
        isinstance(sampled.seed, int), sampled.seed == stored["parameters"]["seed"],
        "total_ms" in sampled.timings,
        sampled.timings == {k: v for k, v in stored["timings"].items() if v is not None})
    row = client.request(whole.request_id)
    seen["row"] = (row["status"], row["output_text"] == whole.text, row["model"])

    twin = client.clone()
    try:
        seen["clone"] = (twin is not client, twin.url == client.url,
                         twin.status()["version"] == client.status()["version"])
    finally:
        twin.close()

    ours = [whole.request_id, chat.request_id, events.request_id, stopped, job]
    rows = {row["id"]: row for row in client.history(20, model="demo")}
    seen["history"] = [(rows[id_]["status"], rows[id_]["finish_reason"]) for id_ in ours]

    seen["errors"] = [
        error(lambda: client.generate("x", model="no-such-model")),
        error(lambda: client.generate("x", messages=[{"role": "user", "content": "x"}])),
        error(lambda: client.cancel(job), job),
        error(lambda: client.request("0" * 32)),
        error(lambda: client.result(job, poll_seconds=0)),
    ]
    return seen


def stop_a_stream_from_another_thread(client: Any) -> tuple[tuple[Any, ...], str]:
    """The panel's Stop: a thread reads a stream whose model is paused; another closes it."""
    pid = client.model("demo")["pid"]
    os.kill(pid, signal.SIGSTOP)  # nothing is generated until the stream is closed
    try:
        events = client.stream(PROMPT, model="demo", max_tokens=400, temperature=0)
        read: list[Any] = []
        reader = threading.Thread(target=lambda: read.append(list(events)), daemon=True)
        reader.start()
        events.close()
        reader.join(60)
        woke = not reader.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    ended = client.result(events.request_id, timeout=120)
    return (woke, read, events.text, events.result, ended.finish_reason), events.request_id


def outcome(result: Any) -> tuple[Any, ...]:
    return result.text, result.finish_reason, result.model, result.usage["completion_tokens"]


def error(action: Any, *ids: str) -> tuple[str, str]:
    try:
        action()
    except MlxError as failure:
        message = str(failure)
        for id_ in ids:
            message = message.replace(id_, "<id>")
        return type(failure).__name__, message
    return "no error", ""


def test_both_clients_do_the_same_against_a_live_server(live_server):
    with Client(live_server.url, live_server.token) as client:
        blocking = scenario(client)
    with blocking_async_client(live_server.url, live_server.token) as client:
        awaited = scenario(client)
    assert awaited == blocking
    # And what they did is what the scenario means.
    assert blocking["model actions"] == ("loaded", True, True, False, True)
    assert {"max_active_per_model", "models", "queued"} <= set(blocking["keys"][1])
    assert blocking["answers"][3:] == [True, True] and blocking["answers"][0][0]
    assert blocking["closed from another thread"] == (True, [[]], "", None, "cancelled")
    assert blocking["job"] == blocking["answers"][0]
    assert blocking["sampled job"] == (True, True, True, True)
    assert [status for status, _ in blocking["history"]] == \
        ["completed", "completed", "completed", "cancelled", "completed"]
    assert [kind for kind, _ in blocking["errors"]] == \
        ["ModelNotFound", "InvalidRequest", "Conflict", "RequestNotFound", "InvalidRequest"]


def structured_scenario(client: Any) -> dict[str, Any]:
    """Structured output, logprobs and tools through `client`; ids left out."""
    import pydantic

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=16)
        age: int = pydantic.Field(ge=0, le=120)

    asked = {"messages": [{"role": "user", "content": "Invent a person."}], **GREEDY,
             "max_tokens": 60}
    seen: dict[str, Any] = {}
    whole = client.generate(schema=Person, **asked)
    with client.stream(schema=Person, **asked) as events:
        pieces = [event["text"] for event in events if "text" in event]
    seen["schema"] = (type(whole.parsed).__name__, whole.parsed.model_dump(),
                      events.result.parsed == whole.parsed, "".join(pieces) == whole.text)
    seen["cut"] = error(lambda: client.generate(schema=Person, **{**asked, "max_tokens": 3}))
    tokens = client.generate(PROMPT, logprobs=True, top_logprobs=2, **GREEDY)
    seen["logprobs"] = [(entry["token"], round(entry["logprob"], 4), len(entry["top_logprobs"]))
                        for entry in tokens.logprobs]
    return seen


def test_both_clients_read_structured_answers_alike(live_server):
    with Client(live_server.url, live_server.token) as client:
        blocking = structured_scenario(client)
    with blocking_async_client(live_server.url, live_server.token) as client:
        awaited = structured_scenario(client)
    assert awaited == blocking
    assert blocking["schema"][0] == "Person" and blocking["schema"][2:] == (True, True)
    assert blocking["cut"][0] == "StructuredOutputError" and "raise max_tokens" in \
        blocking["cut"][1]
    assert blocking["logprobs"] and all(rivals == 2 for *_, rivals in blocking["logprobs"])
