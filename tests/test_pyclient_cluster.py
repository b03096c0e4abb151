"""The Python client (clients/python) against real node processes on PostgreSQL: an application that
syncs, loses its node to kill -9, resumes on a second node while changes go on, and ends with the
true state; a device client that connects, reports, and receives and acknowledges notifications
sent over HTTP and over the websocket."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred, gatherResults

from presence.apps import Applications
from presence.store import open_store
from presence_client import Backoff, PresenceApp, PresenceDevice, Stopped
from tests.cluster import AUDIENCE, NodeProcess
from tests.fakes import until
from tests.pyclient import AsyncioThread, idp_credentials
from tests.wsclient import WSClient


@pytest_twisted.ensureDeferred
async def test_an_application_survives_kill_9_of_its_node_and_ends_with_the_true_state(idp, postgres_url, tmp_path):
    from twisted.internet import reactor

    store = open_store(postgres_url)
    await store.open()
    apps = Applications(store, reactor)
    app = await apps.mark_verified(await apps.register("dev@example.com", "chat.example", "Chat", ""))
    for email in ("alice@example.com", "bob@example.com"):
        await apps.grant(email, app.app_id)
    app, key = await apps.activate(app)
    a, b = (NodeProcess(name, postgres_url, idp, tmp_path) for name in ("a", "b"))
    await gatherResults([ensureDeferred(n.start()) for n in (a, b)])
    client = AsyncioThread()
    changes: list[tuple[str, str, int]] = []
    try:
        # the application, on a first (then b); alice's device, the Python client, on b
        stream = PresenceApp([f"ws://127.0.0.1:{a.ws}", f"ws://127.0.0.1:{b.ws}"], app.app_id, key,
                             http_url=[f"http://127.0.0.1:{a.web}", f"http://127.0.0.1:{b.web}"],
                             on_change=lambda c: changes.append((c.email, c.status, c.seq)),
                             backoff=Backoff(base=0.05, cap=0.5))
        await client.run(stream.wait_synced(15))
        assert sorted((p.email, p.status) for p in stream.people.values()) == [
            ("alice@example.com", "offline"), ("bob@example.com", "offline")]
        uid = {p.email: p.uid for p in client.call(lambda: list(stream.people.values()))}
        laptop = PresenceDevice(idp_credentials(idp, "alice@example.com", "laptop", AUDIENCE, f"http://127.0.0.1:{b.web}",
                                                f"ws://127.0.0.1:{b.ws}", "pyclient-alice"),
                                backoff=Backoff(base=0.05, cap=0.5))
        await client.run(laptop.wait_connected())
        await client.until(lambda: stream.people[uid["alice@example.com"]].status == "online", "alice online")

        # kill -9 the application's node; meanwhile the people change on b
        a.kill()
        bob = await WSClient.connect(b.ws, "/presence")
        bob.send({"type": "connect", "assertion": idp.assertion("bob@example.com", AUDIENCE), "device": "phone"})
        assert (await bob.receive())["result"] is True
        bob.send({"type": "status", "status": "online"})
        assert await bob.receive() == {"result": "OK"}
        await client.run(laptop.set_status("unavailable"))

        # the client is back on b, resumed from its last synced: the true state, every transition once
        response = await treq.get(f"http://127.0.0.1:{b.web}/{app.app_id}/people",
                                  headers={"authorization": [f"Bearer {key}"]})
        truth = {p["uid"]: (p["status"], p["last_active"], p["seq"]) for p in (await response.json())["people"]}
        assert [status for status, _, _ in truth.values()] and truth[uid["bob@example.com"]][0] == "online"
        held = lambda: {u: (p.status, p.last_active, p.seq) for u, p in stream.people.items()}  # noqa: E731
        await client.until(lambda: held() == truth, "the client to hold the true state")
        assert client.call(lambda: stream.url) == f"ws://127.0.0.1:{b.ws}/{app.app_id}"
        assert client.call(lambda: stream.connections) >= 2
        alice = [(s, seq) for e, s, seq in client.call(lambda: list(changes)) if e == "alice@example.com"]
        assert [s for s, _ in alice] == ["offline", "online", "unavailable"], alice
        assert [seq for _, seq in alice] == sorted({seq for _, seq in alice})

        # notifications over HTTP and over the websocket, with their per-item results; the device acks
        received = []
        laptop.on_notification = received.append
        results = await client.run(stream.notify([{"uid": uid["alice@example.com"], "message": "over HTTP"},
                                                  {"uid": "nobody", "message": "lost"}], via="http"))
        assert results[0]["result"] == "OK" and (results[1]["result"], results[1]["errno"]) == ("KO", 41)
        results = await client.run(stream.notify([{"uid": uid["alice@example.com"], "message": "over the websocket",
                                                   "action": "https://chat.example/room/1"}], via="ws"))
        assert [r["result"] for r in results] == ["OK"]
        await client.until(lambda: len(received) == 2, "the device to receive both notifications")
        assert [n["message"] for n in received] == ["over HTTP", "over the websocket"]
        assert received[1]["action"] == "https://chat.example/room/1" and received[1]["app"] == "Chat"

        async def waiting() -> int:
            return (await store._query("SELECT count(*) FROM notifications", ()))[0][0]
        await until(lambda: ensureDeferred(waiting()).addCallback(lambda n: n == 0), "the acks to remove both")

        # the device's node is killed too and comes back: the device reconnects (a new session) and
        # states its status again; the application, back on b as well, ends with it
        session = client.call(lambda: laptop.session_id)
        b.kill()
        await b.start()
        await client.until(lambda: laptop.connected.is_set() and laptop.session_id not in (None, session),
                           "the device to reconnect to the restarted node")
        await client.until(lambda: stream.connected.is_set()
                           and stream.people[uid["alice@example.com"]].status == "unavailable",
                           "the application to hear the device's status again")

        # the device leaves: offline, and the application hears it
        await client.run(laptop.close())
        await client.until(lambda: stream.people[uid["alice@example.com"]].status == "offline", "alice offline")
        await client.run(stream.close())

        # a wrong key is not retried: the client stops with the node's errno
        wrong = PresenceApp(f"ws://127.0.0.1:{b.ws}", app.app_id, "x" * 1024, backoff=Backoff(base=0.05, cap=0.5))
        with pytest.raises(Stopped) as refused:
            await client.run(wrong.wait())
        assert refused.value.errno == 30
        bob.close()
    finally:
        client.stop()
        await gatherResults([ensureDeferred(n.stop()) for n in (a, b)])
        await store.close()
