"""The fan-out to applications: batching, coalescing, slow readers and the waiting queue."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from presence import errors
from presence.store import PendingUpdate
from presence.streams import Streams
from presence.subscriber import Subscriber
from presence.views import Update
from tests.fakes import ListPeer


class Turns(Clock):
    """A Clock whose ``advance`` is one reactor turn: it runs the calls due when it starts, not those
    they schedule (a ``callLater(0)`` made during a turn runs in the next one, after the reactor has
    read its sockets). ``Clock.advance`` would run a whole sliced fan-out at once."""

    def advance(self, amount):
        self.rightNow += amount
        self._sortCalls()
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:   # not cancelled by an earlier one
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)

    def run_turns(self, limit=100):
        """Turns (no time passing) until nothing is due now; how many it took."""
        for n in range(limit):
            if not any(call.getTime() <= self.seconds() for call in self.calls):
                return n
            self.advance(0)
        raise AssertionError("still running after %d turns" % limit)


def upd(email, status, at, uid=None, app="app", seq=None):
    """An update; unless told, its change number follows its time (later: newer)."""
    return Update(app, email, uid or "u-" + email, status, at, round(at * 1000) if seq is None else seq)


def as_json(*updates):
    return [u.as_json() for u in updates]


class TestSubscriber:
    def make(self, limit=3, timeout=10.0):
        clock, sink, overflowed = Clock(), ListPeer(), []
        sub = Subscriber("app", sink, clock, limit, timeout, overflowed.append)
        return clock, sink, overflowed, sub

    def test_loading_holds_live_changes_until_waiting_ones_are_out(self):
        clock, sink, _, sub = self.make()
        live = upd("a@x", "online", 2)
        sub.push(b"[]", [live])
        assert sink.sent == []
        sub.loaded([upd("a@x", "offline", 1), upd("b@x", "online", 1.5)])
        # one list: the older waiting change of a@x is replaced by the live one
        assert sink.sent == [as_json(upd("b@x", "online", 1.5), live)]

    def test_paused_connection_coalesces_per_person_and_sends_on_resume(self):
        clock, sink, _, sub = self.make()
        sub.loaded([])
        sub.pause()
        sub.push(b"", [upd("a@x", "online", 1)])
        sub.push(b"", [upd("a@x", "unavailable", 2), upd("b@x", "online", 3)])
        assert sink.sent == []
        sub.resume()
        assert sink.sent == [as_json(upd("a@x", "unavailable", 2), upd("b@x", "online", 3))]

    def test_too_many_waiting_people_closes_and_hands_back_the_backlog(self):
        clock, sink, overflowed, sub = self.make(limit=2)
        sub.loaded([])
        sub.pause()
        sub.push(b"", [upd(f"{i}@x", "online", i) for i in range(3)])
        assert overflowed == [sub]
        assert sink.closed[0] == errors.CLOSE_TOO_SLOW
        assert len(sub.detach()) == 3

    def test_a_stalled_reader_is_closed_after_the_timeout(self):
        clock, sink, overflowed, sub = self.make(timeout=10)
        sub.loaded([])
        sub.pause()
        clock.advance(9)
        assert sink.closed is None
        clock.advance(1)
        assert sink.closed[0] == errors.CLOSE_TOO_SLOW and overflowed == [sub]

    def test_resume_in_time_cancels_the_stall_timer(self):
        clock, sink, overflowed, sub = self.make(timeout=10)
        sub.loaded([])
        sub.pause()
        clock.advance(5)
        sub.resume()
        clock.advance(20)
        assert sink.closed is None and overflowed == []


@pytest_twisted.ensureDeferred
async def test_changes_in_one_window_go_out_as_one_list_every_transition_in_order(sqlite_store):
    clock = Clock()
    streams = Streams(sqlite_store, clock, batch_window=0.05)
    a, b = ListPeer(), ListPeer()
    await streams.subscribe("app", a)
    await streams.subscribe("app", b)
    streams.publish([upd("p@x", "online", 1), upd("q@x", "online", 1)])
    streams.publish([upd("p@x", "unavailable", 1.01)])
    assert a.sent == []
    clock.advance(0.05)
    expected = [as_json(upd("p@x", "online", 1), upd("q@x", "online", 1), upd("p@x", "unavailable", 1.01))]
    assert a.sent == expected and b.sent == expected


@pytest_twisted.ensureDeferred
async def test_a_connection_registers_its_application_and_gets_what_waited_first(sqlite_store):
    clock = Clock()
    clock.advance(1000)
    streams = Streams(sqlite_store, clock, node="n1", pending_ttl=3600)
    await sqlite_store.queue_pending([PendingUpdate("app", "p@x", "u-p@x", "offline", 995, 995_000),
                                      PendingUpdate("app", "q@x", "u-q@x", "unavailable", 996, 996_000)])
    peer = ListPeer()
    sub = await streams.subscribe("app", peer)
    assert await sqlite_store.subscribed(["app", "other"]) == {"app"}
    assert peer.sent == [as_json(upd("p@x", "offline", 995), upd("q@x", "unavailable", 996))]
    assert await sqlite_store.count_pending("app") == 0
    streams.unsubscribe(sub)
    await streams.flush()
    assert await sqlite_store.subscribed(["app"]) == set()


@pytest_twisted.ensureDeferred
async def test_waiting_changes_older_than_the_ttl_are_not_delivered(sqlite_store):
    clock = Clock()
    clock.advance(10_000)
    streams = Streams(sqlite_store, clock, pending_ttl=3600)
    await sqlite_store.queue_pending([PendingUpdate("app", "old@x", "u-old@x", "online", 10_000 - 3601, 6_399_000),
                                      PendingUpdate("app", "new@x", "u-new@x", "online", 10_000 - 10, 9_990_000)])
    peer = ListPeer()
    await streams.subscribe("app", peer)
    assert peer.sent == [as_json(upd("new@x", "online", 10_000 - 10))]


@pytest_twisted.ensureDeferred
async def test_changes_for_an_application_held_nowhere_here_are_not_queued_twice(sqlite_store):
    """The store queued them when it made the change; a node that never held the app does nothing."""
    streams = Streams(sqlite_store, Clock())
    streams.publish([upd("p@x", "online", 1)])
    await streams.flush()
    assert await sqlite_store.count_pending("app") == 0


@pytest_twisted.ensureDeferred
async def test_a_batch_left_when_the_last_connection_goes_is_kept(sqlite_store):
    clock = Clock()
    streams = Streams(sqlite_store, clock)
    peer = ListPeer()
    sub = await streams.subscribe("app", peer)
    streams.publish([upd("p@x", "online", 1)])
    streams.unsubscribe(sub)
    # the registry may have said this node held the app when the next change was made: keep it too
    streams.publish([upd("q@x", "online", 2)])
    # but not what the store already queued
    streams.publish([upd("r@x", "online", 3)], queued=frozenset({"app"}))
    await streams.flush()
    assert [(p.email, p.status) for p in await sqlite_store.take_pending("app", 0)] == [
        ("p@x", "online"), ("q@x", "online")]


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_closed_for_overflow_loses_nothing(sqlite_store):
    clock = Clock()
    streams = Streams(sqlite_store, clock, slow_limit=1)
    fast, slow = ListPeer(), ListPeer()
    await streams.subscribe("app", fast)
    slow_sub = await streams.subscribe("app", slow)
    slow_sub.pause()
    streams.publish([upd("p@x", "online", 1), upd("q@x", "online", 1)])
    clock.advance(0.05)
    assert slow.closed[0] == errors.CLOSE_TOO_SLOW
    assert len(fast.sent[0]) == 2
    await streams.flush()
    assert sorted(p.email for p in await sqlite_store.take_pending("app", 0)) == ["p@x", "q@x"]
    assert streams.connection_count() == 1


def test_a_large_list_is_split_under_the_message_limit():
    from presence.subscriber import encode_lists

    updates = [upd(f"person{i}@example.com", "online", i) for i in range(1000)]
    payloads = encode_lists(updates, 4096)
    assert len(payloads) > 1 and all(len(p) <= 4096 for p in payloads)
    import json

    assert [u["email"] for p in payloads for u in json.loads(p)] == [u.email for u in updates]


@pytest_twisted.ensureDeferred
async def test_many_waiting_changes_arrive_in_messages_under_the_limit(sqlite_store):
    """Regression: a waiting queue larger than --max-message was taken from the store and lost."""
    clock = Clock()
    clock.advance(1000)
    streams = Streams(sqlite_store, clock, max_message=4096)
    await sqlite_store.queue_pending([PendingUpdate("app", f"p{i}@x", f"u{i}", "online", 900 + i / 1000)
                                      for i in range(500)])
    peer = ListPeer()
    await streams.subscribe("app", peer)
    assert len(peer.sent) > 1
    assert sorted(u["email"] for batch in peer.sent for u in batch) == sorted(f"p{i}@x" for i in range(500))


# -- leading-edge batching --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_change_on_a_quiet_node_goes_out_on_the_next_turn_not_after_the_window(sqlite_store):
    clock = Turns()
    streams = Streams(sqlite_store, clock, batch_window=0.5)
    peer = ListPeer()
    await streams.subscribe("app", peer)
    streams.publish([upd("p@x", "online", 0)])
    streams.publish([upd("q@x", "online", 0)])   # the same turn: the same list
    assert peer.sent == []
    clock.advance(0)
    assert peer.sent == [as_json(upd("p@x", "online", 0), upd("q@x", "online", 0))]


@pytest_twisted.ensureDeferred
async def test_a_change_within_the_window_waits_for_it(sqlite_store):
    clock = Turns()
    streams = Streams(sqlite_store, clock, batch_window=0.5)
    peer = ListPeer()
    await streams.subscribe("app", peer)
    streams.publish([upd("p@x", "online", 0)])
    clock.advance(0)                              # flushed at 0
    assert len(peer.sent) == 1
    clock.advance(0.25)
    streams.publish([upd("p@x", "unavailable", 0.25)])
    clock.advance(0)
    clock.advance(0.125)
    streams.publish([upd("p@x", "offline", 0.375), upd("q@x", "online", 0.375)])
    clock.advance(0.0625)
    assert len(peer.sent) == 1                    # at most one flush per window
    clock.advance(0.0625)                         # 0.5: the previous flush + the window
    assert peer.sent[1:] == [as_json(upd("p@x", "unavailable", 0.25), upd("p@x", "offline", 0.375),
                                     upd("q@x", "online", 0.375))]
    # quiet for a whole window: the next change goes at once again
    clock.advance(0.5)
    streams.publish([upd("q@x", "offline", 1.0)])
    clock.advance(0)
    assert peer.sent[2:] == [as_json(upd("q@x", "offline", 1.0))]


@pytest_twisted.ensureDeferred
async def test_one_timer_for_every_application(sqlite_store):
    clock = Turns()
    streams = Streams(sqlite_store, clock, batch_window=0.5)
    peers = {app: ListPeer() for app in ("a", "b", "c")}
    for app, peer in peers.items():
        await streams.subscribe(app, peer)
    streams.publish([upd("p@x", "online", 0, app=app) for app in peers])
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    clock.advance(0.25)
    streams.publish([upd("q@x", "online", 0.25, app=app) for app in peers])
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.25)
    assert all(len(peer.sent) == 2 for peer in peers.values())


# -- cooperative fan-out ----------------------------------------------------------------------------

async def fanout(sqlite_store, n=10, slice_size=3, apps=1, **kw):
    clock = Turns()
    streams = Streams(sqlite_store, clock, batch_window=0.5, slice_size=slice_size, **kw)
    peers = [ListPeer() for _ in range(n)]
    subs = [await streams.subscribe("app" if apps == 1 else f"app{i}", peer) for i, peer in enumerate(peers)]
    return clock, streams, peers, subs


def got(peers):
    return [len(peer.sent) for peer in peers]


@pytest_twisted.ensureDeferred
async def test_a_fan_out_sends_a_slice_per_turn(sqlite_store):
    clock, streams, peers, _ = await fanout(sqlite_store)
    streams.publish([upd("p@x", "online", 0)])
    clock.advance(0)
    assert got(peers) == [1, 1, 1] + [0] * 7
    clock.advance(0)
    assert got(peers) == [1] * 6 + [0] * 4
    assert clock.run_turns() == 2
    assert all(peer.sent == [as_json(upd("p@x", "online", 0))] for peer in peers)
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_fan_out_to_many_applications_is_sliced_too(sqlite_store):
    clock, streams, peers, _ = await fanout(sqlite_store, n=6, slice_size=2, apps=6)
    streams.publish([upd("p@x", "online", 0, app=f"app{i}") for i in range(6)])
    clock.advance(0)
    assert got(peers) == [1, 1, 0, 0, 0, 0]
    assert clock.run_turns() == 2
    assert [peer.sent for peer in peers] == [[as_json(upd("p@x", "online", 0, app=f"app{i}"))] for i in range(6)]


@pytest_twisted.ensureDeferred
async def test_a_later_batch_never_overtakes_an_earlier_one(sqlite_store):
    clock, streams, peers, _ = await fanout(sqlite_store)
    first, second = upd("p@x", "online", 0), upd("p@x", "offline", 1)
    streams.publish([first])
    clock.advance(0)
    streams.publish([second])
    # the window is long over before the first fan-out ends: the second still waits for it
    for _ in range(10):
        clock.advance(1)
    assert all(peer.sent == [as_json(first), as_json(second)] for peer in peers)


@pytest_twisted.ensureDeferred
async def test_a_connection_that_leaves_mid_fan_out_gets_nothing_more(sqlite_store):
    clock, streams, peers, subs = await fanout(sqlite_store)
    streams.publish([upd("p@x", "online", 0)])
    clock.advance(0)
    streams.unsubscribe(subs[7])     # not reached yet
    streams.unsubscribe(subs[1])     # reached: the ones after it must not be skipped
    clock.run_turns()
    assert got(peers) == [1, 1, 1, 1, 1, 1, 1, 0, 1, 1]


@pytest_twisted.ensureDeferred
async def test_a_list_in_flight_is_kept_when_the_last_connection_leaves_before_its_turn(sqlite_store):
    clock, streams, peers, subs = await fanout(sqlite_store, n=2, slice_size=1)
    streams.publish([upd("p@x", "online", 0)])
    clock.advance(0)
    assert got(peers) == [1, 0]
    streams.unsubscribe(subs[0])
    streams.unsubscribe(subs[1])
    clock.run_turns()
    await streams.flush()
    assert [(p.email, p.status) for p in await sqlite_store.take_pending("app", 0)] == [("p@x", "online")]


@pytest_twisted.ensureDeferred
async def test_a_list_in_flight_is_not_kept_twice_when_the_last_connection_had_it(sqlite_store):
    clock, streams, peers, subs = await fanout(sqlite_store, n=2, slice_size=1)
    streams.publish([upd("p@x", "online", 0)])
    clock.advance(0)
    streams.unsubscribe(subs[1])
    streams.unsubscribe(subs[0])
    await streams.flush()
    assert got(peers) == [1, 0]
    assert await sqlite_store.take_pending("app", 0) == []


@pytest_twisted.ensureDeferred
async def test_flush_finishes_a_fan_out_in_progress_then_sends_what_came_since(sqlite_store):
    clock, streams, peers, _ = await fanout(sqlite_store)
    first, second = upd("p@x", "online", 0), upd("p@x", "offline", 0.1)
    streams.publish([first])
    clock.advance(0)
    streams.publish([second])
    await streams.flush()
    assert all(peer.sent == [as_json(first), as_json(second)] for peer in peers)
    assert clock.getDelayedCalls() == []       # no slice left to run
    clock.advance(10)
    assert all(len(peer.sent) == 2 for peer in peers)


@pytest_twisted.ensureDeferred
async def test_split_lists_are_sliced_and_arrive_whole(sqlite_store):
    clock, streams, peers, _ = await fanout(sqlite_store, n=4, slice_size=3, max_message=1024)
    updates = [upd(f"person{i}@example.com", "online", i / 100) for i in range(100)]
    streams.publish(updates)
    clock.advance(0)
    parts = len(peers[0].sent)
    assert parts > 1 and all(peer.sent == [] for peer in peers[1:])   # one connection's lists fill the turn
    clock.run_turns()
    for peer in peers:
        assert len(peer.sent) == parts
        assert [u["email"] for batch in peer.sent for u in batch] == [u.email for u in updates]


class Counting:
    def __init__(self):
        self.calls = []

    def inc(self, amount=1):
        self.calls.append(amount)


@pytest_twisted.ensureDeferred
async def test_metrics_count_every_delivery_with_one_increment_per_turn(sqlite_store):
    clock, streams, peers, _ = await fanout(sqlite_store, n=10, slice_size=4, apps=10)
    delivered = streams.metrics.updates_delivered = Counting()
    streams.publish([upd(e, "online", 0, app=f"app{i}") for i in range(10) for e in ("p@x", "q@x")])
    turns = clock.run_turns()
    assert sum(delivered.calls) == 20 and len(delivered.calls) == turns < 10
    registry = streams.metrics.registry
    assert registry.get_sample_value("presence_batch_size_count") == 10
    assert registry.get_sample_value("presence_batch_size_sum") == 20
    assert registry.get_sample_value("presence_delivery_latency_seconds_count") == 20


@pytest_twisted.ensureDeferred
async def test_connections_arriving_together_open_in_one_store_transaction(sqlite_store, monkeypatch):
    from twisted.internet.defer import ensureDeferred, gatherResults

    clock = Clock()
    clock.advance(1000)
    streams = Streams(sqlite_store, clock, node="n1", pending_ttl=3600)
    await sqlite_store.queue_pending([PendingUpdate("a", "p@x", "u-p@x", "offline", 995, 995_000),
                                      PendingUpdate("b", "q@x", "u-q@x", "online", 996, 996_000)])
    calls = []
    real = sqlite_store.open_streams

    async def counting(node, app_ids, not_before, fence=False):
        calls.append(sorted(app_ids))
        return await real(node, app_ids, not_before, fence)

    monkeypatch.setattr(sqlite_store, "open_streams", counting)
    first = [ListPeer()]
    rest = [ListPeer() for _ in range(3)]
    await streams.subscribe("a", first[0])               # the first opens alone ...
    await gatherResults([ensureDeferred(streams.subscribe(app, peer)) for app, peer in zip(["a", "b", "c"], rest)])
    assert calls == [["a"], ["a", "b", "c"]]              # ... those arriving meanwhile together
    assert first[0].sent == [as_json(upd("p@x", "offline", 995, app="a"))]
    assert rest[0].sent == [] and rest[2].sent == []     # taken once, by the first connection of "a"
    assert rest[1].sent == [as_json(upd("q@x", "online", 996, app="b"))]
    assert await sqlite_store.subscribed(["a", "b", "c"]) == {"a", "b", "c"}


def test_encode_writes_exactly_what_json_dumps_would():
    import json
    import math

    from presence.subscriber import encode

    updates = [upd("p@x", "online", 995.123456), upd('q"\\\u00e9\u2603@x', "offline", 1.0, uid="u\n1"),
               upd("r@x", "unavailable", 1700000000.5), Update("app", "s@x", "u", "online", 7)]
    expected = json.dumps([u.as_json() for u in updates], separators=(",", ":")).encode()
    assert encode(updates) == expected
    assert encode([]) == b"[]"
    assert json.loads(encode(updates))[1]["email"] == 'q"\\\u00e9\u2603@x'
    assert not math.isnan(json.loads(encode(updates))[0]["at"])


def test_a_large_backlog_goes_out_while_the_socket_takes_it_and_waits_when_it_is_full():
    """What waited for an application is sent list by list; once the socket is full (paused) the
    rest stays in the backlog, not in the socket's buffer, and goes out on resume, in order."""
    clock = Clock()

    class Filling(ListPeer):
        def send(self, payload):
            taken = super().send(payload)
            if len(self.sent) % 2 == 0:
                subscriber.pause()          # what the transport does once its buffer is full
            return taken

    sink = Filling()
    subscriber = Subscriber("app", sink, clock, 10_000, 30.0, lambda s: None, max_message=1024)
    waiting = [upd(f"p{i:03}@x", "online", i) for i in range(200)]
    subscriber.loaded(waiting)
    assert len(sink.sent) == 2 and subscriber.backlog       # two lists, then the socket was full
    while subscriber.backlog:
        subscriber.resume()
    got = [u["email"] for batch in sink.sent for u in batch]
    assert got == [u.email for u in waiting]                 # every one, once, in order


