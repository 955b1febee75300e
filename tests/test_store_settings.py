"""Typed settings: defaults, validation, persistence, the TTL cache and its invalidation."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event, update

from mlx_jupyter.errors import InvalidRequest
from mlx_jupyter.store import SETTINGS, InvalidSetting, SettingsError, Store, UnknownSetting
from mlx_jupyter.store.database import create_engine_for
from mlx_jupyter.store.schema import Setting
from mlx_jupyter.store.settings import _MISSING, TTLCache

pytest_plugins = ["store_fixtures"]  # database_url, store, postgres_server

DEFAULTS = {"default_model": "demo", "default_max_tokens": 256, "default_temperature": 0.7,
            "default_top_p": 1.0, "history_retention_days": 0, "max_history_rows": 0}


def write_behind_the_cache(url: str, key: str, value: object) -> None:
    """Changes a stored value the way another process would: not through this store."""
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            assert connection.execute(
                update(Setting.__table__).where(Setting.key == key).values(value=value)
            ).rowcount == 1
    finally:
        engine.dispose()


def count_settings_queries(store: Store) -> list[str]:
    """A list that receives every statement this store sends that reads the settings table."""
    seen: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _record(_conn, _cursor, statement, *_args):
        if "FROM settings" in statement:
            seen.append(statement)
    return seen


def test_defaults_are_typed(store):
    assert set(SETTINGS) == set(DEFAULTS)
    for key, default in DEFAULTS.items():
        value = store.settings.get(key)
        assert value == default and type(value) is type(default), key


def test_all_lists_every_setting_with_value_default_type_and_description(store):
    store.settings.set("default_top_p", 0.9)
    listed = store.settings.all()
    assert list(listed) == list(SETTINGS)
    for key, entry in listed.items():
        assert set(entry) == {"value", "default", "type", "expected", "description"}
        assert entry["default"] == DEFAULTS[key]
        assert entry["type"] == type(DEFAULTS[key]).__name__
        assert entry["description"] and entry["expected"]
    assert listed["default_top_p"]["value"] == 0.9
    assert listed["default_max_tokens"]["value"] == 256


def test_values_persist_across_stores(database_url):
    with Store.open(database_url) as first:
        assert first.settings.set("default_model", "llama") == "llama"
        assert first.settings.set("default_temperature", 1) == 1.0  # an int is a fine float
    with Store.open(database_url) as second:
        assert second.settings.get("default_model") == "llama"
        temperature = second.settings.get("default_temperature")
        assert temperature == 1.0 and isinstance(temperature, float)


def test_unknown_keys_raise_an_error_naming_the_key(store):
    for call in (lambda: store.settings.get("colour"),
                 lambda: store.settings.set("colour", "red"),
                 lambda: store.settings.spec("colour")):
        with pytest.raises(UnknownSetting) as raised:
            call()
        error = raised.value
        assert isinstance(error, KeyError) and isinstance(error, SettingsError)
        assert isinstance(error, InvalidRequest) and error.status == 400
        assert error.key == "colour"
        assert "'colour'" in str(error) and "default_max_tokens" in str(error)


INVALID = [
    ("default_max_tokens", 0, "an integer from 1 to 32768"),
    ("default_max_tokens", 40000, "an integer from 1 to 32768"),
    ("default_max_tokens", "12", "an integer"),
    ("default_max_tokens", 1.5, "an integer"),
    ("default_max_tokens", True, "an integer"),
    ("default_temperature", 2.5, "a number from 0 to 2"),
    ("default_temperature", -0.1, "a number from 0 to 2"),
    ("default_temperature", "hot", "a number"),
    ("default_top_p", 0, "above 0, at most 1"),
    ("default_top_p", 1.01, "above 0, at most 1"),
    ("default_model", "", "a non-empty model name"),
    ("default_model", "de\x00mo", "a non-empty model name"),  # PostgreSQL cannot store a NUL
    ("default_model", 5, "model name"),
    ("history_retention_days", -1, "an integer from 0"),
    ("max_history_rows", None, "an integer from 0"),
]


def test_invalid_values_are_refused_naming_key_and_expectation(store):
    for key, value, expected in INVALID:
        with pytest.raises(InvalidSetting) as raised:
            store.settings.set(key, value)
        error = raised.value
        assert isinstance(error, ValueError) and isinstance(error, InvalidRequest)
        assert error.key == key
        message = str(error)
        assert f"'{key}'" in message and expected in message and repr(value) in message, message
        assert store.settings.get(key) == DEFAULTS[key], key  # nothing stored


def test_a_stored_value_that_is_no_longer_valid_reads_as_the_default(store, caplog):
    store.settings.set("default_max_tokens", 99)
    write_behind_the_cache(str(store.engine.url.render_as_string(hide_password=False)),
                           "default_max_tokens", -5)
    store.settings.cache.invalidate()
    assert store.settings.get("default_max_tokens") == 256
    assert "no longer valid" in caplog.text


def test_cached_reads_do_not_touch_the_database(store):
    store.settings.set("default_model", "first")
    queries = count_settings_queries(store)
    assert store.settings.get("default_model") == "first"  # miss: one query
    for _ in range(20):
        assert store.settings.get("default_model") == "first"  # hits
    assert len(queries) == 1
    info = store.settings.cache.info()
    assert info["hits"] >= 20 and info["entries"] >= 1
    # values() of a warm cache is served from the cache too.
    store.settings.values()
    store.settings.values()
    assert len(queries) == 2


def test_a_value_changed_elsewhere_shows_after_the_ttl(database_url):
    with Store.open(database_url, settings_ttl=0.2) as store:
        store.settings.set("default_model", "before")
        assert store.settings.get("default_model") == "before"
        write_behind_the_cache(database_url, "default_model", "after")
        assert store.settings.get("default_model") == "before"  # still cached
        time.sleep(0.3)
        assert store.settings.get("default_model") == "after"


def test_a_ttl_of_zero_disables_the_cache(database_url):
    with Store.open(database_url, settings_ttl=0) as store:
        store.settings.set("default_model", "before")
        store.settings.get("default_model")
        write_behind_the_cache(database_url, "default_model", "after")
        assert store.settings.get("default_model") == "after"


def test_a_write_is_visible_at_once_in_every_thread(store):
    """A long TTL, values cached by other threads: set() must still show everywhere at once."""
    store.settings.set("default_max_tokens", 100)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    written = threading.Event()
    cached = threading.Barrier(3)

    def reader(name: str) -> None:
        seen[name].append(store.settings.get("default_max_tokens"))  # caches 100
        cached.wait(timeout=10)
        written.wait(timeout=10)
        seen[name].append(store.settings.get("default_max_tokens"))

    threads = [threading.Thread(target=reader, args=(name,)) for name in seen]
    for thread in threads:
        thread.start()
    cached.wait(timeout=10)
    store.settings.set("default_max_tokens", 200)
    written.set()
    for thread in threads:
        thread.join(timeout=10)
    assert seen == {"a": [100, 200], "b": [100, 200]}


def test_a_read_that_raced_a_write_cannot_cache_the_old_value():
    cache = TTLCache(ttl_seconds=3600)
    generation = cache.generation  # a reader starts loading "old" from the database...
    cache.invalidate(["key"])  # ...a writer stores "new" and invalidates...
    assert cache.put("key", "old", generation) is False  # ...the reader's put is refused
    assert cache.get("key") is _MISSING
    assert cache.put("key", "new", cache.generation) is True
    assert cache.get("key") == "new"


def test_concurrent_readers_end_on_the_last_written_value(store):
    """Readers hammer the cache while a writer changes the value: once the writer is done,
    every reader reads the last value, never a stale one re-inserted by a racing read."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                store.settings.get("default_max_tokens")
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        for value in range(1, 31):
            store.settings.set("default_max_tokens", value)
            assert store.settings.get("default_max_tokens") == value
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=30)
    assert not errors
    results = []
    check = [threading.Thread(target=lambda: results.append(
        store.settings.get("default_max_tokens"))) for _ in range(4)]
    for thread in check:
        thread.start()
    for thread in check:
        thread.join(timeout=10)
    assert results == [30, 30, 30, 30]
