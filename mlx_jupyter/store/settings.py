"""Typed application settings stored in the `settings` table, read through a TTL cache.

Every setting is declared once in `SETTINGS` with its type, default, constraint and description;
values are validated by a strict pydantic TypeAdapter on the way in (and again on the way out,
so a stored value that a newer version no longer accepts falls back to the default).

The cache is one object shared by every thread. A write invalidates it before `set` returns, so
the next read in any thread sees the new value. The TTL only bounds how stale a value written
by another process (a second server on the same PostgreSQL database) can be. A generation
counter stops a read that fetched the old value just before a write from putting it back into
the cache after the write invalidated it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy import Engine, select

from ..limits import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_MODEL_NAME_CHARS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
)
from .database import dialect_insert, immediate
from .errors import InvalidSetting, UnknownSetting
from .schema import Setting, utcnow

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 30.0


@dataclass(frozen=True)
class SettingSpec:
    key: str
    type: type
    default: Any
    expected: str  # what a valid value looks like, for error messages and the UI
    description: str
    constraint: Any = None  # a pydantic Field(...) with bounds
    adapter: TypeAdapter[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        annotated: Any = (Annotated[self.type, self.constraint] if self.constraint is not None
                          else self.type)
        # Strict: "5" is not an int and true is not a number; an int is still a float.
        object.__setattr__(self, "adapter", TypeAdapter(annotated, config=ConfigDict(strict=True)))

    def validate(self, value: Any) -> Any:
        try:
            return self.adapter.validate_python(value)
        except ValidationError:
            raise InvalidSetting(self.key, self.expected, value) from None


SETTINGS: dict[str, SettingSpec] = {spec.key: spec for spec in (
    # No control characters: no model name has them, and PostgreSQL cannot store a NUL.
    SettingSpec("default_model", str, DEFAULT_MODEL, "a non-empty model name",
                "Model used when a request names none.",
                Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS,
                      pattern=r"^[^\x00-\x1f\x7f]+$")),
    SettingSpec("default_max_tokens", int, DEFAULT_MAX_TOKENS, f"an integer from 1 to {MAX_TOKENS}",
                "Most tokens generated when a request does not say.",
                Field(ge=1, le=MAX_TOKENS)),
    SettingSpec("default_temperature", float, DEFAULT_TEMPERATURE,
                f"a number from 0 to {MAX_TEMPERATURE:g}",
                "Sampling temperature when a request does not say; 0 is greedy.",
                Field(ge=0.0, le=MAX_TEMPERATURE)),
    SettingSpec("default_top_p", float, DEFAULT_TOP_P, "a number above 0, at most 1",
                "Nucleus sampling mass when a request does not say; 1 keeps every token.",
                Field(gt=0.0, le=1.0)),
    SettingSpec("history_retention_days", int, 0, "an integer from 0 to 36500",
                "Finished requests older than this many days are deleted by the history "
                "cleanup pass (every c.MlxApp.cleanup_interval_seconds); 0 keeps them forever.",
                Field(ge=0, le=36500)),
    SettingSpec("max_history_rows", int, 0, "an integer from 0 to 100000000",
                "The history cleanup pass keeps at most this many finished requests, the "
                "newest; 0 means no limit.",
                Field(ge=0, le=100_000_000)),
)}

_MISSING = object()


class TTLCache:
    """A thread-safe key -> value cache with a time to live and a write generation."""

    def __init__(self, ttl_seconds: float):
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Any, float]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0

    @property
    def generation(self) -> int:
        """Read it before loading from the database; hand it to `put` with the loaded value."""
        return self._generation

    def get(self, key: str) -> Any:
        """The cached value, or `_MISSING`."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] > now:
                self.hits += 1
                return entry[0]
            self.misses += 1
            return _MISSING

    def put(self, key: str, value: Any, generation: int) -> bool:
        """Caches a value loaded at `generation`, unless a write invalidated the cache since."""
        if self.ttl <= 0:
            return False
        with self._lock:
            if generation != self._generation:
                return False
            self._entries[key] = (value, time.monotonic() + self.ttl)
            return True

    def invalidate(self, keys: Iterable[str] | None = None) -> None:
        """Drops the given keys (all when None) and starts a new generation."""
        with self._lock:
            self._generation += 1
            if keys is None:
                self._entries.clear()
            else:
                for key in keys:
                    self._entries.pop(key, None)

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"ttl_seconds": self.ttl, "entries": len(self._entries), "hits": self.hits,
                    "misses": self.misses, "generation": self._generation}


