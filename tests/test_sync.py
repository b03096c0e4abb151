"""Catching an application up (presence/sync.py) on both stores for real: resuming after a socket that
vanished, the state on connect, and the switch to live changes while changes keep coming."""

from __future__ import annotations

import random

import pytest_twisted
from twisted.internet.task import Clock

from presence import errors
from presence.apps import Applications
from presence.hub import Hub
from presence.streams import Streams
from presence.sync import Syncer, state_messages
from presence.store.base import PersonState
from tests.fakes import ListPeer


class World:
    """One node's core on a real store, a Clock, application connections as lists. ``during`` runs
    before every page a catch-up reads: changes keep coming while it runs."""

    def __init__(self, store, page: int = 3, slow_limit: int = 10_000):
        self.store = store
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.streams = Streams(store, self.clock, node="n1", batch_window=0.0, slow_limit=slow_limit)
        self.hub = Hub(store, self.streams, self.clock, "n1")
        self.syncer = Syncer(_Interleaved(store, self), self.streams, self.clock, page=page)
        self.apps = Applications(store, self.clock)
        self.during: list[tuple[str, str]] = []
        self.reads = 0

    async def app(self, people: list[str]) -> str:
        app = await self.apps.register("dev@example.com", "example.com", "App", "")
        app = await self.apps.mark_verified(app)
        for email in people:
            await self.apps.grant(email, app.app_id)
        return app.app_id

    async def change(self, email: str, status: str) -> None:
        self.clock.advance(0.001)
        await self.hub.set_page_status(email, status)
        self.clock.advance(0)      # the fan-out runs

    async def between_pages(self) -> None:
        self.reads += 1
        if self.during:
            await self.change(*self.during.pop(0))


class _Interleaved:
    """The real store, with a change made before each page a catch-up reads."""

    def __init__(self, store, world: World):
        self._store, self._world = store, world

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def changes_since(self, seq, limit=1000):
        await self._world.between_pages()
        return await self._store.changes_since(seq, limit)

    async def people_page(self, app_id, after="", limit=1000):
        await self._world.between_pages()
        return await self._store.people_page(app_id, after, limit)


class Model:
    """What an application makes of its messages, checking as it goes that for one person the numbers
    only grow and that no change comes twice."""

    def __init__(self):
        self.status: dict[str, str] = {}
        self.seq: dict[str, int] = {}
        self.transitions: list[tuple[str, str, int]] = []
        self.kinds: list[str] = []
        self.synced: int | None = None
        self.live_after_synced: list[tuple[str, str, int]] = []

    def read(self, messages: list) -> "Model":
        for m in messages:
            if isinstance(m, list):
                self.kinds.append("updates")
                for u in m:
                    self._apply(u)
                    self.transitions.append((u["email"], u["status"], u["seq"]))
                    if self.synced is not None:
                        self.live_after_synced.append((u["email"], u["status"], u["seq"]))
            elif m.get("type") == "state":
                self.kinds.append("state")
                for p in m["people"]:
                    self._apply(p)
            else:
                self.kinds.append(m["type"])
                if m["type"] == "synced":
                    self.synced = m["seq"]
        return self

    def _apply(self, item: dict) -> None:
        email = item["email"]
        assert item["seq"] > self.seq.get(email, -1), f"{email}: {item['seq']} after {self.seq.get(email)}"
        self.seq[email] = item["seq"]
        self.status[email] = item["status"]


async def truth(store, app_id: str) -> dict[str, str]:
    out, after = {}, ""
    while page := await store.people_page(app_id, after, 1000):
        out.update((p.email, p.status) for p in page)
        after = page[-1].email
    return out


@pytest_twisted.ensureDeferred
async def test_a_resume_after_a_vanished_socket_replays_every_missed_transition_once_in_order(store):
    w = World(store, page=2)
    people = ["a@x", "b@x", "c@x"]
    app_id = await w.app(people)
    first = ListPeer()
    sub = await w.streams.subscribe(app_id, first)
    await w.change("a@x", "online")
    await w.change("b@x", "online")
    last = Model().read(first.sent).transitions[-1][2]
    w.streams.unsubscribe(sub)          # the socket vanished; the node notices
    missed = [("a@x", "unavailable"), ("a@x", "offline"), ("b@x", "offline"), ("c@x", "online"), ("a@x", "online")]
    for email, status in missed:
        await w.change(email, status)
    # while it catches up, changes keep coming (before every page it reads)
    w.during = [("c@x", "unavailable"), ("b@x", "online"), ("c@x", "offline"), ("a@x", "unavailable")]
    again = ListPeer()
    sub = await w.syncer.subscribe(app_id, again)
    n = await w.syncer.catch_up(sub, since=last)
    assert w.reads >= 4 and not w.during
    await w.change("b@x", "unavailable")            # live
    model = Model().read(again.sent)
    expected = missed + [("c@x", "unavailable"), ("b@x", "online"), ("c@x", "offline"), ("a@x", "unavailable"),
                         ("b@x", "unavailable")]
    assert [(e, s) for e, s, _ in model.transitions] == expected
    seqs = [seq for _, _, seq in model.transitions]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > last
    assert model.synced == n and model.live_after_synced == [model.transitions[-1]]
    assert model.kinds[-2:] == ["synced", "updates"]
    assert model.status == await truth(store, app_id)


