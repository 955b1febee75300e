"""Which database errors are faults of the database itself rather than of the call.

A fault passes: the same call, made again once the database answers (or has room), succeeds.
The server keeps the writes such a fault refused and tries them again later; any other error
is the call's own and fails it alone.

- `FULL`: SQLite's SQLITE_FULL ("database or disk is full": the disk, or the database's
  `PRAGMA max_page_count`), PostgreSQL's disk_full (SQLSTATE 53100).
- `UNAVAILABLE`: the connection could not be made or was lost (SQLAlchemy marks it
  `connection_invalidated`; psycopg's OperationalError without an SQLSTATE: connection refused
  or closed), PostgreSQL's classes 08 (connection), 53 (out of resources: memory, connections),
  57P (server shutting down or starting) and 58 (I/O); SQLite's busy, locked, read-only, I/O
  and cannot-open errors.

An error that is the call's own must not be taken for a fault: a write it refused would be
tried again and again, holding back the writes behind it.
"""

from __future__ import annotations

import sqlite3
from typing import Literal

from sqlalchemy import exc as sa_exc

FaultKind = Literal["full", "unavailable"]
FULL: FaultKind = "full"
UNAVAILABLE: FaultKind = "unavailable"

_POSTGRES_DISK_FULL = "53100"
_POSTGRES_UNAVAILABLE_CLASSES = ("08", "53", "57P", "58")
# SQLite's primary result codes (the low byte of an extended code) that pass.
_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = {5, 6, 8, 10, 14, 15}  # BUSY, LOCKED, READONLY, IOERR, CANTOPEN, PROTOCOL


def database_fault(error: BaseException) -> FaultKind | None:
    """The kind of database fault `error` is, or None when it is the call's own error."""
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    original = error.orig
    if isinstance(original, sqlite3.Error):
        code = (getattr(original, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL:
            return FULL
        if code in _SQLITE_UNAVAILABLE or error.connection_invalidated:
            return UNAVAILABLE
        return None
    sqlstate = getattr(original, "sqlstate", None) or ""
    if sqlstate == _POSTGRES_DISK_FULL:
        return FULL
    if (error.connection_invalidated or sqlstate.startswith(_POSTGRES_UNAVAILABLE_CLASSES)
            or (isinstance(error, sa_exc.OperationalError) and not sqlstate)):
        return UNAVAILABLE
    return None
