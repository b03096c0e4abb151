"""Live notifications over real loopback sockets: an application posts (HTTP or its websocket), the
person's devices receive, acknowledge, and nothing is lost or stored that should not be."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from presence import errors
from presence.apps import Applications
from presence.hub import Hub
from presence.node import Node
from presence.notifications import Notifier
from presence.streams import Streams
from tests.test_node_e2e import Running, config


class Posting(Running):
    async def post(self, app_id: str, body, key: str | None = None, raw: bytes | None = None):
        headers = {"content-type": ["application/json"]}
        if key is not None:
            headers["authorization"] = [f"Bearer {key}"]
        port = self.node.web_port.getHost().port
        data = raw if raw is not None else json.dumps(body).encode()
        response = await treq.post(f"http://127.0.0.1:{port}/{app_id}/notification", data=data, headers=headers)
        return response.code, await response.json(), response

    async def granted_app(self, *emails):
        app, key = await self.app(*emails)
        uids = {e: (await self.node.store.get_grant(e, app.app_id)).uid for e in emails}
        return app, key, uids


@pytest_twisted.async_yield_fixture
async def running(idp, tmp_path, request):
    node = Node(config(idp, tmp_path, **getattr(request, "param", {})))
    await node.start()
    yield Posting(node, idp)
    await node.stop()


def messages(notes):
    return [n["message"] for n in notes]


@pytest_twisted.ensureDeferred
async def test_a_connected_device_receives_a_posted_notification_at_once(running):
    app, key, uids = await running.granted_app("alice@example.com")
    phone = await running.device("alice@example.com")
    code, body, _ = await running.post(app.app_id, [
        {"uid": uids["alice@example.com"], "message": "Bob asks you to join the room",
         "action": "https://app0.example/room/1"}], key)
    assert code == 200 and body == [{"result": "OK", "queue_size": 1}]
    received = await phone.receive()
    assert received["type"] == "notifications"
    [note] = received["notifications"]
    assert note["message"] == "Bob asks you to join the room" and note["action"] == "https://app0.example/room/1"
    assert note["appid"] == app.app_id and note["app"] == "An app" and note["domain"] == app.domain
    assert isinstance(note["id"], int) and isinstance(note["at"], float)


@pytest_twisted.ensureDeferred
async def test_a_device_connecting_later_gets_everything_waiting_in_one_message_until_it_acks(running):
    app, key, uids = await running.granted_app("alice@example.com")
    uid = uids["alice@example.com"]
    await running.post(app.app_id, [{"uid": uid, "message": f"m{i}"} for i in range(3)], key)
    phone = await running.device("alice@example.com", "phone")
    first = await phone.receive()
    assert messages(first["notifications"]) == ["m0", "m1", "m2"]
    await phone.nothing_more()
    # no ack: sent again on the next connect (of any device)
    laptop = await running.device("alice@example.com", "laptop")
    again = await laptop.receive()
    assert messages(again["notifications"]) == ["m0", "m1", "m2"]
    laptop.send({"type": "ack", "ids": [n["id"] for n in again["notifications"][:2]]})
    assert await laptop.receive() == {"result": "OK", "acked": 2}
    tablet = await running.device("alice@example.com", "tablet")
    assert messages((await tablet.receive())["notifications"]) == ["m2"]


@pytest_twisted.ensureDeferred
async def test_a_full_queue_drops_the_oldest(running):
    app, key, uids = await running.granted_app("alice@example.com")
    uid = uids["alice@example.com"]
    code, body, _ = await running.post(app.app_id, [{"uid": uid, "message": f"m{i}"} for i in range(100)], key)
    assert body[-1] == {"result": "OK", "queue_size": 100}
    code, body, _ = await running.post(app.app_id, [{"uid": uid, "message": "m100"}], key)
    assert body == [{"result": "OK", "queue_size": 100}]
    phone = await running.device("alice@example.com")
    notes = (await phone.receive())["notifications"]
    assert len(notes) == 100 and notes[0]["message"] == "m1" and notes[-1]["message"] == "m100"
    scraped = running.node.metrics.notifications_dropped._value.get()
    assert scraped == 1


@pytest_twisted.ensureDeferred
async def test_revoking_deletes_the_queue(running):
    app, key, uids = await running.granted_app("alice@example.com")
    await running.post(app.app_id, [{"uid": uids["alice@example.com"], "message": "hello"}], key)
    await running.node.apps.revoke("alice@example.com", app.app_id)
    phone = await running.device("alice@example.com")
    await phone.nothing_more()
    code, body, _ = await running.post(app.app_id, [{"uid": uids["alice@example.com"], "message": "again"}], key)
    assert code == 200 and body[0]["errno"] == errors.UNKNOWN_UID


@pytest_twisted.ensureDeferred
async def test_one_bad_item_does_not_reject_the_others(running):
    app, key, uids = await running.granted_app("alice@example.com")
    uid = uids["alice@example.com"]
    code, body, _ = await running.post(app.app_id, [
        {"uid": uid, "message": "fine"},
        {"uid": "nobody", "message": "who?"},
        {"uid": uid, "message": "x" * 513},
        {"uid": uid, "message": ""},
        {"uid": uid, "message": "click", "action": "javascript:alert(1)"},
        {"uid": uid, "message": "click", "action": "ftp://example.com/x"},
        {"uid": uid, "message": "click", "action": "https://example.com/" + "a" * 500},
        "not an object",
        {"uid": uid, "message": "also fine", "action": "http://example.com/ok"},
    ], key)
    assert code == 200
    assert [r.get("errno") for r in body] == [None, errors.UNKNOWN_UID, errors.BAD_MESSAGE, errors.BAD_MESSAGE,
                                             errors.BAD_ACTION, errors.BAD_ACTION, errors.BAD_ACTION,
                                             errors.NOTIFY_MALFORMED, None]
    assert body[0] == {"result": "OK", "queue_size": 1} and body[-1] == {"result": "OK", "queue_size": 2}
    phone = await running.device("alice@example.com")
    assert messages((await phone.receive())["notifications"]) == ["fine", "also fine"]


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_their_status_and_store_nothing(running):
    app, key, uids = await running.granted_app("alice@example.com")
    inactive, _ = await running.app(active=False)
    good = [{"uid": uids["alice@example.com"], "message": "hi"}]
    cases = [
        (app.app_id, good, None, None, 401, errors.BAD_FIELD),
        (app.app_id, good, "wrong", None, 401, errors.BAD_KEY),
        ("nosuchapp", good, key, None, 404, errors.UNKNOWN_APP),
        (inactive.app_id, good, key, None, 403, errors.APP_NOT_ACTIVE),
        (app.app_id, None, key, b"{not json", 400, errors.NOTIFY_MALFORMED),
        (app.app_id, {"uid": "x"}, key, None, 400, errors.NOTIFY_MALFORMED),
        (app.app_id, good * 101, key, None, 413, errors.BATCH_TOO_LARGE),
        (app.app_id, None, key, b"[" + b" " * (300 * 1024) + b"]", 413, errors.BATCH_TOO_LARGE),
    ]
    for app_id, body, k, raw, status, errno in cases:
        code, reply, response = await running.post(app_id, body, k, raw)
        assert (code, reply["result"], reply["errno"]) == (status, "KO", errno), (app_id, k, status)
        if status == 401:
            assert response.headers.getRawHeaders(b"www-authenticate")
    assert await running.node.store.pending_notifications("alice@example.com", 0) == []
    # the key in the query string is not a way in
    port = running.node.web_port.getHost().port
    response = await treq.post(f"http://127.0.0.1:{port}/{app.app_id}/notification?key={key}", json=good)
    assert response.code == 401


@pytest.mark.parametrize("running", [{"notify_rate": 1.0, "notify_burst": 3}], indirect=True)
@pytest_twisted.ensureDeferred
async def test_over_the_rate_limit_429_with_retry_after_and_errno_on_the_websocket(running):
    app, key, uids = await running.granted_app("alice@example.com")
    note = {"uid": uids["alice@example.com"], "message": "hi"}
    code, body, _ = await running.post(app.app_id, [note] * 3, key)
    assert code == 200
    code, body, response = await running.post(app.app_id, [note], key)
    assert code == 429 and body["errno"] == errors.RATE_LIMITED
    assert int(response.headers.getRawHeaders(b"retry-after")[0]) >= 1
    stream = await running.stream(app, key)
    stream.send({"type": "notify", "notifications": [note]})
    reply = await stream.receive()
    assert reply["errno"] == errors.RATE_LIMITED and reply["retry_after"] > 0
    assert len(await running.node.store.pending_notifications("alice@example.com", 0)) == 3


@pytest_twisted.ensureDeferred
async def test_an_application_notifies_over_its_stream(running):
    app, key, uids = await running.granted_app("alice@example.com")
    stream = await running.stream(app, key)
    phone = await running.device("alice@example.com")
    stream.send({"type": "notify", "notifications": [{"uid": uids["alice@example.com"], "message": "ping"},
                                                     {"uid": "nobody", "message": "x"}]})
    reply = await stream.receive()
    assert reply == {"type": "notified", "results": [{"result": "OK", "queue_size": 1},
                                                     {"result": "KO", "errno": errors.UNKNOWN_UID,
                                                      "error": reply["results"][1]["error"]}]}
    assert messages((await phone.receive())["notifications"]) == ["ping"]
    stream.send({"type": "notify", "notifications": "nope"})
    assert (await stream.receive())["errno"] == errors.NOTIFY_MALFORMED


@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_the_queue(idp, tmp_path, database_url):
    node = Node(config(idp, tmp_path, database=database_url))
    await node.start()
    running = Posting(node, idp)
    try:
        app, key, uids = await running.granted_app("alice@example.com")
        await running.post(app.app_id, [{"uid": uids["alice@example.com"], "message": "survives"}], key)
    finally:
        await node.stop()
    node = Node(config(idp, tmp_path, database=database_url))
    await node.start()
    try:
        phone = await Posting(node, idp).device("alice@example.com")
        assert messages((await phone.receive())["notifications"]) == ["survives"]
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_items_expire_after_the_ttl(sqlite_store):
    clock = Clock()
    clock.advance(1_000)
    apps = Applications(sqlite_store, clock)
    app = await apps.mark_verified(await apps.register("dev@example.com", "a.example", "A", ""))
    grant = await apps.grant("alice@example.com", app.app_id)
    hub = Hub(sqlite_store, Streams(sqlite_store, clock), clock, "n")
    notifier = Notifier(sqlite_store, hub, clock, "n", ttl=300)
    await notifier.send(app, [{"uid": grant.uid, "message": "soon gone"}])
    clock.advance(299)
    assert [n.message for n in await notifier.waiting("alice@example.com")] == ["soon gone"]
    assert await notifier.expire() == 0
    clock.advance(2)
    assert await notifier.waiting("alice@example.com") == []
    assert await notifier.expire() == 1
