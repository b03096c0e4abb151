"""A real node over loopback sockets: devices prove their email with a real assertion, applications
holding a grant receive exactly the documented lists, and bad input gets the documented answer."""

from __future__ import annotations

import pytest
import pytest_twisted

from presence import errors
from presence.config import Config
from presence.node import Node
from tests.fakes import until
from tests.wsclient import WSClient

AUDIENCE = "http://presence.test:8080"


class Running:
    def __init__(self, node: Node, idp):
        self.node = node
        self.idp = idp

    @property
    def ws(self) -> int:
        return self.node.ws_port.getHost().port

    async def app(self, *granted: str, active: bool = True, verified: bool = True):
        apps = self.node.apps
        app = await apps.register("dev@example.com", f"app{len(await self.node.store.list_apps())}.example", "An app", "")
        key = None
        if verified:
            app = await apps.mark_verified(app)
            for email in granted:
                await apps.grant(email, app.app_id)
        if active:
            app, key = await apps.activate(app)
        return app, key

    async def stream(self, app, key) -> WSClient:
        client = await WSClient.connect(self.ws, "/" + app.app_id)
        client.send({"key": key})
        assert await client.receive() == {"result": "OK", "app_id": app.app_id}
        return client

    async def device(self, email: str, device: str | None = None, **extra) -> WSClient:
        client = await WSClient.connect(self.ws, "/presence")
        message = {"type": "connect", "assertion": self.idp.assertion(email, AUDIENCE), **extra}
        if device:
            message["device"] = device
        client.send(message)
        reply = await client.receive()
        assert reply["result"] is True and reply["session_id"]
        return client

    async def status(self, client: WSClient, status: str, **extra) -> None:
        client.send({"type": "status", "status": status, **extra})
        assert await client.receive() == {"result": "OK"}


def config(idp, tmp_path, **overrides) -> Config:
    values = dict(web="tcp:0:interface=127.0.0.1", ws="tcp:0:interface=127.0.0.1", public_url=AUDIENCE,
                  database=f"sqlite:{tmp_path / 'node.sqlite'}", node="test-node", insecure_identity=True,
                  trusted_issuers=[idp.domain], grace=0.3, batch_window=0.02, auth_timeout=2.0)
    values.update(overrides)
    return Config(**values)


@pytest_twisted.async_yield_fixture
async def running(idp, tmp_path, request):
    overrides = getattr(request, "param", {})
    node = Node(config(idp, tmp_path, **overrides))
    await node.start()
    yield Running(node, idp)
    await node.stop()


def statuses(batch):
    return [(u["email"], u["status"]) for u in batch]


@pytest_twisted.ensureDeferred
async def test_a_device_status_reaches_only_granted_applications(running):
    app, key = await running.app("alice@example.com")
    other, other_key = await running.app()
    granted = await running.stream(app, key)
    ungranted = await running.stream(other, other_key)
    phone = await running.device("alice@example.com", "phone")
    await running.status(phone, "online")
    batch = await granted.receive()
    grant = await running.node.store.get_grant("alice@example.com", app.app_id)
    assert len(batch) == 1
    assert batch[0]["email"] == "alice@example.com" and batch[0]["status"] == "online"
    assert batch[0]["uid"] == grant.uid and isinstance(batch[0]["at"], float)
    await running.status(phone, "unavailable")
    assert statuses(await granted.receive()) == [("alice@example.com", "unavailable")]
    await ungranted.nothing_more()


@pytest_twisted.ensureDeferred
async def test_changes_wait_for_an_absent_application_and_arrive_on_connect(running):
    app, key = await running.app("alice@example.com", "bob@example.com")
    phone = await running.device("alice@example.com")
    laptop = await running.device("bob@example.com")
    await running.status(phone, "online")
    await running.status(laptop, "online")
    await running.status(phone, "unavailable")
    stream = await running.stream(app, key)
    assert sorted(statuses(await stream.receive())) == [("alice@example.com", "unavailable"),
                                                         ("bob@example.com", "online")]
    await stream.nothing_more()


@pytest_twisted.ensureDeferred
async def test_two_devices_and_the_grace_period(running):
    app, key = await running.app("alice@example.com")
    stream = await running.stream(app, key)
    phone = await running.device("alice@example.com", "phone")
    laptop = await running.device("alice@example.com", "laptop")
    await running.status(phone, "unavailable")
    assert statuses(await stream.receive()) == [("alice@example.com", "unavailable")]
    await running.status(laptop, "online")
    assert statuses(await stream.receive()) == [("alice@example.com", "online")]
    laptop.drop()
    # within the grace period a reconnect of the same device changes nothing
    laptop = await running.device("alice@example.com", "laptop")
    await stream.nothing_more(0.5)
    laptop.drop()
    # after it, the person is as available as the phone
    assert statuses(await stream.receive()) == [("alice@example.com", "unavailable")]


@pytest_twisted.ensureDeferred
async def test_a_second_connection_of_the_same_device_replaces_the_first(running):
    first = await running.device("alice@example.com", "phone")
    await running.device("alice@example.com", "phone")
    assert await first.wait_closed() == errors.CLOSE_REPLACED


