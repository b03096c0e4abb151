"""Live notifications in the store: each person's FIFO queue per application, acknowledgements,
expiry. A mixin of SQLStore (see presence/store/sql.py for the primitives).

Queueing a batch is one transaction that also logs it for the other nodes' devices, with a token:
when the connection is lost at the very commit, the node reads the log for that token once the
database is back and answers the application truthfully (stored, or not stored: send again),
instead of an errno 50 after which a retry could store the batch twice.
"""

from __future__ import annotations

import secrets

from twisted.internet.task import deferLater

from presence import changelog
from presence.store.base import CommitUnknown, Notification, Queued, StoreUnavailable
from presence.store.rows import IN_BATCH, _in

# Looks for the log entry after a lost commit: 0.1 s doubling to 2 s, about 15 s in all.
SETTLE_TRIES = 10


def _answers(extra: dict) -> list[Queued | None]:
    """The per-item results a logged batch carries (``results``: [email, id, queue size, dropped])."""
    by_id = {n["id"]: (email, n) for email, notes in extra.get("notify", {}).items() for n in notes}
    out: list[Queued | None] = []
    for answer in extra.get("results", []):
        if answer is None:
            out.append(None)
            continue
        email, id, size, dropped = answer
        n = by_id[id][1]
        out.append(Queued(Notification(id, email, n["appid"], n["app"], n["domain"], n["message"], n["action"], n["at"]),
                          size, dropped))
    return out


class NotificationQueries:
    #: The clock the settling waits on (the store's reactor; a test's Clock).
    settle_clock = None

    async def queue_notifications(self, app_id: str, items, now: float, limit: int,
                                  origin: str | None = None) -> list[Queued | None]:
        # A token in the log entry: if the connection is lost at the commit, the entry tells
        # whether the batch was stored (an application must not be told to send it again if it was).
        token = secrets.token_hex(8) if origin is not None else None
        try:
            return await self._transaction(self._queue_notifications(app_id, items, now, limit, origin, token))
        except CommitUnknown:
            if token is None:
                raise
            return await self._settle_notifications(origin, now, token)

    def _queue_notifications(self, app_id: str, items, now: float, limit: int, origin: str | None,
                             token: str | None):
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
            if origin is not None:
                # Logged in the same transaction: stored and announced to the other nodes' devices
                # together, or neither (an error then means nothing was stored).
                delivered: dict[str, list[dict]] = {}
                for queued in results:
                    if queued is not None:
                        delivered.setdefault(queued.notification.email, []).append(queued.notification.as_json())
                answers = [None if q is None else [q.notification.email, q.notification.id, q.queue_size, q.dropped]
                           for q in results]
                yield from self._log(origin, now, changelog.encode(
                    [], extras=[{"notify": delivered, "token": token, "results": answers}]))
            return results

        return interaction()

    async def _settle_notifications(self, origin: str, now: float, token: str) -> list[Queued | None]:
        """After a commit whose answer was lost: wait for the database (a few seconds at most), then
        answer from the log entry the transaction would have written. No entry: nothing was stored,
        so StoreUnavailable (sending again is then safe); no database: CommitUnknown."""
        delay = 0.1
        for _ in range(SETTLE_TRIES):
            await deferLater(self.settle_clock, delay, lambda: None)
            delay = min(delay * 2, 2.0)
            try:
                rows = await self._query("SELECT payload FROM changes WHERE origin = ? AND at BETWEEN ? AND ?",
                                         (origin, now - 0.001, now + 0.001))
            except StoreUnavailable:
                continue
            for (payload,) in rows:
                for extra in changelog.decode(payload)[2]:
                    if extra.get("token") == token:
                        return _answers(extra)
            raise StoreUnavailable("the database went away while the notifications were stored, and they were not:"
                                   " nothing was stored; send them again")
        raise CommitUnknown("the database went away while the notifications were stored, and did not come back:"
                            " whether they were stored is unknown")

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

