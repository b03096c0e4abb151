"""The whole path in a real browser (Debian's headless Chromium driven by Playwright), as people
would go through it, against a node run as operators run it (``twistd -n presence``):

a developer signs in through the one-time link (read from the node's log: no mail server), registers
an application, verifies it against a local HTTP server serving ``__presence``, activates it; a
second person grants it access through the door hanger and sets their status with the page's
buttons; an application websocket client receives the updates, then, once the person revoked the
grant, nothing more.

Playwright's sync API runs in a thread of its own (never in the reactor's); the test, the
application client and the developer's site run in the reactor.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.test_twistd import twistd, wait_listening
from tests.webnode import free_port
from tests.wsclient import WSClient

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    import playwright.sync_api  # noqa: F401

    HAVE_PLAYWRIGHT = True
except ImportError:  # pragma: no cover
    HAVE_PLAYWRIGHT = False

# Skipped only on a developer's machine without the browser; under CI (which installs both) a
# missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not os.environ.get("CI") and not (HAVE_PLAYWRIGHT and os.path.exists(CHROMIUM)),
    reason="needs Playwright (pip install -e '.[test]') and Debian's chromium (.ci/run installs both)")


class BrowserThread:
    """One thread owning Playwright and Chromium; ``run(fn, *args)`` calls ``fn(*args)`` there and
    gives its result to the reactor as a Deferred."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._main, name="playwright", daemon=True)
        self.started: Deferred = Deferred()

    def _main(self) -> None:
        from playwright.sync_api import sync_playwright

        try:
            with sync_playwright() as p:
                self.browser = browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                reactor.callFromThread(self.started.callback, None)
                while (job := self.jobs.get()) is not None:
                    fn, args, d = job
                    try:
                        result = fn(*args)
                    except BaseException:
                        failure = Failure()
                        reactor.callFromThread(d.errback, failure)
                    else:
                        reactor.callFromThread(d.callback, result)
                browser.close()
        except BaseException:
            failure = Failure()
            if not self.started.called:
                reactor.callFromThread(self.started.errback, failure)

    async def start(self) -> None:
        self.thread.start()
        await self.started

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.jobs.put((fn, args, d))
        return d

    def person(self) -> Deferred:
        """A new browser context (cookies and storage of its own) and its page."""
        return self.run(lambda: new_person(self.browser))

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(30)


class DeveloperSite(Resource):
    """The developer's own site: ``/__presence`` (404 until the key is put there) and ``/back``, where
    the door hanger sends people back."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.key: bytes | None = None

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/__presence" and self.key is not None:
            request.setHeader(b"content-type", b"text/plain")
            return self.key
        if request.path == b"/back":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return b"<!doctype html><title>Back</title><h1>Back at the application</h1>"
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"not here"


class NodeProcess:
    """``twistd -n presence`` with its output collected line by line."""

    def __init__(self, args: list[str], cwd: Path):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "presence", *args], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def link_for(self, email: str, timeout: float = 15.0) -> str:
        """The one-time link the node wrote to its log for ``email`` (no SMTP configured)."""
        pattern = re.compile(rf"one-time sign-in link for {re.escape(email)} .*?: (http://\S+)")
        for _ in range(int(timeout / 0.1)):
            found = [m.group(1) for m in map(pattern.search, list(self.lines)) if m]
            if found:
                return found[-1]
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"no sign-in link for {email} in the node's log:\n{self.output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.reader.join(5)
        if not self.reader.is_alive():
            self.process.stdout.close()


# -- what the browser does (each runs in the Playwright thread) ---------------------------------------

def new_person(browser: Any) -> Any:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


def ask_for_link(page: Any, url: str, email: str) -> str:
    """Open ``url`` (which asks to sign in), and ask for a one-time link in navigator.id's dialog."""
    page.goto(url)
    page.wait_for_url(re.compile(r".*/login\?next=.*"))
    page.click("#signin")
    page.fill("#presence-id-email", email)
    page.click("#presence-id-send")
    message = page.locator("#presence-id-message")
    message.wait_for(state="visible")
    page.wait_for_function("() => document.getElementById('presence-id-message').textContent.length > 0")
    return message.text_content()


def follow_link(page: Any, link: str, lands_on: str) -> None:
    page.goto(link)
    page.click("#finish")
    page.wait_for_url(re.compile(lands_on))


