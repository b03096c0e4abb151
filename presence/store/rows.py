"""How rows become records and records rows: the pieces every query module of the SQL store shares.

Statements use ``?`` placeholders (the PostgreSQL backend turns them into ``%s``). Times are made
floats on the way out: SQLite keeps whole REAL values as integers and may hand them back as such.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from presence.store.base import App, Device, PendingUpdate

T = TypeVar("T")


@dataclass(frozen=True)
class Script:
    """Several ``;``-separated statements without parameters (a migration script)."""

    text: str


Statement = tuple[str, tuple]
Interaction = Generator["Statement | Script", list[tuple], T]

APP_COLUMNS = (
    "id, app_id, developer, domain, name, description, verification_key, state, api_key_hash,"
    " created_at, verified_at, activated_at"
)
GRANT_COLUMNS = "email, app_id, uid, created_at"
DEVICE_COLUMNS = "email, device, node, status, last_seen, session, scope, overrides"
PENDING_COLUMNS = "app_id, email, uid, status, at, seq, last_active"

# Rows per INSERT when queueing pending updates: well below SQLite's limit on bound parameters.
PENDING_BATCH = 500
# Values per IN (...) list or multi-row INSERT of a batch of changes.
IN_BATCH = 500


def _time(value: float | None) -> float | None:
    return None if value is None else float(value)


def _app(row: tuple) -> App:
    *fields, created_at, verified_at, activated_at = row
    return App(*fields, float(created_at), _time(verified_at), _time(activated_at))


def _record(cls: type[T], row: tuple) -> T:
    """Grant, Device, PersonStatus and PendingUpdate all end with their time."""
    return cls(*row[:-1], float(row[-1]))


def _device(row: tuple) -> Device:
    email, device, node, status, last_seen, session, scope, overrides = row
    return Device(email, device, node, status, float(last_seen), session,
                  None if scope is None else frozenset(json.loads(scope)),
                  {} if overrides == "{}" else json.loads(overrides))   # nearly always "{}": no parse


def _device_row(d: Device) -> tuple:
    scope = None if d.scope is None else json.dumps(sorted(d.scope))
    return (d.email, d.device, d.node, d.status, d.last_seen, d.session, scope,
            json.dumps(dict(d.overrides), sort_keys=True) if d.overrides else "{}")


def _in(values: list) -> str:
    return "(" + ", ".join("?" * len(values)) + ")"


def _one_app(rows: list[tuple]) -> App | None:
    return _app(rows[0]) if rows else None


def _where(filters: Iterable[tuple[str, Any]]) -> tuple[str, tuple]:
    """`` WHERE a = ? AND b = ?`` for the filters whose value is not None."""
    used = [(column, value) for column, value in filters if value is not None]
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(f"{column} = ?" for column, _ in used), tuple(v for _, v in used)


def _pending(row: tuple) -> PendingUpdate:
    app_id, email, uid, status, at, seq, last_active = row
    return PendingUpdate(app_id, email, uid, status, float(at), int(seq), _time(last_active))
