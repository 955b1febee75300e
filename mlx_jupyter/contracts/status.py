"""What mlx/api/status and mlx/api/database answer, and the OpenAPI document's outline."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import Answer
from .models import ModelState


class Memory(Answer):
    total: int = Field(description="the machine's memory, bytes")
    available: int
    budget: int = Field(description="what models may be counted for in all")
    used_by_models: int = Field(description="what loaded (and loading) models are counted for")
    rss_of_models: int = Field(description="what their workers hold, resident")


class LoadedModels(Answer):
    loaded_count: int
    total_memory_gb: float
    max_loaded: int
    loaded: list[ModelState]


class ModelQueueCounts(Answer):
    queued_requests: int
    active_requests: int


class QueueSummary(Answer):
    queued: int = Field(description="requests waiting, every model")
    models: dict[str, ModelQueueCounts] = Field(description="per model with requests")


class SystemStatus(Answer):
    """What the model manager knows: memory and the loaded models."""

    memory: Memory
    models: LoadedModels


class DatabaseState(Answer):
    state: Literal["opening", "ready", "unavailable"] = Field(
        description="opened off the server's start: requests that need it wait while it opens, "
                    "and answer 503 while it is unavailable: it could not be opened, or it "
                    "stopped answering or is full (then the history's writes are kept and "
                    "land once it is ready again)")
    error: str | None = Field(description="why it is unavailable, and what to fix")


class Status(SystemStatus):
    version: str
    queue: QueueSummary
    database: DatabaseState


class SqlitePragmas(Answer):
    journal_mode: str
    synchronous: str | int
    cache_size: int
    mmap_size: int
    temp_store: str | int
    foreign_keys: bool
    busy_timeout: int


class SettingsCacheInfo(Answer):
    ttl_seconds: float
    entries: int
    hits: int
    misses: int
    generation: int


class DatabaseInfo(Answer):
    dialect: str
    driver: str
    url: str = Field(description="its password masked")
    connection_pool_class: str
    connection_pool_size: int | None
    connection_pool_checked_out: int | None
    connection_pool_checked_in: int | None
    connection_pool_overflow: int | None
    server_version: str
    pragmas: SqlitePragmas | None = Field(description="SQLite's, read back from a connection")
    server_settings: dict[str, str] | None = Field(description="PostgreSQL's")
    file: str | None = Field(description="the SQLite file")
    size_bytes: int | None
    wal_size_bytes: int | None
    row_counts: dict[str, int]
    schema_revision: str | None
    schema_head: str
    settings_cache: SettingsCacheInfo


class ApiDocument(Answer):
    """mlx/api/openapi.json: an OpenAPI 3.1 document (its outline; the specification has the
    rest)."""

    openapi: str
    info: dict[str, Any]
    servers: list[dict[str, Any]]
    security: list[dict[str, list[str]]]
    paths: dict[str, dict[str, Any]]
    components: dict[str, Any]
