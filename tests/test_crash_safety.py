"""What an application is told stays true through crashes, restarts, pauses, clock skew and store
failures (issue 13): one regression test per case found from outside, each failing on the code
before the fix. Real `twistd presence` processes where the fault is a process's (kill -9, SIGSTOP,
a lost LISTEN connection); the store and the core directly where it is the database's."""

from __future__ import annotations

import itertools
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater

from presence.apps import Applications
from presence.bus import ChangeFeed
from presence.cluster import Cluster
from presence.hub import Hub
from presence.identity import Identity
from presence.notifications import Notifier
from presence.store import Device, NodeFenced, StoreUnavailable, open_store
from presence.streams import Streams
from presence.subscriber import Subscriber
from presence.views import Update
from tests.cluster import AUDIENCE, NodeProcess
from tests.conftest import _admin
from tests.fakes import ListPeer
from tests.wsclient import WSClient



async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def pairs(batch):
    return [(u["email"], u["status"]) for u in batch]


async def updates_until(client: WSClient, done, timeout: float = 15.0) -> list[dict]:
    """Every update received until ``done(updates)`` holds."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"gave up waiting; received {pairs(got)}"
        got += await client.receive(max(0.1, deadline - time.monotonic()))
    return got


async def new_app(store, *granted: str):
    apps = Applications(store, reactor)
    app = await apps.register("dev@example.com", f"app{len(await store.list_apps())}.example", "App", "")
    app = await apps.mark_verified(app)
    for email in granted:
        await apps.grant(email, app.app_id)
    return await apps.activate(app)


async def stream(port: int, app, key) -> WSClient:
    client = await WSClient.connect(port, "/" + app.app_id)
    client.send({"key": key})
    assert (await client.receive())["result"] == "OK"
    return client


async def device(port: int, idp, email: str, name: str = "phone") -> WSClient:
    client = await WSClient.connect(port, "/presence")
    client.send({"type": "connect", "assertion": idp.assertion(email, AUDIENCE), "device": name})
    assert (await client.receive())["result"] is True
    return client


async def status(client: WSClient, value: str) -> None:
    client.send({"type": "status", "status": value})
    assert await client.receive() == {"result": "OK"}


# -- 1. kill -9 and restart on the same database --------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_node_restarted_after_kill_9_hands_its_applications_every_change(idp, tmp_path):
    database = f"sqlite:{tmp_path / 'presence.sqlite'}"
    store = open_store(database)
    await store.open()
    people = [f"p{i}@example.com" for i in range(10)]
    app, key = await new_app(store, "alice@example.com", *people)
    node = NodeProcess("solo", database, idp, tmp_path)
    node.database = database          # SQLite: no application_name
    await node.start()
    try:
        app_stream = await stream(node.ws, app, key)
        alice = await device(node.ws, idp, "alice@example.com")
        await status(alice, "online")
        assert pairs(await app_stream.receive()) == [("alice@example.com", "online")]

        node.process.send_signal(signal.SIGKILL)   # what Restart=on-failure restarts after
        node.process.wait(timeout=10)
        await node.start()
        # the application is away: every change now waits for it, the recovery's too
        for email in people:
            await status(await device(node.ws, idp, email), "online")
        again = await stream(node.ws, app, key)
        got = await updates_until(again, lambda got: len(got) >= 11)
        assert sorted(pairs(got)) == sorted([("alice@example.com", "offline")] + [(p, "online") for p in people])
        assert all(u["seq"] > 0 for u in got)
    finally:
        await node.stop()
        await store.close()


# -- 2. reaping stops halfway ----------------------------------------------------------------------------
def each_statement(interaction, before):
    """The interaction as it is, calling ``before(statement)`` ahead of each of its statements (which
    may raise: the database fails right there, inside the transaction)."""
    rows = None
    while True:
        try:
            step = interaction.send(rows)
        except StopIteration as done:
            return done.value
        before(step)
        rows = yield step


class Budget:
    """The store fails (StoreUnavailable) once ``left`` more statements have run: a reaper whose
    database goes away in the middle of its work."""

    def __init__(self, store, left: int):
        self.left = left
        for name in ("_query", "_execute"):
            inner = getattr(store, name)

            async def counted(*args, _inner=inner):
                self.spend()
                return await _inner(*args)
            setattr(store, name, counted)
        inner_transaction = store._transaction

        async def transaction(interaction):
            return await inner_transaction(each_statement(interaction, lambda step: self.spend()))
        store._transaction = transaction

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise StoreUnavailable("injected: the database went away")


def survivor(store, name: str) -> Cluster:
    clock = Clock()
    clock.advance(time.time())
    streams = Streams(store, clock, node=name)
    hub = Hub(store, streams, clock, name)
    feed = ChangeFeed(store, clock, hub.apply)
    return Cluster(store, hub, feed, clock, name, node_timeout=30.0)


@pytest.mark.parametrize("failing_after", [5, 60, 400])
@pytest_twisted.ensureDeferred
async def test_a_reaper_that_fails_halfway_leaves_nobody_online_for_ever(database_url, failing_after):
    setup = open_store(database_url)
    await setup.open()
    try:
        await setup.add_developer("dev@example.com", 1.0)
        app, _ = await new_app(setup)
        people = [f"p{i:03}@example.com" for i in range(300)]
        for email in people:
            await setup.add_grant(email, app.app_id, "uid-" + email, 1.0)
        await setup.register_node("dead", time.time() - 100, 0)
        await setup.subscribe("dead", app.app_id)

        def online(email):
            def put(devices):
                devices["phone"] = Device(email, "phone", "dead", "online", 1.0, "s")
            return put
        await setup.change_people([(email, online(email), None) for email in people], "dead", 1.0)

        first = open_store(database_url)
        await first.open()
        Budget(first, failing_after)
        cluster = survivor(first, "first")
        await cluster.join()
        await cluster.beat()             # fails somewhere in the middle (logged, not raised)
        await first.close()

        second = open_store(database_url)
        await second.open()
        cluster = survivor(second, "second")
        await cluster.join()
        await cluster.beat()
        await second.close()

        assert await setup.emails_on_node("dead") == []
        assert {(await setup.get_status(email)).status for email in people} == {"offline"}
        assert await setup.take_subscriptions("dead") == []
        waiting = await setup.take_pending(app.app_id, 0)
        assert sorted((u.email, u.status) for u in waiting) == [(email, "offline") for email in people]
    finally:
        await setup.close()


# -- 3. a notification is stored and announced together, or not at all ---------------------------
class Phone(ListPeer):
    def __init__(self):
        super().__init__()
        self.notified: list[dict] = []

    def notify(self, notifications: list[dict]) -> None:
        self.notified += notifications


@pytest_twisted.ensureDeferred
async def test_a_notification_answered_unavailable_was_not_stored(store):
    app, _ = await new_app(store, "alice@example.com")
    uid = (await store.get_grant("alice@example.com", app.app_id)).uid
    clock = Clock()
    hub = Hub(store, Streams(store, clock), clock, "n")
    phone = Phone()
    await hub.attach("alice@example.com", "phone", None, phone)
    notifier = Notifier(store, hub, clock, "n")
    inner = store._transaction

    def logging_fails(step):
        if "INSERT INTO changes" in step[0]:
            raise StoreUnavailable("injected: the database went away")

    async def no_log(interaction):
        return await inner(each_statement(interaction, logging_fails))
    store._transaction = no_log
    with pytest.raises(StoreUnavailable):
        await notifier.send(app, [{"uid": uid, "message": "hello"}])
    store._transaction = inner
    assert await store.pending_notifications("alice@example.com", 0) == []
    assert phone.notified == []
    # the application's retry is then the only copy
    assert (await notifier.send(app, [{"uid": uid, "message": "hello"}]))[0]["result"] == "OK"
    assert [n.message for n in await store.pending_notifications("alice@example.com", 0)] == ["hello"]


# -- 4. order by the change log, not by the nodes' clocks ----------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_waiting_queue_keeps_the_later_change_whatever_the_clocks(store):
    app, _ = await new_app(store, "alice@example.com")

    def put(status):
        def mutate(devices):
            devices["phone"] = Device("alice@example.com", "phone", "n", status, 1.0, "s")
        return mutate
    await store.change_person("alice@example.com", put("online"), "fast-clock", 100.0)
    await store.change_person("alice@example.com", put("unavailable"), "slow-clock", 98.0)  # 2 s behind, later
    assert [(u.status, u.seq) for u in await store.take_pending(app.app_id, 0)] == [("unavailable", 2)]


def test_a_slow_reader_is_sent_the_later_change_whatever_the_clocks():
    clock, sink = Clock(), ListPeer()
    reader = Subscriber("app", sink, clock, 10, 10.0, lambda s: None)
    reader.loaded([])
    reader.pause()
    reader.push(b"", [Update("app", "p@x", "u", "online", 100.0, 7)])
    reader.push(b"", [Update("app", "p@x", "u", "unavailable", 98.0, 8)])
    reader.resume()
    assert [u["status"] for batch in sink.sent for u in batch] == ["unavailable"]


# -- 5. a node paused past --node-timeout -------------------------------------------------------------
@pytest_twisted.async_yield_fixture
async def two_nodes(idp, postgres_url, tmp_path):
    store = open_store(postgres_url)
    await store.open()
    nodes = {name: NodeProcess(name, postgres_url, idp, tmp_path, **{"log-retention": "4"}) for name in ("a", "b")}
    for node in nodes.values():
        await node.start()
    try:
        yield store, nodes
    finally:
        for node in nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
            await node.stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_node_paused_past_the_timeout_closes_everything_and_rejoins(two_nodes, idp):
    store, nodes = two_nodes
    app, key = await new_app(store, "alice@example.com", "bob@example.com")
    on_a = await stream(nodes["a"].ws, app, key)
    alice = await device(nodes["a"].ws, idp, "alice@example.com")
    await status(alice, "online")
    assert pairs(await on_a.receive()) == [("alice@example.com", "online")]

    nodes["a"].process.send_signal(signal.SIGSTOP)
    # b reaps a (node timeout 3 s): alice is offline, and a's application waits for it
    deadline = time.monotonic() + 20
    while (await store.get_status("alice@example.com")).status != "offline":
        assert time.monotonic() < deadline, "a was never reaped"
        await sleep(0.2)
    bob = await device(nodes["b"].ws, idp, "bob@example.com")
    await status(bob, "online")
    await sleep(6)                           # past --log-retention too: the log moved on without a
    nodes["a"].process.send_signal(signal.SIGCONT)

    # a finds it was taken for dead: it closes what it held, and they start again from the truth
    assert await on_a.wait_closed(timeout=15) == 1001
    assert await alice.wait_closed(timeout=5) == 1001
    again = await stream(nodes["a"].ws, app, key)
    got = await updates_until(again, lambda got: {"alice@example.com", "bob@example.com"} <= {u["email"] for u in got})
    latest = {u["email"]: u["status"] for u in sorted(got, key=lambda u: u["seq"])}
    assert latest == {"alice@example.com": "offline", "bob@example.com": "online"}
    alice = await device(nodes["a"].ws, idp, "alice@example.com")
    await status(alice, "online")
    got = await updates_until(again, lambda got: ("alice@example.com", "online") in pairs(got))
    assert (await store.get_status("alice@example.com")).status == "online"
    assert "rejoined as a#" in nodes["a"].output()


# -- 6. a lost LISTEN connection during a stream of changes ---------------------------------------
@pytest_twisted.ensureDeferred
async def test_every_transition_arrives_in_order_across_a_lost_listen_connection(idp, postgres_url, tmp_path):
    store = open_store(postgres_url)
    await store.open()
    options = {"device-rate": "1000", "device-burst": "1000"}
    nodes = [NodeProcess(name, postgres_url, idp, tmp_path, **options) for name in ("a", "b")]
    for node in nodes:
        await node.start()
    try:
        app, key = await new_app(store, "alice@example.com")
        on_b = await stream(nodes[1].ws, app, key)
        await sleep(0.2)
        alice = await device(nodes[0].ws, idp, "alice@example.com")
        sent = [s for s, _ in zip(itertools.cycle(["online", "unavailable"]), range(200))]
        for i, value in enumerate(sent):
            await status(alice, value)
            if i == 100:
                database = postgres_url.rsplit("/", 1)[1]
                conn = _admin()
                with conn.cursor() as cur:   # b's LISTEN connection, in this test's database only
                    cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s"
                                " AND application_name = 'presence-b' AND query LIKE 'LISTEN%%'", (database,))
                    assert cur.fetchone()[0] == 1
                conn.close()
        got = await updates_until(on_b, lambda got: len(got) >= len(sent), timeout=30)
        assert [u["status"] for u in got] == sent
        assert [u["seq"] for u in got] == sorted(u["seq"] for u in got)
        await on_b.nothing_more(0.5)
    finally:
        for node in nodes:
            await node.stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_reaping_replays_what_the_dead_node_had_not_delivered_with_its_own_numbers(store):
    """Changes after a dead node's delivered mark reach its applications: logged again (every node's
    connections get what they lack, at their original number) and queued where nobody holds them."""
    shared, _ = await new_app(store, "p@x")      # also held by a live node
    alone, _ = await new_app(store, "p@x")       # held by the dead node only
    now = await store.now()
    await store.register_node("dead", now - 100, 0)
    await store.register_node("live", now, 0)
    await store.register_node("reaper", now, 0)
    for node, app in (("dead", shared), ("live", shared), ("dead", alone)):
        await store.subscribe(node, app.app_id)

    def put(devices):
        devices["phone"] = Device("p@x", "phone", "live", "online", 1.0, "s")
    change = await store.change_person("p@x", put, "live", 1.0)
    assert change.queued == frozenset()          # both held: delivered live, nothing waits

    reaped = await store.reap_node("reaper", 2.0, before=now - 30)
    assert reaped.node == "dead" and reaped.apps == sorted([shared.app_id, alone.app_id])
    assert sorted((u.app_id, u.status, u.seq) for u in reaped.replayed) == sorted(
        [(shared.app_id, "online", change.seq), (alone.app_id, "online", change.seq)])
    assert reaped.queued == {alone.app_id}
    assert [(u.status, u.seq) for u in await store.take_pending(alone.app_id, 0)] == [("online", change.seq)]
    assert await store.take_pending(shared.app_id, 0) == []
    logged = (await store.changes_since(change.seq))[-1]
    assert logged.seq > change.seq
    from presence import changelog
    updates, queued, _ = changelog.decode(logged.payload, logged.seq)
    assert {u.seq for u in updates} == {change.seq} and queued == {alone.app_id}
    assert await store.reap_node("reaper", 3.0, before=now - 30) is None   # once


@pytest_twisted.ensureDeferred
async def test_a_clean_stop_that_could_not_clear_its_devices_leaves_no_ghost(store):
    """A stop whose store failed while it marked its devices offline (hub.stop logs it and goes on)
    must not leave the registry with those devices still recorded: nobody would reap them."""
    app, _ = await new_app(store, "alice@example.com")
    leaving = survivor(store, "n#1")
    await leaving.join()

    def online(devices):
        devices["phone"] = Device("alice@example.com", "phone", "n#1", "online", 1.0, "s")
    await store.change_person("alice@example.com", online, "n#1", 1.0)
    await leaving.leave()              # what stop does after hub.stop, whether or not that worked
    assert await store.emails_on_node("n#1") == []
    assert (await store.get_status("alice@example.com")).status == "offline"
    assert [u.status for u in await store.take_pending(app.app_id, 0)] == ["offline"]
    assert await store.heartbeat("n#1", 2.0, 0) is False


@pytest_twisted.ensureDeferred
async def test_a_node_whose_store_goes_away_in_the_middle_of_its_start_still_starts(idp, tmp_path):
    """The store may go away at any step of the start (here: while cleaning up after the previous
    incarnation), not only while opening: the node waits and starts once it is back."""
    from presence.node import Node
    from tests.test_node_e2e import config

    node = Node(config(idp, tmp_path))
    reap, failures = node.store.reap_node, []

    async def away_once(*args, **kwargs):
        if not failures:
            failures.append(True)
            raise StoreUnavailable("injected: the database went away")
        return await reap(*args, **kwargs)
    node.store.reap_node = away_once
    node.startService()
    try:
        deadline = time.monotonic() + 10
        while not node.ready:
            assert time.monotonic() < deadline, "the node never started"
            await sleep(0.05)
        assert failures == [True] and node.ws_port is not None
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_a_transaction_cut_by_a_lost_connection_is_one_clear_error_not_a_traceback(postgres_url):
    """The backend dies in the middle of a transaction (the server restarted, or it was terminated):
    the caller gets StoreUnavailable, and nothing is logged as an unhandled error."""
    from twisted.logger import globalLogPublisher

    store = open_store(postgres_url)
    await store.open()
    failures: list = []

    def observe(event):
        if "log_failure" in event or event.get("isError"):   # the new logger's, or log.err's
            failures.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        def dies():
            rows = yield "SELECT pg_backend_pid()", ()
            admin = _admin()            # another session terminates this one, mid-transaction
            with admin.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND datname = %s",
                            (rows[0][0], postgres_url.rsplit("/", 1)[1]))
            admin.close()
            yield "SELECT 1", ()
        with pytest.raises(StoreUnavailable):
            await store._transaction(dies())
        await sleep(0.2)
        assert failures == []
        assert await store._query("SELECT 2") == [(2,)]        # the next call reconnects
    finally:
        globalLogPublisher.removeObserver(observe)
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_change_committed_though_the_node_saw_its_commit_fail_still_reaches_its_applications(sqlite_store):
    """The connection drops after the server committed: the node answers errno 50 and publishes
    nothing, but the change is in the log; reading its own changes back from the log delivers it
    (and what was already sent is not sent again)."""
    app, _ = await new_app(sqlite_store, "alice@example.com")
    clock = Clock()
    streams = Streams(sqlite_store, clock, node="n", batch_window=0.0)
    hub = Hub(sqlite_store, streams, clock, "n")
    peer = ListPeer()
    await streams.subscribe(app.app_id, peer)
    phone = await hub.attach("alice@example.com", "phone", None, ListPeer())
    await hub.set_status(phone, "online")
    seen = await sqlite_store.last_change()
    commit = sqlite_store.change_people

    async def committed_but_unanswered(*args, **kwargs):
        await commit(*args, **kwargs)
        raise StoreUnavailable("injected: the connection dropped after COMMIT")
    sqlite_store.change_people = committed_but_unanswered
    with pytest.raises(StoreUnavailable):
        await hub.set_status(phone, "unavailable")
    sqlite_store.change_people = commit
    for logged in await sqlite_store.changes_since(0):     # the feed, reading the log from the start
        hub.apply(logged)
    clock.advance(0)
    got = [(u["status"], u["seq"]) for batch in peer.sent for u in batch]
    assert got == [("online", seen), ("unavailable", seen + 1)]   # each once, in order


@pytest_twisted.ensureDeferred
async def test_a_reaped_node_subscribes_nothing(store):
    """An application connecting to a node at the moment it is reaped: its subscription would hold
    the application for ever (changes neither queued nor delivered), so a fenced node makes none."""
    app, _ = await new_app(store, "alice@example.com")
    now = await store.now()
    await store.register_node("gone#1", now - 100, 0)
    await store.register_node("reaper", now, 0)
    assert (await store.reap_node("reaper", 1.0, before=now - 30)).node == "gone#1"
    with pytest.raises(NodeFenced):
        await store.open_streams("gone#1", [app.app_id], 0.0, fence=True)
    assert await store.subscribed([app.app_id]) == set()

    def online(devices):
        devices["phone"] = Device("alice@example.com", "phone", "reaper", "online", 1.0, "s")
    change = await store.change_person("alice@example.com", online, "reaper", 2.0)
    assert change.queued == {app.app_id}          # nobody holds it: it waits


@pytest_twisted.ensureDeferred
async def test_an_application_whose_subscription_fails_after_ok_is_closed_not_left_deaf(store):
    """The key is answered OK before the node registers the stream; if that registration then fails
    (the store went away, or the node was just reaped), a connection left open would look live to
    the application while nothing reaches it and its changes wait in the store for a reconnect that
    never comes. Found by the chaos checker: every status of one application stuck as offline."""
    from presence.metrics import Metrics
    from presence.ws.app import AppSession

    app, key = await new_app(store, "alice@example.com")
    now = await store.now()
    await store.register_node("gone#1", now - 100, 0)
    await store.register_node("reaper", now, 0)
    assert (await store.reap_node("reaper", 1.0, before=now - 30)).node == "gone#1"
    clock = Clock()
    streams = Streams(store, clock, "gone#1")
    streams.fence = True
    peer = ListPeer()
    session = AppSession(peer, app.app_id, Applications(store, reactor), streams, clock, 10, Metrics(), None)
    await session._handle('{"key": "%s"}' % key)
    assert peer.sent[0]["result"] == "OK"
    assert peer.closed is not None and peer.closed[0] == 1011, peer.sent   # it reconnects, and is told
    assert session.subscriber is None and streams.connection_count() == 0
    assert await store.subscribed([app.app_id]) == set()


@pytest_twisted.ensureDeferred
async def test_a_device_whose_waiting_notifications_cannot_be_read_after_ok_is_closed(store):
    """The same for a device: answered OK, then its waiting notifications could not be read. Left
    open it would never be given them (they are sent on connect only); closed, it reconnects and is."""
    from presence.metrics import Metrics
    from presence.ws.device import DeviceSession

    class Verifier:
        async def verify(self, assertion):
            return Identity("alice@example.com", "example.com", 0.0)

    clock = Clock()
    hub = Hub(store, Streams(store, clock), clock, "n")
    notifier = Notifier(store, hub, clock, "n")

    async def store_gone(email):
        raise StoreUnavailable("injected: the database went away")
    notifier.waiting = store_gone
    peer = Phone()
    session = DeviceSession(peer, hub, Verifier(), clock, 10, 10.0, 10, Metrics(), notifier)
    await session._handle('{"type": "connect", "assertion": "a~b", "device": "phone"}')
    assert peer.sent[0]["result"] is True
    assert peer.closed is not None and peer.closed[0] == 1011, peer.sent


@pytest_twisted.ensureDeferred
async def test_a_registration_is_never_undone_by_the_previous_connections_late_removal(store):
    """The last connection of an application leaves (its registry row is being removed) and the next
    one registers meanwhile: the removal must not land after the registration, or the live
    connection's row is gone and other nodes queue its changes for a reconnect that never comes."""
    from twisted.internet.defer import Deferred

    app, _ = await new_app(store, "alice@example.com")
    streams = Streams(store, Clock(), "n1")
    first = await streams.subscribe(app.app_id, ListPeer())
    assert await store.subscribed([app.app_id]) == {app.app_id}
    gate, real = Deferred(), store.unsubscribe

    async def slow_unsubscribe(node, app_id):
        await gate                   # the removal's statement is slow to commit
        await real(node, app_id)
    store.unsubscribe = slow_unsubscribe
    streams.unsubscribe(first)
    second = ensureDeferred(streams.subscribe(app.app_id, ListPeer()))
    await deferLater(reactor, 0.2, lambda: None)    # the registration had every chance to go first
    gate.callback(None)
    await second
    await streams.flush()
    assert await store.subscribed([app.app_id]) == {app.app_id}


