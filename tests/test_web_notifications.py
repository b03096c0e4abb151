"""The notifications of ``/me``: the waiting ones listed with the application's name and the action
as a link (all of it escaped), the JSON the page's script polls (a session needed, never cached),
Dismiss (CSRF-protected, only the person's own, and then no device receives it either), and one run
on a started node where an application posts over HTTP and a device connects."""

from __future__ import annotations

import time
from importlib import resources

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from presence.identity import make_assertion
from presence.web.people import action_link
from tests.test_web_e2e import live  # noqa: F401  (the started node's fixture)
from tests.test_web_people import app_at
from tests.webnode import Browser, WebNode
from tests.wsclient import WSClient

MESSAGE = '<script>alert("hi")</script> & <b>bold</b>'
ACTION = "https://example.com/room?a=1&b=\"x\"'y'"


@pytest_twisted.async_yield_fixture
async def web(sqlite_url):
    node = await WebNode.start(sqlite_url)
    yield node
    await node.stop()


async def granted(web, *emails, domain="example.com", name="Example <app>"):
    """A verified application and each person's id for it."""
    app = await app_at(web, domain, name)
    uids = {email: (await web.node.apps.grant(email, app.app_id)).uid for email in emails}
    return app, uids


async def notify(web, app, uid, message, action=None):
    item = {"uid": uid, "message": message}
    if action is not None:
        item["action"] = action
    [result] = await web.node.notifier.send(app, [item])
    assert result["result"] == "OK", result


async def waiting(web, email):
    """What a device of ``email`` that connects now receives."""
    return [(n.message, n.action) for n in await web.node.notifier.waiting(email)]


# -- the section of /me -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_me_shows_waiting_notifications_with_the_application_and_everything_escaped(web):
    app, uids = await granted(web, "bob@example.com")
    await notify(web, app, uids["bob@example.com"], MESSAGE, ACTION)
    await notify(web, app, uids["bob@example.com"], "No action here")
    [with_action, without] = await web.node.notifier.waiting("bob@example.com")
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me")
    assert page.code == 200 and '<body data-page="me">' in page.text
    assert "<h2>Notifications</h2>" in page.text
    assert "<script>alert" not in page.text and "<b>bold</b>" not in page.text and "Example <app>" not in page.text
    assert "&lt;script&gt;alert(&#34;hi&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page.text
    assert '<strong class="note-app">Example &lt;app&gt;</strong>' in page.text
    assert '<span class="muted note-domain">example.com</span>' in page.text
    escaped = "https://example.com/room?a=1&amp;b=&#34;x&#34;&#39;y&#39;"
    assert (f'<a class="note-action" href="{escaped}" rel="noopener noreferrer" target="_blank">{escaped}</a>'
            in page.text)
    assert page.text.count('class="note-action"') == 1  # none for the item without an action
    for note in (with_action, without):
        assert f'id="notification-{note.id}"' in page.text and f'id="dismiss-{note.id}"' in page.text
        assert f'<input type="hidden" name="id" value="{note.id}">' in page.text
    assert 'id="no-notifications" hidden' in page.text
    assert "default-src 'self'" in page.header("content-security-policy")


@pytest_twisted.ensureDeferred
async def test_me_without_notifications_says_so(web):
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me")
    assert 'id="notifications" aria-live="polite" hidden' in page.text
    assert "No notification is waiting for you." in page.text and 'id="no-notifications">' in page.text


@pytest_twisted.ensureDeferred
async def test_an_action_that_is_not_http_is_never_a_link(web):
    """Refused when queued; and should one be in the store anyway, the page shows no link for it."""
    app, uids = await granted(web, "bob@example.com")
    now = web.node.reactor.seconds()
    await web.store.queue_notifications(app.app_id, [(uids["bob@example.com"], "sneaky", "javascript:alert(1)")],
                                        now, 100)
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me")
    assert "sneaky" in page.text and "javascript:" not in page.text and 'class="note-action"' not in page.text
    [note] = (await browser.get("/me/notifications")).json()["notifications"]
    assert note["message"] == "sneaky" and note["action"] is None


