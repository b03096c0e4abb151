"""``/myapps``: registering (every validation message, nothing typed lost), verifying against a real
loopback site (failures, background polling on a Clock), activating, rotating and deactivating
(streams closed), and developers seeing and changing only their own applications."""

from __future__ import annotations

import time

import html
import re

import pytest
import pytest_twisted
from markupsafe import escape

from presence import errors
from presence.errors import PresenceError
from presence.keys import hash_key
from presence.store.base import ACTIVE, PENDING, VERIFIED
from tests.webnode import KeyServer, WebNode


@pytest_twisted.async_yield_fixture
async def web(sqlite_url):
    node = await WebNode.start(sqlite_url)
    yield node
    await node.stop()


@pytest_twisted.async_yield_fixture
async def site():
    server = KeyServer()
    yield server
    await server.stop()


class Closed:
    """The closings of applications' streams the log holds for every node (presence.apps logs them
    in the transaction that rotates the key or deactivates the application)."""

    def __init__(self, web: WebNode):
        self.store = web.store

    async def calls(self) -> list[tuple[str, int, str]]:
        from presence import changelog

        return [tuple(extra["close_app"]) for change in await self.store.changes_since(0)
                for extra in changelog.decode(change.payload, change.seq)[2] if "close_app" in extra]


async def register(browser, domain="example.com", name="Example", description="An example") -> int:
    page = await browser.post("/myapps", {"domain": domain, "name": name, "description": description})
    assert page.code == 303, page.text
    return int(re.search(r"#app-(\d+)$", page.location).group(1))


async def verified_app(web, browser, site) -> int:
    app_id = await register(browser, site.domain)
    app = await web.store.get_app_by_id(app_id)
    site.serve(app.verification_key)
    assert (await browser.post(f"/myapps/{app_id}/verify")).location.startswith("/myapps?done=verified")
    await browser.get("/myapps")
    return app_id


def key_in(page, element_id: str) -> str:
    return html.unescape(re.search(rf'id="{element_id}"[^>]*>([^<]*)</textarea>', page.text).group(1))


# -- registering --------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_page_needs_a_signed_in_developer(web):
    browser = web.browser()
    assert (await browser.get("/myapps")).location == "/login?next=%2Fmyapps"
    await browser.get("/login")
    page = await browser.post("/myapps", {"domain": "example.com", "name": "x"})
    assert page.code == 303 and page.location == "/login?next=%2Fmyapps"
    assert await web.store.list_apps() == []


@pytest.mark.parametrize("form, field, message", [
    ({"domain": ""}, "domain", "Give the application&#39;s domain, like example.com."),
    ({"domain": "   "}, "domain", "Give the application&#39;s domain, like example.com."),
    ({"domain": "not a host!"}, "domain", "&#39;not a host!&#39; is not a hostname; give one like example.com."),
    ({"domain": "-bad.example"}, "domain", "is not a hostname; give one like example.com."),
    ({"domain": "a" * 64 + ".example"}, "domain", "is not a hostname"),
    ({"domain": "localhost:99999"}, "domain", "the port must be a number from 1 to 65535."),
    ({"domain": "localhost:http"}, "domain", "the port must be a number from 1 to 65535."),
    ({"name": ""}, "name", "Give the application a name (people see it when they grant it access)."),
    ({"name": "  "}, "name", "Give the application a name"),
    ({"name": "n" * 101}, "name", "The name may have at most 100 characters; this one has 101."),
    ({"description": "d" * 2001}, "description",
     "The description may have at most 2000 characters; this one has 2001."),
])
@pytest_twisted.ensureDeferred
async def test_each_validation_failure_says_why_and_keeps_what_was_typed(web, form, field, message):
    browser = await web.signed_in("dev@example.com")
    typed = {"domain": "example.com", "name": "My <app>", "description": "Says \"who\" & where", **form}
    page = await browser.post("/myapps", typed)
    assert page.code == 400
    shown = re.search(rf'<p class="field-error" id="{field}-error">([^<]*)</p>', page.text).group(1)
    assert message in shown and shown.endswith(".")
    assert f'id="{field}" name="{field}"' in page.text and 'aria-invalid="true"' in page.text
    for name, value in typed.items():  # nothing typed is lost
        assert str(escape(value)) in page.text
    assert await web.store.list_apps() == []