@pytest_twisted.ensureDeferred
async def test_application_ids_limit_a_session_to_those_applications(running):
    a, a_key = await running.app("alice@example.com")
    b, b_key = await running.app("alice@example.com")
    a_stream, b_stream = await running.stream(a, a_key), await running.stream(b, b_key)
    phone = await running.device("alice@example.com", application_ids=[a.app_id])
    await running.status(phone, "online")
    assert statuses(await a_stream.receive()) == [("alice@example.com", "online")]
    await b_stream.nothing_more()


@pytest_twisted.ensureDeferred
async def test_several_connections_of_one_application_each_receive_everything(running):
    app, key = await running.app("alice@example.com")
    one, two = await running.stream(app, key), await running.stream(app, key)
    phone = await running.device("alice@example.com")
    await running.status(phone, "online")
    assert statuses(await one.receive()) == statuses(await two.receive()) == [("alice@example.com", "online")]


# -- bad input ---------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_application_authentication_failures(running):
    app, key = await running.app()
    pending, _ = await running.app(verified=False, active=False)
    inactive, _ = await running.app(active=False)
    cases = [
        (app.app_id, {"key": "wrong"}, errors.BAD_KEY, errors.CLOSE_AUTH_FAILED),
        (app.app_id, {"nokey": 1}, errors.BAD_FIELD, errors.CLOSE_AUTH_FAILED),
        ("doesnotexist", {"key": key}, errors.UNKNOWN_APP, errors.CLOSE_UNKNOWN_APP),
        (inactive.app_id, {"key": key}, errors.APP_NOT_ACTIVE, errors.CLOSE_APP_NOT_READY),
    ]
    for app_id, message, errno, code in cases:
        client = await WSClient.connect(running.ws, "/" + app_id)
        client.send(message)
        reply = await client.receive()
        assert reply["result"] == "KO" and reply["errno"] == errno, (app_id, reply)
        assert await client.wait_closed() == code
    # a pending application has no app id yet, so nothing can even name it
    assert pending.app_id is None


