"""Several `twistd presence` processes on one real PostgreSQL: changes cross nodes once and in order,
a person's devices on two nodes combine, the waiting queue is shared, revocation holds everywhere,
a killed node's devices go offline, and a lost database connection loses nothing."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from presence.apps import Applications
from presence.store import open_store
from tests.cluster import AUDIENCE, NodeProcess
from tests.conftest import _admin
from tests.fakes import until
from tests.wsclient import WSClient


# "Nothing more arrived" waits this long. The nodes batch for 0.02 s (--batch-window) and a change
# crosses nodes through LISTEN/NOTIFY in milliseconds on loopback, so a stray or duplicate update
# would follow the expected ones within a few batch windows; 0.5 s is 25 of them, with room for a
# loaded machine.
QUIET = 0.5


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Cluster:
    def __init__(self, nodes: list[NodeProcess], store, idp):
        self.nodes = {n.name: n for n in nodes}
        self.store = store
        self.apps = Applications(store, reactor)
        self.idp = idp

    async def app(self, *granted: str):
        app = await self.apps.register("dev@example.com", f"app{len(await self.store.list_apps())}.example", "App", "")
        app = await self.apps.mark_verified(app)
        for email in granted:
            await self.apps.grant(email, app.app_id)
        app, key = await self.apps.activate(app)
        return app, key

    async def stream(self, node: str, app, key) -> WSClient:
        client = await WSClient.connect(self.nodes[node].ws, "/" + app.app_id)
        client.send({"key": key})
        assert (await client.receive())["result"] == "OK"
        # the node answers OK, then records in the database that it streams the application: changes
        # made from now on reach this connection (and not the waiting queue)
        await until(lambda: self.subscribed(node, app.app_id), f"node {node} to record the subscription")
        return client

    async def subscribed(self, node: str, app_id: str) -> bool:
        """Does node ``node`` (any incarnation: ``<name>#<id>``) stream ``app_id``, per the database?"""
        rows = await self.store._query("SELECT count(*) FROM subscriptions WHERE app_id = ? AND node LIKE ?",
                                       (app_id, node + "#%"))
        return rows[0][0] > 0

    async def device(self, node: str, email: str, device: str = "phone") -> WSClient:
        client = await WSClient.connect(self.nodes[node].ws, "/presence")
        client.send({"type": "connect", "assertion": self.idp.assertion(email, AUDIENCE), "device": device})
        assert (await client.receive())["result"] is True
        return client

    async def status(self, client: WSClient, status: str) -> None:
        client.send({"type": "status", "status": status})
        assert await client.receive() == {"result": "OK"}


@pytest_twisted.async_yield_fixture
async def cluster(idp, postgres_url, tmp_path):
    store = open_store(postgres_url)
    await store.open()   # create the schema once, before three nodes race for it
    nodes = [NodeProcess(name, postgres_url, idp, tmp_path) for name in ("a", "b", "c")]
    await gatherResults([ensureDeferred(n.start()) for n in nodes])
    try:
        yield Cluster(nodes, store, idp)
    finally:
        await gatherResults([ensureDeferred(n.stop()) for n in nodes])
        await store.close()


def pairs(batch):
    return [(u["email"], u["status"]) for u in batch]


async def received(client: WSClient, count: int, timeout: float = 10.0) -> list[tuple[str, str]]:
    """Exactly ``count`` updates (across however many lists), then nothing more."""
    got: list[tuple[str, str]] = []
    while len(got) < count:
        got += pairs(await client.receive(timeout))
    await client.nothing_more(QUIET)
    return got


@pytest_twisted.ensureDeferred
async def test_a_change_reaches_every_granted_connection_on_every_node_once_and_in_order(cluster):
    app, key = await cluster.app("alice@example.com")
    other, other_key = await cluster.app()
    on_b, on_c = await cluster.stream("b", app, key), await cluster.stream("c", app, key)
    also_a = await cluster.stream("a", app, key)
    ungranted = await cluster.stream("b", other, other_key)
    phone = await cluster.device("a", "alice@example.com")
    sequence = ["online", "unavailable", "offline", "online", "unavailable"]
    for status in sequence:
        await cluster.status(phone, status)
        # the next change is made once every stream has this one: each change is its own list
        for stream in (on_b, on_c, also_a):
            assert pairs(await stream.receive()) == [("alice@example.com", status)]
    for stream in (on_b, on_c, also_a, ungranted):
        await stream.nothing_more(QUIET)   # no duplicate, and nothing for the ungranted application


@pytest_twisted.ensureDeferred
async def test_devices_on_two_nodes_combine_into_the_most_available(cluster):
    app, key = await cluster.app("alice@example.com")
    stream = await cluster.stream("c", app, key)
    phone = await cluster.device("a", "alice@example.com", "phone")
    laptop = await cluster.device("b", "alice@example.com", "laptop")
    await cluster.status(laptop, "unavailable")
    assert await received(stream, 1) == [("alice@example.com", "unavailable")]
    await cluster.status(phone, "online")
    assert await received(stream, 1) == [("alice@example.com", "online")]
    await cluster.status(phone, "offline")
    assert await received(stream, 1) == [("alice@example.com", "unavailable")]


@pytest_twisted.ensureDeferred
async def test_the_waiting_queue_is_shared_and_revocation_holds_on_every_node(cluster):
    app, key = await cluster.app("alice@example.com", "bob@example.com")
    first = await cluster.stream("b", app, key)
    first.close()
    await first.wait_closed()
    # changes go to the waiting queue once no node streams the application any more
    await until(lambda: ensureDeferred(cluster.subscribed("b", app.app_id)).addCallback(lambda yes: not yes),
                "node b to drop the application's subscription")
    alice, bob = await cluster.device("a", "alice@example.com"), await cluster.device("c", "bob@example.com")
    await cluster.status(alice, "online")
    await cluster.status(bob, "unavailable")
    # the application comes back on another node and gets what waited
    again = await cluster.stream("c", app, key)
    assert sorted(await received(again, 2)) == [("alice@example.com", "online"), ("bob@example.com", "unavailable")]
    # alice revokes (through any node's store): nothing more of her, anywhere
    await cluster.apps.revoke("alice@example.com", app.app_id)
    on_a = await cluster.stream("a", app, key)
    await cluster.status(alice, "unavailable")
    await cluster.status(bob, "online")
    assert await received(again, 1) == [("bob@example.com", "online")]
    assert await received(on_a, 1) == [("bob@example.com", "online")]


@pytest_twisted.ensureDeferred
async def test_a_killed_node_s_devices_go_offline_and_applications_hear_it(cluster):
    app, key = await cluster.app("alice@example.com", "bob@example.com")
    stream = await cluster.stream("b", app, key)
    alice = await cluster.device("a", "alice@example.com")
    bob = await cluster.device("c", "bob@example.com")
    await cluster.status(alice, "online")
    await cluster.status(bob, "online")
    assert sorted(await received(stream, 2)) == [("alice@example.com", "online"), ("bob@example.com", "online")]
    cluster.nodes["a"].kill()
    # after --node-timeout (3 s) a survivor marks a's devices offline: alice, not bob
    assert await received(stream, 1, timeout=15) == [("alice@example.com", "offline")]
    # recorded by node c's incarnation (its name, "#", a new id at every start)
    assert [d.node.partition("#")[0] for d in await cluster.store.list_devices("bob@example.com")] == ["c"]
    outputs = cluster.nodes["b"].output() + cluster.nodes["c"].output()
    assert "cleaned up after node a#" in outputs


@pytest_twisted.ensureDeferred
async def test_a_lost_database_connection_loses_no_change(cluster, postgres_url):
    people = [f"p{i}@example.com" for i in range(20)]
    app, key = await cluster.app(*people)
    stream = await cluster.stream("b", app, key)
    devices = [await cluster.device("a", email) for email in people]
    for i, device in enumerate(devices):
        await cluster.status(device, "online")
        if i == 9:
            # cut node b off from PostgreSQL (its listener and its pool) in the middle of the stream
            conn = _admin()
            with conn.cursor() as cur:
                # only this test's database: the server is shared with other tests and people
                cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE application_name = 'presence-b' AND datname = %s",
                            (postgres_url.rpartition("/")[2],))
                assert cur.fetchone()[0] >= 1
            conn.close()
        await sleep(0.05)
    got = await received(stream, len(people), timeout=20)
    assert sorted(got) == sorted((email, "online") for email in people)
    assert "reconnecting" in cluster.nodes["b"].output()