@pytest_twisted.ensureDeferred
async def test_a_removal_that_failed_is_retried_so_nobody_holds_a_gone_application(store):
    """The last connection left while the database was away: the row would say this node holds the
    application for ever, so other nodes would neither queue its changes nor anyone send them."""
    from tests.fakes import eventually

    app, _ = await new_app(store, "alice@example.com")
    clock = Clock()
    streams = Streams(store, clock, "n1", retry_delay=5.0)
    subscriber = await streams.subscribe(app.app_id, ListPeer())
    real, calls = store.unsubscribe, []

    async def away_once(node, app_id):
        calls.append(app_id)
        if len(calls) == 1:
            raise StoreUnavailable("injected: the database went away")
        await real(node, app_id)
    store.unsubscribe = away_once
    streams.unsubscribe(subscriber)
    await eventually(lambda: len(calls) == 1)
    assert await store.subscribed([app.app_id]) == {app.app_id}
    clock.advance(5.0)
    await eventually(lambda: len(calls) == 2)
    await streams.flush()
    assert await store.subscribed([app.app_id]) == set()


def test_a_socket_libpq_already_dropped_is_a_lost_connection_not_a_traceback():
    """txpostgres registers the socket again after libpq dropped it (fd -1) while psycopg2 still
    says the connection is open: seen as 'Unhandled Error' tracebacks during database restarts."""
    from types import SimpleNamespace

    from presence.store.postgres import _Connection
    from twisted.internet import error
    from txpostgres import txpostgres

    lost = []
    conn = _Connection.__new__(_Connection)
    conn.reactor = SimpleNamespace(callLater=lambda delay, f: lost.append(f))
    conn.on_lost = lambda: None
    conn._connection = SimpleNamespace(closed=0)
    original = txpostgres.Connection.doRead
    txpostgres.Connection.doRead = lambda self: (_ for _ in ()).throw(
        ValueError("file descriptor cannot be a negative integer (-1)"))
    try:
        assert isinstance(conn.doRead(), error.ConnectionLost)
    finally:
        txpostgres.Connection.doRead = original
    assert lost == [conn.on_lost]


