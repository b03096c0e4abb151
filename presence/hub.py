"""The node core: the devices connected to this node and every change of a person's status.

The store holds each person's devices (on every node) and is the truth about their status; a change
runs as one store transaction (``Store.change_person``) that also says which applications' view of
the person changed. The hub keeps only what is local: which connection is which device, and the grace
timers of dropped ones. Nothing here knows about websockets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from presence import changelog, errors
from presence.batching import Grouped
from presence.keys import new_id
from presence.status import OFFLINE
from presence.store import Device, LoggedChange, NodeFenced, PersonChange, Store, StoreUnavailable
from presence.streams import Streams
from presence.views import visible_to

log = Logger()

PAGE_DEVICE = "web"
REVOKED_FOR = 600.0      # seconds a revoked pairing is remembered here (far longer than a connect takes)
REVOKED_KEPT = 10_000


class DeviceConnection(Protocol):
    def close(self, code: int, reason: str) -> None: ...

    def notify(self, notifications: list[dict]) -> None: ...


@dataclass(eq=False, slots=True)
class Link:
    """This node's connection of one device (live, or dropped and in its grace period)."""

    email: str
    device: str
    session: str
    connection: DeviceConnection | None
    grace: IDelayedCall | None = None
    retries: int = 0         # failed offline writes in a row (the next waits longer)
    replaced: str = ""       # the session of the link this one replaced here, while its row may remain

    def cancel_grace(self) -> None:
        if self.grace is not None and self.grace.active():
            self.grace.cancel()
        self.grace = None


