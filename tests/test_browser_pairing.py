"""A browser device on an application's page (another origin than the node's), paired through the
node's popup with the person's consent (``static/presence-pairing.js``, ``/pair/browser``), in
Debian's headless Chromium driven by Playwright against a node run by ``twistd -n presence``.

The application's page is the example of docs/clients.md ("Pages on another origin") as written,
served by a small Twisted server on another port of 127.0.0.1 (another origin, still a secure
context): it imports the module from the node; a click opens the popup, where the person signs in
(the one-time link from the node's log, opened in the popup), sees the asking origin and approves.
The page's device connects and an application hears the person online; reloaded, the page connects
again with its stored key and certificate, no popup; revoked on /me, the page reports "revoked".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.test_browser import BrowserThread, pytestmark  # noqa: F401 (the same skip rule)
from tests.test_browser_device import ChatNode, stopped
from tests.test_twistd import wait_listening
from tests.wsclient import WSClient

ROOT = Path(__file__).resolve().parent.parent


def example_page() -> str:
    """The example page of docs/clients.md ("Pages on another origin"), as written there."""
    text = (ROOT / "docs" / "clients.md").read_text()
    return re.search(r"```html\n(.*?)```", text.split("### Pages on another origin", 1)[1], re.S).group(1)


class ApplicationSite(Resource):
    """The application's own site: ``/chat.html`` is the docs' example."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path != b"/chat.html":
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return example_page().encode()


# -- in the Playwright thread ---------------------------------------------------------------------

def open_application(browser: Any, url: str) -> Any:
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(url)
    page.wait_for_function("() => document.getElementById('state').textContent === 'signed-out'")
    return page


def pair_and_ask_for_link(page: Any, email: str) -> Any:
    """Click the page's button: the node's popup opens, sends the person to sign in; ask for a link."""
    with page.expect_popup() as opened:
        page.click("#pair")
    popup = opened.value
    popup.set_default_timeout(15_000)
    popup.wait_for_url(re.compile(r".*/login\?next=%2Fpair%2Fbrowser$"))
    popup.click("#signin")
    popup.fill("#presence-id-email", email)
    popup.click("#presence-id-send")
    # a function, not a bare expression: Playwright evaluates those with eval, which the pages' CSP forbids
    popup.wait_for_function("() => document.getElementById('presence-id-message').textContent.length > 0")
    return popup


def sign_in_and_see_consent(popup: Any, link: str) -> dict[str, Any]:
    """The one-time link, opened in the popup: signed in, it is back on /pair/browser and asks."""
    popup.goto(link)
    popup.click("#finish")
    popup.wait_for_url(re.compile(r".*/pair/browser$"))
    popup.locator("#pair-consent").wait_for(state="visible")
    return {"heading": popup.text_content("#pair-consent h2"), "origin": popup.text_content("#pair-origin"),
            "name": popup.text_content("#pair-name")}


def approve(page: Any, popup: Any) -> dict[str, Any]:
    with popup.expect_event("close"):
        popup.click("#pair-approve")
    return connected(page)


def connected(page: Any) -> dict[str, Any]:
    page.wait_for_function("() => presenceDevice.state === 'connected' && presenceDevice.status === 'online'")
    return page.evaluate("""async () => {
      const { BrowserPairing } = await import(presenceDevice.node + '/static/presence-pairing.js');
      const stored = await new BrowserPairing(presenceDevice.node).load();
      return {state: document.getElementById('state').textContent, who: document.getElementById('who').textContent,
              device: presenceDevice.device, email: presenceDevice.identity.email,
              stored: stored && {email: stored.email, device: stored.device, pairing: stored.pairing,
                                 extractable: stored.privateKey.extractable, ws: stored.websocket}};
    }""")


def reload_without_popup(page: Any) -> dict[str, Any]:
    popups: list[Any] = []
    page.context.on("page", lambda opened: popups.append(opened))
    page.reload()
    info = connected(page)
    info["popups"] = len(popups)
    info["button_hidden"] = page.locator("#pair").is_hidden()
    return info


