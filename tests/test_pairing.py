"""Pairing a device that has no browser (presence.pairing, presence.web.pairing; docs/protocol.md):
the codes, the store's single-use decisions on both backends, the whole path over a started node's
loopback sockets (codes, the person's page, the certificate, connect, renewal, revocation closing
the live connection and refusing the next), and revocation reaching another node through the log."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from presence import errors
from presence.identity import jws, make_assertion, new_user_key
from presence.pairing import USER_CODE_ALPHABET, new_user_code, normalize_user_code
from presence.store import open_store
from tests.fakes import ListPeer
from tests.test_hub import World
from tests.test_web_e2e import Live, live  # noqa: F401 (the fixture)
from tests.webnode import Browser
from tests.wsclient import WSClient

KEY = new_user_key()
PUBLIC = jws.public_key_to_json(KEY.public_key(), "browserid")


def test_user_codes_are_short_unambiguous_and_read_back_however_typed():
    codes = {new_user_code() for _ in range(200)}
    assert len(codes) == 200
    for code in codes:
        assert len(code) == 9 and code[4] == "-"
        assert all(c in USER_CODE_ALPHABET for c in code.replace("-", ""))
        assert normalize_user_code(code.lower().replace("-", " ")) == code
    assert normalize_user_code("BCDF-GHJ") is None       # too short
    assert normalize_user_code("BCDF-GHJA") is None      # a vowel is never in a code
    assert normalize_user_code("") is None


@pytest_twisted.ensureDeferred
async def test_a_request_is_decided_once_and_its_answer_taken_once(database_url):
    store = open_store(database_url)
    await store.open()
    try:
        await store.add_pairing_request("d1", "u1", json.dumps(PUBLIC), "laptop", 1000.0, 1600.0)
        assert (await store.get_pairing_request("u1", 1001.0)).name == "laptop"
        assert (await store.poll_pairing("d1", 1001.0, 5.0)).state == "slow_down"          # 1 s after the start
        assert (await store.poll_pairing("d1", 1006.0, 5.0)).state == "authorization_pending"
        assert (await store.poll_pairing("d1", 1007.0, 5.0)).state == "slow_down"
        assert await store.decide_pairing("u1", 1010.0, "a@x.org", "kitchen", "p1") == "approved"
        assert await store.decide_pairing("u1", 1011.0, "b@x.org", "other", "p2") == "gone"   # once
        assert await store.get_pairing_request("u1", 1011.0) is None
        answer = await store.poll_pairing("d1", 1020.0, 5.0)
        assert answer.state == "approved" and answer.device.email == "a@x.org" and answer.device.name == "kitchen"
        assert json.loads(answer.device.public_key) == PUBLIC
        assert (await store.poll_pairing("d1", 1030.0, 5.0)).state == "expired_token"        # taken once
        # the person's name for a device is theirs alone
        await store.add_pairing_request("d2", "u2", json.dumps(PUBLIC), "laptop", 1000.0, 1600.0)
        assert await store.decide_pairing("u2", 1010.0, "a@x.org", "kitchen", "p3") == "taken"
        assert (await store.get_pairing_request("u2", 1010.0)).name == "laptop"   # still undecided
        assert [d.id for d in await store.list_paired_devices("a@x.org")] == ["p1"]
        assert await store.decide_pairing("u2", 1010.0, "a@x.org", None, "p3") == "denied"
        assert (await store.poll_pairing("d2", 1020.0, 5.0)).state == "access_denied"
        # expired: neither decided nor answered
        await store.add_pairing_request("d3", "u3", json.dumps(PUBLIC), "tv", 1000.0, 1600.0)
        assert await store.decide_pairing("u3", 1600.0, "a@x.org", "tv", "p4") == "gone"
        assert (await store.poll_pairing("d3", 1600.0, 5.0)).state == "expired_token"
        # seen, listed, revoked
        assert (await store.touch_paired_device("p1", "a@x.org", 2000.0)).last_seen == 2000.0
        assert await store.touch_paired_device("p1", "b@x.org", 2000.0) is None   # not b's
        assert [d.name for d in await store.list_paired_devices("a@x.org")] == ["kitchen"]
        assert await store.revoke_paired_device("b@x.org", "p1") is None
        assert (await store.revoke_paired_device("a@x.org", "p1")).id == "p1"
        assert await store.touch_paired_device("p1", "a@x.org", 2001.0) is None
        assert await store.list_paired_devices("a@x.org") == []
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_revoking_a_paired_device_closes_it_on_another_node_and_refuses_it_there(sqlite_store):
    w = World(sqlite_store)
    await sqlite_store.add_pairing_request("d1", "u1", json.dumps(PUBLIC), "laptop", 1000.0, 1_000_000_000.0)
    assert await sqlite_store.decide_pairing("u1", 1001.0, "p@x.org", "laptop", "p1") == "approved"
    here = ListPeer()
    await w.hub.attach("p@x.org", "laptop", None, here, pairing="p1")
    seen = await sqlite_store.last_change()
    b = w.other_node()
    assert (await b.revoke_pairing("p@x.org", "p1")).name == "laptop"   # the node that served the page
    assert await b.revoke_pairing("p@x.org", "p1") is None
    for change in await sqlite_store.changes_since(seen):
        w.hub.apply(change)                       # what this node's change feed does
    assert here.closed[0] == errors.CLOSE_DEVICE_REVOKED
    # a connect that checked its pairing just before the revocation arrived is refused on attach
    with pytest.raises(errors.PresenceError) as refused:
        await w.hub.attach("p@x.org", "laptop", None, ListPeer(), pairing="p1")
    assert (refused.value.errno, refused.value.close_code) == (errors.PAIRING_REVOKED, errors.CLOSE_AUTH_FAILED)


async def post(live: Live, path: str, body: dict) -> tuple[int, dict]:
    response = await treq.post(live.public_url + path, data=json.dumps(body).encode(),
                               headers={"content-type": ["application/json"]})
    return response.code, json.loads(await treq.content(response))


async def connect(live: Live, certificate: str, device: str | None = None) -> tuple[WSClient, dict]:
    client = await WSClient.connect(live.ws, "/presence")
    message = {"type": "connect", "assertion": make_assertion(certificate, KEY, live.public_url, live.clock.seconds())}
    if device:
        message["device"] = device
    client.send(message)
    return client, await client.receive()


@pytest_twisted.ensureDeferred
async def test_a_device_pairs_through_the_person_s_page_connects_renews_and_is_revoked(live):  # noqa: F811
    # 1. the device asks for codes
    code, started = await post(live, "/pair", {"publicKey": PUBLIC, "name": "kitchen laptop"})
    assert code == 200, started
    assert started["verification_uri"] == live.public_url + "/me/pair"
    assert started["verification_uri_complete"].endswith("?code=" + started["user_code"])
    assert started["expires_in"] == 600 and started["interval"] == 5
    assert (await post(live, "/pair/token", {"device_code": started["device_code"]}))[1]["error"] == "slow_down"

    # 2. the person enters the code, sees the device's name, names it and approves
    person = Browser(live)
    await person.login("alice@example.com")
    page = await person.get("/me/pair?code=" + started["user_code"].lower())
    assert started["user_code"] in page.text
    wrong = await person.post("/me/pair", {"code": "BBBB-BBBB"})
    assert wrong.code == 400 and "No device is waiting with this code" in wrong.text
    shown = await person.post("/me/pair", {"code": started["user_code"]})
    assert shown.code == 200 and 'id="suggested-name">kitchen laptop<' in shown.text
    approved = await person.post("/me/pair", {"code": started["user_code"], "decision": "approve", "name": "kitchen"})
    assert approved.code == 303 and approved.location == "/me?done=paired"

    # 3. the device's next poll takes a long-lived certificate naming the pairing, once
    code, taken = await post(live, "/pair/token", {"device_code": started["device_code"]})
    assert code == 200, taken
    assert (taken["email"], taken["device"]) == ("alice@example.com", "kitchen")
    assert (taken["audience"], taken["websocket"]) == (live.public_url, "ws://127.0.0.1:9/presence")
    payload = jws.parse(taken["certificate"], "certificate").payload
    assert payload["presence-pairing"] == taken["pairing"] and payload["public-key"] == PUBLIC
    assert payload["exp"] - payload["iat"] == 30 * 86400 * 1000 == taken["expires"] - payload["iat"]
    assert (await post(live, "/pair/token", {"device_code": started["device_code"]}))[1]["error"] == "expired_token"

    # 4. it connects (named as the person named it), reports, and is listed as connected
    device, answer = await connect(live, taken["certificate"])
    assert answer["result"] is True, answer
    device.send({"type": "status", "status": "online"})
    assert await device.receive() == {"result": "OK"}
    assert [d.device for d in await live.store.list_devices("alice@example.com")] == ["kitchen"]
    me = await person.get("/me")
    assert "kitchen" in me.text and "connected now" in me.text

    # 5. renewal while valid: a fresh certificate for the same key and pairing
    code, renewed = await post(live, "/pair/renew", {"assertion": make_assertion(
        taken["certificate"], KEY, live.public_url, live.clock.seconds())})
    assert code == 200 and renewed["pairing"] == taken["pairing"], renewed

    # a paired device's certificate opens no page session (only its own connects and renewals)
    stranger = Browser(live)
    await stranger.get("/login")
    page = await stranger.post_json("/login/assertion", {"assertion": make_assertion(
        taken["certificate"], KEY, live.public_url, live.clock.seconds())})
    assert page.code == 400 and "cannot sign in to the pages" in page.text, page.text

    # 6. revoked on /me: the live connection closes with 4007; connect and renewal are refused
    revoked = await person.post("/me/unpair", {"id": taken["pairing"]})
    assert revoked.code == 303 and revoked.location == "/me?done=unpaired"
    assert await device.closed.addTimeout(10, reactor) == errors.CLOSE_DEVICE_REVOKED
    again, answer = await connect(live, renewed["certificate"])
    assert answer["errno"] == errors.PAIRING_REVOKED, answer
    assert await again.closed.addTimeout(10, reactor) == errors.CLOSE_AUTH_FAILED
    code, refused = await post(live, "/pair/renew", {"assertion": make_assertion(
        renewed["certificate"], KEY, live.public_url, live.clock.seconds())})
    assert (code, refused["error"]) == (403, "revoked")
    assert "No device is paired" in (await person.get("/me")).text


@pytest_twisted.ensureDeferred
async def test_pairing_refuses_bad_keys_and_denied_devices_and_limits_each_address(live):  # noqa: F811
    code, bad = await post(live, "/pair", {"publicKey": {"algorithm": "RS", "n": "5", "e": "3"}})
    assert (code, bad["error"]) == (400, "invalid_request")
    code, started = await post(live, "/pair", {"publicKey": PUBLIC})
    person = Browser(live)
    await person.login("bob@example.com")
    denied = await person.post("/me/pair", {"code": started["user_code"], "decision": "deny"})
    assert denied.location == "/me?done=denied"
    assert (await post(live, "/pair/token", {"device_code": started["device_code"]}))[1]["error"] == "access_denied"
    # codes entered count before they are looked up: past the limit even the right one is refused
    code, second = await post(live, "/pair", {"publicKey": PUBLIC})
    for _ in range(9):   # ten per person per code lifetime (the denial above was one)
        assert (await person.post("/me/pair", {"code": "BBBB-BBBB"})).code == 400
    refused = await person.post("/me/pair", {"code": second["user_code"], "decision": "approve", "name": "x"})
    assert refused.code == 429 and refused.header("retry-after")
    assert await live.store.list_paired_devices("bob@example.com") == []
    for _ in range(8):   # ten per address per code lifetime (two asked above; a refused key does not count)
        assert (await post(live, "/pair", {"publicKey": PUBLIC}))[0] == 200
    code, limited = await post(live, "/pair", {"publicKey": PUBLIC})
    assert code == 429 and limited["retry_after"] > 0