@pytest_twisted.ensureDeferred
async def test_several_fields_wrong_at_once_each_get_their_message(web):
    browser = await web.signed_in("dev@example.com")
    page = await browser.post("/myapps", {"domain": "", "name": "", "description": "d" * 2001})
    assert page.code == 400 and page.text.count('class="field-error"') == 3


@pytest_twisted.ensureDeferred
async def test_a_port_is_refused_outside_the_local_mode(sqlite_url):
    web = await WebNode.start(sqlite_url, insecure_identity=False)
    try:
        browser = await web.signed_in("dev@example.com")
        page = await browser.post("/myapps", {"domain": "example.com:8080", "name": "x"})
        assert page.code == 400
        assert "&#39;example.com:8080&#39;: give a hostname without a port, like example.com." in page.text
        assert "local mode" not in page.text
    finally:
        await web.stop()


@pytest_twisted.ensureDeferred
async def test_registering_shows_the_key_and_exactly_what_to_do(web):
    browser = await web.signed_in("dev@example.com")
    app_id = await register(browser, "Example.COM", "<b>Example</b>", "Shows <i>who</i> is around")
    page = await browser.get("/myapps?done=registered")
    app = await web.store.get_app_by_id(app_id)
    assert app.developer == "dev@example.com" and app.domain == "example.com" and app.state == PENDING
    assert "Registered. Now serve the verification key below, then press Verify." in page.text
    assert key_in(page, f"verification-key-{app_id}") == app.verification_key and len(app.verification_key) == 1024
    assert "<code>text/plain</code>" in page.text and "<code>http://example.com/__presence</code>" in page.text
    assert f'id="verify-{app_id}"' in page.text and "waiting for domain verification" in page.text
    assert "&lt;b&gt;Example&lt;/b&gt;" in page.text and "<b>Example</b>" not in page.text  # escaped
    assert "Shows &lt;i&gt;who&lt;/i&gt; is around" in page.text


# -- verifying ----------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_verify_right_away(web, site):
    browser = await web.signed_in("dev@example.com")
    app_id = await verified_app(web, browser, site)
    app = await web.store.get_app_by_id(app_id)
    page = await browser.get("/myapps?done=verified")
    assert app.state == VERIFIED and app.app_id
    assert "Verified: the domain proved it is yours." in page.text
    assert f'<code id="app-id-{app_id}">{app.app_id}</code>' in page.text
    assert f'<code id="entry-point-{app_id}">ws://127.0.0.1:9/{app.app_id}</code>' in page.text
    assert f'id="activate-{app_id}"' in page.text and app.verification_key not in page.text


@pytest_twisted.ensureDeferred
async def test_a_failed_verify_says_what_to_serve_and_polling_verifies_it_later(web, site):
    browser = await web.signed_in("dev@example.com")
    app_id = await register(browser, site.domain)
    page = await browser.post(f"/myapps/{app_id}/verify")
    assert page.location == f"/myapps?done=checking#app-{app_id}"
    page = await browser.get("/myapps?done=checking")
    assert "Not verified yet; see why below. Presence keeps checking in the background." in page.text
    # What must be served, the same whatever failed (why goes to the node's log: Verify is no probe).
    assert f"http://{site.domain}/__presence did not serve this application" in page.text
    assert "must answer HTTP 200 with exactly the key as text/plain" in page.text and "404" not in page.text
    assert "Checked 1 time, last at" in page.text and "Presence checks again by itself at" in page.text
    assert "becomes verified without another click" in page.text

    site.serve("wrong", content_type=b"text/html")
    web.clock.advance(10)
    await web.site.poller.wait()
    page = await browser.get("/myapps")
    assert "must answer HTTP 200 with exactly the key as text/plain" in page.text and "text/html" not in page.text
    assert "Checked 2 times" in page.text

    app = await web.store.get_app_by_id(app_id)
    site.serve(app.verification_key)
    web.clock.advance(20)
    await web.site.poller.wait()
    app = await web.store.get_app_by_id(app_id)
    assert app.state == VERIFIED and site.resource.fetches == 3
    page = await browser.get("/myapps")
    assert f'<code id="app-id-{app_id}">{app.app_id}</code>' in page.text and "Not verified yet" not in page.text


