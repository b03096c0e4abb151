"""The state of an application's people: what a syncing application, a resync and the HTTP queries
are told, and the bookkeeping every change does for it. A mixin of SQLStore.

Each person has a row in ``people`` (schema v6): the number of their last logged change, so a state
read at any moment says which changes it already holds (a syncing connection then drops the live
ones it holds), and ``last_active``, when a device of theirs was last online. Both are written by
the change's own transaction (``_note_people``, called from ``ChangeQueries._change``).

Pages are keyset pages by email over ``grants (app_id, email)``: one page costs the same wherever it
starts, and nothing holds more than a page.
"""

from __future__ import annotations

from presence import views
from presence.status import ONLINE
from presence.store.base import Device, PersonState
from presence.store.rows import DEVICE_COLUMNS, IN_BATCH, _device, _in

# The largest page a caller may ask for (a bound on memory, not a default).
MAX_PAGE = 5000


def _active(devices: dict[str, Device]) -> bool:
    return any(d.status == ONLINE or ONLINE in d.overrides.values() for d in devices.values())


class PeopleQueries:
    # -- written by every change ---------------------------------------------------------------------
    def _note_people(self, transitions: list[tuple[str, dict, dict, list, int | None]], now: float):
        """Per change of a batch (email, devices before, after, its updates, its number or None):
        record the person's last number and last_active, and give each update its last_active.

        A person is active at ``now`` if a device of theirs is online before or after the change (going
        offline at ``now`` means they were last active at ``now``); otherwise last_active stays."""
        latest: dict[str, tuple[int, float | None]] = {}
        unknown: set[str] = set()
        for email, before, after, updates, seq in transitions:
            last_seq, last_active = latest.get(email, (0, None))
            if _active(before) or _active(after):
                last_active = now
            elif last_active is None and updates:
                unknown.add(email)
            latest[email] = (max(last_seq, seq or 0), last_active)
        stored: dict[str, float | None] = {}
        wanted = sorted(unknown)
        for start in range(0, len(wanted), IN_BATCH):
            part = wanted[start:start + IN_BATCH]
            rows = yield f"SELECT email, last_active FROM people WHERE email IN {_in(part)}", tuple(part)
            stored.update((email, None if la is None else float(la)) for email, la in rows)
        # The updates: a person's last_active as it is after that change (an earlier change of the
        # batch may have set it).
        running: dict[str, float | None] = {}
        for email, before, after, updates, _ in transitions:
            if _active(before) or _active(after):
                running[email] = now
            la = running.get(email, stored.get(email))
            for u in updates:
                u.last_active = la
        rows_out = [(email, seq, la) for email, (seq, la) in latest.items()]
        for start in range(0, len(rows_out), IN_BATCH):
            part = rows_out[start:start + IN_BATCH]
            yield ("INSERT INTO people (email, seq, last_active) VALUES " + ", ".join(["(?, ?, ?)"] * len(part))
                   + " ON CONFLICT (email) DO UPDATE SET"
                   " seq = CASE WHEN excluded.seq > people.seq THEN excluded.seq ELSE people.seq END,"
                   " last_active = COALESCE(excluded.last_active, people.last_active)",
                   tuple(v for row in part for v in row))

    # -- read ------------------------------------------------------------------------------------------
    async def people_page(self, app_id: str, after: str = "", limit: int = 1000) -> list[PersonState]:
        # The number before the devices: the devices are then at least as new as the number, so a
        # live change the state does not hold always has a higher number (at worst the state already
        # shows it, and the application sees the same status again with a higher number).
        # The page first, alone (an index range scan that stops at the limit), then its people: a join
        # first would make PostgreSQL hash every grant after the cursor, for every page.
        rows = await self._query(
            "SELECT g.email, g.uid, p.seq, p.last_active FROM (SELECT email, uid FROM grants WHERE app_id = ?"
            " AND email > ? ORDER BY email LIMIT ?) g LEFT JOIN people p ON p.email = g.email ORDER BY g.email",
            (app_id, after, max(1, min(limit, MAX_PAGE))))
        return await self._states(app_id, rows)

    async def person_state(self, app_id: str, uid: str) -> PersonState | None:
        rows = await self._query(
            "SELECT g.email, g.uid, p.seq, p.last_active FROM grants g LEFT JOIN people p ON p.email = g.email"
            " WHERE g.app_id = ? AND g.uid = ?", (app_id, uid))
        states = await self._states(app_id, rows)
        return states[0] if states else None

    async def _states(self, app_id: str, rows: list[tuple]) -> list[PersonState]:
        if not rows:
            return []
        emails = [row[0] for row in rows]
        devices: dict[str, list[Device]] = {email: [] for email in emails}
        for start in range(0, len(emails), IN_BATCH):
            part = emails[start:start + IN_BATCH]
            for device in map(_device, await self._query(
                    f"SELECT {DEVICE_COLUMNS} FROM devices WHERE email IN {_in(part)}", tuple(part))):
                devices[device.email].append(device)
        return [PersonState(email, uid, views.view(devices[email], app_id), None if la is None else float(la),
                            int(seq or 0))
                for email, uid, seq, la in rows]