@pytest_twisted.ensureDeferred
async def test_a_connection_that_closes_while_it_opens_leaves_what_waited_in_the_store(sqlite_store):
    """What waited is taken from the store as a connection opens; if the connection is closing by
    the time it arrives (the peer went, the node closed it), it waits in the store again."""
    clock = Clock()
    streams = Streams(sqlite_store, clock)
    await sqlite_store.queue_pending([PendingUpdate("app", "p@x", "u-p@x", "offline", 995, 995_000)])
    peer = ListPeer()
    opening = ensureDeferred(streams.subscribe("app", peer))
    peer.closed = (1000, "the peer went")                  # before the store answered
    subscriber = await opening
    streams.unsubscribe(subscriber)                        # its connection is lost
    await streams.flush()
    assert peer.sent == []
    assert [(u.email, u.status, u.seq) for u in await sqlite_store.take_pending("app", 0)] == [
        ("p@x", "offline", 995_000)]


@pytest_twisted.ensureDeferred
async def test_a_change_for_a_connection_that_is_closing_waits_in_the_store(sqlite_store):
    """Between a connection starting to close and its loss, a fan-out to it is not taken: kept, then
    queued when it goes, never dropped."""
    clock = Clock()
    streams = Streams(sqlite_store, clock, batch_window=0.05)
    peer = ListPeer()
    subscriber = await streams.subscribe("app", peer)
    peer.closed = (1001, "closing")
    streams.publish([upd("p@x", "online", 1)])
    clock.advance(0.05)
    streams.unsubscribe(subscriber)
    await streams.flush()
    assert [(u.email, u.status) for u in await sqlite_store.take_pending("app", 0)] == [("p@x", "online")]
