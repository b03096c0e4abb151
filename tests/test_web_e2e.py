"""A started node over real loopback sockets, its pages driven over HTTP like a browser would (the
key made in Python): the one-time link read from the node's log, an application's life from
registration to deactivation with its real websocket closed on rotation and deactivation, grants
and statuses reaching it, a device signing in with a certificate from Presence's own identity
provider, and no secret in any log line."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from presence import errors
from presence.config import Config
from presence.identity import make_assertion
from presence.node import Node
from tests.webnode import Browser, KeyServer, free_port
from tests.wsclient import WSClient


class LogLinks:
    """Every log event while it listens; the one-time links are what the node's log gives people."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def token(self, email: str) -> str:
        links = [e["link"] for e in self.events if e.get("event") == "login.link" and e.get("email") == email.lower()]
        return urlsplit(links[-1]).fragment

    def text(self, without_links: bool = True) -> str:
        return "\n".join(formatEvent(e) for e in self.events
                         if not (without_links and e.get("event") == "login.link"))


class Live:
    """What tests.webnode.Browser needs of a node: its public URL, where links go, the time."""

    def __init__(self, node: Node, links: LogLinks):
        self.node = node
        self.public_url = node.config.public_url
        self.mailer = links
        self.clock = reactor
        self.store = node.store

    @property
    def ws(self) -> int:
        return self.node.ws_port.getHost().port


@pytest_twisted.async_yield_fixture
async def live(tmp_path):
    links = LogLinks()
    globalLogPublisher.addObserver(links)
    web = free_port()
    node = Node(Config(web=f"tcp:{web}:interface=127.0.0.1", ws="tcp:0:interface=127.0.0.1",
                       public_url=f"http://127.0.0.1:{web}", public_ws_url="ws://127.0.0.1:9",
                       database=f"sqlite:{tmp_path / 'node.sqlite'}", node="e2e", insecure_identity=True,
                       verify_allow_private=True, batch_window=0.02, grace=0.3))
    await node.start()
    try:
        yield Live(node, links)
    finally:
        await node.stop()
        globalLogPublisher.removeObserver(links)


async def stream(live: Live, app_id: str, key: str) -> WSClient:
    client = await WSClient.connect(live.ws, "/" + app_id)
    client.send({"key": key})
    assert await client.receive() == {"result": "OK", "app_id": app_id}
    return client


def api_key(page, app: int) -> str:
    return re.search(rf'id="api-key-{app}"[^>]*>([^<]*)</textarea>', page.text).group(1)


@pytest_twisted.ensureDeferred
async def test_an_application_from_registration_to_deactivation(live):
    site = KeyServer()
    secrets_seen: list[str] = []
    try:
        dev = Browser(live)
        await dev.login("dev@example.com", "/myapps")
        secrets_seen += [dev.cookie("presence_session").value, dev.cookie("presence_csrf").value]
        page = await dev.post("/myapps", {"domain": site.domain, "name": "Example", "description": ""})
        number = int(page.location.rsplit("-", 1)[1])
        app = await live.store.get_app_by_id(number)
        secrets_seen.append(app.verification_key)
        site.serve(app.verification_key)
        assert (await dev.post(f"/myapps/{number}/verify")).location.startswith("/myapps?done=verified")
        activated = await dev.post(f"/myapps/{number}/activate")
        assert activated.code == 303   # post/redirect/get: the key is on the page the redirect shows
        key = api_key(await dev.get(activated.location.partition("#")[0]), number)
        secrets_seen.append(key)
        app = await live.store.get_app_by_id(number)
        client = await stream(live, app.app_id, key)

        # A person grants it through the door hanger and sets a status on their page.
        bob = Browser(live)
        door = f"/{app.app_id}/grant?redirect=http://{site.domain}/back&id=42"
        await bob.login("bob@example.com", door)
        secrets_seen.append(bob.cookie("presence_session").value)
        await bob.get(door)
        page = await bob.post(f"/{app.app_id}/grant", {"redirect": f"http://{site.domain}/back", "id": "42",
                                                       "decision": "accept"})
        uid = parse_qs(urlsplit(page.location).query)["uid"][0]
        await bob.post("/me/status", {"status": "online"})
        [update] = await client.receive()
        assert (update["email"], update["status"], update["uid"]) == ("bob@example.com", "online", uid)

        # Rotating the key closes the stream that used the old one; the old key is refused.
        rotated = await dev.post(f"/myapps/{number}/rotate")
        new_key = api_key(await dev.get(rotated.location.partition("#")[0]), number)
        secrets_seen.append(new_key)
        assert await client.wait_closed() == errors.CLOSE_REVOKED
        old = await WSClient.connect(live.ws, "/" + app.app_id)
        old.send({"key": key})
        assert (await old.receive())["errno"] == errors.BAD_KEY
        client = await stream(live, app.app_id, new_key)

        # Revoking stops updates at once.
        await bob.post("/me/revoke", {"app": app.app_id})
        await bob.post("/me/status", {"status": "unavailable"})
        await client.nothing_more(0.5)

        # Deactivating closes the stream; the key no longer opens one.
        await dev.post(f"/myapps/{number}/deactivate")
        assert await client.wait_closed() == errors.CLOSE_REVOKED
        again = await WSClient.connect(live.ws, "/" + app.app_id)
        again.send({"key": new_key})
        assert (await again.receive())["errno"] == errors.APP_NOT_ACTIVE
    finally:
        await site.stop()

    # No secret in any log line; the one-time links only in the lines that deliver them.
    text = live.mailer.text()
    for secret in secrets_seen:
        assert secret and secret not in text
    for event in live.mailer.events:
        if event.get("event") != "login.link":
            assert "/login/link#" not in formatEvent(event)


@pytest_twisted.ensureDeferred
async def test_a_device_signs_in_with_a_certificate_from_presences_own_identity_provider(live):
    phone = Browser(live)
    certified = await phone.certificate("erin@example.com")
    assertion = make_assertion(certified["certificate"], phone.key, live.public_url, reactor.seconds())
    device = await WSClient.connect(live.ws, "/presence")
    device.send({"type": "connect", "assertion": assertion, "device": "phone"})
    reply = await device.receive()
    assert reply["result"] is True
    device.send({"type": "status", "status": "online"})
    assert await device.receive() == {"result": "OK"}
    assert (await live.store.get_status("erin@example.com")).status == "online"
    device.close()
    await device.wait_closed()


@pytest_twisted.ensureDeferred
async def test_the_node_serves_its_pages_and_identity_document(live):
    browser = Browser(live)
    page = await browser.get("/")
    assert page.code == 200 and "Presence" in page.text and page.header("x-frame-options") == "DENY"
    doc = await browser.get("/.well-known/browserid")
    assert doc.code == 200 and doc.json()["public-key"]["algorithm"] == "RS"
    assert (await browser.get("/static/presence-id.js")).header("content-type").startswith("text/javascript")
    assert (await browser.get("/static/nothing.js")).code == 404
    assert (await browser.get("/healthz")).code == 200  # the node's front still answers health checks
