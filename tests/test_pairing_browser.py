"""Pairing a browser on another origin through the node's popup (presence.pairing.pair_browser,
``/pair/browser``; docs/clients.md, "Browser"): the origin check, the endpoint's session, CSRF token,
names and answer, the popup page's headers, and CORS on the device's JSON calls (the browser test,
tests/test_browser_pairing.py, goes through it all in Chromium)."""

from __future__ import annotations

import json

import pytest_twisted
import treq

from presence.identity import jws, make_assertion
from presence.pairing import browser_device_name, browser_origin
from tests.test_pairing import KEY, PUBLIC, connect, post
from tests.test_web_e2e import Live, live  # noqa: F401 (the fixture)
from tests.webnode import Browser

JWK = jws.public_key_to_json(KEY.public_key(), "jwk")
APP = "https://chat.example"


def test_only_an_http_s_origin_as_the_browser_spells_it_can_ask():
    for good in ("https://chat.example", "https://chat.example:8443", "http://127.0.0.1:8000", "http://localhost:3000",
                 "http://[::1]:81", "http://app.localhost"):
        assert browser_origin(good) == good
    for bad in ("null", "", None, 7, "http://chat.example", "https://chat.example/", "https://chat.example:443",
                "https://Chat.example", "https://user@chat.example", "file:///etc/passwd", "javascript:alert(1)",
                "http://127.evil.example", "https://chat.example:99999", "https://chat example", "chrome-extension://abc",
                "https://chat.example?x", "https://chat.example#x"):
        assert browser_origin(bad) is None, bad
    assert browser_device_name("https://chat.example") == "chat.example (browser)"
    assert browser_device_name("http://127.0.0.1:8000", "  my   tab ") == "127.0.0.1:8000 (my tab)"


async def person(live: Live, email: str = "alice@example.com") -> Browser:
    browser = Browser(live)
    await browser.login(email)
    return browser


@pytest_twisted.ensureDeferred
async def test_the_popup_needs_a_session_refuses_framing_and_runs_only_its_own_script(live):  # noqa: F811
    stranger = Browser(live)
    page = await stranger.get("/pair/browser")
    assert page.code == 303 and page.location == "/login?next=%2Fpair%2Fbrowser"
    alice = await person(live)
    page = await alice.get("/pair/browser")
    assert page.code == 200 and 'src="/static/pair-browser.js"' in page.text and 'id="pair-approve"' in page.text
    policy = page.header("content-security-policy")
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy and "script-src 'self'" in policy
    assert page.header("x-frame-options") == "DENY"
    assert page.header("access-control-allow-origin") is None
    assert page.header("cross-origin-opener-policy") is None   # the popup must keep its opener


@pytest_twisted.ensureDeferred
async def test_the_endpoint_pairs_for_the_signed_in_person_with_their_csrf_token_only(live):  # noqa: F811
    body = {"publicKey": JWK, "origin": APP}
    # no session, no token
    assert (await Browser(live).post_json("/pair/browser", body, csrf=False)).code == 403
    signed_out = Browser(live)
    await signed_out.get("/login")
    refused = await signed_out.post_json("/pair/browser", body)
    assert refused.code == 403 and "Sign in" in refused.json()["error"]
    alice = await person(live)
    assert (await alice.post_json("/pair/browser", body, csrf=False)).code == 403
    assert (await alice.post_json("/pair/browser", body, extra={"x-csrf-token": ["forged"]}, csrf=False)).code == 403
    assert await live.store.list_paired_devices("alice@example.com") == []

    # bad origins, keys and names
    for origin in ("null", "http://chat.example", "https://chat.example/path", None):
        page = await alice.post_json("/pair/browser", {**body, "origin": origin})
        assert (page.code, page.json()["error"]) == (400, "invalid_request"), origin
    page = await alice.post_json("/pair/browser", {**body, "publicKey": {"kty": "RSA", "n": "5", "e": "3"}})
    assert page.code == 400
    assert (await alice.post_json("/pair/browser", {**body, "name": "x" * 65})).code == 400

    # paired: /pair/token's answer, a certificate naming the pairing; the device connects under its name
    page = await alice.post_json("/pair/browser", body)
    assert page.code == 200, page.text
    answer = page.json()
    assert set(answer) == {"email", "device", "pairing", "certificate", "expires", "audience", "websocket"}
    assert (answer["email"], answer["device"]) == ("alice@example.com", "chat.example (browser)")
    assert (answer["audience"], answer["websocket"]) == (live.public_url, "ws://127.0.0.1:9/presence")
    payload = jws.parse(answer["certificate"], "certificate").payload
    assert payload["presence-pairing"] == answer["pairing"] and payload["principal"]["email"] == "alice@example.com"
    device, connected = await connect(live, answer["certificate"])
    assert connected["result"] is True, connected
    device.protocol.dropConnection(abort=True)

    # unique names per person: a suffix on a clash; another person's names are theirs
    names = [(await alice.post_json("/pair/browser", body)).json()["device"] for _ in range(2)]
    labelled = (await alice.post_json("/pair/browser", {**body, "name": "Chat tab"})).json()["device"]
    assert names == ["chat.example (browser) 2", "chat.example (browser) 3"] and labelled == "chat.example (Chat tab)"
    bob = await person(live, "bob@example.com")
    assert (await bob.post_json("/pair/browser", body)).json()["device"] == "chat.example (browser)"
    listed = [d.name for d in await live.store.list_paired_devices("alice@example.com")]
    assert listed == ["chat.example (browser)", *names, labelled]
    assert "chat.example (browser) 2" in (await alice.get("/me")).text   # on /me, revocable like any

    # rate-limited per person (ten per code lifetime; four above, one refused key did not count)
    for _ in range(6):
        assert (await alice.post_json("/pair/browser", body)).code == 200
    limited = await alice.post_json("/pair/browser", body)
    assert limited.code == 429 and limited.header("retry-after") and limited.json()["error"] == "slow_down"


