"""Persistence of mlx-jupyter: SQLAlchemy 2 on SQLite (default) or PostgreSQL.

    store = Store.open(default_database_url(jupyter_data_dir()))
    store.ensure_model("demo", path, source="bundled")
    store.add_request(RequestRecord(model="demo", prompt="Hello"))
    store.settings.get("default_max_tokens")

Synchronous: call it from a thread pool, never on the event loop. No tornado, no jupyter_server,
no mlx here.

The names below load with the module that defines them, on first use: the server imports the
package for its statuses and records at start-up, and SQLAlchemy and alembic (most of a
start-up's import time) only load when the store opens, on the thread pool.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module (of this package) that defines it
_HOMES = {
    "create_engine_for": "database", "default_database_url": "database", "mask_url": "database",
    "InvalidField": "errors", "InvalidSetting": "errors", "SettingsError": "errors",
    "StoreError": "errors", "UnknownModel": "errors", "UnknownSetting": "errors",
    "current_revision": "migrations", "head_revision": "migrations",
    "upgrade_to_head": "migrations",
    "ModelStatus": "records", "RequestRecord": "records", "RequestStatus": "records",
    "new_request_id": "records", "utcnow": "records",
    "SETTINGS": "settings", "SettingSpec": "settings", "SettingsService": "settings",
    "Store": "store",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
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
    from .records import ModelStatus, RequestRecord, RequestStatus, new_request_id, utcnow
    from .settings import SETTINGS, SettingSpec, SettingsService
    from .store import Store