# -- a commit whose answer was lost: a notification is stored once, and the application told so --
@pytest_twisted.ensureDeferred
async def test_notifications_whose_commit_answer_was_lost_are_answered_ok_once_stored(database_url):
    """The database went away just as the batch committed: the node cannot tell whether it was
    stored, and an errno 50 would make the application send it again (stored twice, under two ids).
    The node reads its log entry back once the database answers, and answers OK with the ids."""
    from presence.store import CommitUnknown

    store = open_store(database_url)
    await store.open()
    store.settle_clock = reactor
    try:
        app, _ = await new_app(store, "alice@example.com")
        uid = (await store.get_grant("alice@example.com", app.app_id)).uid
        inner = store._transaction

        async def answer_lost(interaction):
            await inner(interaction)
            raise CommitUnknown("injected: committed, but the answer was lost with the connection")
        store._transaction = answer_lost
        results = await store.queue_notifications(app.app_id, [(uid, "hello", None), ("nobody", "x", None)], 5.0,
                                                  100, origin="n1")
        store._transaction = inner
        stored = await store.pending_notifications("alice@example.com", 0)
        assert [n.message for n in stored] == ["hello"]
        assert results[1] is None
        assert results[0].notification == stored[0] and results[0].queue_size == 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_at_the_commit_itself_is_settled_from_the_log(postgres_url):
    """The real thing on PostgreSQL: a deferred trigger ends the session at COMMIT, so the commit's
    answer never comes (and nothing is applied). The store says CommitUnknown, then settles it:
    not in the log, so StoreUnavailable, and the application may send the batch again."""
    import psycopg2

    from presence.store import CommitUnknown

    store = open_store(postgres_url)
    await store.open()
    store.settle_clock = reactor
    try:
        app, _ = await new_app(store, "alice@example.com")
        uid = (await store.get_grant("alice@example.com", app.app_id)).uid
        with psycopg2.connect(postgres_url) as db, db.cursor() as cur:
            cur.execute("CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS"
                        " $$ BEGIN PERFORM pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = pg_backend_pid() AND datname = current_database(); RETURN NULL; END $$")
            cur.execute("CREATE CONSTRAINT TRIGGER die AFTER INSERT ON notifications DEFERRABLE INITIALLY DEFERRED"
                        " FOR EACH ROW WHEN (NEW.message = 'doomed') EXECUTE FUNCTION die_at_commit()")
        seen = []
        settle = store._settle_notifications

        async def watch(*args):
            seen.append("settling")
            return await settle(*args)
        store._settle_notifications = watch
        with pytest.raises(StoreUnavailable) as caught:
            await store.queue_notifications(app.app_id, [(uid, "doomed", None)], 5.0, 100, origin="n1")
        assert seen == ["settling"] and not isinstance(caught.value, CommitUnknown)
        assert await store.pending_notifications("alice@example.com", 0) == []
        assert (await store.queue_notifications(app.app_id, [(uid, "fine", None)], 6.0, 100, origin="n1"))[0]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_device_offline_write_that_failed_is_retried_soon_not_after_the_full_delay(store):
    """A device's grace ended while the database restarted: its offline write failed. Retried only
    after --retry 5 s, the person stayed online (with no device) well past the quiet period the
    invariants are defined after (chaos checker: a ghost device after a database restart). Retries
    start at a quarter second and double up to the delay; simultaneous ones are one group commit."""
    from tests.fakes import eventually

    clock = Clock()
    hub = Hub(store, Streams(store, clock), clock, "n", grace=1.0, retry_delay=5.0)
    phone = Phone()
    link = await hub.attach("alice@example.com", "phone", None, phone)
    await hub.set_status(link, "online")
    inner, failures = store._transaction, []

    async def restarting(interaction):
        if len(failures) < 2:
            failures.append(1)
            raise StoreUnavailable("injected: the database is restarting")
        return await inner(interaction)
    store._transaction = restarting
    hub.detach(link, phone)
    clock.advance(1.0)                         # grace over: the first attempt fails
    await eventually(lambda: len(failures) == 1)
    clock.advance(0.25)                        # the second fails too
    await eventually(lambda: len(failures) == 2)
    clock.advance(0.5)                         # the third lands
    await eventually(lambda: ("alice@example.com", "phone") not in hub.links)
    assert await store.list_devices("alice@example.com") == []
    assert (await store.get_status("alice@example.com")).status == "offline"