@pytest_twisted.ensureDeferred
async def test_the_device_calls_answer_cors_without_credentials_and_the_popup_s_post_does_not(live):  # noqa: F811
    for path in ("/pair", "/pair/token", "/pair/renew"):
        response = await treq.request("OPTIONS", live.public_url + path, headers={
            "origin": [APP], "access-control-request-method": ["POST"],
            "access-control-request-headers": ["content-type"]})
        assert response.code == 204, path
        headers = response.headers
        assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
        assert headers.getRawHeaders("access-control-allow-methods") == ["POST"]
        assert headers.getRawHeaders("access-control-allow-headers") == ["content-type"]
        assert headers.getRawHeaders("access-control-allow-credentials") is None
    alice = await person(live)
    answer = (await alice.post_json("/pair/browser", {"publicKey": JWK, "origin": APP})).json()
    response = await treq.post(live.public_url + "/pair/renew", headers={
        "content-type": ["application/json"], "origin": [APP]}, data=json.dumps({"assertion": make_assertion(
            answer["certificate"], KEY, live.public_url, live.clock.seconds())}).encode())
    renewed = json.loads(await treq.content(response))
    assert response.code == 200 and renewed["pairing"] == answer["pairing"], renewed
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    code, refused = await post(live, "/pair/renew", {"assertion": "nonsense"})
    assert code == 400 and refused["error"] == "invalid_grant"
    # the popup's endpoint and pages (cookies) have none; the module's files have it
    response = await treq.request("OPTIONS", live.public_url + "/pair/browser", headers={"origin": [APP]})
    assert response.headers.getRawHeaders("access-control-allow-origin") is None
    page = await alice.post_json("/pair/browser", {"publicKey": JWK, "origin": APP})
    assert page.header("access-control-allow-origin") is None
    for name in ("presence-device.js", "device-support.js", "presence-pairing.js"):
        response = await treq.get(f"{live.public_url}/static/{name}")
        assert response.code == 200 and response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
        await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_the_store_pairs_a_browser_once_per_name_on_both_backends(database_url):
    from presence.store import open_store

    store = open_store(database_url)
    await store.open()
    try:
        key = json.dumps(PUBLIC)
        added = await store.add_paired_device("p1", "a@x.org", "chat.example (browser)", key, 1000.0)
        assert (added.id, added.name, added.last_seen) == ("p1", "chat.example (browser)", None)
        assert await store.add_paired_device("p2", "a@x.org", "chat.example (browser)", key, 1001.0) is None
        assert (await store.add_paired_device("p3", "b@x.org", "chat.example (browser)", key, 1001.0)).id == "p3"
        assert [d.id for d in await store.list_paired_devices("a@x.org")] == ["p1"]
        assert (await store.revoke_paired_device("a@x.org", "p1")).id == "p1"
    finally:
        await store.close()