@pytest_twisted.ensureDeferred
async def test_when_polling_gives_up_the_page_says_so(sqlite_url, site):
    web = await WebNode.start(sqlite_url, verify_poll=25)
    try:
        browser = await web.signed_in("dev@example.com")
        app_id = await register(browser, site.domain)
        await browser.post(f"/myapps/{app_id}/verify")
        for _ in range(4):
            web.clock.advance(10)
            await web.site.poller.wait()
        page = await browser.get("/myapps")
        assert "Checked 3 times" in page.text and "Presence stopped checking at" in page.text
        assert "fix the problem and press Verify again" in page.text
    finally:
        await web.stop()


# -- activating ---------------------------------------------------------------------------------------------------

async def follow(browser, page):
    """The GET a browser makes after a 303."""
    assert page.code == 303, page.text
    return await browser.get(page.location.partition("#")[0])


@pytest_twisted.ensureDeferred
async def test_activate_shows_the_api_key_once_and_keeps_only_its_hash(web, site):
    browser = await web.signed_in("dev@example.com")
    app_id = await verified_app(web, browser, site)
    answer = await browser.post(f"/myapps/{app_id}/activate")
    # post/redirect/get: the POST's answer is a redirect, so reloading the page shown does not post again
    assert answer.code == 303 and answer.location == f"/myapps?done=activated#app-{app_id}"
    page = await follow(browser, answer)
    assert page.code == 200 and page.header("cache-control") == "no-store"
    key = key_in(page, f"api-key-{app_id}")
    app = await web.store.get_app_by_id(app_id)
    assert len(key) == 1024 and app.state == ACTIVE and app.api_key_hash == hash_key(key)
    assert "The API key, shown only now." in page.text and "Activated. The application can now connect" in page.text
    assert await web.node.apps.authenticate(app.app_id, key)
    reloaded = await browser.get(page.response.request.absoluteURI.decode().removeprefix(web.public_url))
    assert key not in reloaded.text and "api-key-" not in reloaded.text       # shown once
    assert (await web.store.get_app_by_id(app_id)).api_key_hash == hash_key(key)   # and not rotated
    assert f'id="rotate-{app_id}"' in reloaded.text and f'id="deactivate-{app_id}"' in reloaded.text


@pytest_twisted.ensureDeferred
async def test_a_handed_over_key_is_shown_only_to_the_session_it_was_made_for(web, site):
    browser = await web.signed_in("dev@example.com")
    app_id = await verified_app(web, browser, site)
    answer = await browser.post(f"/myapps/{app_id}/activate")
    cookie = browser.cookie("presence_new_key")
    assert cookie is not None and cookie.path == "/" and int(cookie.expires - time.time()) <= 300
    other = await web.signed_in("dev@example.com")   # another session of the same developer
    other.cookies.set_cookie(cookie)
    assert "api-key-" not in (await other.get("/myapps")).text
    assert "api-key-" in (await follow(browser, answer)).text


