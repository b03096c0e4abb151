"""Live notifications: an application reaches the people who granted it, on their devices.

Items are validated one by one (one bad item does not reject the others), rate limited per
application, queued in the store (one FIFO queue per person and application, the oldest dropped past
the limit), pushed at once to the person's live devices on this node and, through the change log, on
the others, and sent again on every connect until a device acknowledges them or they expire: at
least once, within the expiry.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

from presence import errors
from presence.batching import Grouped
from presence.errors import PresenceError
from presence.hub import Hub
from presence.metrics import Metrics
from presence.store import App, Notification, Store

MAX_TEXT = 512


class RateLimited(PresenceError):
    def __init__(self, retry_after: float):
        super().__init__(errors.RATE_LIMITED, f"too many notifications; retry in {retry_after:.1f}s")
        self.retry_after = retry_after

    def reply(self) -> dict:
        return {**super().reply(), "retry_after": round(self.retry_after, 3)}


def _item(raw: Any) -> tuple[str, str, str | None] | PresenceError:
    if not isinstance(raw, dict):
        return PresenceError(errors.NOTIFY_MALFORMED, "each notification must be an object")
    uid, message, action = raw.get("uid"), raw.get("message"), raw.get("action")
    if not isinstance(uid, str) or not uid:
        return PresenceError(errors.UNKNOWN_UID, "uid must be the person's id for this application")
    if not isinstance(message, str) or not message or len(message) > MAX_TEXT:
        return PresenceError(errors.BAD_MESSAGE, f"message must be a string of 1 to {MAX_TEXT} characters")
    if action is not None:
        if not isinstance(action, str) or len(action) > MAX_TEXT:
            return PresenceError(errors.BAD_ACTION, f"action must be an http(s) URL of at most {MAX_TEXT} characters")
        try:
            parts = urlsplit(action)
        except ValueError:
            parts = None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return PresenceError(errors.BAD_ACTION, "action must be an http:// or https:// URL")
    return uid, message, action


class Notifier:
    def __init__(self, store: Store, hub: Hub, clock: IReactorTime, node: str, *, limit: int = 100,
                 ttl: float = 300.0, rate: float = 1000.0, burst: int = 2000, max_batch: int = 100,
                 metrics: Metrics | None = None):
        self.store = store
        self.hub = hub
        self.clock = clock
        self.node = node
        self.limit = limit
        self.ttl = ttl
        self.rate = rate
        self.burst = burst
        self.max_batch = max_batch
        self.metrics = metrics or Metrics()
        self._buckets: dict[str, tuple[float, float]] = {}   # app_id -> (tokens, when)
        # Acks and the lookups of devices that connect come in bursts: each is group-committed.
        self._ack = Grouped(self._ack_batch)
        self._waiting = Grouped(self._waiting_batch)

    def admit(self, app_id: str, count: int) -> None:
        """Take ``count`` tokens of the application's bucket, or raise RateLimited saying when."""
        now = self.clock.seconds()
        tokens, when = self._buckets.get(app_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if count > tokens:
            self._buckets[app_id] = (tokens, now)
            raise RateLimited((count - tokens) / self.rate)
        self._buckets[app_id] = (tokens - count, now)

    def parse(self, body: Any) -> list[tuple[str, str, str | None] | PresenceError]:
        """Batch-level problems raise; item-level ones come back in place of the item."""
        if not isinstance(body, list):
            raise PresenceError(errors.NOTIFY_MALFORMED, "send a JSON list of {uid, message, action} objects")
        if len(body) > self.max_batch:
            raise PresenceError(errors.BATCH_TOO_LARGE, f"at most {self.max_batch} notifications per batch")
        return [_item(raw) for raw in body]

    async def send(self, app: App, body: Any) -> list[dict]:
        """Queue and deliver a batch; the reply for each item, in order."""
        items = self.parse(body)
        self.admit(app.app_id, len(items))
        valid = [item for item in items if not isinstance(item, PresenceError)]
        # Queued and logged for the other nodes' devices in one transaction: an error here means
        # nothing was stored, so the application may safely send the batch again.
        queued = await self.store.queue_notifications(app.app_id, valid, self.clock.seconds(), self.limit,
                                                      origin=self.node) if valid else []
        results: list[dict] = []
        delivered: dict[str, list[dict]] = {}
        results_iter = iter(queued)
        for item in items:
            if isinstance(item, PresenceError):
                results.append(item.reply())
                continue
            outcome = next(results_iter)
            if outcome is None:
                results.append(PresenceError(errors.UNKNOWN_UID, "no grant for this uid (never granted, or revoked)")
                               .reply())
                continue
            results.append({"result": "OK", "queue_size": outcome.queue_size})
            delivered.setdefault(outcome.notification.email, []).append(outcome.notification.as_json())
            self.metrics.notifications_queued.inc()
            if outcome.dropped:
                self.metrics.notifications_dropped.inc(outcome.dropped)
        for email, notes in delivered.items():
            self.metrics.notifications_delivered.inc(self.hub.notify(email, notes))
        return results

    async def waiting(self, email: str) -> list[Notification]:
        return await self._waiting(email)

    async def _waiting_batch(self, emails: list[str]) -> list[list[Notification]]:
        found = await self.store.pending_notifications_of(emails, self.clock.seconds() - self.ttl)
        return [found.get(email, []) for email in emails]

    async def ack(self, email: str, ids: Any) -> int:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) \
                or len(ids) > 10_000:
            raise PresenceError(errors.BAD_FIELD, "ids must be a list of notification ids (integers)")
        acked = await self._ack((email, ids))
        self.metrics.notifications_acked.inc(acked)
        return acked

    async def _ack_batch(self, batch: list[tuple[str, list[int]]]) -> list[int]:
        """The acks that arrive while one batch is deleted make up the next, deleted in one
        transaction (each is one write otherwise)."""
        gone = await self.store.ack_notifications_of([(email, i) for email, ids in batch for i in dict.fromkeys(ids)])
        return [sum((email, i) in gone for i in dict.fromkeys(ids)) for email, ids in batch]

    async def expire(self) -> int:
        n = await self.store.expire_notifications(self.clock.seconds() - self.ttl)
        self.metrics.notifications_expired.inc(n)
        return n
