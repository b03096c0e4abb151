"""The people's pages: the door hanger (who asks, Accept or Decline, and the redirect rules: back
only to the application's verified domain) and ``/me`` (status buttons, devices, revoking)."""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlsplit

import pytest
import pytest_twisted

from presence.store.base import Device
from presence.web.common import Problem
from presence.web.people import back_to, check_redirect
from tests.webnode import WebNode


@pytest_twisted.async_yield_fixture
async def web(sqlite_url):
    node = await WebNode.start(sqlite_url)
    yield node
    await node.stop()


async def app_at(web, domain="example.com", name="Example <app>", description="Shows who is <b>around</b>",
                 verified=True):
    apps = web.node.apps
    app = await apps.register("dev@example.com", domain, name, description)
    return await apps.mark_verified(app) if verified else app


def door(app_id: str, redirect: str | None = "https://example.com/back", state: str | None = "ref-1") -> str:
    query = []
    if redirect is not None:
        query.append("redirect=" + quote(redirect, safe=""))
    if state is not None:
        query.append("id=" + quote(state, safe=""))
    return f"/{app_id}/grant?" + "&".join(query)


# -- the redirect rule -----------------------------------------------------------------------------------

@pytest.mark.parametrize("url, domain", [
    ("https://example.com/back", "example.com"), ("http://example.com/", "example.com"),
    ("https://EXAMPLE.com:443/x?y=1#z", "example.com"), ("http://example.com:80/a", "example.com"),
    ("http://localhost:8000/back", "localhost:8000"),
])
def test_redirects_allowed_on_the_applications_domain(url, domain):
    assert check_redirect(url, domain) == url


@pytest.mark.parametrize("url, domain, words", [
    ("", "example.com", "did not say where to send you back"),
    ("https://evil.example/back", "example.com", "is not on example.com, the application's verified domain"),
    ("https://example.com.evil.example/", "example.com", "is not on example.com"),
    ("https://sub.example.com/", "example.com", "is not on example.com"),
    ("https://example.com:8443/", "example.com", "is not on example.com"),
    ("http://localhost:8001/", "localhost:8000", "is not on localhost:8000"),
    ("http://localhost/", "localhost:8000", "is not on localhost:8000"),
    ("https://example.com@evil.example/", "example.com", "may not hold a user name or password"),
    ("https://user:pw@example.com/", "example.com", "may not hold a user name or password"),
    ("https://example.com\\@evil.example/", "example.com", "characters a web address may not have"),
    ("https://example.com/\nSet-Cookie:x", "example.com", "characters a web address may not have"),
    ("javascript:alert(1)//example.com", "example.com", "must be an http or https address"),
    ("//example.com/back", "example.com", "must be an http or https address"),
    ("/back", "example.com", "must be an http or https address"),
    ("ftp://example.com/", "example.com", "must be an http or https address"),
    ("https://example.com:99999/", "example.com", "not a valid web address"),
    ("https://example.com/" + "a" * 2000, "example.com", "too long"),
])
def test_redirects_refused(url, domain, words):
    with pytest.raises(Problem) as e:
        check_redirect(url, domain)
    assert e.value.code == 400 and words in e.value.message


def test_back_to_keeps_the_applications_own_query():
    url = back_to("https://example.com/back?lang=fr#top", result="granted", uid="U1", id="a&b")
    parts = urlsplit(url)
    assert parse_qs(parts.query) == {"lang": ["fr"], "result": ["granted"], "uid": ["U1"], "id": ["a&b"]}
    assert parts.fragment == "top"


# -- the door hanger -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_person_signed_out_is_sent_to_sign_in_and_back(web):
    app = await app_at(web)
    browser = web.browser()
    path = door(app.app_id)
    page = await browser.get(path)
    assert page.code == 303
    assert page.location == "/login?" + "next=" + quote(path, safe="")
    await browser.login("bob@example.com", path)
    page = await browser.get(path)
    assert page.code == 200 and page.header("x-frame-options") == "DENY"
    assert "frame-ancestors 'none'" in page.header("content-security-policy")