@pytest_twisted.ensureDeferred
async def test_a_device_whose_attach_failed_is_not_kept_as_live(store):
    """The connect's store write failed (perhaps after committing: the answer was lost): the device
    was answered errno 50 and goes, but its link stayed, live, with no grace period, so a row that
    did commit would never be cleared (a ghost device). It now ends like a dropped connection."""
    from tests.fakes import eventually

    clock = Clock()
    hub = Hub(store, Streams(store, clock), clock, "n", grace=1.0)
    inner = store._transaction

    async def committed_but_lost(interaction):
        await inner(interaction)
        raise StoreUnavailable("injected: committed, but the answer was lost with the connection")
    store._transaction = committed_but_lost
    with pytest.raises(StoreUnavailable):
        await hub.attach("alice@example.com", "phone", None, Phone())
    store._transaction = inner
    assert [d.device for d in await store.list_devices("alice@example.com")] == ["phone"]   # the ghost
    clock.advance(1.0)
    await eventually(lambda: ("alice@example.com", "phone") not in hub.links)
    assert await store.list_devices("alice@example.com") == []


@pytest_twisted.ensureDeferred
async def test_the_log_is_still_polled_after_a_read_failed_unexpectedly(store):
    """The poll is a LoopingCall on the read: one read failing with anything but StoreUnavailable
    stopped it for good, and the node then followed the log only while its LISTEN connection lived."""
    from presence import changelog
    from tests.fakes import eventually

    clock, applied = Clock(), []
    feed = ChangeFeed(store, clock, applied.append, poll_interval=2.0)
    await feed.start()
    real, calls = store.changes_since, []

    async def odd_once(seq, limit=1000):
        calls.append(seq)
        if len(calls) == 1:
            raise ValueError("injected: something unexpected")
        return await real(seq, limit)
    store.changes_since = odd_once
    await store.log_change("other", 1.0, changelog.encode([]))
    clock.advance(2.0)
    await eventually(lambda: len(calls) == 1 and feed._reading is None)
    clock.advance(2.0)
    await eventually(lambda: len(applied) == 1)
    feed.stop()