@pytest_twisted.ensureDeferred
async def test_a_notification_posted_on_one_node_reaches_a_device_on_another(cluster):
    import treq

    app, key = await cluster.app("alice@example.com")
    uid = (await cluster.store.get_grant("alice@example.com", app.app_id)).uid
    phone = await cluster.device("b", "alice@example.com")
    response = await treq.post(f"http://127.0.0.1:{cluster.nodes['a'].web}/{app.app_id}/notification",
                               json=[{"uid": uid, "message": "from node a"}],
                               headers={"authorization": [f"Bearer {key}"]})
    assert response.code == 200 and (await response.json())[0]["result"] == "OK"
    received = await phone.receive(timeout=10)
    assert [n["message"] for n in received["notifications"]] == ["from node a"]


@pytest_twisted.ensureDeferred
async def test_a_device_revoked_on_one_node_s_page_is_closed_on_another_and_refused_there(cluster):
    import json

    import treq

    from presence import errors
    from presence.identity import jws, make_assertion, new_user_key
    from tests.webnode import Browser

    async def post(node: str, path: str, body: dict) -> tuple[int, dict]:
        response = await treq.post(f"http://127.0.0.1:{cluster.nodes[node].web}{path}", data=json.dumps(body).encode(),
                                   headers={"content-type": ["application/json"]})
        return response.code, json.loads(await treq.content(response))

    class Pages:   # what tests.webnode.Browser needs of node a
        public_url = f"http://127.0.0.1:{cluster.nodes['a'].web}"

    person = Browser(Pages())
    await person.get("/login")
    signed_in = await person.post_json("/login/assertion", {"assertion": cluster.idp.assertion("alice@example.com",
                                                                                              AUDIENCE)})
    assert signed_in.code == 200, signed_in.text
    await person.get("/")

    key = new_user_key()
    _, started = await post("a", "/pair", {"publicKey": jws.public_key_to_json(key.public_key(), "browserid")})
    shown = await person.post("/me/pair", {"code": started["user_code"], "decision": "approve", "name": "desk"})
    assert shown.location == "/me?done=paired", shown.text
    code, taken = await post("a", "/pair/token", {"device_code": started["device_code"]})
    assert code == 200, taken

    async def connect() -> tuple[WSClient, dict]:
        client = await WSClient.connect(cluster.nodes["b"].ws, "/presence")
        client.send({"type": "connect", "assertion": make_assertion(taken["certificate"], key, AUDIENCE,
                                                                    reactor.seconds())})
        return client, await client.receive()

    desk, answer = await connect()                       # on node b
    assert answer["result"] is True, answer
    revoked = await person.post("/me/unpair", {"id": taken["pairing"]})   # on node a's page
    assert revoked.location == "/me?done=unpaired"
    assert await desk.closed.addTimeout(10, reactor) == errors.CLOSE_DEVICE_REVOKED   # heard through the log
    again, answer = await connect()
    assert answer["errno"] == errors.PAIRING_REVOKED and await again.closed == errors.CLOSE_AUTH_FAILED


@pytest_twisted.ensureDeferred
async def test_a_key_rotated_by_the_operator_closes_the_application_s_streams_on_every_node(cluster):
    from presence import errors

    app, key = await cluster.app("alice@example.com")
    streams = [await cluster.stream(node, app, key) for node in ("a", "b")]
    await cluster.apps.activate(app)     # what presence-admin apps activate does to an active application
    for stream in streams:
        assert await stream.closed.addTimeout(10, reactor) == errors.CLOSE_REVOKED
