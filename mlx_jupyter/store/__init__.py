"""Persistence of mlx-jupyter: SQLAlchemy 2 on SQLite (default) or PostgreSQL.

    store = Store.open(default_database_url(jupyter_data_dir()))
    store.ensure_model("demo", path, source="bundled")
    store.add_request(RequestRecord(model="demo", prompt="Hello"))
    store.settings.get("default_max_tokens")

Synchronous: call it from a thread pool, never on the event loop. No tornado, no jupyter_server,
no mlx here.
"""

from .database import create_engine_for, default_database_url, mask_url
from .errors import (
    InvalidField,
    InvalidSetting,
    SettingsError,
    StoreError,
    UnknownModel,
    UnknownSetting,
)
from .migrations import current_revision, head_revision, upgrade_to_head
from .records import RequestRecord, new_request_id
from .schema import ModelStatus, RequestStatus
from .settings import SETTINGS, SettingSpec, SettingsService
from .store import Store

__all__ = [
    "SETTINGS",
    "InvalidField",
    "InvalidSetting",
    "ModelStatus",
    "RequestRecord",
    "RequestStatus",
    "SettingSpec",
    "SettingsError",
    "SettingsService",
    "Store",
    "StoreError",
    "UnknownModel",
    "UnknownSetting",
    "create_engine_for",
    "current_revision",
    "default_database_url",
    "head_revision",
    "mask_url",
    "new_request_id",
    "upgrade_to_head",
]
