"""Settings, database info and request history over REST, on a real server and database."""

import json

import pytest
from tornado.httpclient import HTTPClientError

from live_server import database_kind
from mlx_jupyter.store import head_revision

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


async def call(jp_fetch, *path, method="GET", body=None, params=None):
    response = await jp_fetch("mlx", "api", *path, method=method, params=params,
                              body=None if body is None else json.dumps(body),
                              request_timeout=120)
    return json.loads(response.body)


async def refused(jp_fetch, *path, method="GET", body=None, params=None):
    with pytest.raises(HTTPClientError) as excinfo:
        await call(jp_fetch, *path, method=method, body=body, params=params)
    return excinfo.value.code, json.loads(excinfo.value.response.body)["message"]


async def test_every_generation_is_recorded_with_its_notebook_and_outcome(jp_fetch):
    answers = [await call(jp_fetch, "generate", method="POST", body={
        "model": "demo", "messages": CHAT, "max_tokens": 12, "temperature": 0,
        "notebook": notebook}) for notebook in ("work/a.ipynb", "work/b.ipynb", "work/a.ipynb")]
    with pytest.raises(HTTPClientError):  # refused before it ran: not recorded
        await call(jp_fetch, "generate", method="POST", body={"model": "nope", "prompt": "x"})

    history = await call(jp_fetch, "requests")
    assert history["total"] == 3
    assert [row["id"] for row in history["requests"]] == [a["request_id"] for a in answers][::-1]
    row = history["requests"][0]
    assert row["model"] == "demo" and row["status"] == "completed"
    assert row["completion_tokens"] == answers[-1]["usage"]["completion_tokens"]
    # The figures the answer reported are the ones stored, in the list and in the detail.
    assert row["timings"] == answers[-1]["timings"] and row["timings"]["ttft_ms"] > 0

    one = await call(jp_fetch, "requests", answers[0]["request_id"])
    assert one["output_text"] == answers[0]["text"]
    assert one["messages"] == CHAT and one["notebook"] == "work/a.ipynb"
    assert one["parameters"]["max_tokens"] == 12 and one["finish_reason"] in ("stop", "length")
    assert one["finished_at"] >= one["created_at"]
    assert one["timings"] == answers[0]["timings"]
    assert set(one["timings"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_second",
                                   "prompt_tokens_per_second"}

    only_a = await call(jp_fetch, "requests", params={"notebook": "work/a.ipynb"})
    assert only_a["total"] == 2
    page = await call(jp_fetch, "requests", params={"limit": 1, "offset": 1})
    assert page["total"] == 3 and [r["id"] for r in page["requests"]] == [answers[1]["request_id"]]
    assert (await call(jp_fetch, "requests", params={"status": "failed"}))["total"] == 0
    assert (await call(jp_fetch, "requests", params={"model": "nope"}))["total"] == 0


@pytest.mark.parametrize("params, field", [
    ({"status": "done"}, "status"), ({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
    ({"offset": -1}, "offset"), ({"color": "red"}, "color"), ({"123": "x"}, "123"),
])
async def test_bad_history_queries_are_refused_naming_the_field(jp_fetch, params, field):
    code, message = await refused(jp_fetch, "requests", params=params)
    assert code == 400 and field in message


async def test_jupyterlabs_cache_buster_is_not_a_field(jp_fetch):
    # ServerConnection appends "&<milliseconds>" to every GET.
    response = await jp_fetch("mlx", "api", "requests", method="GET",
                              params={"limit": 2, "1795733111086": ""})
    assert json.loads(response.body)["limit"] == 2


async def test_an_unknown_request_id_is_a_404(jp_fetch):
    code, message = await refused(jp_fetch, "requests", "0123abcd")
    assert code == 404 and "0123abcd" in message


async def test_settings_are_typed_validated_and_used_as_defaults(jp_fetch):
    settings = (await call(jp_fetch, "settings"))["settings"]
    assert settings["default_max_tokens"]["value"] == 256
    assert settings["default_model"]["value"] == "demo"

    stored = await call(jp_fetch, "settings", "default_max_tokens", method="PUT",
                        body={"value": 3})
    assert stored["value"] == 3
    assert (await call(jp_fetch, "settings", "default_max_tokens"))["value"] == 3

    # A request that leaves model and max_tokens out takes them from the settings.
    answer = await call(jp_fetch, "generate", method="POST", body={"prompt": "The sea"})
    assert answer["model"] == "demo" and answer["usage"]["completion_tokens"] <= 3
    recorded = await call(jp_fetch, "requests", answer["request_id"])
    assert recorded["parameters"]["max_tokens"] == 3
    assert recorded["parameters"]["temperature"] == settings["default_temperature"]["value"]


@pytest.mark.parametrize("key, body, words", [
    ("default_max_tokens", {"value": "12"}, ["default_max_tokens"]),
    ("default_max_tokens", {"value": 0}, ["default_max_tokens"]),
    ("default_temperature", {"value": 5.0}, ["default_temperature"]),
    ("no_such_setting", {"value": 1}, ["no_such_setting"]),
    ("default_model", {}, ["value"]),
])
async def test_bad_settings_are_refused_naming_the_key(jp_fetch, key, body, words):
    code, message = await refused(jp_fetch, "settings", key, method="PUT", body=body)
    assert code == 400 and all(word in message for word in words)
    assert (await call(jp_fetch, "settings"))["settings"]["default_max_tokens"]["value"] == 256


async def test_database_info_shows_the_tuned_store(jp_fetch):
    await call(jp_fetch, "generate", method="POST",
               body={"model": "demo", "prompt": "Hi", "max_tokens": 2})
    info = await call(jp_fetch, "database")
    if database_kind() == "postgresql":  # c.MlxApp.database_url, a new schema (conftest.py)
        assert info["dialect"] == "postgresql" and info["driver"] == "psycopg"
        assert ":***@127.0.0.1:" in info["url"] and info["pragmas"] is None
        assert info["server_settings"]
    else:
        assert info["dialect"] == "sqlite" and info["url"].endswith("mlx_jupyter.db")
        assert info["pragmas"]["journal_mode"] == "wal"
        assert info["pragmas"]["foreign_keys"] == 1
    assert info["connection_pool_size"] == 10
    assert info["connection_pool_checked_out"] == 0
    assert info["schema_revision"] == head_revision()
    assert info["row_counts"]["requests"] == 1 and info["row_counts"]["models"] >= 1
