"""People's changes, the change log and the registry of nodes: the queries that keep what
applications are told true across nodes, crashes and restarts. A mixin of SQLStore (see
presence/store/sql.py for the primitives).

Three rules hold by construction here rather than by care in the callers:

- **Everything a change does is one transaction**: the devices, the person's status, the updates
  queued for applications nobody holds, and the change's entry in the log, numbered in commit order.
- **A node's rows belong to its incarnation** (``nodes.name``, new at every start): a node writes
  only while its registry row exists (``fence``), so once a survivor has reaped it — in one
  transaction that cannot stop halfway — nothing it still had in flight can write again.
- **Order is the log's number**, never a clock: a waiting update replaces another only if it is newer
  in the log.
"""

from __future__ import annotations

from typing import Callable, Container

from presence import changelog, views
from presence.store.base import Device, LoggedChange, NodeFenced, PersonChange, PersonStatus, Reaped
from presence.views import Update
from presence.store.rows import DEVICE_COLUMNS, IN_BATCH, _device, _device_row, _in, _record

# Changes read per statement when a reaper looks for what a dead node may not have delivered.
MISSED_BATCH = 1000


def _without_node(node: str) -> Callable[[dict[str, Device]], None]:
    def drop(devices: dict[str, Device]) -> None:
        for device_id in [d for d, device in devices.items() if device.node == node]:
            del devices[device_id]
    return drop