class SettingsService:
    """get/set/all of the typed settings, with the cache in front of the database."""

    def __init__(self, engine: Engine, ttl_seconds: float = DEFAULT_TTL_SECONDS):
        self._engine = engine
        self._write_engine = immediate(engine)
        self.cache = TTLCache(ttl_seconds)
        self._last_read: dict[str, Any] | None = None  # for when the database does not answer

    @staticmethod
    def spec(key: str) -> SettingSpec:
        try:
            return SETTINGS[key]
        except KeyError:
            raise UnknownSetting(key, list(SETTINGS)) from None

    def get(self, key: str) -> Any:
        spec = self.spec(key)
        value = self.cache.get(key)
        if value is not _MISSING:
            log.debug("settings cache hit: %s", key)
            return value
        log.debug("settings cache miss: %s", key)
        generation = self.cache.generation
        with self._engine.connect() as connection:
            stored = connection.scalar(select(Setting.value).where(Setting.key == key))
        value = self._from_storage(spec, stored)
        self.cache.put(key, value, generation)
        return value

    def cached_values(self) -> dict[str, Any] | None:
        """Every setting's value if all are cached, else None; never touches the database,
        so the event loop may call it."""
        cached = {key: self.cache.get(key) for key in SETTINGS}
        return None if any(value is _MISSING for value in cached.values()) else cached

    def values(self) -> dict[str, Any]:
        """Every setting's value; one query for all of them when any is not cached."""
        cached = self.cached_values()
        if cached is not None:
            return cached
        log.debug("settings cache miss: loading all settings")
        generation = self.cache.generation
        with self._engine.connect() as connection:
            stored: dict[str, Any] = dict(
                connection.execute(select(Setting.key, Setting.value)).all())
        values = {}
        for key, spec in SETTINGS.items():
            values[key] = self._from_storage(spec, stored.get(key))
            self.cache.put(key, values[key], generation)
        self._last_read = values
        return values

    def last_values(self) -> dict[str, Any] | None:
        """Every setting's value as last read or written here, however old (None before the
        first `values()`); for requests that must go on while the database does not answer."""
        return self._last_read

    def all(self) -> dict[str, dict[str, Any]]:
        """Every setting: value, default, type, what it expects and what it does."""
        values = self.values()
        return {key: {"value": values[key], "default": spec.default,
                      "type": spec.type.__name__, "expected": spec.expected,
                      "description": spec.description}
                for key, spec in SETTINGS.items()}

    def set(self, key: str, value: Any) -> Any:
        """Validates and stores a value; returns it as stored. Visible to every thread at once."""
        spec = self.spec(key)
        value = spec.validate(value)
        with self._write_engine.begin() as connection:
            connection.execute(_upsert(connection.dialect.name, key, value))
        self.cache.invalidate([key])
        if self._last_read is not None:
            self._last_read = {**self._last_read, key: value}
        log.debug("setting %s = %r stored; cache invalidated", key, value)
        return value

    @staticmethod
    def _from_storage(spec: SettingSpec, stored: Any) -> Any:
        if stored is None:
            return spec.default
        try:
            return spec.validate(stored)
        except InvalidSetting:
            log.warning("stored setting %s=%r is no longer valid (%s); using the default %r",
                        spec.key, stored, spec.expected, spec.default)
            return spec.default


def _upsert(dialect: str, key: str, value: Any) -> Any:
    statement = dialect_insert(dialect)(Setting).values(key=key, value=value, updated_at=utcnow())
    return statement.on_conflict_do_update(
        index_elements=[Setting.key],
        set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at})
