"""The node core: several devices per person, grace periods, per-application scopes, start and stop,
and devices moving between nodes (two hubs on one real store)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from presence import errors
from presence.apps import Applications
from presence.errors import PresenceError
from presence.hub import Hub
from presence.streams import Streams
from tests.fakes import ListPeer, eventually

GRACE = 10.0


class World:
    """Hubs on one real SQLite store, a Clock for their timers, application connections as lists."""

    def __init__(self, store):
        self.store = store
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.streams = Streams(store, self.clock, node="node-a", batch_window=0.05)
        self.hub = Hub(store, self.streams, self.clock, "node-a", grace=GRACE)
        self.apps = Applications(store, self.clock)
        self.uids: dict[tuple[str, str], str] = {}

    def other_node(self, name: str = "node-b") -> Hub:
        return Hub(self.store, Streams(self.store, self.clock, node=name), self.clock, name, grace=GRACE)

    async def app(self, name: str, connect: bool = True) -> tuple[str, ListPeer]:
        app = await self.apps.register("dev@example.com", f"{name}.example.com", name, "")
        app = await self.apps.mark_verified(app)
        peer = ListPeer()
        if connect:
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
    phone = await w.hub.attach("alice@example.com", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    w.clock.advance(0.05)
    assert g_peer.sent == [[{"email": "alice@example.com", "status": "online",
                             "uid": w.uids[("alice@example.com", granted)], "at": 1_000_000.0,
                             "seq": await sqlite_store.last_change(), "last_active": 1_000_000.0}]]
    assert o_peer.sent == []
    assert (await sqlite_store.get_status("alice@example.com")).status == "online"


@pytest_twisted.ensureDeferred
async def test_the_most_available_device_wins(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("a@x.org", app)
    phone = await w.hub.attach("a@x.org", "phone", None, ListPeer())
    laptop = await w.hub.attach("a@x.org", "laptop", None, ListPeer())
    await w.hub.set_status(phone, "unavailable")
    assert w.received(peer) == [("a@x.org", "unavailable")]
    await w.hub.set_status(laptop, "online")
    await w.hub.set_status(phone, "offline")   # laptop still online: no change
    assert w.received(peer)[1:] == [("a@x.org", "online")]
    await w.hub.set_status(laptop, "offline")
    assert w.received(peer)[2:] == [("a@x.org", "offline")]


@pytest_twisted.ensureDeferred
async def test_a_change_for_an_absent_application_waits_in_the_store(sqlite_store):
    w = World(sqlite_store)
    app, _ = await w.app("away", connect=False)
    await w.grant("a@x.org", app)
    phone = await w.hub.attach("a@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    await w.hub.set_status(phone, "unavailable")
    waiting = await sqlite_store.take_pending(app, 0)
    assert [(p.email, p.status, p.uid) for p in waiting] == [("a@x.org", "unavailable", w.uids[("a@x.org", app)])]


@pytest_twisted.ensureDeferred
async def test_a_dropped_device_goes_offline_after_the_grace_period(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("a@x.org", app)
    conn = ListPeer()
    phone = await w.hub.attach("a@x.org", "phone", None, conn)
    await w.hub.set_status(phone, "online")
    w.hub.detach(phone, conn)
    w.clock.advance(GRACE - 1)
    assert w.received(peer) == [("a@x.org", "online")]
    w.clock.advance(1)
    await eventually(lambda: w.received(peer) == [("a@x.org", "online"), ("a@x.org", "offline")])
    await eventually(lambda: not w.hub.links)
    assert await sqlite_store.list_devices("a@x.org") == []
    assert (await sqlite_store.get_status("a@x.org")).status == "offline"


@pytest_twisted.ensureDeferred
async def test_a_quick_reconnect_causes_no_flap_and_replaces_the_old_connection(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("a@x.org", app)
    first, second, third = ListPeer(), ListPeer(), ListPeer()
    phone = await w.hub.attach("a@x.org", "phone", None, first)
    await w.hub.set_status(phone, "online")
    w.hub.detach(phone, first)
    w.clock.advance(GRACE / 2)
    again = await w.hub.attach("a@x.org", "phone", None, second)
    w.clock.advance(GRACE * 3)
    assert w.received(peer) == [("a@x.org", "online")]
    assert [d.status for d in await sqlite_store.list_devices("a@x.org")] == ["online"]
    # a third connection of the same device replaces the live second one
    await w.hub.attach("a@x.org", "phone", None, third)
    assert second.closed[0] == errors.CLOSE_REPLACED
    w.hub.detach(again, second)   # the replaced connection's late drop changes nothing
    w.clock.advance(GRACE * 3)
    assert w.received(peer) == [("a@x.org", "online")]
    with pytest.raises(PresenceError):
        await w.hub.set_status(again, "offline")   # the old session may no longer speak


@pytest_twisted.ensureDeferred
async def test_a_session_scope_limits_which_applications_hear_it(sqlite_store):
    w = World(sqlite_store)
    a, a_peer = await w.app("a")
    b, b_peer = await w.app("b")
    await w.grant("p@x.org", a)
    await w.grant("p@x.org", b)
    only_a = await w.hub.attach("p@x.org", "work", frozenset({a}), ListPeer())
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
    phone = await w.hub.attach("p@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    await w.hub.set_status(phone, "unavailable", frozenset({b}))
    assert w.received(a_peer) == [("p@x.org", "online")]
    assert w.received(b_peer) == [("p@x.org", "online"), ("p@x.org", "unavailable")]   # every transition
    await w.hub.set_status(phone, "offline")   # a change for everyone again
    assert w.received(a_peer)[-1] == ("p@x.org", "offline")
    assert w.received(b_peer)[-1] == ("p@x.org", "offline")


@pytest_twisted.ensureDeferred
async def test_a_revoked_grant_stops_updates_at_once(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    phone = await w.hub.attach("p@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    await w.apps.revoke("p@x.org", app)
    await w.hub.set_status(phone, "unavailable")
    assert w.received(peer) == [("p@x.org", "online")]


@pytest_twisted.ensureDeferred
async def test_clean_stop_marks_everyone_offline_and_clears_the_node(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    phone = await w.hub.attach("p@x.org", "phone", None, ListPeer())
    await w.hub.set_status(phone, "online")
    assert w.received(peer) == [("p@x.org", "online")]
    await w.hub.stop()
    await w.streams.flush()   # sends the gathered batch without waiting for the window
    assert [(u["email"], u["status"]) for batch in peer.sent for u in batch] == [
        ("p@x.org", "online"), ("p@x.org", "offline")]
    assert await sqlite_store.list_devices("p@x.org") == []
    assert (await sqlite_store.get_status("p@x.org")).status == "offline"


@pytest_twisted.ensureDeferred
async def test_clearing_a_node_touches_only_its_devices(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    b = w.other_node()
    on_b = await b.attach("p@x.org", "laptop", None, ListPeer())
    on_a = await w.hub.attach("p@x.org", "phone", None, ListPeer())
    await b.set_status(on_b, "unavailable")
    await w.hub.set_status(on_a, "online")
    # node-a crashed; at its next start it clears what it left
    assert await w.other_node("node-a").clear_node("node-a") == 1
    assert [(d.device, d.node) for d in await sqlite_store.list_devices("p@x.org")] == [("laptop", "node-b")]
    assert (await sqlite_store.get_status("p@x.org")).status == "unavailable"


@pytest_twisted.ensureDeferred
async def test_a_device_taken_over_by_another_node_is_closed_here(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    here = ListPeer()
    phone = await w.hub.attach("p@x.org", "phone", None, here)
    await w.hub.set_status(phone, "online")
    seen = await sqlite_store.last_change()
    b = w.other_node()
    await b.attach("p@x.org", "phone", None, ListPeer())
    for change in await sqlite_store.changes_since(seen):
        w.hub.apply(change)   # what node-a's change feed does
    assert here.closed[0] == errors.CLOSE_REPLACED
    assert not w.hub.links
    devices = await sqlite_store.list_devices("p@x.org")
    assert [(d.node, d.status) for d in devices] == [("node-b", "online")]   # no flap
    assert w.received(peer) == [("p@x.org", "online")]


@pytest_twisted.ensureDeferred
async def test_the_person_s_page_counts_as_a_device_that_outlives_node_stops(sqlite_store):
    w = World(sqlite_store)
    app, peer = await w.app("app")
    await w.grant("p@x.org", app)
    await w.hub.set_page_status("p@x.org", "unavailable")
    phone = await w.hub.attach("p@x.org", "phone", None, ListPeer())
    assert w.received(peer) == [("p@x.org", "unavailable")]
    await w.hub.set_status(phone, "online")
    assert w.received(peer)[1:] == [("p@x.org", "online")]
    await w.hub.stop()
    await w.streams.flush()
    assert w.received(peer)[2:] == [("p@x.org", "unavailable")]
    assert [d.device for d in await sqlite_store.list_devices("p@x.org")] == ["web"]


@pytest_twisted.ensureDeferred
async def test_closing_an_application_reaches_its_streams_on_other_nodes(sqlite_store):
    from presence.apps import DEACTIVATED

    w = World(sqlite_store)
    app, peer = await w.app("app")
    active, _ = await w.apps.activate(await sqlite_store.get_app(app))
    seen = await sqlite_store.last_change()
    # deactivated by node b (its pages): the closing is logged with the deactivation, for every node
    await Applications(sqlite_store, w.clock, origin="node-b").deactivate(active)
    for change in await sqlite_store.changes_since(seen):
        w.hub.apply(change)
    assert peer.closed == (errors.CLOSE_REVOKED, DEACTIVATED)


@pytest_twisted.ensureDeferred
async def test_changes_arriving_together_are_committed_together_in_order(sqlite_store):
    from twisted.internet.defer import ensureDeferred, gatherResults

    w = World(sqlite_store)
    app, peer = await w.app("app")
    links = []
    for i in range(50):
        await w.grant(f"p{i}@x.org", app)
        links.append(await w.hub.attach(f"p{i}@x.org", "phone", None, ListPeer()))
    seen = await sqlite_store.last_change()
    first = links[0]
    await gatherResults([ensureDeferred(w.hub.set_status(link, "online")) for link in links]
                        + [ensureDeferred(w.hub.set_status(first, s)) for s in ("unavailable", "offline")])
    logged = await sqlite_store.changes_since(seen)
    assert 1 < len(logged) < 10          # the first alone, the rest grouped
    assert (await sqlite_store.get_status("p0@x.org")).status == "offline"   # arrival order kept
    assert (await sqlite_store.get_status("p49@x.org")).status == "online"
    got = w.received(peer)
    assert len(got) == 52 and ("p1@x.org", "online") in got
    assert [s for e, s in got if e == "p0@x.org"] == ["online", "unavailable", "offline"]   # each, in order