@pytest_twisted.ensureDeferred
async def test_a_resume_older_than_the_log_says_resync_and_sends_the_state(store):
    w = World(store, page=2)
    app_id = await w.app(["a@x", "b@x", "c@x"])
    for email, status in [("a@x", "online"), ("b@x", "unavailable"), ("a@x", "offline"), ("c@x", "online")]:
        await w.change(email, status)
    assert await store.trim_changes(before=2e9) > 0      # nothing left in the log
    await w.change("b@x", "online")
    w.during = [("c@x", "offline"), ("a@x", "unavailable")]
    peer = ListPeer()
    sub = await w.syncer.subscribe(app_id, peer)
    n = await w.syncer.catch_up(sub, since=1)
    resync = peer.sent[0]
    assert resync["type"] == "resync" and resync["since"] == 1 and resync["oldest"] == n - 2
    model = Model().read(peer.sent)
    assert model.kinds[0] == "resync" and "state" in model.kinds and model.synced == n
    assert model.status == await truth(store, app_id) == {"a@x": "unavailable", "b@x": "online", "c@x": "offline"}


@pytest_twisted.ensureDeferred
async def test_a_resume_from_the_head_or_ahead_of_it(store):
    w = World(store)
    app_id = await w.app(["a@x"])
    await w.change("a@x", "online")
    head = await store.last_change()
    peer = ListPeer()
    assert await w.syncer.catch_up(await w.syncer.subscribe(app_id, peer), since=head) == head
    assert peer.sent == [{"type": "synced", "seq": head}]
    ahead = ListPeer()
    await w.syncer.catch_up(await w.syncer.subscribe(app_id, ahead), since=head + 100)
    assert ahead.sent[0]["type"] == "resync" and ahead.sent[1]["type"] == "state"


@pytest_twisted.ensureDeferred
async def test_sync_sends_the_exact_state_while_changes_keep_coming_and_misses_no_live_one(store):
    rng = random.Random(15)
    w = World(store, page=7)
    people = [f"p{i:02d}@x" for i in range(60)]
    app_id = await w.app(people)
    for email in people[::3]:
        await w.change(email, "online")
    statuses = ["online", "unavailable", "offline"]
    w.during = [(rng.choice(people), rng.choice(statuses)) for _ in range(9)]     # one before each page
    peer = ListPeer()
    sub = await w.syncer.subscribe(app_id, peer)
    n = await w.syncer.catch_up(sub)
    assert not w.during
    now = await truth(store, app_id)
    live = []
    for _ in range(10):
        email = rng.choice(people)
        now[email] = rng.choice([s for s in statuses if s != now[email]])    # a real transition each
        live.append((email, now[email]))
        await w.change(email, now[email])
    model = Model().read(peer.sent)
    assert model.synced == n and model.kinds.index("synced") > model.kinds.index("state")
    assert set(model.status) == set(people)
    assert model.status == await truth(store, app_id) == now
    # every change after synced arrived, in order, and nothing else
    assert [(e, s) for e, s, _ in model.live_after_synced] == live


@pytest_twisted.ensureDeferred
async def test_too_many_changes_while_catching_up_close_it_as_a_slow_reader_and_they_wait(store):
    w = World(store, page=1, slow_limit=2)
    app_id = await w.app(["a@x", "b@x"])
    w.during = [("a@x", "online"), ("b@x", "online"), ("a@x", "offline"), ("b@x", "offline")]
    peer = ListPeer()
    sub = await w.syncer.subscribe(app_id, peer)
    assert await w.syncer.catch_up(sub) is None
    assert peer.closed[0] == errors.CLOSE_TOO_SLOW
    await w.streams.flush()
    assert w.during == [("b@x", "offline")]       # closed at the third held change
    assert {p.email: p.status for p in await store.take_pending(app_id, 0)} == {"a@x": "offline", "b@x": "online"}