class Hub:
    def __init__(self, store: Store, streams: Streams, clock: IReactorTime, node: str, grace: float = 10.0,
                 retry_delay: float = 5.0, fence: bool = False):
        self.store = store
        # Write only while this node's incarnation is registered (a node sets it; tests of the hub
        # alone need no registry). A fenced write calls on_fenced: the node rejoins.
        self.fence = fence
        self.on_fenced: Callable[[], None] = lambda: None
        self.streams = streams
        self.clock = clock
        self.node = node
        self.grace = grace
        self.retry_delay = retry_delay
        self.links: dict[tuple[str, str], Link] = {}
        self.by_email: dict[str, dict[str, Link]] = {}   # the same links, found by person
        self._changes = Grouped(self._commit, max_batch=500)
        # Pairings revoked lately (id -> when): a connect that checked its pairing just before the
        # revocation reached this node is refused when it attaches, not left open.
        self.revoked: dict[str, float] = {}
        # The pairing of each paired device's link here (presence.pairing), kept beside the links
        # so that the many devices that are not paired pay nothing for it.
        self.pairings: dict[tuple[str, str], str] = {}

    # -- devices ----------------------------------------------------------------------------------
    async def attach(self, email: str, device_id: str, scope: frozenset[str] | None,
                     connection: DeviceConnection, pairing: str = "") -> Link:
        """A device proved its owner's email. The same device connecting again (here or on another
        node) replaces its older connection and keeps its status, so a quick reconnect causes no flap.
        A paired device's pairing was checked in the store before; one revoked since is refused here."""
        if pairing and pairing in self.revoked:
            raise errors.PresenceError(errors.PAIRING_REVOKED, "this device's pairing was revoked; pair it again",
                                       errors.CLOSE_AUTH_FAILED)
        key = (email, device_id)
        old = self.links.get(key)
        if old is not None:
            old.cancel_grace()
            if old.connection is not None and old.connection is not connection:
                old.connection.close(errors.CLOSE_REPLACED, "replaced by a newer connection of the same device")
        link = self.links[key] = Link(email, device_id, new_id(), connection)
        if pairing:
            self.pairings[key] = pairing
        elif self.pairings:
            self.pairings.pop(key, None)
        if old is not None:
            link.replaced = old.session     # until this connect is written, the row may still be the old one's
        self.by_email.setdefault(email, {})[device_id] = link
        now = self.clock.seconds()

        def take(devices: dict[str, Device]) -> dict | None:
            previous = devices.get(device_id)
            devices[device_id] = Device(
                email, device_id, self.node, previous.status if previous else OFFLINE, now, link.session, scope,
                previous.overrides if previous else {})
            if previous is not None and previous.node not in ("", self.node):
                return {"takeover": [email, device_id, link.session]}  # tell the node that had it
            return None

        try:
            await self._change(email, take)
            link.replaced = ""
        except BaseException:
            # Answered errno 50 and going; the write may still have committed (its answer lost):
            # it ends like a dropped connection, so a row that did commit is cleared after grace.
            self.detach(link, connection)
            raise
        return link

    async def set_status(self, link: Link, status: str, app_ids: frozenset[str] | None = None) -> None:
        """Apply a status the device reported; ``app_ids`` limits this one change to those applications."""
        now = self.clock.seconds()
        taken_over = []

        def report(devices: dict[str, Device]) -> None:
            device = devices.get(link.device)
            if device is None or device.session != link.session:
                taken_over.append(True)
                return
            if app_ids is None:
                # positional, not dataclasses.replace: this runs for every status change
                devices[link.device] = Device(device.email, device.device, device.node, status, now, device.session,
                                              device.scope, {})
            else:
                overrides = dict(device.overrides)
                overrides.update({a: status for a in app_ids if visible_to(device, a)})
                devices[link.device] = dataclasses.replace(device, overrides=overrides, last_seen=now)

        await self._change(link.email, report)
        if taken_over:
            self._forget(link)
            raise errors.PresenceError(errors.NOT_CONNECTED, "this device connected again elsewhere",
                                       errors.CLOSE_REPLACED)

    async def set_page_status(self, email: str, status: str) -> None:
        """The person's own page: a device called "web" that needs no connection and keeps its status
        until the person changes it there (no node owns it, so no node's stop clears it)."""
        now = self.clock.seconds()

        def put(devices: dict[str, Device]) -> None:
            devices[PAGE_DEVICE] = Device(email, PAGE_DEVICE, "", status, now, "page")

        await self._change(email, put)

    async def revoke_pairing(self, email: str, pairing: str) -> Any:
        """Revoke the person's paired device: its row goes and its connection closes on every node,
        both in one transaction (the log entry that closes it elsewhere); None if it was not theirs."""
        device = await self.store.revoke_paired_device(
            email, pairing, self.node, self.clock.seconds(),
            changelog.encode([], extras=[{"close_pairing": [email, pairing]}]))
        if device is not None:
            self._close_pairing(email, pairing)
        return device

    def _close_pairing(self, email: str, pairing: str) -> None:
        now = self.clock.seconds()
        self.revoked[pairing] = now
        while self.revoked and (len(self.revoked) > REVOKED_KEPT or next(iter(self.revoked.values())) < now - REVOKED_FOR):
            del self.revoked[next(iter(self.revoked))]
        for link in list(self.by_email.get(email, {}).values()):
            if self.pairings.get((email, link.device)) == pairing and link.connection is not None:
                link.connection.close(errors.CLOSE_DEVICE_REVOKED, "this device was revoked on /me")

    def detach(self, link: Link, connection: DeviceConnection) -> None:
        """The connection dropped: the device counts as it was for ``grace`` seconds, then goes offline."""
        if link.connection is not connection or self.links.get((link.email, link.device)) is not link:
            return  # already replaced by a newer connection
        link.connection = None
        link.grace = self.clock.callLater(self.grace, self._expire, link)
        pairing = self.pairings.get((link.email, link.device))
        if pairing:   # when it was last seen, for /me (a failure only leaves it older)
            ensureDeferred(self.store.touch_paired_device(pairing, link.email, self.clock.seconds())) \
                .addErrback(lambda f: None)

    def _expire(self, link: Link) -> None:
        link.grace = None

        async def remove() -> None:
            try:
                await self._change(link.email, lambda devices: _drop(devices, link))
            except StoreUnavailable as e:
                # Soon, then less often: a database back after a restart gets the write within a
                # moment (the person must not look online with no device for long), and the
                # retries of many devices fall together, so the group commit makes them one.
                delay = min(self.retry_delay, 0.25 * 2 ** link.retries)
                link.retries += 1
                log.warn("could not mark {email}'s device offline ({why}); retrying in {delay}s",
                         email=link.email, why=e, delay=delay, event="device.offline_retry")
                if self.links.get((link.email, link.device)) is link:
                    link.grace = self.clock.callLater(delay, self._expire, link)
                return
            self._forget(link)

        ensureDeferred(remove()).addErrback(lambda f: log.failure("marking a device offline failed", f,
                                                                  event="device.offline_failed"))

    def _forget(self, link: Link) -> None:
        link.cancel_grace()
        if self.links.get((link.email, link.device)) is link:
            del self.links[(link.email, link.device)]
            devices = self.by_email[link.email]
            del devices[link.device]
            if not devices:
                del self.by_email[link.email]
            if self.pairings:
                self.pairings.pop((link.email, link.device), None)

    def notify(self, email: str, notifications: list[dict]) -> int:
        """Push live notifications to the person's devices connected here; returns how many got them."""
        sent = 0
        for link in self.by_email.get(email, {}).values():
            if link.connection is not None:
                link.connection.notify(notifications)
                sent += 1
        return sent

    # -- the one place a change happens ------------------------------------------------------------
    def _change(self, email: str, mutate: Callable[[dict[str, Device]], None],
                extra: dict[str, Any] | None = None) -> Deferred:
        """Queue a change of one person; it runs in the next batch, which hands what it changed to
        the local streams. One batch runs at a time, in arrival order, so this node's changes of a
        person keep their order (the store orders nodes)."""
        return self._changes((email, mutate, extra))

    async def _commit(self, batch: list[tuple[str, Callable, dict | None]]) -> list[Any]:
        """Group commit (presence.batching): the changes that arrive while a batch runs make up the
        next one; all of a batch's updates reach the streams before any caller resumes."""
        try:
            changes = await self.store.change_people(batch, self.node, self.clock.seconds(),
                                                     held=self.streams.channels, fence=self.fence)
        except NodeFenced:
            self.on_fenced()
            raise
        self.publish(changes)
        return changes

    def publish(self, changes: list[PersonChange]) -> None:
        for change in changes:
            self.streams.publish(change.updates, change.queued)

    # -- changes made by other nodes ----------------------------------------------------------------
    def apply(self, logged: LoggedChange) -> None:
        """A change from the log: deliver its updates here; close a device taken over elsewhere.

        This node's own changes too: one whose commit it saw fail (the connection dropped after the
        server had committed) was never published here, and the streams drop what they already sent
        (the same number). Their extras were done when they were made."""
        updates, queued, extras = changelog.decode(logged.payload, logged.seq)
        self.streams.publish(updates, queued)
        if logged.origin == self.node:
            return
        for extra in extras:
            for email, notes in extra.get("notify", {}).items():
                self.notify(email, notes)
            if "close_app" in extra:
                self.streams.close_app(*extra["close_app"])
            if "close_pairing" in extra:
                self._close_pairing(*extra["close_pairing"])
            takeover = extra.get("takeover")
            if takeover:
                email, device_id, session = takeover
                link = self.links.get((email, device_id))
                if link is not None and link.session != session:
                    self._forget(link)
                    if link.connection is not None:
                        link.connection.close(errors.CLOSE_REPLACED, "replaced by a newer connection of the same device")

    # -- start, stop, and other nodes' leftovers ------------------------------------------------------
    async def clear_node(self, node: str) -> int:
        """Every device recorded on ``node`` goes offline now (this node at start after a crash, or
        at a clean stop; a dead node, from a survivor). Returns how many people it touched."""
        emails = await self.store.emails_on_node(node)
        for email in emails:
            await self._change(email, lambda devices: _drop_node(devices, node))
        return len(emails)

    def drop_all(self) -> None:
        """Close every device connection (they reconnect and state their status again): this node was
        taken for dead, so its records of them are gone."""
        for link in list(self.links.values()):
            self._forget(link)
            if link.connection is not None:
                link.connection.close(errors.CLOSE_GOING_AWAY, "node out of sync; reconnect")

    async def stop(self) -> None:
        """Clean stop: every device of this node goes offline now, and applications hear it."""
        for link in list(self.links.values()):
            link.cancel_grace()
            link.connection = None
        self.links.clear()
        self.by_email.clear()
        self.pairings.clear()
        try:
            await self.clear_node(self.node)
        except StoreUnavailable as e:
            log.error("could not mark this node's devices offline while stopping: {why}", why=e,
                      event="hub.stop_failed")


def _drop(devices: dict[str, Device], link: Link) -> None:
    device = devices.get(link.device)
    if device is not None and (device.session == link.session or (link.replaced and device.session == link.replaced)):
        del devices[link.device]


def _drop_node(devices: dict[str, Device], node: str) -> None:
    for device_id in [d for d, device in devices.items() if device.node == node]:
        del devices[device_id]