def revoke_on_me(page: Any, base: str, device: str) -> dict[str, Any]:
    """The person revokes the page's device on /me, in a tab of the node: the page says revoked."""
    me = page.context.new_page()
    me.goto(base + "/me")
    row = me.locator("#paired tr", has_text=device)
    seen = row.locator(".paired-seen").text_content()
    row.locator("button").click()
    me.wait_for_url(re.compile(r".*/me\?done=unpaired$"))
    page.wait_for_function("() => presenceDevice.state === 'revoked'")
    stored = page.evaluate("""async () => {
      const { BrowserPairing } = await import(presenceDevice.node + '/static/presence-pairing.js');
      for (let i = 0; i < 50; i++) {   // the module forgets it as it reports "revoked"
        if (!(await new BrowserPairing(presenceDevice.node).load())) { return null; }
        await new Promise((r) => setTimeout(r, 50));
      }
      return 'still stored';
    }""")
    return {"seen": seen, "state": page.text_content("#state"), "stored": stored,
            "button": page.locator("#pair").is_visible(), "listed": me.locator("#paired").count()}


# -- the test ---------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_application_page_pairs_the_browser_through_the_node_s_popup_reconnects_and_is_revoked(tmp_path):
    chat = await ChatNode.start(tmp_path, "pairing-test")
    app_id, key, uid, web, ws, base, node = chat.app_id, chat.key, chat.uid, chat.web, chat.ws, chat.base, chat.node
    site = reactor.listenTCP(0, Site(ApplicationSite()), interface="127.0.0.1")
    app_origin = f"http://127.0.0.1:{site.getHost().port}"
    browser = BrowserThread()
    stream: WSClient | None = None
    try:
        launched = ensureDeferred(browser.start())
        await wait_listening(web, node.process)
        await wait_listening(ws, node.process)
        await launched
        stream = await WSClient.connect(ws, "/" + app_id)
        stream.send({"key": key})
        assert (await stream.receive())["result"] == "OK"

        page = await browser.run(open_application, browser.browser, f"{app_origin}/chat.html?node={base}")
        popup = await browser.run(pair_and_ask_for_link, page, "alice@example.com")
        consent = await browser.run(sign_in_and_see_consent, popup, await node.link_for("alice@example.com"))
        assert consent["origin"] == app_origin and consent["heading"].startswith(app_origin + " asks"), consent
        assert consent["name"] == f"127.0.0.1:{site.getHost().port} (Chat)"

        info = await browser.run(approve, page, popup)
        device = f"127.0.0.1:{site.getHost().port} (Chat)"
        assert (info["state"], info["email"], info["device"]) == ("connected", "alice@example.com", device), info
        assert info["stored"]["device"] == device and info["stored"]["extractable"] is False
        assert info["stored"]["ws"] == f"ws://127.0.0.1:{ws}/presence"
        assert [(u["email"], u["status"], u["uid"]) for u in await stream.receive(10)] == [
            ("alice@example.com", "online", uid)]

        again = await browser.run(reload_without_popup, page)
        assert again["popups"] == 0 and again["state"] == "connected" and again["button_hidden"], again
        assert again["stored"]["pairing"] == info["stored"]["pairing"]

        revoked = await browser.run(revoke_on_me, page, base, device)
        assert revoked["seen"] == "connected now", revoked
        assert revoked == {**revoked, "state": "revoked", "stored": None, "button": True, "listed": 0}, revoked
        heard = []   # the app's tab in the background may report "unavailable" first (a new tab in front)
        while "offline" not in heard and len(heard) < 3:
            heard += [u["status"] for u in await stream.receive(10) if u["email"] == "alice@example.com"]
        assert heard[-1] == "offline", heard
    finally:
        if stream is not None and stream.protocol is not None:
            stream.protocol.dropConnection(abort=True)
        browser.stop()
        await site.stopListening()
        if node.process.poll() is None:
            await stopped(node)
        node.stop()
    assert "eyJ" not in node.output and key not in node.output   # no certificate or API key in the log