@pytest.mark.parametrize("url, link", [
    ("https://example.com/x", True), ("http://example.com", True), ("HTTPS://example.com/", True),
    ("javascript:alert(1)", False), ("JavaScript:alert(1)", False), ("data:text/html,<b>x</b>", False),
    ("vbscript:x", False), ("//example.com/x", False), ("/relative", False), ("https:///nohost", False),
    ("http://[::1", False), ("", False), (None, False),
])
def test_only_http_urls_become_links(url, link):
    assert action_link(url) == (url if link else None)


# -- GET /me/notifications --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_json_needs_a_session(web):
    app, uids = await granted(web, "bob@example.com")
    await notify(web, app, uids["bob@example.com"], "secret plans")
    stranger = web.browser()
    page = await stranger.get("/me/notifications")
    assert page.code == 401 and page.location is None
    assert page.header("content-type") == "application/json" and page.header("cache-control") == "no-store"
    assert "sign in again" in page.json()["error"] and "secret plans" not in page.text
    bob = await web.signed_in("bob@example.com")
    await bob.post("/logout", {})
    assert (await bob.get("/me/notifications")).code == 401


@pytest_twisted.ensureDeferred
async def test_the_json_lists_the_persons_own_notifications_in_order(web):
    app, uids = await granted(web, "bob@example.com", "carol@example.com")
    other, other_uids = await granted(web, "bob@example.com", domain="other.example", name="Other")
    await notify(web, app, uids["bob@example.com"], MESSAGE, ACTION)
    await notify(web, app, uids["carol@example.com"], "for Carol only")
    await notify(web, other, other_uids["bob@example.com"], "second")
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me/notifications")
    assert page.code == 200 and page.header("content-type") == "application/json"
    assert page.header("cache-control") == "no-store"
    notes = page.json()["notifications"]
    assert [(n["app"], n["domain"], n["message"], n["action"]) for n in notes] == [
        ("Example <app>", "example.com", MESSAGE, ACTION), ("Other", "other.example", "second", None)]
    assert notes[0]["id"] < notes[1]["id"] and all(n["when"].endswith(" UTC") for n in notes)
    assert abs(notes[0]["at"] - time.time()) < 60
    assert "for Carol only" not in page.text


@pytest_twisted.ensureDeferred
async def test_the_json_says_when_the_store_does_not_answer(web):
    browser = await web.signed_in("bob@example.com")
    await web.store.close()
    page = await browser.get("/me/notifications")
    assert page.code == 503 and "cannot reach its database" in page.json()["error"]


# -- Dismiss ------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dismiss_removes_it_from_the_page_and_from_every_device(web):
    app, uids = await granted(web, "bob@example.com")
    await notify(web, app, uids["bob@example.com"], "first")
    await notify(web, app, uids["bob@example.com"], "second")
    first, second = await web.node.notifier.waiting("bob@example.com")
    browser = await web.signed_in("bob@example.com")
    await browser.get("/me")
    page = await browser.post("/me/dismiss", {"id": str(first.id)})
    assert page.code == 303 and page.location == "/me?done=dismissed"
    assert await waiting(web, "bob@example.com") == [("second", None)]  # what a connecting device gets
    page = await browser.get("/me?done=dismissed")
    assert "Dismissed: that notification is gone" in page.text
    assert f'id="notification-{first.id}"' not in page.text and f'id="notification-{second.id}"' in page.text
    assert [n["id"] for n in (await browser.get("/me/notifications")).json()["notifications"]] == [second.id]
    again = await browser.post("/me/dismiss", {"id": str(first.id)})
    assert again.location == "/me?done=gone"
    assert "That notification was already gone" in (await browser.get("/me?done=gone")).text