def register(page: Any, domain: str) -> dict[str, str]:
    page.fill("#domain", domain)
    page.fill("#name", "Example app")
    page.fill("#description", "Shows who is around")
    page.click("#register-button")
    page.wait_for_selector("section.app")
    section = page.locator("section.app").first
    app = section.get_attribute("id").removeprefix("app-")
    return {"id": app, "key": page.input_value(f"#verification-key-{app}"),
            "state": section.locator(".state").text_content()}


def verify(page: Any, app: str) -> str:
    page.click(f"#verify-{app}")
    page.wait_for_load_state()
    return page.locator(f"#app-{app}").text_content()


def activate(page: Any, app: str, screenshot: str) -> dict[str, str]:
    app_id = page.text_content(f"#app-id-{app}")
    entry = page.text_content(f"#entry-point-{app}")
    page.click(f"#activate-{app}")
    page.wait_for_selector(f"#api-key-{app}")
    key = page.input_value(f"#api-key-{app}")
    page.screenshot(path=screenshot, full_page=True)
    return {"app_id": app_id, "entry_point": entry, "key": key}


def grant_page(page: Any) -> str:
    page.wait_for_selector("#accept")
    return page.locator("section.door").text_content()


def accept(page: Any, back: str) -> str:
    page.click("#accept")
    page.wait_for_url(re.compile(re.escape(back) + r"\?.*"))
    return page.url


def set_status(page: Any, base: str, status: str) -> str:
    if not page.url.startswith(base + "/me"):
        page.goto(base + "/me")
    page.click(f"#set-{status}")
    page.wait_for_url(re.compile(r".*/me\?done=status"))
    return page.text_content("#status")


def mark_loaded(page: Any) -> None:
    """A mark that a reload or a navigation would wipe out."""
    page.evaluate("window.presenceTestMark = 'still here'")


def arriving_notification(page: Any, text: str) -> dict[str, Any]:
    """Wait (no reload) until the page's script shows the notification holding ``text``."""
    item = page.locator("#notifications li", has_text=text)
    item.wait_for(state="visible", timeout=15_000)
    link = item.locator("a.note-action")
    return {"mark": page.evaluate("window.presenceTestMark"), "id": item.get_attribute("data-id"),
            "app": item.locator(".note-app").text_content(), "message": item.locator(".note-message").text_content(),
            "elements": item.locator(".note-message *").count(), "href": link.get_attribute("href"),
            "rel": link.get_attribute("rel"), "target": link.get_attribute("target"),
            "empty_hidden": page.locator("#no-notifications").is_hidden()}


def dismiss(page: Any, note_id: str) -> str:
    page.click(f"#dismiss-{note_id}")
    page.wait_for_url(re.compile(r".*/me\?done=dismissed"))
    return page.text_content("#notifications-section")


def revoke(page: Any, app_id: str) -> str:
    page.click(f"#revoke-{app_id}")
    page.wait_for_url(re.compile(r".*/me\?done=revoked"))
    return page.text_content("main")


def snapshot(page: Any, path: str) -> None:
    page.screenshot(path=path, full_page=True)


def cookies(page: Any) -> list[dict]:
    return page.context.cookies()


def close(page: Any) -> None:
    page.context.close()