@pytest_twisted.ensureDeferred
async def test_the_door_hanger_shows_who_asks(web):
    app = await app_at(web)
    browser = await web.signed_in("bob@example.com")
    page = await browser.get(door(app.app_id))
    assert "Example &lt;app&gt;" in page.text and "<app>" not in page.text
    assert "Shows who is &lt;b&gt;around&lt;/b&gt;" in page.text
    assert '<p class="domain">example.com</p>' in page.text
    assert 'id="accept"' in page.text and 'id="decline"' in page.text
    assert 'name="redirect" value="https://example.com/back"' in page.text and 'name="id" value="ref-1"' in page.text
    assert "You already allow" not in page.text


@pytest_twisted.ensureDeferred
async def test_accept_grants_and_sends_the_persons_id_back(web):
    app = await app_at(web)
    browser = await web.signed_in("bob@example.com")
    await browser.get(door(app.app_id, state="order 7/a&b"))
    page = await browser.post(f"/{app.app_id}/grant", {"redirect": "https://example.com/back?x=1",
                                                       "id": "order 7/a&b", "decision": "accept"})
    assert page.code == 303
    grant = await web.store.get_grant("bob@example.com", app.app_id)
    location = urlsplit(page.location)
    assert (location.scheme, location.netloc, location.path) == ("https", "example.com", "/back")
    assert parse_qs(location.query) == {"x": ["1"], "result": ["granted"], "uid": [grant.uid], "id": ["order 7/a&b"]}
    page = await browser.get(door(app.app_id))
    assert "You already allow this application" in page.text
    again = await browser.post(f"/{app.app_id}/grant", {"redirect": "https://example.com/back", "decision": "accept"})
    assert parse_qs(urlsplit(again.location).query)["uid"] == [grant.uid]  # the same id every time


@pytest_twisted.ensureDeferred
async def test_decline_grants_nothing(web):
    app = await app_at(web)
    browser = await web.signed_in("bob@example.com")
    await browser.get(door(app.app_id))
    page = await browser.post(f"/{app.app_id}/grant", {"redirect": "https://example.com/back", "id": "r",
                                                       "decision": "decline"})
    assert page.code == 303 and page.location == "https://example.com/back?result=declined&id=r"
    assert await web.store.get_grant("bob@example.com", app.app_id) is None


@pytest_twisted.ensureDeferred
async def test_the_door_hanger_refuses_what_it_cannot_honour(web):
    app = await app_at(web)
    pending = await app_at(web, "pending.example", verified=False)
    browser = await web.signed_in("bob@example.com")
    cases = [
        (door("NoSuchApp123"), 404, "There is no such application here."),
        (f"/{pending.id}/grant?redirect=https://pending.example/", 404, "There is no such application here."),
        (door(app.app_id, redirect=None), 400, "did not say where to send you back"),
        (door(app.app_id, redirect="https://evil.example/"), 400,
         "The redirect address is not on example.com, the application&#39;s verified domain"),
        (door(app.app_id, state="x" * 257), 400, "longer than 256 characters"),
    ]
    for path, code, words in cases:
        page = await browser.get(path)
        assert page.code == code and words in page.text, path
        assert 'id="accept"' not in page.text
    # the same rules hold for the form, whatever it was changed to
    page = await browser.post(f"/{app.app_id}/grant", {"redirect": "https://evil.example/", "decision": "accept"})
    assert page.code == 400 and page.location is None
    assert await web.store.list_grants() == []


@pytest_twisted.ensureDeferred
async def test_accepting_needs_the_csrf_token_and_a_session(web):
    app = await app_at(web)
    browser = await web.signed_in("bob@example.com")
    await browser.get(door(app.app_id))
    form = {"redirect": "https://example.com/back", "id": "r", "decision": "accept"}
    page = await browser.post(f"/{app.app_id}/grant", form, csrf=False)
    assert page.code == 403
    stranger = web.browser()
    await stranger.get("/")
    page = await stranger.post(f"/{app.app_id}/grant", form)
    assert page.code == 303 and page.location.startswith("/login?next=")
    assert quote(f"/{app.app_id}/grant?redirect=", safe="") in page.location
    assert await web.store.list_grants() == []