@pytest_twisted.ensureDeferred
async def test_another_persons_notification_cannot_be_dismissed(web):
    app, uids = await granted(web, "bob@example.com", "carol@example.com")
    await notify(web, app, uids["carol@example.com"], "for Carol")
    [carols] = await web.node.notifier.waiting("carol@example.com")
    bob = await web.signed_in("bob@example.com")
    await bob.get("/me")
    page = await bob.post("/me/dismiss", {"id": str(carols.id)})
    assert page.location == "/me?done=gone"
    assert await waiting(web, "carol@example.com") == [("for Carol", None)]
    assert f'notification-{carols.id}"' not in (await bob.get("/me")).text


@pytest_twisted.ensureDeferred
async def test_dismiss_needs_the_csrf_token_a_session_and_an_id(web):
    app, uids = await granted(web, "bob@example.com")
    await notify(web, app, uids["bob@example.com"], "keep me")
    [note] = await web.node.notifier.waiting("bob@example.com")
    bob = await web.signed_in("bob@example.com")
    await bob.get("/me")
    assert (await bob.post("/me/dismiss", {"id": str(note.id)}, csrf=False)).code == 403
    stranger = web.browser()
    await stranger.get("/")
    page = await stranger.post("/me/dismiss", {"id": str(note.id)})
    assert page.code == 303 and page.location == "/login?next=%2Fme"
    for bad in ("", "abc", "-1", "1e3", "\u00b2", "9" * 40, f"{note.id},{note.id}"):
        page = await bob.post("/me/dismiss", {"id": bad})
        assert page.code == 303 and page.location == "/me?done=gone", bad
    assert await waiting(web, "bob@example.com") == [("keep me", None)]


def test_the_pages_script_builds_no_markup_from_text():
    script = (resources.files("presence.web") / "static" / "pages.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert 'fetch("/me/notifications"' in script and "textContent" in script
    assert 'url.protocol === "http:" || url.protocol === "https:"' in script


# -- on a started node --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_application_notifies_the_page_shows_it_and_dismiss_reaches_the_devices(live):  # noqa: F811
    apps = live.node.apps
    app = await apps.mark_verified(await apps.register("dev@example.com", "chat.example", "Chat <3", ""))
    app, key = await apps.activate(app)
    uid = (await apps.grant("bob@example.com", app.app_id)).uid
    port = live.node.web_port.getHost().port
    response = await treq.post(f"http://127.0.0.1:{port}/{app.app_id}/notification",
                               json=[{"uid": uid, "message": "Alice asks you to join", "action": ACTION}],
                               headers={"authorization": [f"Bearer {key}"]})
    assert response.code == 200 and (await response.json())[0]["result"] == "OK"

    bob = Browser(live)
    await bob.login("bob@example.com", "/me")
    page = await bob.get("/me")
    assert "Alice asks you to join" in page.text and "Chat &lt;3" in page.text
    [note] = (await bob.get("/me/notifications")).json()["notifications"]
    assert (note["app"], note["message"], note["action"]) == ("Chat <3", "Alice asks you to join", ACTION)

    async def device(name: str) -> WSClient:
        certified = await bob.certificate("bob@example.com")
        client = await WSClient.connect(live.ws, "/presence")
        assertion = make_assertion(certified["certificate"], bob.key, live.public_url, reactor.seconds())
        client.send({"type": "connect", "device": name, "assertion": assertion})
        assert (await client.receive())["result"] is True
        return client

    phone = await device("phone")
    delivered = await phone.receive()
    assert delivered["type"] == "notifications" and [n["id"] for n in delivered["notifications"]] == [note["id"]]
    phone.close()
    await phone.wait_closed()

    await bob.get("/me")
    assert (await bob.post("/me/dismiss", {"id": str(note["id"])})).location == "/me?done=dismissed"
    laptop = await device("laptop")
    await laptop.nothing_more(0.5)  # nothing waits any more: no notifications message
    laptop.close()
    await laptop.wait_closed()
    assert (await bob.get("/me/notifications")).json() == {"notifications": []}