@pytest_twisted.ensureDeferred
async def test_a_pending_application_cannot_be_activated(web):
    browser = await web.signed_in("dev@example.com")
    app_id = await register(browser)
    page = await browser.post(f"/myapps/{app_id}/activate")
    assert page.code == 400 and "Verify the application&#39;s domain before activating it." in page.text
    assert (await web.store.get_app_by_id(app_id)).state == PENDING


@pytest_twisted.ensureDeferred
async def test_rotate_and_deactivate_close_the_applications_streams(web, site):
    closed = Closed(web)
    browser = await web.signed_in("dev@example.com")
    app_id = await verified_app(web, browser, site)
    first = key_in(await follow(browser, await browser.post(f"/myapps/{app_id}/activate")), f"api-key-{app_id}")
    assert await closed.calls() == []  # nothing to close on a first activation
    rotated = await follow(browser, await browser.post(f"/myapps/{app_id}/rotate"))
    assert "Rotated: the old API key no longer works" in rotated.text
    second = key_in(rotated, f"api-key-{app_id}")
    app = await web.store.get_app_by_id(app_id)
    assert second != first and app.api_key_hash == hash_key(second)
    assert await closed.calls() == [(app.app_id, errors.CLOSE_REVOKED, "the API key was rotated")]
    with pytest.raises(PresenceError) as e:
        await web.node.apps.authenticate(app.app_id, first)
    assert e.value.errno == errors.BAD_KEY

    page = await browser.post(f"/myapps/{app_id}/deactivate")
    assert page.location == f"/myapps?done=deactivated#app-{app_id}"
    assert (await closed.calls())[-1] == (app.app_id, errors.CLOSE_REVOKED, "the application was deactivated")
    app = await web.store.get_app_by_id(app_id)
    assert app.state == VERIFIED and app.api_key_hash is None
    with pytest.raises(PresenceError) as e:
        await web.node.apps.authenticate(app.app_id, second)
    assert e.value.errno == errors.APP_NOT_ACTIVE
    page = await browser.get("/myapps?done=deactivated")
    assert "Deactivated: the API key no longer works" in page.text and f'id="activate-{app_id}"' in page.text


# -- whose applications ------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_developer_sees_and_changes_only_their_own_applications(web, site):
    alice = await web.signed_in("alice@example.com")
    bob = await web.signed_in("bob@example.com")
    pending = await register(alice, "pending.example", "Alice's pending app")
    verified = await verified_app(web, alice, site)
    mine = await register(bob, "bob.example", "Bob's app")
    before = {a.id: a for a in await web.store.list_apps()}

    page = await bob.get("/myapps")
    assert "Bob&#39;s app" in page.text and "Alice" not in page.text and site.domain not in page.text
    assert before[pending].verification_key not in page.text
    for app_id in (pending, verified, 999, "abc", "1x"):
        for action in ("verify", "activate", "rotate", "deactivate"):
            page = await bob.post(f"/myapps/{app_id}/{action}")
            assert page.code == 404 and "There is no such application among yours." in page.text, (app_id, action)
    assert {a.id: a for a in await web.store.list_apps()} == before
    assert mine in before and site.resource.fetches == 1  # Bob's attempts fetched nothing


@pytest_twisted.ensureDeferred
async def test_every_form_needs_the_csrf_token(web, site):
    browser = await web.signed_in("dev@example.com")
    app_id = await verified_app(web, browser, site)
    before = await web.store.list_apps()
    for path, form in [("/myapps", {"domain": "example.org", "name": "x"}), (f"/myapps/{app_id}/verify", {}),
                       (f"/myapps/{app_id}/activate", {}), (f"/myapps/{app_id}/rotate", {}),
                       (f"/myapps/{app_id}/deactivate", {})]:
        page = await browser.post(path, form, csrf=False)
        assert page.code == 403 and "This form is out of date" in page.text, path
        page = await browser.post(path, {**form, "csrf": "forged"}, csrf=False)
        assert page.code == 403, path
    assert await web.store.list_apps() == before
