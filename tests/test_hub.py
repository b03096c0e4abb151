"""The node core: several devices per person, grace periods, per-application scopes, start and stop."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from presence import errors
from presence.apps import Applications
from presence.hub import Hub
from presence.streams import Streams
from tests.fakes import ListPeer, eventually

GRACE = 10.0


class World:
    """A hub on a real SQLite store, a Clock for its timers, and application connections as lists."""

    def __init__(self, store):
        self.store = store
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.streams = Streams(store, self.clock, batch_window=0.05)
        self.hub = Hub(store, self.streams, self.clock, "node-a", grace=GRACE)
        self.apps = Applications(store, self.clock)
        self.uids: dict[tuple[str, str], str] = {}

    async def app(self, name: str) -> tuple[str, ListPeer]:
        app = await self.apps.register("dev@example.com", f"{name}.example.com", name, "")
        app = await self.apps.mark_verified(app)
        peer = ListPeer()
        await self.streams.subscribe(app.app_id, peer)
        return app.app_id, peer

    async def grant(self, email: str, app_id: str) -> None:
        self.uids[(email, app_id)] = (await self.apps.grant(email, app_id)).uid

    def received(self, peer: ListPeer) -> list[tuple[str, str]]:
        """Advance past the batch window and return (email, status) pairs sent so far."""
        self.clock.advance(0.05)
        return [(u["email"], u["status"]) for batch in peer.sent for u in batch]


@pytest_twisted.ensureDeferred
async def test_only_granted_applications_hear_a_status(sqlite_store):
    w = World(sqlite_store)
    granted, g_peer = await w.app("granted")
    other, o_peer = await w.app("other")
    await w.grant("alice@example.com", granted)
    phone = w.hub.attach("alice@example.com", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    w.clock.advance(0.05)
    assert g_peer.sent == [[{"email": "alice@example.com", "status": "online",
                             "uid": w.uids[("alice@example.com", granted)], "at": 1_000_000.0}]]
    assert o_peer.sent == []
    assert (await sqlite_store.get_status("alice@example.com")).status == "online"


@pytest_twisted.ensureDeferred
async def test_the_most_available_device_wins(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("a@x.org", app)
    phone = w.hub.attach("a@x.org", "phone", None, ListPeer())
    laptop = w.hub.attach("a@x.org", "laptop", None, ListPeer())
    await w.hub.set_status(phone, "unavailable")
    assert w.received(peer) == [("a@x.org", "unavailable")]
    await w.hub.set_status(laptop, "online")
    await w.hub.set_status(phone, "offline")   # laptop still online: no change
    assert w.received(peer)[1:] == [("a@x.org", "online")]
    await w.hub.set_status(laptop, "offline")
    assert w.received(peer)[2:] == [("a@x.org", "offline")]


@pytest_twisted.ensureDeferred
async def test_a_dropped_device_goes_offline_after_the_grace_period(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("a@x.org", app)
    conn = ListPeer()
    phone = w.hub.attach("a@x.org", "phone", None, conn)
    await w.hub.set_status(phone, "online")
    w.hub.detach(phone, conn)
    w.clock.advance(GRACE - 1)
    assert w.received(peer) == [("a@x.org", "online")]
    w.clock.advance(1)
    await eventually(lambda: w.received(peer) == [("a@x.org", "online"), ("a@x.org", "offline")])
    await eventually(lambda: "a@x.org" not in w.hub.people)
    assert await sqlite_store.list_devices("a@x.org") == []


@pytest_twisted.ensureDeferred
async def test_a_quick_reconnect_causes_no_flap_and_replaces_the_old_connection(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("a@x.org", app)
    first, second = ListPeer(), ListPeer()
    phone = w.hub.attach("a@x.org", "phone", None, first)
    await w.hub.set_status(phone, "online")
    w.hub.detach(phone, first)
    w.clock.advance(GRACE / 2)
    again = w.hub.attach("a@x.org", "phone", None, second)
    assert again is phone and phone.status == "online"
    w.clock.advance(GRACE * 3)
    assert w.received(peer) == [("a@x.org", "online")]
    # a third connection of the same device replaces the live second one
    third = ListPeer()
    w.hub.attach("a@x.org", "phone", None, third)
    assert second.closed[0] == errors.CLOSE_REPLACED
    w.hub.detach(phone, second)   # the replaced connection's late drop changes nothing
    w.clock.advance(GRACE * 3)
    assert phone.connection is third


@pytest_twisted.ensureDeferred
async def test_a_session_scope_limits_which_applications_hear_it(sqlite_store):
    w = World(sqlite_store)
    a, a_peer = await w.app("a")
    b, b_peer = await w.app("b")
    await w.grant("p@x.org", a)
    await w.grant("p@x.org", b)
    only_a = w.hub.attach("p@x.org", "work", frozenset({a}), ListPeer())
    await w.hub.set_status(only_a, "online")
    assert w.received(a_peer) == [("p@x.org", "online")]
    assert w.received(b_peer) == []


@pytest_twisted.ensureDeferred
async def test_a_status_for_listed_applications_only(sqlite_store):
    w = World(sqlite_store)
    a, a_peer = await w.app("a")
    b, b_peer = await w.app("b")
    await w.grant("p@x.org", a)
    await w.grant("p@x.org", b)
    phone = w.hub.attach("p@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    await w.hub.set_status(phone, "unavailable", frozenset({b}))
    assert w.received(a_peer) == [("p@x.org", "online")]
    assert w.received(b_peer) == [("p@x.org", "unavailable")]
    await w.hub.set_status(phone, "offline")   # a change for everyone again
    assert w.received(a_peer)[-1] == ("p@x.org", "offline")
    assert w.received(b_peer)[-1] == ("p@x.org", "offline")


@pytest_twisted.ensureDeferred
async def test_a_revoked_grant_stops_updates_at_once(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    phone = w.hub.attach("p@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    await w.apps.revoke("p@x.org", app)
    await w.hub.set_status(phone, "unavailable")
    assert w.received(peer) == [("p@x.org", "online")]


@pytest_twisted.ensureDeferred
async def test_clean_stop_marks_everyone_offline_and_clears_the_node(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    phone = w.hub.attach("p@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    assert w.received(peer) == [("p@x.org", "online")]
    await w.hub.stop()
    await w.streams.flush()   # sends the gathered batch without waiting for the window
    assert [(u["email"], u["status"]) for batch in peer.sent for u in batch] == [
        ("p@x.org", "online"), ("p@x.org", "offline")]
    assert await sqlite_store.list_devices("p@x.org") == []
    assert (await sqlite_store.get_status("p@x.org")).status == "offline"


@pytest_twisted.ensureDeferred
async def test_start_after_a_crash_marks_the_node_s_devices_offline(sqlite_store):
    w = World(sqlite_store)
    app, _ = await w.app("app")
    await w.grant("p@x.org", app)
    await sqlite_store.set_device("p@x.org", "phone", "node-a", "online", 1.0)
    await sqlite_store.set_device("q@x.org", "phone", "node-b", "online", 1.0)
    await sqlite_store.set_status("p@x.org", "online", 1.0)
    # the application is away: the offline change waits for it
    streams = Streams(sqlite_store, w.clock)
    hub = Hub(sqlite_store, streams, w.clock, "node-a")
    assert await hub.recover() == 1
    await streams.flush()
    waiting = await sqlite_store.take_pending(app, 0)
    assert [(p.email, p.status) for p in waiting] == [("p@x.org", "offline")]
    assert [d.node for d in await sqlite_store.list_devices("q@x.org")] == ["node-b"]
