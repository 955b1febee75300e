"""Errors the store raises on purpose. All are `InvalidRequest`s: the API answers 400 (or the
status on the class), with the message, which says what was wrong and what is expected."""

from __future__ import annotations

from typing import Any

from mlx_jupyter.errors import InvalidRequest


class StoreError(InvalidRequest):
    """Base of the store's own errors."""


class SettingsError(StoreError):
    """A setting that does not exist, or a value it does not take."""


class UnknownSetting(SettingsError, KeyError):
    def __init__(self, key: str, known: list[str]):
        super().__init__(f"unknown setting {key!r}; settings are: {', '.join(known)}")
        self.key = key

    # KeyError's str() is the repr of its argument; keep the plain message.
    __str__ = Exception.__str__


class InvalidSetting(SettingsError, ValueError):
    def __init__(self, key: str, expected: str, value: Any):
        super().__init__(f"setting {key!r} expects {expected}, got {value!r}")
        self.key = key
        self.expected = expected


class UnknownModel(StoreError, KeyError):
    """A request names a model that was never registered with `Store.ensure_model`."""

    status = 404

    def __init__(self, name: str):
        super().__init__(f"model {name!r} is not registered in the database")
        self.name = name

    __str__ = Exception.__str__


class InvalidField(StoreError, ValueError):
    """`update_request` got a column it may not change, or a status that does not exist."""
