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

import json

from presence import changelog, views
from presence.store import migrations
from presence.store.sql_web import WebQueries
from presence.store.base import (
    ACTIVE, PENDING, VERIFIED, App, Device, Grant, LoggedChange, Notification, PendingUpdate, PersonChange,
    PersonStatus, Queued,
)

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
PENDING_COLUMNS = "app_id, email, uid, status, at"

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


class SQLStore(WebQueries):
    """The Store interface on top of the backend primitives (see the module docstring)."""

    #: Names the directory of schema scripts (presence/store/schema/<dialect>/).
    dialect: str = ""
    #: A statement taking a lock that serialises migrations across processes, if the database needs one.
    migration_lock: str | None = None
    #: Where the schema scripts are read from; tests point it at a directory of their own.
    schema_dir: Traversable | None = None
    #: A statement locking one person (by email) until the transaction ends, across processes.
    person_lock: str | None = None
    #: A statement telling listening nodes a change was logged (its number as the argument).
    notify: str | None = None
    #: Whether change_people logs changes for other nodes (a node alone on its database does not
    #: need to: Node turns it off for SQLite).
    log_changes: bool = True

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
            yield "DELETE FROM notifications WHERE email = ? AND app_id = ?", (email, app_id)
            return bool(rows)

        return await self._transaction(interaction())

    async def list_grants(self, email: str | None = None, app_id: str | None = None) -> list[Grant]:
        where, args = _where([("email", email), ("app_id", app_id)])
        rows = await self._query(f"SELECT {GRANT_COLUMNS} FROM grants{where} ORDER BY email, app_id", args)
        return [_record(Grant, row) for row in rows]

    # -- people --------------------------------------------------------------------------------
    async def change_person(self, email: str, mutate, node: str, now: float, extra=None) -> PersonChange:
        return (await self.change_people([(email, mutate, extra)], node, now))[0]

    async def change_people(self, changes, node: str, now: float, held=()) -> list[PersonChange]:
        """Several changes in one transaction (group commit): the people are locked and read with one
        statement each, the changes applied in order in memory, each person's final devices written
        once, and the whole batch logged as one change."""
        emails = sorted({email for email, _, _ in changes})

        def interaction():
            if self.person_lock:
                yield self.person_lock, (emails,)
            devices: dict[str, dict[str, Device]] = {email: {} for email in emails}
            for start in range(0, len(emails), IN_BATCH):
                part = emails[start:start + IN_BATCH]
                rows = yield f"SELECT {DEVICE_COLUMNS} FROM devices WHERE email IN {_in(part)}", tuple(part)
                for device in map(_device, rows):
                    devices[device.email][device.device] = device
            # (app_id, uid) pairs, not Grant records: a person may have granted thousands.
            grants: dict[str, list[tuple[str, str]]] = {email: [] for email in emails}
            for start in range(0, len(emails), IN_BATCH):
                part = emails[start:start + IN_BATCH]
                rows = yield (f"SELECT email, app_id, uid FROM grants WHERE email IN {_in(part)} ORDER BY email, app_id",
                              tuple(part))
                for email, app_id, uid in rows:
                    grants[email].append((app_id, uid))
            initial = {email: dict(d) for email, d in devices.items()}
            results: list[tuple[list, dict]] = []
            extras = []
            logged_extras = []
            for email, mutate, extra in changes:
                before = devices[email]
                after = dict(before)
                said = mutate(after)
                if said:
                    extra = {**(extra or {}), **said}
                logged_extras.append(extra)
                devices[email] = after
                results.append((views.changes(before.values(), after.values(), email, grants[email], now), after))
                if extra:
                    extras.append(extra)
            yield from self._write_devices(initial, devices, now)
            updates = [u for person_updates, _ in results for u in person_updates]
            queued: frozenset[str] = frozenset()
            if updates:
                # Only membership tests on ``held`` (the caller's live dict, read from the store's
                # thread on SQLite: atomic under the GIL; an application that just left is caught
                # by Streams.recently_left).
                app_ids = sorted({u.app_id for u in updates if u.app_id not in held})
                subscribed: set[str] = set()
                for start in range(0, len(app_ids), IN_BATCH):
                    part = app_ids[start:start + IN_BATCH]
                    rows = yield f"SELECT DISTINCT app_id FROM subscriptions WHERE app_id IN {_in(part)}", tuple(part)
                    subscribed.update(row[0] for row in rows)
                queued = frozenset(app_ids) - subscribed
                waiting = [(u.app_id, u.email, u.uid, u.status, u.at) for u in updates if u.app_id in queued]
                if waiting:
                    yield from self._queue(waiting)
            seq = None
            if (updates or extras) and self.log_changes:
                seq = yield from self._log(node, now, changelog.encode(updates, queued, extras))
            return [PersonChange(person_updates, queued & {u.app_id for u in person_updates},
                                 seq if person_updates or extra else None, after)
                    for (person_updates, after), extra in zip(results, logged_extras)]

        return await self._transaction(interaction())

    def _write_devices(self, initial: dict, final: dict, now: float):
        """Each person's final devices, written once: deletes, one multi-row upsert, and the overall
        statuses that changed."""
        upserts, statuses = [], []
        for email, after in final.items():
            before = initial[email]
            for device_id in before.keys() - after.keys():
                yield "DELETE FROM devices WHERE email = ? AND device = ?", (email, device_id)
            upserts += [_device_row(d) for device_id, d in after.items() if before.get(device_id) != d]
            status = views.overall(after.values())
            if status != views.overall(before.values()):
                statuses.append((email, status, now))
        for start in range(0, len(upserts), IN_BATCH):
            part = upserts[start:start + IN_BATCH]
            yield (
                f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(part))
                + " ON CONFLICT (email, device) DO UPDATE SET node = excluded.node, status = excluded.status,"
                " last_seen = excluded.last_seen, session = excluded.session, scope = excluded.scope,"
                " overrides = excluded.overrides",
                tuple(v for row in part for v in row),
            )
        for start in range(0, len(statuses), IN_BATCH):
            part = statuses[start:start + IN_BATCH]
            yield (
                "INSERT INTO statuses (email, status, changed_at) VALUES " + ", ".join(["(?, ?, ?)"] * len(part))
                + " ON CONFLICT (email) DO UPDATE SET status = excluded.status, changed_at = excluded.changed_at",
                tuple(v for row in part for v in row),
            )

    def _log(self, origin: str, now: float, payload: str):
        # The counter's row stays locked until commit, so numbers are taken in commit order: a node
        # that has seen change N has seen every change before it.
        rows = yield "UPDATE bus SET seq = seq + 1 WHERE id = 1 RETURNING seq", ()
        seq = int(rows[0][0])
        yield "INSERT INTO changes (seq, origin, at, payload) VALUES (?, ?, ?, ?)", (seq, origin, now, payload)
        if self.notify:
            yield self.notify, (str(seq),)
        return seq

    async def log_change(self, origin: str, now: float, payload: str) -> int:
        return await self._transaction(self._log(origin, now, payload))

    async def changes_since(self, seq: int, limit: int = 1000) -> list[LoggedChange]:
        rows = await self._query(
            "SELECT seq, origin, at, payload FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [LoggedChange(int(s), origin, float(at), payload) for s, origin, at, payload in rows]

    async def last_change(self) -> int:
        rows = await self._query("SELECT seq FROM bus WHERE id = 1")
        return int(rows[0][0])

    async def trim_changes(self, before: float) -> int:
        return len(await self._query("DELETE FROM changes WHERE at < ? RETURNING 1", (before,)))

    async def emails_on_node(self, node: str) -> list[str]:
        rows = await self._query("SELECT DISTINCT email FROM devices WHERE node = ? ORDER BY email", (node,))
        return [row[0] for row in rows]

    async def list_devices(self, email: str) -> list[Device]:
        rows = await self._query(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE email = ? ORDER BY device", (email,))
        return [_device(row) for row in rows]

    async def get_status(self, email: str) -> PersonStatus | None:
        rows = await self._query("SELECT email, status, changed_at FROM statuses WHERE email = ?", (email,))
        return _record(PersonStatus, rows[0]) if rows else None

    # -- nodes and subscriptions ----------------------------------------------------------------
    async def register_node(self, node: str, now: float, last_applied: int) -> None:
        await self._execute(
            "INSERT INTO nodes (name, started_at, heartbeat_at, last_applied) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,"
            " last_applied = excluded.last_applied",
            (node, now, now, last_applied),
        )

    async def heartbeat(self, node: str, now: float, last_applied: int) -> bool:
        rows = await self._query(
            "UPDATE nodes SET heartbeat_at = ?, last_applied = ? WHERE name = ? RETURNING name",
            (now, last_applied, node))
        return bool(rows)

    async def forget_node(self, node: str) -> None:
        def interaction():
            yield "DELETE FROM subscriptions WHERE node = ?", (node,)
            yield "DELETE FROM nodes WHERE name = ?", (node,)

        await self._transaction(interaction())

    async def claim_dead_node(self, before: float) -> tuple[str, int] | None:
        # One statement: of several survivors, exactly one gets the row.
        rows = await self._query(
            "DELETE FROM nodes WHERE name = (SELECT name FROM nodes WHERE heartbeat_at < ?"
            " ORDER BY heartbeat_at LIMIT 1) AND heartbeat_at < ? RETURNING name, last_applied",
            (before, before))
        return (rows[0][0], int(rows[0][1])) if rows else None

    async def subscribe(self, node: str, app_id: str) -> None:
        await self._execute(
            "INSERT INTO subscriptions (node, app_id) VALUES (?, ?) ON CONFLICT (node, app_id) DO NOTHING",
            (node, app_id))

    async def unsubscribe(self, node: str, app_id: str) -> None:
        await self._execute("DELETE FROM subscriptions WHERE node = ? AND app_id = ?", (node, app_id))

    async def take_subscriptions(self, node: str) -> list[str]:
        rows = await self._query("DELETE FROM subscriptions WHERE node = ? RETURNING app_id", (node,))
        return sorted(row[0] for row in rows)

    async def subscribed(self, app_ids: list[str]) -> set[str]:
        if not app_ids:
            return set()
        rows = await self._query(
            f"SELECT DISTINCT app_id FROM subscriptions WHERE app_id IN {_in(app_ids)}", tuple(app_ids))
        return {row[0] for row in rows}

    # -- live notifications -------------------------------------------------------------------
    async def queue_notifications(self, app_id: str, items, now: float, limit: int) -> list[Queued | None]:
        def interaction():
            rows = yield "SELECT name, domain FROM applications WHERE app_id = ?", (app_id,)
            if not rows:
                return [None] * len(items)
            name, domain = rows[0]
            uids = sorted({uid for uid, _, _ in items})
            rows = yield f"SELECT uid, email FROM grants WHERE app_id = ? AND uid IN {_in(uids)}", (app_id, *uids)
            emails = dict(rows)
            valid = [(emails[uid], message, action) for uid, message, action in items if uid in emails]
            if not valid:
                return [None] * len(items)
            people = sorted({email for email, _, _ in valid})
            rows = yield (f"SELECT email, COUNT(*) FROM notifications WHERE app_id = ? AND email IN {_in(people)}"
                          " GROUP BY email", (app_id, *people))
            sizes = {email: int(count) for email, count in rows}
            # One multi-row insert per chunk; ids come in the order of the VALUES, ascending.
            ids: list[int] = []
            for start in range(0, len(valid), IN_BATCH):
                part = valid[start:start + IN_BATCH]
                rows = yield (
                    "INSERT INTO notifications (email, app_id, message, action, at) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?)"] * len(part)) + " RETURNING id",
                    tuple(v for email, message, action in part for v in (email, app_id, message, action, now)))
                ids += sorted(int(row[0]) for row in rows)
            # FIFO per queue: past the limit, the oldest go (possibly earlier items of this batch).
            drop: dict[str, int] = {}
            queued = iter(zip(ids, valid))
            results: list[Queued | None] = []
            for uid, _, _ in items:
                if uid not in emails:
                    results.append(None)
                    continue
                id, (email, message, action) = next(queued)
                size = sizes.get(email, 0) + 1
                dropped = max(0, size - limit)
                sizes[email] = size - dropped
                drop[email] = drop.get(email, 0) + dropped
                results.append(Queued(Notification(id, email, app_id, name, domain, message, action, now),
                                      sizes[email], dropped))
            for email, count in drop.items():
                if count:
                    yield (
                        "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications WHERE email = ?"
                        " AND app_id = ? ORDER BY id LIMIT ?)", (email, app_id, count))
            return results

        return await self._transaction(interaction())

    async def pending_notifications(self, email: str, not_before: float) -> list[Notification]:
        return (await self.pending_notifications_of([email], not_before)).get(email, [])

    async def pending_notifications_of(self, emails: list[str], not_before: float) -> dict[str, list[Notification]]:
        emails = sorted(set(emails))
        found: dict[str, list[Notification]] = {}
        for start in range(0, len(emails), IN_BATCH):
            part = emails[start:start + IN_BATCH]
            rows = await self._query(
                "SELECT n.id, n.email, n.app_id, a.name, a.domain, n.message, n.action, n.at FROM notifications n"
                f" JOIN applications a ON a.app_id = n.app_id WHERE n.email IN {_in(part)} AND n.at >= ?"
                " ORDER BY n.id", (*part, not_before))
            for i, e, a, name, domain, m, act, at in rows:
                found.setdefault(e, []).append(Notification(int(i), e, a, name, domain, m, act, float(at)))
        return found

    async def ack_notifications(self, email: str, ids: list[int]) -> int:
        return len(await self.ack_notifications_of([(email, i) for i in ids]))

    async def ack_notifications_of(self, pairs: list[tuple[str, int]]) -> set[tuple[str, int]]:
        if not pairs:
            return set()

        def interaction():
            gone: set[tuple[str, int]] = set()
            for start in range(0, len(pairs), IN_BATCH):
                part = pairs[start:start + IN_BATCH]
                values = ", ".join(["(?, ?)"] * len(part))
                rows = yield (f"DELETE FROM notifications WHERE (email, id) IN (VALUES {values}) RETURNING email, id",
                              tuple(v for pair in part for v in pair))
                gone.update((email, int(i)) for email, i in rows)
            return gone

        return await self._transaction(interaction())

    async def expire_notifications(self, before: float) -> int:
        return len(await self._query("DELETE FROM notifications WHERE at < ? RETURNING 1", (before,)))

    # -- waiting updates for applications without a connection -----------------------------
    async def queue_pending(self, updates: list[PendingUpdate]) -> None:
        rows = [(u.app_id, u.email, u.uid, u.status, u.at) for u in updates]
        if rows:
            await self._transaction(self._queue(rows))

    def _queue(self, rows: list[tuple]):
        """Upsert pending rows, keeping the newest per (app_id, email): no INSERT may touch the same
        row twice, so duplicates are folded first."""
        latest: dict[tuple[str, str], tuple] = {}
        for row in rows:
            key = (row[0], row[1])
            if key not in latest or row[4] >= latest[key][4]:
                latest[key] = row
        rows = list(latest.values())
        for start in range(0, len(rows), PENDING_BATCH):
            batch = rows[start:start + PENDING_BATCH]
            values = ", ".join(["(?, ?, ?, ?, ?)"] * len(batch))
            yield (
                f"INSERT INTO pending ({PENDING_COLUMNS}) VALUES {values} ON CONFLICT (app_id, email)"
                " DO UPDATE SET uid = excluded.uid, status = excluded.status, at = excluded.at"
                " WHERE excluded.at >= pending.at",
                tuple(value for row in batch for value in row),
            )

    async def open_streams(self, node: str, app_ids: list[str], not_before: float) -> dict[str, list[PendingUpdate]]:
        ids = sorted(set(app_ids))

        def interaction():
            taken: dict[str, list[PendingUpdate]] = {app_id: [] for app_id in ids}
            for start in range(0, len(ids), IN_BATCH):
                part = ids[start:start + IN_BATCH]
                # Registered before taking what waits: a change made after this goes to a connection.
                yield ("INSERT INTO subscriptions (node, app_id) VALUES " + ", ".join(["(?, ?)"] * len(part))
                       + " ON CONFLICT (node, app_id) DO NOTHING", tuple(v for app_id in part for v in (node, app_id)))
                rows = yield (f"DELETE FROM pending WHERE app_id IN {_in(part)} RETURNING {PENDING_COLUMNS}", tuple(part))
                for update in (_record(PendingUpdate, row) for row in rows):
                    if update.at >= not_before:
                        taken[update.app_id].append(update)
            return {app_id: sorted(updates, key=lambda u: (u.at, u.email)) for app_id, updates in taken.items()}

        return await self._transaction(interaction())

    async def take_pending(self, app_id: str, not_before: float) -> list[PendingUpdate]:
        rows = await self._query(f"DELETE FROM pending WHERE app_id = ? RETURNING {PENDING_COLUMNS}", (app_id,))
        updates = [_record(PendingUpdate, row) for row in rows]
        return sorted((u for u in updates if u.at >= not_before), key=lambda u: (u.at, u.email))

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
