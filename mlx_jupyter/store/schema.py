"""Tables: models, requests, settings (SQLAlchemy 2.0 declarative, typed).

The migrations in `migrations/versions` build exactly this schema; a test compares the two.
Every timestamp is timezone-aware UTC in Python. SQLite has no time zones, so `UTCDateTime`
stores naive UTC there and gives UTC back on the way out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The statuses and timestamps live in records.py, importable without SQLAlchemy.
from .records import ModelStatus, RequestStatus, utcnow


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend; naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# JSONB on PostgreSQL (compact, indexable), JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    # Deterministic constraint names: SQLite's batch migrations need names to find them again.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType,
                           list[dict[str, Any]]: JSONType}


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    path: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32))  # bundled, configured, huggingface, api
    kind: Mapped[str] = mapped_column(String(16), default="text", server_default="text")
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    memory_estimate_bytes: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.UNLOADED.value,
                                        server_default=ModelStatus.UNLOADED.value)
    pinned: Mapped[bool] = mapped_column(default=False, server_default=false())
    last_used_at: Mapped[datetime | None]
    use_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    # "metadata" is taken by the declarative base; the column keeps the name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Request(Base):
    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4().hex
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    notebook: Mapped[str | None] = mapped_column(Text)  # the kernel's notebook path
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.QUEUED.value)
    prompt: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, Any]] | None]
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    output_text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    ttft_ms: Mapped[float | None]
    error: Mapped[str | None] = mapped_column(Text)
    # Revision 0003: the rest of the figures the server computes once, when the request ends.
    queue_ms: Mapped[float | None]
    total_ms: Mapped[float | None]
    tokens_per_second: Mapped[float | None]
    prompt_tokens_per_second: Mapped[float | None]


class Setting(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSONType, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# The indexes reference column expressions (created_at DESC), so they are declared after the
# class. History of one model, newest first.
Index("ix_requests_model_created", Request.model_id, Request.created_at.desc())
# Revision 0002: the other history filters, and the unfiltered newest-first list.
Index("ix_requests_notebook_created", Request.notebook, Request.created_at)
Index("ix_requests_status_created", Request.status, Request.created_at)
Index("ix_requests_created", Request.created_at)

# The tables for Core statements (the hot paths skip the ORM), typed as the Tables they are.
models_table = cast(Table, Model.__table__)
requests_table = cast(Table, Request.__table__)
settings_table = cast(Table, Setting.__table__)
