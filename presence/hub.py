"""The node core: people, their devices, and which applications hear about their status.

A person's status, as one application sees it, is the most available status among the person's live
devices whose sessions include that application. Every change of that view is published to the
application through ``Streams``. Nothing here knows about websockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from twisted.internet.defer import DeferredLock, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from presence import errors
from presence.status import OFFLINE, most_available
from presence.store import Grant, Store, StoreUnavailable
from presence.streams import Streams, Update

log = Logger()


class DeviceConnection(Protocol):
    def close(self, code: int, reason: str) -> None: ...


@dataclass(eq=False)
class Device:
    email: str
    device: str
    scope: frozenset[str] | None = None      # application ids this session speaks to; None = all granted
    status: str = OFFLINE                    # what it said last, for every application in scope
    overrides: dict[str, str] = field(default_factory=dict)  # per-application statuses of a targeted change
    connection: DeviceConnection | None = None
    grace: IDelayedCall | None = None

    def visible_to(self, app_id: str) -> bool:
        return self.scope is None or app_id in self.scope

    def status_for(self, app_id: str) -> str:
        return self.overrides.get(app_id, self.status)


@dataclass(eq=False)
class Person:
    email: str
    devices: dict[str, Device] = field(default_factory=dict)
    lock: DeferredLock = field(default_factory=DeferredLock)

    def view(self, app_id: str) -> str:
        return most_available(d.status_for(app_id) for d in self.devices.values() if d.visible_to(app_id))

    def overall(self) -> str:
        return most_available(d.status for d in self.devices.values())


class Hub:
    def __init__(self, store: Store, streams: Streams, clock: IReactorTime, node: str, grace: float = 10.0,
                 retry_delay: float = 5.0):
        self.store = store
        self.streams = streams
        self.clock = clock
        self.node = node
        self.grace = grace
        self.retry_delay = retry_delay
        self.people: dict[str, Person] = {}

    # -- devices ----------------------------------------------------------------------------------
    def attach(self, email: str, device_id: str, scope: frozenset[str] | None,
               connection: DeviceConnection) -> Device:
        """A device proved its owner's email. The same device connecting again replaces its older
        connection and keeps its status, so a quick reconnect causes no flap."""
        person = self.people.get(email)
        if person is None:
            person = self.people[email] = Person(email)
        device = person.devices.get(device_id)
        if device is None:
            device = person.devices[device_id] = Device(email, device_id)
        else:
            if device.grace is not None and device.grace.active():
                device.grace.cancel()
            device.grace = None
            old = device.connection
            if old is not None and old is not connection:
                old.close(errors.CLOSE_REPLACED, "replaced by a newer connection of the same device")
        device.connection = connection
        device.scope = scope
        return device

    async def set_status(self, device: Device, status: str, app_ids: frozenset[str] | None = None) -> None:
        """Apply a status the device reported; ``app_ids`` limits this one change to those applications."""

        def change(person: Person) -> list[Device]:
            if app_ids is None:
                device.status = status
                device.overrides.clear()
            else:
                for app_id in app_ids:
                    if device.visible_to(app_id):
                        device.overrides[app_id] = status
            return []

        await self._change(device.email, change, device)

    def detach(self, device: Device, connection: DeviceConnection) -> None:
        """The connection dropped: the device counts as it was for ``grace`` seconds, then goes offline."""
        if device.connection is not connection:
            return  # already replaced by a newer connection
        device.connection = None
        device.grace = self.clock.callLater(self.grace, self._expire, device)

    def _expire(self, device: Device) -> None:
        device.grace = None

        async def remove() -> None:
            try:
                await self._change(device.email, lambda person: self._forget(person, device), None)
            except StoreUnavailable as e:
                log.warn("could not mark {email}'s device offline ({why}); retrying in {delay}s",
                         email=device.email, why=e, delay=self.retry_delay)
                device.grace = self.clock.callLater(self.retry_delay, self._expire, device)

        ensureDeferred(remove()).addErrback(lambda f: log.failure("marking a device offline failed", f))

    @staticmethod
    def _forget(person: Person, device: Device) -> list[Device]:
        if person.devices.get(device.device) is device and device.connection is None:
            del person.devices[device.device]
            return [device]
        return []

    @staticmethod
    def _forget_all(person: Person) -> list[Device]:
        gone = list(person.devices.values())
        person.devices.clear()
        return gone

    # -- the one place a change happens ------------------------------------------------------------
    async def _change(self, email: str, change: Callable[[Person], list[Device]], device: Device | None) -> None:
        """Apply ``change`` (which returns the devices it removed) and publish what it changed for
        every application the person granted; then record it."""
        person = self.people.get(email)
        if person is None:
            return
        async with person.lock:
            grants: list[Grant] = await self.store.list_grants(email=email)
            before = [person.view(g.app_id) for g in grants]
            overall_before = person.overall()
            removed = change(person)
            now = self.clock.seconds()
            for grant, old in zip(grants, before):
                new = person.view(grant.app_id)
                if new != old:
                    self.streams.publish(grant.app_id, Update(email, grant.uid, new, now))
            if device is not None:
                await self.store.set_device(email, device.device, self.node, device.status, now)
            for gone in removed:
                await self.store.remove_device(email, gone.device)
            overall = person.overall()
            if overall != overall_before:
                await self.store.set_status(email, overall, now)
        if not person.devices and not person.lock.locked and self.people.get(email) is person:
            del self.people[email]

    # -- start and stop -----------------------------------------------------------------------------
    async def recover(self) -> int:
        """At start: devices this node had when it last stopped without cleaning up are offline now."""
        rows = await self.store.take_node_devices(self.node)
        emails = sorted({row.email for row in rows})
        now = self.clock.seconds()
        for email in emails:
            current = await self.store.get_status(email)
            if current is not None and current.status == OFFLINE:
                continue
            for grant in await self.store.list_grants(email=email):
                self.streams.publish(grant.app_id, Update(email, grant.uid, OFFLINE, now))
            await self.store.set_status(email, OFFLINE, now)
        return len(emails)

    async def stop(self) -> None:
        """Clean stop: every device of this node goes offline now, and applications hear it."""
        for person in list(self.people.values()):
            for device in list(person.devices.values()):
                if device.grace is not None and device.grace.active():
                    device.grace.cancel()
                device.grace = None
                device.connection = None
            try:
                await self._change(person.email, self._forget_all, None)
            except StoreUnavailable as e:
                log.error("could not mark {email} offline while stopping: {why}", email=person.email, why=e)
        try:
            await self.store.take_node_devices(self.node)
        except StoreUnavailable as e:
            log.error("could not clear this node's devices while stopping: {why}", why=e)