class ChangeQueries:
    #: A statement locking one person (by email) until the transaction ends, across processes.
    person_lock: str | None = None
    #: A statement telling listening nodes a change was logged (its number as the argument).
    notify: str | None = None
    #: Appended to the fence's SELECT: a reaper's DELETE of the row then waits for the writes in flight.
    fence_lock: str = ""
    #: The database's own clock in epoch seconds: heartbeats are compared on one clock, not the nodes'.
    clock_sql: str = ""

    async def now(self) -> float:
        """The database's clock (one clock for every node: skewed node clocks cannot fake a death)."""
        rows = await self._query(f"SELECT {self.clock_sql}")
        return float(rows[0][0])

    # -- people ------------------------------------------------------------------------------------
    async def change_person(self, email: str, mutate, node: str, now: float, extra=None,
                            fence: bool = False) -> PersonChange:
        return (await self.change_people([(email, mutate, extra)], node, now, fence=fence))[0]

    async def change_people(self, changes, node: str, now: float, held: Container[str] = (),
                            fence: bool = False) -> list[PersonChange]:
        return await self._transaction(self._change(changes, node, now, held, fence))

    def _fence(self, node: str):
        rows = yield f"SELECT 1 FROM nodes WHERE name = ?{self.fence_lock}", (node,)
        if not rows:
            raise NodeFenced(f"node {node} is no longer registered: another node took it for dead and cleaned up"
                             " after it; it must rejoin as a new incarnation")

    def _change(self, changes, node: str, now: float, held: Container[str], fence: bool):
        """Several changes in one transaction (group commit): the people are locked and read with one
        statement each, the changes applied in order in memory, each person's final devices written
        once, and the whole batch logged as one change whose number every update carries."""
        if fence:
            yield from self._fence(node)
        emails = sorted({email for email, _, _ in changes})
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
        befores: list[dict] = []
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
            befores.append(before)
            results.append((views.changes(before.values(), after.values(), email, grants[email], now), after))
            if extra:
                extras.append(extra)
        yield from self._write_devices(initial, devices, now)
        updates = [u for person_updates, _ in results for u in person_updates]
        queued: frozenset[str] = frozenset()
        first = last = None
        if updates or extras:
            # A number for every change of the batch, in order: two transitions of one person
            # committed together still differ, and one number always means one content.
            last = yield from self._next_seq(len(changes))
            first = last - len(changes) + 1
            for i, (person_updates, _) in enumerate(results):
                for u in person_updates:
                    u.seq = first + i
        # Each person's last number and last_active (presence/store/sql_people.py), in this transaction.
        yield from self._note_people([(email, before, after, person_updates, None if first is None else first + i)
                                      for i, ((email, _, _), before, (person_updates, after))
                                      in enumerate(zip(changes, befores, results))], now)
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
            waiting = [(u.app_id, u.email, u.uid, u.status, u.at, u.seq, u.last_active) for u in updates
                       if u.app_id in queued]
            if waiting:
                yield from self._queue(waiting)
        if last is not None:
            yield from self._append(first, last, node, now,
                                    changelog.encode(updates, queued, extras, keep_seq=first != last))
        return [PersonChange(person_updates, queued & {u.app_id for u in person_updates},
                             first + i if person_updates or extra else None, after)
                for i, ((person_updates, after), extra) in enumerate(zip(results, logged_extras))]

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

    # -- the change log --------------------------------------------------------------------------------
    def _next_seq(self, count: int = 1):
        """Take ``count`` numbers; returns the last. The counter's row stays locked until commit, so
        numbers are taken in commit order, with no gaps (a transaction rolled back gives its numbers
        back): a node that has seen number N has seen every one before it, and a gap means the log
        was trimmed past it."""
        rows = yield "UPDATE bus SET seq = seq + ? WHERE id = 1 RETURNING seq", (count,)
        return int(rows[0][0])

    def _append(self, first: int, last: int, origin: str, now: float, payload: str):
        """One row of the log holds numbers ``first`` to ``last`` (a group commit's changes)."""
        yield ("INSERT INTO changes (seq, first, origin, at, payload) VALUES (?, ?, ?, ?, ?)",
               (last, first, origin, now, payload))
        if self.notify:
            yield self.notify, (str(last),)

    def _log(self, origin: str, now: float, payload: str):
        seq = yield from self._next_seq()
        yield from self._append(seq, seq, origin, now, payload)
        return seq

    async def log_change(self, origin: str, now: float, payload: str) -> int:
        return await self._transaction(self._log(origin, now, payload))

    async def changes_since(self, seq: int, limit: int = 1000) -> list[LoggedChange]:
        rows = await self._query(
            "SELECT seq, origin, at, payload, first FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [LoggedChange(int(s), origin, float(at), payload, int(first)) for s, origin, at, payload, first in rows]

    async def last_change(self) -> int:
        rows = await self._query("SELECT seq FROM bus WHERE id = 1")
        return int(rows[0][0])

    async def trim_changes(self, before: float) -> int:
        # Never past what a registered node has not delivered yet (a live node never finds a gap, and
        # a reaper always finds what a dead node may not have delivered).
        return len(await self._query(
            "DELETE FROM changes WHERE at < ? AND seq <= COALESCE((SELECT MIN(last_applied) FROM nodes), seq)"
            " RETURNING 1", (before,)))

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
    async def register_node(self, node: str, now: float, last_applied: int, label: str = "") -> None:
        await self._execute(
            "INSERT INTO nodes (name, label, started_at, heartbeat_at, last_applied) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,"
            " last_applied = excluded.last_applied",
            (node, label, now, now, last_applied),
        )

    async def heartbeat(self, node: str, now: float, last_applied: int) -> bool:
        rows = await self._query(
            "UPDATE nodes SET heartbeat_at = ?, last_applied = ? WHERE name = ? RETURNING name",
            (now, last_applied, node))
        return bool(rows)

    async def reap_node(self, reaper: str, now: float, before: float | None = None, label: str | None = None,
                        held: Container[str] = (), node: str | None = None) -> Reaped | None:
        """Clean up after one dead node, all of it in one transaction: a reaper that dies or loses the
        database halfway leaves the dead node registered, to be reaped again (idempotent, resumable).

        Which node: the longest silent one whose heartbeat (on the database's clock) is older than
        ``before``; or, with ``label``, any earlier incarnation of that node name (a node restarting
        under its name reaps its predecessors at once); or, with ``node``, that one (``reaper`` itself:
        a clean stop leaves this way, so a stop cut short leaves it registered). Its registry row and
        subscriptions go, its devices go offline (logged and queued like any change, made by
        ``reaper``), and what it may not have delivered to the applications it held — logged after the
        last change it said it had delivered — is logged again and waits for the applications no
        other node holds."""
        return await self._transaction(self._reap(reaper, now, before, label, held, node))

    def _reap(self, reaper: str, now: float, before: float | None, label: str | None, held: Container[str],
              node: str | None):
        if node is not None:
            rows = yield "DELETE FROM nodes WHERE name = ? RETURNING name, last_applied", (node,)
        elif label is not None:
            rows = yield ("DELETE FROM nodes WHERE name = (SELECT name FROM nodes WHERE label = ? AND name <> ?"
                          " ORDER BY heartbeat_at LIMIT 1) RETURNING name, last_applied", (label, reaper))
        else:
            rows = yield ("DELETE FROM nodes WHERE name = (SELECT name FROM nodes WHERE heartbeat_at < ? AND name <> ?"
                          " ORDER BY heartbeat_at LIMIT 1) AND heartbeat_at < ? RETURNING name, last_applied",
                          (before, reaper, before))
        if not rows:
            return None
        dead, delivered = rows[0][0], int(rows[0][1])
        rows = yield "DELETE FROM subscriptions WHERE node = ? RETURNING app_id", (dead,)
        apps = {row[0] for row in rows}
        missed: dict[tuple[str, str], tuple] = {}
        since = delivered
        while apps:   # before this transaction logs anything itself
            rows = yield "SELECT seq, payload FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (since, MISSED_BATCH)
            for seq, payload in rows:
                updates, queued, _ = changelog.decode(payload, int(seq))
                for u in updates:
                    # The highest number per person, not the last entry in the log: a replay logged
                    # by an earlier reaper carries older numbers after newer changes.
                    key = (u.app_id, u.email)
                    if u.app_id in apps and u.app_id not in queued and (key not in missed or u.seq > missed[key][5]):
                        missed[key] = (u.app_id, u.email, u.uid, u.status, u.at, u.seq, u.last_active)
                since = int(seq)
            if len(rows) < MISSED_BATCH:
                break
        rows = yield "SELECT DISTINCT email FROM devices WHERE node = ? ORDER BY email", (dead,)
        drop = _without_node(dead)
        fence = dead != reaper   # a node leaving has just deleted its own row
        changes = yield from self._change([(email, drop, None) for (email,) in rows], reaper, now, held, fence) \
            if rows else iter(())
        replayed: list[Update] = []
        queued: frozenset[str] = frozenset()
        if missed:
            # Logged again with their own numbers, so every node's connections of those applications
            # get what they lack (a node drops what is older than what it sent: at worst a duplicate
            # with the same number), and queued for the applications no live node holds. The queue
            # keeps the newer by number: an older missed update never replaces the offline one.
            missing_apps = sorted({app_id for app_id, _ in missed})
            subscribed: set[str] = set()
            for start in range(0, len(missing_apps), IN_BATCH):
                part = missing_apps[start:start + IN_BATCH]
                found = yield f"SELECT DISTINCT app_id FROM subscriptions WHERE app_id IN {_in(part)}", tuple(part)
                subscribed.update(row[0] for row in found)
            queued = frozenset(app_id for app_id in missing_apps if app_id not in subscribed and app_id not in held)
            waiting = [row for (app_id, _), row in missed.items() if app_id in queued]
            if waiting:
                yield from self._queue(waiting)
            replayed = sorted((Update(*row) for row in missed.values()), key=lambda u: u.seq)
            yield from self._log(reaper, now, changelog.encode(replayed, queued, keep_seq=True))
        return Reaped(dead, len(rows), sorted(apps), list(changes or []), replayed, queued)

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