# -- the test ------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_whole_path_in_a_real_browser(tmp_path):
    developer_site = DeveloperSite()
    site_port = reactor.listenTCP(0, Site(developer_site), interface="127.0.0.1")
    domain = f"127.0.0.1:{site_port.getHost().port}"
    web, ws = free_port(), free_port()
    base = f"http://127.0.0.1:{web}"
    node = NodeProcess(["--web", f"tcp:{web}:interface=127.0.0.1", "--ws", f"tcp:{ws}:interface=127.0.0.1",
                        "--public-url", base, "--public-ws-url", f"ws://127.0.0.1:{ws}",
                        "--database", f"sqlite:{tmp_path / 'presence.sqlite'}", "--node", "browser-test",
                        "--insecure-identity", "--verify-allow-private", "--verify-timeout", "5"], tmp_path)
    browser = BrowserThread()
    stream = None
    try:
        await wait_listening(web, node.process)
        await wait_listening(ws, node.process)
        await browser.start()

        # A developer signs in through the one-time link the node writes to its log.
        dev = await browser.person()
        said = await browser.run(ask_for_link, dev, base + "/myapps", "dev@example.com")
        assert "node's log" in said, said
        await browser.run(follow_link, dev, await node.link_for("dev@example.com"), r".*/myapps$")

        # Registers an application: the page shows the 1024-character key and where to put it.
        app = await browser.run(register, dev, domain)
        assert len(app["key"]) == 1024 and app["state"] == "waiting for domain verification"

        # Verify before the key is served: the page says why, and that it keeps checking.
        text = await browser.run(verify, dev, app["id"])
        assert "did not serve this application's verification key" in text and "checks again by itself" in text, text
        await browser.run(snapshot, dev, str(tmp_path / "myapps-polling.png"))
        developer_site.key = app["key"].encode() + b"\n"
        text = await browser.run(verify, dev, app["id"])
        assert "Application id" in text and f"ws://127.0.0.1:{ws}/" in text, text

        # Activates it: the API key, shown once; a screenshot of /myapps is the test's artifact.
        active = await browser.run(activate, dev, app["id"], str(tmp_path / "myapps.png"))
        assert len(active["key"]) == 1024 and active["entry_point"] == f"ws://127.0.0.1:{ws}/{active['app_id']}"

        # The application connects with its key.
        stream = await WSClient.connect(ws, "/" + active["app_id"])
        stream.send({"key": active["key"]})
        assert (await stream.receive())["result"] == "OK"

        # A second person arrives through the door hanger, signs in, and accepts.
        bob = await browser.person()
        back = f"http://{domain}/back"
        door = f"{base}/{active['app_id']}/grant?redirect={back}&id=ref-42"
        await browser.run(ask_for_link, bob, door, "bob@example.com")
        await browser.run(follow_link, bob, await node.link_for("bob@example.com"), r".*/grant\?.*")
        shown = await browser.run(grant_page, bob)
        await browser.run(snapshot, bob, str(tmp_path / "door-hanger.png"))
        assert "Example app" in shown and domain in shown and "Shows who is around" in shown
        landed = await browser.run(accept, bob, back)
        params = parse_qs(urlsplit(landed).query)
        assert params["result"] == ["granted"] and params["id"] == ["ref-42"] and params["uid"][0]
        uid = params["uid"][0]

        # Bob sets his status with the page's buttons; the application hears it.
        assert await browser.run(set_status, bob, base, "online") == "online"
        update = await stream.receive()
        assert [(u["email"], u["status"], u["uid"]) for u in update] == [("bob@example.com", "online", uid)]
        assert await browser.run(set_status, bob, base, "unavailable") == "unavailable"
        assert [(u["email"], u["status"]) for u in await stream.receive()] == [("bob@example.com", "unavailable")]

        # The application sends him a notification; his open page shows it without a reload.
        await browser.run(mark_loaded, bob)
        message, action = "Alice asks you to <b>join</b>", f"http://{domain}/room?a=1&b=2"
        response = await treq.post(f"{base}/{active['app_id']}/notification",
                                   json=[{"uid": uid, "message": message, "action": action}],
                                   headers={"authorization": [f"Bearer {active['key']}"]})
        assert response.code == 200 and (await response.json())[0]["result"] == "OK"
        shown = await browser.run(arriving_notification, bob, "Alice asks you to")
        assert shown["mark"] == "still here", "the page was reloaded"
        assert (shown["app"], shown["message"], shown["elements"]) == ("Example app", message, 0)
        assert (shown["href"], shown["rel"], shown["target"]) == (action, "noopener noreferrer", "_blank")
        assert shown["empty_hidden"]
        await browser.run(snapshot, bob, str(tmp_path / "me.png"))
        text = await browser.run(dismiss, bob, shown["id"])
        assert "No notification is waiting for you." in text and "Alice asks you to" not in text

        # He revokes the grant: the application receives nothing more.
        text = await browser.run(revoke, bob, active["app_id"])
        assert "Revoked" in text and "No application sees your status" in text
        await browser.run(set_status, bob, base, "online")
        await browser.run(set_status, bob, base, "offline")
        await deferLater(reactor, 1.0, lambda: None)
        assert stream.messages.pending == []

        # No secret in the node's log (the one-time links are, by design, without a mail server).
        session_values = [c["value"] for page in (dev, bob) for c in await browser.run(cookies, page)]
        log = node.output
        for secret in [app["key"], active["key"], *session_values]:
            assert secret and secret not in log
    finally:
        if os.environ.get("PRESENCE_ARTIFACTS"):  # the screenshots, kept by CI
            artifacts = Path(os.environ["PRESENCE_ARTIFACTS"])
            artifacts.mkdir(parents=True, exist_ok=True)
            for shot in tmp_path.glob("*.png"):
                shutil.copy(shot, artifacts / shot.name)
        if stream is not None and stream.protocol is not None:
            stream.protocol.dropConnection(abort=True)
        browser.stop()
        node.stop()
        await site_port.stopListening()
    assert node.process.returncode is not None