@pytest_twisted.ensureDeferred
async def test_a_second_reaper_hands_on_the_latest_change_not_the_latest_logged(store):
    """Two dead nodes held one application. The first reaper marks a person offline (not queued:
    the other dead node still holds the application) and then logs again, with their old numbers,
    the changes its dead node had not delivered (the person's earlier 'online'). The second reaper
    took the last entry *in log order* for each person, that replay, so the waiting queue said
    online for ever (chaos checker: an application told 'unavailable' of someone long offline)."""
    app, _ = await new_app(store, "alice@example.com")
    now = await store.now()
    for name in ("b1", "c1"):
        await store.register_node(name, now - 100, 0)
        await store.subscribe(name, app.app_id)
    for name in ("b2", "c2"):
        await store.register_node(name, now, 0)

    def online(devices):
        devices["phone"] = Device("alice@example.com", "phone", "c1", "online", 1.0, "s")
    first = await store.change_person("alice@example.com", online, "c1", 1.0)
    assert not first.queued                      # held (by both)
    reaped = await store.reap_node("c2", 2.0, node="c1")
    assert [u.status for u in reaped.replayed] == ["online"] and not reaped.queued
    reaped = await store.reap_node("b2", 3.0, node="b1")
    waiting = await store.take_pending(app.app_id, 0.0)
    assert [(p.email, p.status) for p in waiting] == [("alice@example.com", "offline")]


