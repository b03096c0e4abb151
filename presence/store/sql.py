"""Every query of the store, written once for both SQL backends.

A backend provides three primitives and a dialect name:

- ``_query(sql, args)``: one statement that returns rows (a SELECT or ``... RETURNING``);
- ``_execute(sql, args)``: one statement whose result is not needed;
- ``_transaction(interaction)``: run a multi-statement *interaction* atomically.

An interaction is a generator that yields ``(sql, args)`` statements (or a ``Script``) and is sent
back each statement's rows; its return value is the transaction's result. Written this way, the
logic between statements (read, decide, write) is shared by a backend that runs it in a thread
(SQLite) and one that runs it asynchronously (PostgreSQL), and one transaction holds it all.

Queries use ``?`` placeholders; the PostgreSQL backend turns them into ``%s``. The backends raise
integrity violations (unknown app, uid taken) as ValueError and connection trouble as
StoreUnavailable. Times are made floats on the way out: SQLite keeps whole REAL values as integers
and may hand them back as such.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass
from importlib.abc import Traversable
from typing import Any, TypeVar

from presence.store import migrations
from presence.store.base import ACTIVE, PENDING, VERIFIED, App, Device, Grant, PendingUpdate, PersonStatus

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
DEVICE_COLUMNS = "email, device, node, status, last_seen"
PENDING_COLUMNS = "app_id, email, uid, status, at"

# Rows per INSERT when queueing pending updates: well below SQLite's limit on bound parameters.
PENDING_BATCH = 500


def _time(value: float | None) -> float | None:
    return None if value is None else float(value)


def _app(row: tuple) -> App:
    *fields, created_at, verified_at, activated_at = row
    return App(*fields, float(created_at), _time(verified_at), _time(activated_at))


def _record(cls: type[T], row: tuple) -> T:
    """Grant, Device, PersonStatus and PendingUpdate all end with their time."""
    return cls(*row[:-1], float(row[-1]))


def _one_app(rows: list[tuple]) -> App | None:
    return _app(rows[0]) if rows else None


def _where(filters: Iterable[tuple[str, Any]]) -> tuple[str, tuple]:
    """`` WHERE a = ? AND b = ?`` for the filters whose value is not None."""
    used = [(column, value) for column, value in filters if value is not None]
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(f"{column} = ?" for column, _ in used), tuple(v for _, v in used)


class SQLStore:
    """The Store interface on top of the backend primitives (see the module docstring)."""

    #: Names the directory of schema scripts (presence/store/schema/<dialect>/).
    dialect: str = ""
    #: A statement taking a lock that serialises migrations across processes, if the database needs one.
    migration_lock: str | None = None
    #: Where the schema scripts are read from; tests point it at a directory of their own.
    schema_dir: Traversable | None = None

    # -- backend primitives ---------------------------------------------------------------
    async def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    async def _execute(self, sql: str, args: tuple = ()) -> None:
        raise NotImplementedError

    async def _transaction(self, interaction: Interaction[T]) -> T:
        raise NotImplementedError

    async def _connect(self) -> None:
        """Make sure the database can be reached (StoreUnavailable otherwise)."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        await self._connect()
        await migrations.migrate(self, self.schema_dir)

    async def ping(self) -> None:
        await self._query("SELECT 1")

    async def schema_version(self) -> int:
        rows = await self._query("SELECT version FROM schema_version")
        return rows[0][0] if rows else 0

    # -- developers and applications ------------------------------------------------------
    _ADD_DEVELOPER = "INSERT INTO developers (email, created_at) VALUES (?, ?) ON CONFLICT (email) DO NOTHING"

    async def add_developer(self, email: str, now: float) -> None:
        await self._execute(self._ADD_DEVELOPER, (email, now))

    async def create_app(
        self, developer: str, domain: str, name: str, description: str, verification_key: str, now: float
    ) -> App:
        def interaction():
            yield self._ADD_DEVELOPER, (developer, now)
            rows = yield (
                "INSERT INTO applications (developer, domain, name, description, verification_key, state,"
                f" created_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {APP_COLUMNS}",
                (developer, domain, name, description, verification_key, PENDING, now),
            )
            return _app(rows[0])

        return await self._transaction(interaction())

    async def get_app(self, app_id: str) -> App | None:
        return _one_app(await self._query(f"SELECT {APP_COLUMNS} FROM applications WHERE app_id = ?", (app_id,)))

    async def get_app_by_id(self, id: int) -> App | None:
        return _one_app(await self._query(f"SELECT {APP_COLUMNS} FROM applications WHERE id = ?", (id,)))

    async def list_apps(self, developer: str | None = None) -> list[App]:
        where, args = _where([("developer", developer)])
        rows = await self._query(f"SELECT {APP_COLUMNS} FROM applications{where} ORDER BY id", args)
        return [_app(row) for row in rows]

    def _transition(self, update: str, args: tuple, id: int, refuse: dict[str, str]) -> Interaction[App]:
        """Run a state-changing UPDATE (guarded by the current state); when it changes nothing,
        return the app as it is, unless it is unknown (KeyError) or its state is in ``refuse``
        (ValueError with that message)."""
        rows = yield f"UPDATE applications SET {update} RETURNING {APP_COLUMNS}", args
        if not rows:
            rows = yield f"SELECT {APP_COLUMNS} FROM applications WHERE id = ?", (id,)
            if not rows:
                raise KeyError(f"no application with id {id}")
        app = _app(rows[0])
        if app.state in refuse:
            raise ValueError(refuse[app.state].format(id=id))
        return app

    async def mark_verified(self, id: int, app_id: str, now: float) -> App:
        return await self._transaction(
            self._transition(
                "state = ?, app_id = ?, verified_at = ? WHERE id = ? AND state = ?",
                (VERIFIED, app_id, now, id, PENDING),
                id,
                refuse={},
            )
        )

    async def set_api_key(self, id: int, api_key_hash: str, now: float) -> App:
        # activated_at records when the app became ACTIVE; rotating the key keeps it.
        return await self._transaction(
            self._transition(
                "state = ?, api_key_hash = ?, activated_at = COALESCE(activated_at, ?)"
                " WHERE id = ? AND state IN (?, ?)",
                (ACTIVE, api_key_hash, now, id, VERIFIED, ACTIVE),
                id,
                refuse={PENDING: "application {id} is not verified yet: it cannot get an API key"},
            )
        )

    async def deactivate(self, id: int) -> App:
        return await self._transaction(
            self._transition(
                "state = ?, api_key_hash = NULL, activated_at = NULL WHERE id = ? AND state = ?",
                (VERIFIED, id, ACTIVE),
                id,
                refuse={},
            )
        )

    async def delete_app(self, id: int) -> None:
        def interaction():
            # Grants go with the application (ON DELETE CASCADE); waiting updates are not tied by a key.
            rows = yield "DELETE FROM applications WHERE id = ? RETURNING app_id", (id,)
            if rows and rows[0][0] is not None:
                yield "DELETE FROM pending WHERE app_id = ?", (rows[0][0],)

        await self._transaction(interaction())

    # -- grants ----------------------------------------------------------------------------
    async def add_grant(self, email: str, app_id: str, uid: str, now: float) -> Grant:
        # The no-op update makes RETURNING give back an existing grant untouched (its uid is kept).
        rows = await self._query(
            f"INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?, ?, ?, ?)"
            f" ON CONFLICT (email, app_id) DO UPDATE SET uid = grants.uid RETURNING {GRANT_COLUMNS}",
            (email, app_id, uid, now),
        )
        return _record(Grant, rows[0])

    async def get_grant(self, email: str, app_id: str) -> Grant | None:
        rows = await self._query(
            f"SELECT {GRANT_COLUMNS} FROM grants WHERE email = ? AND app_id = ?", (email, app_id)
        )
        return _record(Grant, rows[0]) if rows else None

    async def revoke_grant(self, email: str, app_id: str) -> bool:
        def interaction():
            rows = yield "DELETE FROM grants WHERE email = ? AND app_id = ? RETURNING email", (email, app_id)
            yield "DELETE FROM pending WHERE email = ? AND app_id = ?", (email, app_id)
            return bool(rows)

        return await self._transaction(interaction())

    async def list_grants(self, email: str | None = None, app_id: str | None = None) -> list[Grant]:
        where, args = _where([("email", email), ("app_id", app_id)])
        rows = await self._query(f"SELECT {GRANT_COLUMNS} FROM grants{where} ORDER BY email, app_id", args)
        return [_record(Grant, row) for row in rows]

    # -- devices and statuses ----------------------------------------------------------------
    async def set_device(self, email: str, device: str, node: str, status: str, now: float) -> None:
        await self._execute(
            f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (email, device)"
            " DO UPDATE SET node = excluded.node, status = excluded.status, last_seen = excluded.last_seen",
            (email, device, node, status, now),
        )

    async def remove_device(self, email: str, device: str) -> None:
        await self._execute("DELETE FROM devices WHERE email = ? AND device = ?", (email, device))

    async def list_devices(self, email: str) -> list[Device]:
        rows = await self._query(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE email = ? ORDER BY device", (email,))
        return [_record(Device, row) for row in rows]

    async def take_node_devices(self, node: str) -> list[Device]:
        rows = await self._query(f"DELETE FROM devices WHERE node = ? RETURNING {DEVICE_COLUMNS}", (node,))
        return sorted((_record(Device, row) for row in rows), key=lambda d: (d.email, d.device))

    async def set_status(self, email: str, status: str, now: float) -> None:
        await self._execute(
            "INSERT INTO statuses (email, status, changed_at) VALUES (?, ?, ?) ON CONFLICT (email)"
            " DO UPDATE SET status = excluded.status, changed_at = excluded.changed_at",
            (email, status, now),
        )

    async def get_status(self, email: str) -> PersonStatus | None:
        rows = await self._query("SELECT email, status, changed_at FROM statuses WHERE email = ?", (email,))
        return _record(PersonStatus, rows[0]) if rows else None

    # -- waiting updates for applications without a connection -----------------------------
    async def queue_pending(self, updates: list[PendingUpdate]) -> None:
        # One row per (app_id, email), the newest, so no INSERT touches the same row twice.
        latest: dict[tuple[str, str], PendingUpdate] = {}
        for update in updates:
            key = (update.app_id, update.email)
            if key not in latest or update.at >= latest[key].at:
                latest[key] = update
        if not latest:
            return
        rows = [(u.app_id, u.email, u.uid, u.status, u.at) for u in latest.values()]

        def interaction():
            for start in range(0, len(rows), PENDING_BATCH):
                batch = rows[start:start + PENDING_BATCH]
                values = ", ".join(["(?, ?, ?, ?, ?)"] * len(batch))
                yield (
                    f"INSERT INTO pending ({PENDING_COLUMNS}) VALUES {values} ON CONFLICT (app_id, email)"
                    " DO UPDATE SET uid = excluded.uid, status = excluded.status, at = excluded.at"
                    " WHERE excluded.at >= pending.at",
                    tuple(value for row in batch for value in row),
                )

        await self._transaction(interaction())

    async def take_pending(self, app_id: str, not_before: float) -> list[PendingUpdate]:
        rows = await self._query(f"DELETE FROM pending WHERE app_id = ? RETURNING {PENDING_COLUMNS}", (app_id,))
        updates = [_record(PendingUpdate, row) for row in rows]
        return sorted((u for u in updates if u.at >= not_before), key=lambda u: (u.at, u.email))

    async def expire_pending(self, before: float) -> int:
        return len(await self._query("DELETE FROM pending WHERE at < ? RETURNING 1", (before,)))

    async def count_pending(self, app_id: str | None = None) -> int:
        where, args = _where([("app_id", app_id)])
        rows = await self._query(f"SELECT COUNT(*) FROM pending{where}", args)
        return rows[0][0]
