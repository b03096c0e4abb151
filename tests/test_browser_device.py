"""The browser device (``presence/web/static/presence-device.js`` and its page ``/device``) in Debian's
headless Chromium driven by Playwright, against a node run as operators run it (``twistd -n
presence``): signing in through the one-time link, the status from page visibility and input idle
time reaching an application, a live notification shown with the Notification API and acknowledged,
and the reconnection after the node restarted. The module's pure helpers run in the browser too.

What really works in headless Chromium: a page never becomes hidden there (another tab brought to the
front, a minimized window: ``document.visibilityState`` stays "visible"), so the test overrides
``document.visibilityState`` in an init script and dispatches ``visibilitychange``, which is what the
browser does; notifications are shown (the ``show`` event fires) once the context grants the
permission, and an init script records each ``new Notification(...)``.
"""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path
from typing import Any, Callable

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from presence.admin import parser, run
from tests.test_browser import BrowserThread, NodeProcess, pytestmark  # noqa: F401 (the same skip rule)
from tests.test_twistd import wait_listening
from tests.webnode import free_port
from tests.wsclient import WSClient

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "presence" / "web" / "static"


def example_page() -> str:
    """The example page of docs/clients.md ("Browser"), as written there."""
    text = (ROOT / "docs" / "clients.md").read_text()
    return re.search(r"```html\n(.*?)```", text.split("## Browser", 1)[1], re.S).group(1)

# Runs before the page's own scripts: records notifications, and lets the test hide and show the page.
INIT_SCRIPT = """
(() => {
  const Real = window.Notification;
  window.shownNotifications = [];
  class Recorded extends Real {
    constructor(title, options) {
      super(title, options);
      window.shownNotifications.push({ title, body: options && options.body, tag: options && options.tag });
    }
    static get permission() { return Real.permission; }
    static requestPermission() { return Real.requestPermission(); }
  }
  window.Notification = Recorded;
  let hidden = false;
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => hidden ? "hidden" : "visible" });
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  window.setPageHidden = (value) => { hidden = value; document.dispatchEvent(new Event("visibilitychange")); };
})();
"""