def test_state_lists_respect_the_message_limit():
    people = [PersonState(f"p{i}@x", "u" * 20, "online", 1.5, i) for i in range(200)]
    messages = state_messages(people, 2000)
    assert len(messages) > 1 and all(len(m) <= 2000 for m in messages)
    import json
    assert [p["email"] for m in messages for p in json.loads(m)["people"]] == [p.email for p in people]


def test_a_person_is_written_exactly_as_json_dumps_would():
    import json
    from presence.sync import json_bytes, person_json
    for p in [PersonState("a@x", "u1", "online", 1764059012.3456, 12), PersonState('é"\\@x', "u", "offline", None, 0)]:
        assert person_json(p) == json_bytes(p.as_json())
        assert json.loads(person_json(p)) == p.as_json()


@pytest_twisted.ensureDeferred
async def test_a_catch_up_waits_while_the_socket_is_full_and_goes_on_when_it_drains(store):
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater

    w = World(store, page=2)
    app_id = await w.app([f"p{i}@x" for i in range(9)])

    class Full(ListPeer):
        """A socket that is full after every message (the transport pauses its producer)."""
        sub = None

        def send(self, payload):
            taken = super().send(payload)
            self.sub.pause()
            return taken

    peer = Full()
    peer.sub = sub = await w.syncer.subscribe(app_id, peer)
    done = ensureDeferred(w.syncer.catch_up(sub))
    for expected in range(1, 5):
        await deferLater(reactor, 0.2, lambda: None)        # time for store calls: it does not go on
        assert len(peer.sent) == expected and not done.called
        sub.resume()
    while not done.called:
        await deferLater(reactor, 0.05, lambda: None)
        sub.resume()
    assert Model().read(peer.sent).synced is not None and len(Model().read(peer.sent).status) == 9


@pytest_twisted.ensureDeferred
async def test_held_changes_keep_the_delivered_mark_below_them(store):
    w = World(store, page=1)
    app_id = await w.app(["a@x", "b@x"])
    await w.change("a@x", "online")
    peer = ListPeer()
    sub = await w.syncer.subscribe(app_id, peer)
    await w.change("b@x", "online")
    await w.change("b@x", "offline")
    held = [u.seq for u in sub.held]
    assert len(held) == 2 and w.streams.unsent_floor() == held[0]
    await w.syncer.catch_up(sub)
    assert w.streams.unsent_floor() is None and sub.held is None


@pytest_twisted.ensureDeferred
async def test_a_live_connection_is_told_by_synced_up_to_where_it_holds_every_change(store):
    w = World(store)
    app_id = await w.app(["a@x", "b@x"])
    peer = ListPeer()
    sub = await w.syncer.subscribe(app_id, peer)
    n = await w.syncer.catch_up(sub)
    await w.syncer.mark()
    assert peer.sent[-1] == {"type": "synced", "seq": n}        # nothing new: no second mark
    assert sum(1 for m in peer.sent if m == {"type": "synced", "seq": n}) == 1
    await w.change("a@x", "online")
    await w.syncer.mark()
    head = await store.last_change()
    assert peer.sent[-1] == {"type": "synced", "seq": head} and isinstance(peer.sent[-2], list)
    # published here but not handed to the socket yet (the fan-out has not run): no mark past it
    await w.hub.set_page_status("b@x", "online")
    await w.syncer.mark()
    assert peer.sent[-1] == {"type": "synced", "seq": head}
    w.clock.advance(0)
    await w.syncer.mark()
    assert peer.sent[-2][0]["email"] == "b@x" and peer.sent[-1] == {"type": "synced", "seq": head + 1}
    # a paused socket is not told; a closed connection is forgotten
    sub.pause()
    await w.change("a@x", "offline")
    await w.syncer.mark()
    assert peer.sent[-1] == {"type": "synced", "seq": head + 1}
    w.streams.unsubscribe(sub)
    assert w.syncer.mark() is None and not w.syncer.live


@pytest_twisted.ensureDeferred
async def test_catch_ups_are_counted_by_how(store):
    w = World(store)
    app_id = await w.app(["a@x"])
    await w.change("a@x", "online")
    head = await store.last_change()
    await w.syncer.catch_up(await w.syncer.subscribe(app_id, ListPeer()))
    await w.syncer.catch_up(await w.syncer.subscribe(app_id, ListPeer()), since=head)
    await w.syncer.catch_up(await w.syncer.subscribe(app_id, ListPeer()), since=head + 5)
    counted = {how: c._value.get() for how, c in w.streams.metrics.catch_ups.items()}
    assert counted == {"sync": 1, "since": 2, "resync": 1}