# -- /me -----------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_me_needs_a_signed_in_person(web):
    assert (await web.browser().get("/me")).location == "/login?next=%2Fme"


@pytest_twisted.ensureDeferred
async def test_status_buttons_set_the_persons_status(web):
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me")
    assert 'id="status">offline</span>' in page.text and "No device has reported your status yet." in page.text
    for status in ("online", "unavailable", "offline", "online"):
        page = await browser.post("/me/status", {"status": status})
        assert page.code == 303 and page.location == "/me?done=status"
        assert (await web.store.get_status("bob@example.com")).status == status
    page = await browser.get("/me?done=status")
    assert "Your status is set." in page.text and 'id="status">online</span>' in page.text
    assert "<td>this page</td>" in page.text and "just now" in page.text
    assert 'class="status-button online current"' in page.text


@pytest_twisted.ensureDeferred
async def test_a_bad_status_gets_a_message(web):
    browser = await web.signed_in("bob@example.com")
    for status in ("", "away", "ONLINE"):
        page = await browser.post("/me/status", {"status": status})
        assert page.code == 400 and "Choose a status: online, unavailable or offline." in page.text
    assert await web.store.get_status("bob@example.com") is None


@pytest_twisted.ensureDeferred
async def test_me_shows_when_each_device_was_last_seen(web):
    now = web.clock.seconds()

    def devices(d):
        d["phone"] = Device("bob@example.com", "phone", "node-1", "online", now - 300)
        d["laptop"] = Device("bob@example.com", "laptop", "node-1", "unavailable", now - 7200)

    await web.store.change_person("bob@example.com", devices, "node-1", now)
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me")
    assert "<td>phone</td>" in page.text and "5 min ago" in page.text
    assert "<td>laptop</td>" in page.text and "2 h ago" in page.text
    assert 'id="status">online</span>' in page.text


@pytest_twisted.ensureDeferred
async def test_revoke_removes_the_grant(web):
    app = await app_at(web)
    other = await app_at(web, "other.example", "Other")
    for a in (app, other):
        await web.node.apps.grant("bob@example.com", a.app_id)
    await web.node.apps.grant("carol@example.com", app.app_id)
    browser = await web.signed_in("bob@example.com")
    page = await browser.get("/me")
    assert f'id="revoke-{app.app_id}"' in page.text and f'id="revoke-{other.app_id}"' in page.text
    page = await browser.post("/me/revoke", {"app": app.app_id})
    assert page.location == "/me?done=revoked"
    assert [g.app_id for g in await web.store.list_grants(email="bob@example.com")] == [other.app_id]
    assert await web.store.get_grant("carol@example.com", app.app_id) is not None  # only his own
    page = await browser.get("/me?done=revoked")
    assert "Revoked: that application gets no more updates about you." in page.text
    assert f'id="revoke-{app.app_id}"' not in page.text
    page = await browser.post("/me/revoke", {"app": app.app_id})
    assert page.location == "/me?done=none"


@pytest_twisted.ensureDeferred
async def test_me_forms_need_the_csrf_token(web):
    app = await app_at(web)
    await web.node.apps.grant("bob@example.com", app.app_id)
    browser = await web.signed_in("bob@example.com")
    for path, form in [("/me/status", {"status": "online"}), ("/me/revoke", {"app": app.app_id})]:
        assert (await browser.post(path, form, csrf=False)).code == 403
    assert await web.store.get_status("bob@example.com") is None
    assert await web.store.get_grant("bob@example.com", app.app_id) is not None


@pytest_twisted.ensureDeferred
async def test_a_store_that_does_not_answer_gets_a_clear_page(web):
    browser = await web.signed_in("bob@example.com")
    await web.store.close()
    page = await browser.get("/me")
    assert page.code == 503
    assert "This Presence node cannot reach its database right now; nothing was changed." in page.text
    page = await browser.post_json("/login/start", {"email": "bob@example.com"})
    assert page.code == 503 and "cannot reach its database" in page.json()["error"]