class Module(Resource):
    """The module alone (and device-support.js and presence-pairing.js, which it imports), as the
    node serves them (text/javascript), for the helpers' test."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path not in (b"/presence-device.js", b"/device-support.js", b"/presence-pairing.js"):
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        return (STATIC / request.path.decode().lstrip("/")).read_bytes()


async def stopped(node: NodeProcess) -> None:
    """SIGTERM, and wait for the node to end with the reactor running (the application's websocket
    answers the node's close frame; NodeProcess.stop would block the reactor meanwhile)."""
    node.process.send_signal(signal.SIGTERM)
    for _ in range(300):
        if node.process.poll() is not None:
            node.stop()   # ended: joins its output reader and closes the pipe
            return
        await deferLater(reactor, 0.05, lambda: None)
    node.process.kill()
    raise AssertionError("the node did not stop:\n" + node.output)


async def admin(database: str, *argv: str) -> str:
    out = io.StringIO()
    await run(parser().parse_args(["--database", database, "--create", *argv]), reactor, out)
    return out.getvalue()


# -- in the Playwright thread ---------------------------------------------------------------------

def device_page(browser: Any, base: str) -> Any:
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.grant_permissions(["notifications"], origin=base)
    context.add_init_script(INIT_SCRIPT)
    page = context.new_page()
    page.set_default_timeout(15_000)
    return page


def ask_for_link(page: Any, url: str, email: str) -> str:
    page.goto(url)
    page.wait_for_selector("#device-state[data-state='signed-out']")
    page.fill("#device-signin-email", email)
    page.click("#device-signin-send")
    page.wait_for_function("() => document.getElementById('device-message').textContent.length > 0")
    return page.text_content("#device-message")


def follow_link_in_another_tab(page: Any, link: str) -> dict[str, Any]:
    """The link opened in a new tab (as from a mail), while the device tab waits: the link's tab
    lands on the device page too; once it is closed, the waiting tab is the browser's device."""
    page.evaluate("window.seenStates = []; presenceDevice.addEventListener('statechange',"
                  " (e) => seenStates.push(e.detail.state))")
    other = page.context.new_page()
    other.goto(link)
    other.click("#finish")
    other.wait_for_url(re.compile(r".*/device\?retry=1$"))
    other.wait_for_function("() => window.presenceDevice && presenceDevice.connections > 0")
    other.close()
    info = wait_status(page, "online")
    info["seen"] = page.evaluate("seenStates")
    return info


def wait_status(page: Any, status: str, connections: int = 1) -> dict[str, Any]:
    """Wait until the page says it is connected and the node applied ``status``."""
    page.wait_for_function(
        "([s, n]) => window.presenceDevice && presenceDevice.state === 'connected' && presenceDevice.status === s"
        " && presenceDevice.connections >= n && document.getElementById('device-status').textContent === s",
        arg=[status, connections])
    return page.evaluate("({state: presenceDevice.state, email: presenceDevice.identity.email,"
                         " device: presenceDevice.device, connections: presenceDevice.connections,"
                         " stored: localStorage.getItem('presence-device-id'),"
                         " shown: document.getElementById('device-state').textContent})")


def set_hidden(page: Any, hidden: bool) -> None:
    page.evaluate("(h) => setPageHidden(h)", hidden)


def set_idle(page: Any, seconds: float) -> None:
    page.evaluate("(s) => presenceDevice.setIdleSeconds(s)", seconds)


def move_mouse(page: Any) -> None:
    page.mouse.move(200, 300)
    page.mouse.move(220, 310)


def shown_notification(page: Any, message: str) -> dict[str, Any]:
    page.wait_for_function("(m) => shownNotifications.some(n => n.body === m)", arg=message)
    item = page.locator("#device-notifications li", has_text=message)
    item.wait_for(state="visible")
    return {"shown": page.evaluate("shownNotifications"), "system": item.get_attribute("data-system"),
            "message": item.locator(".note-message").text_content(),
            "href": item.locator("a.note-action").get_attribute("href")}


def waiting_on_node(page: Any) -> list[dict]:
    """The person's waiting notifications, as /me shows them (the page is signed in to the node)."""
    return page.evaluate("fetch('/me/notifications', {credentials: 'same-origin'}).then(r => r.json())")["notifications"]


def wait_acknowledged(page: Any) -> None:
    page.wait_for_function("() => fetch('/me/notifications').then(r => r.json()).then(d => d.notifications.length === 0)",
                           polling=200)


def record_states(page: Any) -> None:
    """From now on the page keeps every state the device passes through (a short one included: a
    retry with full jitter may leave "waiting" at once)."""
    page.evaluate("() => { window.seenStates = [];"
                  " presenceDevice.addEventListener('statechange', (e) => seenStates.push(e.detail.state)); }")


def wait_state(page: Any, state: str) -> str:
    """The device passed through ``state`` since record_states."""
    page.wait_for_function("(s) => seenStates.includes(s)", arg=state)
    return state


def open_example(page: Any, base: str, ws: str) -> dict[str, Any]:
    """The docs' example page, on the node's origin, in another tab of the same browser. (Playwright
    serves it: a response that comes from no address counts as public to Chromium's local network
    access checks, which would block its websocket to 127.0.0.1 without the permission.)"""
    page.context.grant_permissions(["notifications", "local-network-access"], origin=base)
    other = page.context.new_page()
    other.set_default_timeout(15_000)
    other.route(re.compile(re.escape(base + "/my-device.html") + r"(\?.*)?$"), lambda route: route.fulfill(
        status=200, content_type="text/html; charset=utf-8", body=example_page()))
    other.goto(f"{base}/my-device.html?ws={ws}")
    other.wait_for_function("() => document.getElementById('status').textContent === 'online'")
    page.wait_for_function("() => presenceDevice.state === 'replaced'")
    return {"state": other.text_content("#state"), "replaced": page.get_attribute("#device-state", "data-state"),
            "take_over": page.locator("#device-take-over").is_visible()}


def renew(page: Any) -> dict[str, str]:
    """Have the node certify a new key with the session of its pages (as with a day's third left)."""
    return page.evaluate("""async () => {
      const before = presenceDevice.identity.certificate;
      const after = (await presenceDevice.renewCertificate()).certificate;
      const stored = (await (await import('/static/presence-device.js')).usableIdentities())[0].certificate;
      return {before, after, stored};
    }""")


def certificate_in_use(page: Any) -> str:
    return page.evaluate("presenceDevice.identity.certificate")


def csp(page: Any, url: str) -> str:
    return page.request.get(url).headers["content-security-policy"]


def helpers(browser: Any, base: str) -> dict[str, Any]:
    page = browser.new_page()
    page.goto(base + "/presence-device.js")
    result = page.evaluate("""async () => {
      const m = await import('/presence-device.js');
      const now = 1_000_000;
      const payload = btoa(JSON.stringify({exp: 42, principal: {email: 'a@b.c'}}));
      return {
        backoff: [m.backoffDelay(0, 1000, 60000, () => 0.999), m.backoffDelay(3, 1000, 60000, () => 0.5),
                  m.backoffDelay(20, 1000, 60000, () => 0.999), m.backoffDelay(5, 1000, 60000, () => 0)],
        outcomes: [[4007, null], [4002, 16], [4002, 14], [4002, 11], [4002, 15], [4000, null], [1001, null],
                   [1006, null], [4001, 34], [4005, null]].map(([c, e]) => m.closeOutcome(c, e)),
        statuses: [m.desiredStatus(true, now - 1000, now, 5000), m.desiredStatus(true, now - 5000, now, 5000),
                   m.desiredStatus(false, now, now, 5000)],
        urls: [m.httpUrl('https://chat.example/room?a=1'), m.httpUrl('javascript:alert(1)'), m.httpUrl(7),
               m.httpUrl('not a url')],
        notes: [m.cleanNotification({id: 3, message: 'hi', app: 'Chat', action: 'javascript:x'}),
                m.cleanNotification({id: '3', message: 'hi'}), m.cleanNotification({id: 4}), m.cleanNotification(null)],
        b64: m.b64url(new Uint8Array([251, 255, 0])),
        certificate: m.certificatePayload('x.' + payload.replace(/=+$/, '') + '.y'),
        exports: Object.keys(m).sort(),
      };
    }""")
    page.close()
    return result


def refusals(browser: Any, base: str) -> dict[str, Any]:
    """A node played by Playwright's websocket routing: the first connect is refused with errno 50
    and left open (the store did not answer), the second accepted; then a revocation's errno 16."""
    import json

    page = browser.new_page()
    connects: list[int] = []

    def node(ws: Any) -> None:
        def on_message(message: str) -> None:
            request = json.loads(message)
            if request.get("type") == "connect":
                connects.append(1)
                if len(connects) == 1:
                    ws.send(json.dumps({"result": "KO", "errno": 50, "error": "the store did not answer"}))
                elif len(connects) == 2:
                    ws.send(json.dumps({"result": True, "session_id": "s2"}))
                else:
                    ws.send(json.dumps({"result": "KO", "errno": 16, "error": "revoked"}))
                    ws.close(code=4002, reason="revoked")
            elif request.get("type") == "status":
                ws.send(json.dumps({"result": "OK"}))
        ws.on_message(on_message)

    page.route_web_socket("ws://127.0.0.1:9/presence", node)
    page.goto(base + "/presence-device.js")
    result = page.evaluate("""async () => {
      const m = await import('/presence-device.js');
      const device = new m.PresenceDevice({ws: 'ws://127.0.0.1:9/presence', node: location.origin,
        assertion: async () => 'certificate~assertion', retryBaseSeconds: 0.05, retryMaxSeconds: 0.1,
        systemNotifications: false, storage: null, device: 'test'});
      const states = [];
      const reached = (state) => new Promise((resolve, reject) => {
        const check = () => { if (device.state === state) { resolve(); return true; } return false; };
        if (!check()) { device.addEventListener('statechange', () => { check(); }); }
        setTimeout(() => reject(new Error('never ' + state + ': ' + states.join(' '))), 5000);
      });
      device.addEventListener('statechange', () => states.push(device.state));
      device.start();
      await reached('connected');
      const connected = device.connections;
      device.socket.close();               // dropped: it connects again, and is refused as revoked
      await reached('revoked');
      device.stop();
      return {connected, states};
    }""")
    page.close()
    return {**result, "connects": len(connects)}


# -- the tests --------------------------------------------------------------------------------------

async def in_chromium(scenario: Callable[[Any, str], dict[str, Any]]) -> dict[str, Any]:
    """``scenario(browser, base)`` run in Chromium, with the module served alone at ``base``."""
    port = reactor.listenTCP(0, Site(Module()), interface="127.0.0.1")
    browser = BrowserThread()
    try:
        await browser.start()
        return await browser.run(scenario, browser.browser, f"http://127.0.0.1:{port.getHost().port}")
    finally:
        browser.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_device_modules_helpers_in_chromium():
    got = await in_chromium(helpers)
    assert got["backoff"] == [999, 4000, 59940, 0]  # full jitter: uniform below min(max, base * 2^n)
    assert got["outcomes"] == ["revoked", "revoked", "signed-out", "signed-out", "retry", "replaced", "retry",
                               "retry", "retry", "retry"]
    assert got["statuses"] == ["online", "unavailable", "unavailable"]
    assert got["urls"] == ["https://chat.example/room?a=1", None, None, None]
    assert got["notes"] == [{"id": 3, "app": "Chat", "domain": "", "message": "hi", "action": None, "at": None},
                            None, None, None]
    assert got["b64"] == "-_8A"
    assert got["certificate"] == {"exp": 42, "principal": {"email": "a@b.c"}}
    assert {"PresenceDevice", "BrowserPairing", "PairingError"} <= set(got["exports"])


@pytest_twisted.ensureDeferred
async def test_the_browser_device_retries_a_refusal_left_open_and_stops_when_revoked():
    got = await in_chromium(refusals)
    assert got["connected"] == 1 and got["connects"] == 3, got
    assert got["states"][-2:] == ["revoked", "stopped"] and "connected" in got["states"], got


class ChatNode:
    """A node run as operators run it (twistd, SQLite in ``tmp_path``) with an active application
    "Chat" that alice granted: its id, key and alice's uid for it."""

    app_id: str
    key: str
    uid: str

    @classmethod
    async def start(cls, tmp_path: Any, name: str) -> ChatNode:
        chat = cls()
        database = f"sqlite:{tmp_path / 'presence.sqlite'}"
        await admin(database, "apps", "create", "dev@example.com", "chat.example", "Chat")
        chat.app_id = (await admin(database, "apps", "verify", "1", "--force")).split()[-1]
        chat.key = (await admin(database, "apps", "activate", "1")).splitlines()[-1]
        chat.uid = (await admin(database, "grants", "add", "alice@example.com", chat.app_id)).strip()
        chat.web, chat.ws = free_port(), free_port()
        chat.base = f"http://127.0.0.1:{chat.web}"
        args = ["--web", f"tcp:{chat.web}:interface=127.0.0.1", "--ws", f"tcp:{chat.ws}:interface=127.0.0.1",
                "--public-url", chat.base, "--public-ws-url", f"ws://127.0.0.1:{chat.ws}", "--database", database,
                "--node", name, "--grace", "1"]
        chat.args, chat.tmp_path = args, tmp_path
        chat.node = NodeProcess(args, tmp_path)
        return chat

    def restart(self) -> NodeProcess:
        """The same node again (after it stopped)."""
        self.node = NodeProcess(self.args, self.tmp_path)
        return self.node


@pytest_twisted.ensureDeferred
async def test_a_browser_device_signs_in_reports_its_status_shows_notifications_and_reconnects(tmp_path):
    chat = await ChatNode.start(tmp_path, "device-test")
    app_id, key, uid, web, ws, base, node = chat.app_id, chat.key, chat.uid, chat.web, chat.ws, chat.base, chat.node
    browser = BrowserThread()
    streams: list[WSClient] = []
    outputs: list[str] = []

    async def application(**extra: Any) -> WSClient:
        stream = await WSClient.connect(ws, "/" + app_id)
        streams.append(stream)
        stream.send({"key": key, **extra})
        assert (await stream.receive())["result"] == "OK"
        return stream

    async def hears(stream: WSClient, status: str) -> None:
        assert [(u["email"], u["status"], u["uid"]) for u in await stream.receive(10)] == [
            ("alice@example.com", status, uid)]

    try:
        launched = ensureDeferred(browser.start())   # Chromium starts while the node does
        await wait_listening(web, node.process)
        await wait_listening(ws, node.process)
        await launched
        stream = await application()
        page = await browser.run(device_page, browser.browser, base)

        # The page allows its scripts to connect to the websocket listener (another origin), nothing else.
        policy = await browser.run(csp, page, base + "/device")
        assert f"connect-src 'self' ws://127.0.0.1:{ws};" in policy and "default-src 'self'" in policy

        # Signed out, the page asks for a one-time link; the link signs this browser in and comes back.
        said = await browser.run(ask_for_link, page, base + "/device?retry=1", "alice@example.com")
        assert "node's log" in said, said
        info = await browser.run(follow_link_in_another_tab, page, await node.link_for("alice@example.com"))
        assert info["email"] == "alice@example.com" and info["shown"] == "connected"
        # woken by the link's tab, connected; if that tab connected after it, replaced, then back
        assert info["seen"][:2] == ["connecting", "connected"] and info["seen"][-1] == "connected", info["seen"]
        if "replaced" in info["seen"]:
            assert info["seen"][info["seen"].index("replaced") + 1] == "waiting", info["seen"]
        assert info["device"] == info["stored"] and info["device"].startswith("browser-")
        await hears(stream, "online")

        # Hidden: unavailable; visible again: online.
        await browser.run(set_hidden, page, True)
        await hears(stream, "unavailable")
        await browser.run(set_hidden, page, False)
        await hears(stream, "online")

        # A second without input: unavailable; the next input: online.
        await browser.run(set_idle, page, 1)
        await hears(stream, "unavailable")
        await browser.run(move_mouse, page)
        await hears(stream, "online")
        await browser.run(set_idle, page, 300)
        await stream.nothing_more(0.3)   # only changes are sent

        # A notification: shown with the Notification API, acknowledged, no longer waiting on the node.
        message, action = "Bob asks you to <b>join</b>", "https://chat.example/room/1"
        response = await treq.post(f"{base}/{app_id}/notification", json=[{"uid": uid, "message": message,
                                                                            "action": action}],
                                   headers={"authorization": [f"Bearer {key}"]})
        assert response.code == 200 and (await response.json())[0]["result"] == "OK"
        shown = await browser.run(shown_notification, page, message)
        assert [(n["title"], n["body"]) for n in shown["shown"]] == [("Chat", message)]
        assert (shown["system"], shown["message"], shown["href"]) == ("yes", message, action)
        await browser.run(wait_acknowledged, page)
        assert await browser.run(waiting_on_node, page) == []

        # The certificate is renewed with the pages' session; the next connection signs with the new key.
        renewed = await browser.run(renew, page)
        assert renewed["after"] != renewed["before"] and renewed["stored"] == renewed["after"]

        # The node restarts: the device waits, reconnects with a fresh assertion, and reports again.
        await browser.run(record_states, page)
        await stopped(node)
        assert await browser.run(wait_state, page, "waiting") == "waiting"
        outputs.append(node.output)
        node = chat.restart()
        await wait_listening(ws, node.process)
        before = info["connections"]
        info = await browser.run(wait_status, page, "online", before + 1)
        assert info["connections"] == before + 1
        assert await browser.run(certificate_in_use, page) == renewed["after"]
        stream = await application(sync=True)
        state = await stream.receive()
        assert [(p["email"], p["status"]) for p in state["people"]] == [("alice@example.com", "online")]
        assert (await stream.receive())["type"] == "synced"
        await browser.run(set_hidden, page, True)
        await hears(stream, "unavailable")
        # The notification was shown once, across the reconnection.
        assert len(await browser.run(lambda: page.evaluate("shownNotifications"))) == 1

        # The example page of docs/clients.md, opened in another tab: the same device (one per
        # browser) connects from there, the /device tab is replaced (close 4000) and stays so.
        shown = await browser.run(open_example, page, base, f"ws://127.0.0.1:{ws}/presence")
        assert shown == {"state": "connected", "replaced": "replaced", "take_over": True}
        await hears(stream, "online")
    finally:
        for stream in streams:
            if stream.protocol is not None:
                stream.protocol.dropConnection(abort=True)
        browser.stop()
        if node.process.poll() is None:
            await stopped(node)
        node.stop()
    for output in [*outputs, node.output]:
        assert "eyJ" not in output and key not in output  # no assertion, no API key in the log
