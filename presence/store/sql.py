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

from importlib.abc import Traversable

from presence import changelog
from presence.store import migrations
from presence.store.rows import (  # noqa: F401 (Script, Interaction and PENDING_BATCH: for the backends, tests)
    APP_COLUMNS, GRANT_COLUMNS, IN_BATCH, PENDING_BATCH, PENDING_COLUMNS, Interaction, Script, T, _app, _in,
    _one_app, _pending, _record, _time, _where,
)
from presence.store.sql_changes import ChangeQueries
from presence.store.sql_notifications import NotificationQueries
from presence.store.sql_pairing import PairingQueries
from presence.store.sql_people import PeopleQueries
from presence.store.sql_web import WebQueries
from presence.store.base import ACTIVE, PENDING, VERIFIED, App, Grant, Notification, PendingUpdate, Queued


class SQLStore(ChangeQueries, NotificationQueries, PairingQueries, PeopleQueries, WebQueries):
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

    def instrument(self, observe) -> None:
        """Report every database call's duration and failure: ``observe(op, seconds, ok)`` with op
        one of query, execute, transaction (the node's metrics). Wraps this instance's primitives."""
        from time import perf_counter

        from presence.store.base import StoreUnavailable

        for op in ("query", "execute", "transaction"):
            inner = getattr(self, "_" + op)

            async def timed(*args, _inner=inner, _op=op):
                start = perf_counter()
                try:
                    result = await _inner(*args)
                except StoreUnavailable:
                    observe(_op, perf_counter() - start, False)
                    raise
                observe(_op, perf_counter() - start, True)
                return result

            setattr(self, "_" + op, timed)

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

    async def get_apps(self, app_ids: list[str]) -> dict[str, App]:
        ids = sorted(set(app_ids))
        found: dict[str, App] = {}
        for start in range(0, len(ids), IN_BATCH):
            part = ids[start:start + IN_BATCH]
            for row in await self._query(f"SELECT {APP_COLUMNS} FROM applications WHERE app_id IN {_in(part)}", tuple(part)):
                app = _app(row)
                found[app.app_id] = app
        return found

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

    def _closing(self, id: int, log: tuple[str, float, str] | None):
        """Log ``log`` (origin, time, payload: what closes the application's streams on every node)
        if the application is active: in the transaction that rotates its key or deactivates it."""
        if log is None:
            return
        rows = yield "SELECT state FROM applications WHERE id = ?", (id,)
        if rows and rows[0][0] == ACTIVE:
            yield from self._log(*log)

    async def set_api_key(self, id: int, api_key_hash: str, now: float,
                          log: tuple[str, float, str] | None = None) -> App:
        # activated_at records when the app became ACTIVE; rotating the key keeps it.
        def interaction():
            yield from self._closing(id, log)
            return (yield from self._transition(
                "state = ?, api_key_hash = ?, activated_at = COALESCE(activated_at, ?)"
                " WHERE id = ? AND state IN (?, ?)",
                (ACTIVE, api_key_hash, now, id, VERIFIED, ACTIVE),
                id,
                refuse={PENDING: "application {id} is not verified yet: it cannot get an API key"},
            ))

        return await self._transaction(interaction())

    async def deactivate(self, id: int, log: tuple[str, float, str] | None = None) -> App:
        def interaction():
            yield from self._closing(id, log)
            return (yield from self._transition(
                "state = ?, api_key_hash = NULL, activated_at = NULL WHERE id = ? AND state = ?",
                (VERIFIED, id, ACTIVE),
                id,
                refuse={},
            ))

        return await self._transaction(interaction())

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
            yield "DELETE FROM notifications WHERE email = ? AND app_id = ?", (email, app_id)
            return bool(rows)

        return await self._transaction(interaction())

    async def list_grants(self, email: str | None = None, app_id: str | None = None) -> list[Grant]:
        where, args = _where([("email", email), ("app_id", app_id)])
        rows = await self._query(f"SELECT {GRANT_COLUMNS} FROM grants{where} ORDER BY email, app_id", args)
        return [_record(Grant, row) for row in rows]

    # -- waiting updates for applications without a connection -----------------------------
    async def queue_pending(self, updates: list[PendingUpdate]) -> None:
        rows = [(u.app_id, u.email, u.uid, u.status, u.at, u.seq, u.last_active) for u in updates]
        if rows:
            await self._transaction(self._queue(rows))

    def _queue(self, rows: list[tuple]):
        """Upsert pending rows (app_id, email, uid, status, at, seq(, last_active)), keeping the newest per
        (app_id, email) by the change log's number, never by a node's clock: no INSERT may touch the
        same row twice, so duplicates are folded first (the later of equal numbers wins)."""
        latest: dict[tuple[str, str], tuple] = {}
        for row in rows:
            if len(row) == 6:
                row = (*row, None)
            key = (row[0], row[1])
            if key not in latest or row[5] >= latest[key][5]:
                latest[key] = row
        rows = list(latest.values())
        for start in range(0, len(rows), PENDING_BATCH):
            batch = rows[start:start + PENDING_BATCH]
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(batch))
            yield (
                f"INSERT INTO pending ({PENDING_COLUMNS}) VALUES {values} ON CONFLICT (app_id, email)"
                " DO UPDATE SET uid = excluded.uid, status = excluded.status, at = excluded.at, seq = excluded.seq,"
                " last_active = excluded.last_active"
                " WHERE excluded.seq >= pending.seq",
                tuple(value for row in batch for value in row),
            )

    async def open_streams(self, node: str, app_ids: list[str], not_before: float,
                           fence: bool = False) -> dict[str, list[PendingUpdate]]:
        ids = sorted(set(app_ids))

        def interaction():
            if fence:    # a reaped node subscribes nothing: its subscription would hold the app for ever
                yield from self._fence(node)
            taken: dict[str, list[PendingUpdate]] = {app_id: [] for app_id in ids}
            for start in range(0, len(ids), IN_BATCH):
                part = ids[start:start + IN_BATCH]
                # Registered before taking what waits: a change made after this goes to a connection.
                yield ("INSERT INTO subscriptions (node, app_id) VALUES " + ", ".join(["(?, ?)"] * len(part))
                       + " ON CONFLICT (node, app_id) DO NOTHING", tuple(v for app_id in part for v in (node, app_id)))
                rows = yield (f"DELETE FROM pending WHERE app_id IN {_in(part)} RETURNING {PENDING_COLUMNS}", tuple(part))
                for update in map(_pending, rows):
                    if update.at >= not_before:
                        taken[update.app_id].append(update)
            return {app_id: sorted(updates, key=lambda u: (u.seq, u.email)) for app_id, updates in taken.items()}

        return await self._transaction(interaction())

    async def take_pending(self, app_id: str, not_before: float) -> list[PendingUpdate]:
        rows = await self._query(f"DELETE FROM pending WHERE app_id = ? RETURNING {PENDING_COLUMNS}", (app_id,))
        updates = [_pending(row) for row in rows]
        return sorted((u for u in updates if u.at >= not_before), key=lambda u: (u.seq, u.email))

    async def expire_pending(self, before: float) -> int:
        return len(await self._query("DELETE FROM pending WHERE at < ? RETURNING 1", (before,)))

    async def pending_stats(self) -> tuple[int, float | None]:
        rows = await self._query("SELECT COUNT(*), MIN(at) FROM pending")
        count, oldest = rows[0]
        return int(count), _time(oldest)

    async def count_pending(self, app_id: str | None = None) -> int:
        where, args = _where([("app_id", app_id)])
        rows = await self._query(f"SELECT COUNT(*) FROM pending{where}", args)
        return rows[0][0]