@pytest_twisted.ensureDeferred
async def test_a_failed_reconnect_of_a_device_does_not_leave_its_earlier_row_for_ever(store):
    """The device reconnects here: the new link replaces the old one (its grace cancelled), then the
    new connect's store write fails before committing. The row still has the old session, which the
    new link's expiry did not recognise, so it stayed (chaos checker: a device row with no live
    connection, on a live node, for good)."""
    from tests.fakes import eventually

    clock = Clock()
    hub = Hub(store, Streams(store, clock), clock, "n", grace=1.0)
    old = Phone()
    link = await hub.attach("alice@example.com", "phone", None, old)
    await hub.set_status(link, "online")
    inner = store._transaction

    async def refused(interaction):
        raise StoreUnavailable("injected: the database went away")
    store._transaction = refused
    with pytest.raises(StoreUnavailable):
        await hub.attach("alice@example.com", "phone", None, Phone())
    store._transaction = inner
    assert [d.session for d in await store.list_devices("alice@example.com")] == [link.session]
    clock.advance(1.0)
    await eventually(lambda: ("alice@example.com", "phone") not in hub.links)
    assert await store.list_devices("alice@example.com") == []
    assert (await store.get_status("alice@example.com")).status == "offline"


@pytest_twisted.ensureDeferred
async def test_a_connect_that_fails_at_once_is_the_store_unavailable_not_a_failed_start(postgres_url):
    """txpostgres raised straight out of the pool's start (epoll refused a socket libpq had just
    replaced, as the server restarted): the node's start, which retries only StoreUnavailable, gave
    up for good and the process stayed up without listening (chaos checker: a node that never came
    back after a database restart)."""
    from presence.store import postgres

    store = open_store(postgres_url)
    real = postgres._Pool.start

    def vanished(self):
        raise FileNotFoundError(2, "No such file or directory")
    postgres._Pool.start = vanished
    try:
        with pytest.raises(StoreUnavailable, match="No such file"):
            await store.open()
    finally:
        postgres._Pool.start = real
    await store.open()             # and the next attempt simply works
    await store.close()