@pytest.mark.parametrize("running", [{"auth_timeout": 0.3}], indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_client_that_never_authenticates_is_closed(running):
    for path in ("/presence", "/someapp"):
        client = await WSClient.connect(running.ws, path)
        reply = await client.receive()
        assert reply["errno"] == errors.AUTH_TIMEOUT
        assert await client.wait_closed() == errors.CLOSE_AUTH_TIMEOUT


@pytest_twisted.ensureDeferred
async def test_device_protocol_errors_leave_the_session_usable(running):
    client = await WSClient.connect(running.ws, "/presence")
    for raw, errno in [(b"{not json", errors.MALFORMED), (b"[1, 2]", errors.MALFORMED),
                       (b'{"type": "dance"}', errors.UNKNOWN_TYPE),
                       (b'{"type": "status", "status": "online"}', errors.NOT_CONNECTED),
                       (b'{"type": "connect"}', errors.BAD_FIELD),
                       (b'{"type": "connect", "assertion": "x", "device": 5}', errors.BAD_FIELD)]:
        client.send_raw(raw)
        reply = await client.receive()
        assert (reply["result"], reply["errno"]) == ("KO", errno), raw
    client.send({"type": "connect", "assertion": running.idp.assertion("a@example.com", AUDIENCE)})
    assert (await client.receive())["result"] is True
    client.send({"type": "status", "status": "asleep"})
    assert (await client.receive())["errno"] == errors.BAD_FIELD
    client.send({"type": "connect", "assertion": running.idp.assertion("a@example.com", AUDIENCE)})
    assert (await client.receive())["errno"] == errors.ALREADY_CONNECTED
    await running.status(client, "online")


@pytest_twisted.ensureDeferred
async def test_bad_assertions_are_refused_with_the_reason_and_closed(running):
    cases = [
        (running.idp.assertion("a@example.com", "http://elsewhere.test"), errors.ASSERTION_AUDIENCE),
        (running.idp.assertion("a@example.com", AUDIENCE, now=1_000_000), errors.ASSERTION_EXPIRED),
        ("garbage~garbage", errors.ASSERTION_MALFORMED),
    ]
    for assertion, errno in cases:
        client = await WSClient.connect(running.ws, "/presence")
        client.send({"type": "connect", "assertion": assertion})
        reply = await client.receive()
        assert reply["errno"] == errno and reply["error"]
        assert await client.wait_closed() == errors.CLOSE_AUTH_FAILED


@pytest_twisted.ensureDeferred
async def test_binary_frames_are_refused(running):
    client = await WSClient.connect(running.ws, "/presence")
    client.send_raw(b"\x00\x01", binary=True)
    assert (await client.receive())["errno"] == errors.BINARY
    assert await client.wait_closed() == errors.CLOSE_UNSUPPORTED


@pytest.mark.parametrize("running", [{"max_message": 4096}], indirect=True)
@pytest_twisted.ensureDeferred
async def test_oversized_messages_close_the_connection(running):
    client = await WSClient.connect(running.ws, "/presence")
    client.send({"type": "connect", "assertion": "x" * 5000})
    assert await client.wait_closed() == errors.CLOSE_TOO_BIG


@pytest_twisted.ensureDeferred
async def test_an_unknown_path_is_refused_in_the_handshake(running):
    with pytest.raises(Exception):
        await WSClient.connect(running.ws, "/not/a/path")


@pytest.mark.parametrize("running", [{"device_rate": 1.0, "device_burst": 2}], indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_device_sending_too_fast_is_told_to_slow_down(running):
    phone = await running.device("a@example.com")
    replies = []
    for status in ("online", "unavailable", "online"):
        phone.send({"type": "status", "status": status})
        replies.append(await phone.receive())
    assert replies[:2] == [{"result": "OK"}] * 2
    assert replies[2]["errno"] == errors.SLOW_DOWN


@pytest_twisted.ensureDeferred
async def test_clean_stop_closes_with_going_away_and_queues_the_offline_change(idp, tmp_path):
    node = Node(config(idp, tmp_path))
    await node.start()
    running = Running(node, idp)
    app, key = await running.app("alice@example.com")
    phone = await running.device("alice@example.com")
    await running.status(phone, "online")
    await node.stop()
    assert await phone.wait_closed() == errors.CLOSE_GOING_AWAY
    # the application was away: on the next start its waiting queue holds the offline change
    node = Node(config(idp, tmp_path))
    await node.start()
    try:
        stream = await Running(node, idp).stream(app, key)
        assert statuses(await stream.receive()) == [("alice@example.com", "offline")]
    finally:
        await node.stop()


# Autobahn rounds this timeout to whole seconds (txaio batched timers), so no sub-second value here.
@pytest.mark.parametrize("running", [{"handshake_timeout": 2}], indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_client_that_never_finishes_the_handshake_is_dropped(running):
    from twisted.internet import protocol, reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint

    lost = Deferred()

    class Silent(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"GET /presence HTTP/1.1\r\nHost: x\r\n")  # and never the rest

        def connectionLost(self, reason):
            lost.callback(None)

    await TCP4ClientEndpoint(reactor, "127.0.0.1", running.ws).connect(protocol.Factory.forProtocol(Silent))
    timer = reactor.callLater(5, lost.cancel)
    await lost   # the node hung up (a CancelledError here would mean it did not)
    timer.cancel()
    # and it still serves others
    await running.device("a@example.com")


@pytest.mark.parametrize("running", [{"max_message": 8192}], indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_waiting_queue_larger_than_one_message_arrives_whole(running):
    """Regression: what waited was sent as one message over --max-message, refused, and lost."""
    from presence.store import PendingUpdate

    app, key = await running.app()
    now = running.node.reactor.seconds()
    await running.node.store.queue_pending([PendingUpdate(app.app_id, f"p{i}@example.com", f"u{i}", "online",
                                                          now - 1 + i / 10_000) for i in range(400)])
    stream = await running.stream(app, key)
    got = []
    while len(got) < 400:
        got += statuses(await stream.receive())
    assert sorted(got) == sorted((f"p{i}@example.com", "online") for i in range(400))
    assert await running.node.store.count_pending(app.app_id) == 0


@pytest_twisted.ensureDeferred
async def test_closed_connections_leave_no_cyclic_garbage(running):
    """Frozen long-lived objects (--gc-freeze) are only safe if a closed connection frees itself by
    reference counting: no cycle may hold a protocol or a session."""
    import gc

    from presence.ws.session import Session

    app, key = await running.app("alice@example.com")
    stream = await running.stream(app, key)
    phone = await running.device("alice@example.com")
    await running.status(phone, "online")
    await stream.receive()
    idle = await WSClient.connect(running.ws, "/presence")
    gc.collect()
    for client in (stream, phone, idle):
        client.drop()
    node = running.node
    await until(lambda: not node.ws_factory.open_connections and all(link.grace is None for link in node.hub.links.values()),
                "the connections to be lost and alice's grace period to end")
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage
                  if isinstance(o, Session) or type(o).__name__ == "PresenceServerProtocol"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []


@pytest_twisted.ensureDeferred
async def test_a_running_node_leaves_full_collections_to_its_compaction(idp, tmp_path):
    """Automatic full collections stalled a loaded node for 100-200 ms (docs/performance.md): a
    running node only collects the young generations; its --gc-compact timer runs the full ones."""
    import gc

    from presence.node import NO_AUTOMATIC_FULL_COLLECTION

    before = gc.get_threshold()
    node = Node(config(idp, tmp_path, gc_compact=0.2))
    await node.start()
    try:
        assert gc.get_threshold() == (before[0], before[1], NO_AUTOMATIC_FULL_COLLECTION)
        def full_collections() -> float:
            return node.metrics.registry.get_sample_value("presence_gc_pause_seconds_count", {"generation": "2"}) or 0

        full = full_collections()
        # the compaction timer (every 0.2 s) runs full collections
        await until(lambda: full_collections() > full, "a full collection by the --gc-compact timer")
    finally:
        await node.stop()
    assert gc.get_threshold() == before
