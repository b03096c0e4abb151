"""Signing in: Presence's own identity provider (support document, one-time links, certifying the
browser's key), assertions from it and from other trusted issuers, sessions (cookies, logout,
expiry), CSRF on every state-changing endpoint, and how the links are delivered (log or SMTP)."""

from __future__ import annotations

import json
from email import message_from_bytes
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.mail import smtp
from zope.interface import implementer

from presence.identity import Issuer, jws, make_assertion, new_user_key
from presence.keys import hash_key
from presence.mail import LOG, MAIL, LogMailer, SMTPMailer, mailer_from_config
from presence.config import Config
from presence.web.idp import issuer_domain
from tests.idp import shared_key
from tests.webnode import WebNode


@pytest_twisted.async_yield_fixture
async def web(sqlite_url):
    node = await WebNode.start(sqlite_url)
    yield node
    await node.stop()


@pytest_twisted.async_yield_fixture
async def web_both(database_url):
    node = await WebNode.start(database_url)
    yield node
    await node.stop()


def set_cookies(page) -> list[str]:
    return page.response.headers.getRawHeaders("set-cookie") or []


# -- the identity provider ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_support_document_publishes_presences_key(web):
    page = await web.browser().get("/.well-known/browserid")
    assert page.code == 200 and page.header("content-type") == "application/json"
    document = page.json()
    key = jws.public_key_from_json(document["public-key"])
    assert key.public_numbers() == web.site.issuer.public_key.public_numbers()
    assert document["authentication"] == "/browserid/sign_in" and document["provisioning"] == "/browserid/provision"
    assert web.site.issuer.domain == web.public_url.removeprefix("http://")


@pytest.mark.parametrize("url, domain", [
    ("https://presence.example.org", "presence.example.org"), ("https://presence.example.org:443/", "presence.example.org"),
    ("http://127.0.0.1:8080", "127.0.0.1:8080"), ("https://Presence.Example.org:8443", "presence.example.org:8443"),
])
def test_the_issuer_is_named_after_the_public_url(url, domain):
    assert issuer_domain(url) == domain


@pytest_twisted.ensureDeferred
async def test_signing_in_through_a_one_time_link(web_both):
    browser = web_both.browser()
    page = await browser.get("/myapps")
    assert page.code == 303 and page.location == "/login?next=%2Fmyapps"
    page = await browser.get("/login?next=/myapps")
    assert page.code == 200 and 'data-next="/myapps"' in page.text and "/static/presence-id.js" in page.text
    signed_in = await browser.login("Alice@Example.com", "/myapps")
    assert signed_in.json() == {"email": "alice@example.com", "next": "/myapps"}
    cookie = next(c for c in set_cookies(signed_in) if c.startswith("presence_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie and "Max-Age=86400" in cookie
    assert "Secure" not in cookie  # http public URL
    page = await browser.get("/myapps")
    assert page.code == 200 and "alice@example.com" in page.text
    assert (await browser.get("/login?next=/me")).location == "/me"  # already signed in


@pytest_twisted.ensureDeferred
async def test_a_link_works_once_and_only_its_hash_is_stored(web_both):
    browser = web_both.browser()
    await browser.get("/login")
    assert (await browser.post_json("/login/start", {"email": "alice@example.com"})).code == 200
    token = web_both.mailer.token()
    assert web_both.mailer.sent[-1][1] == f"{web_both.public_url}/login/link#{token}"  # fragment: in no request line
    rows = await web_both.store._query("SELECT token_hash, email, next_path FROM login_tokens")
    assert rows == [(hash_key(token), "alice@example.com", "/")]
    key = {"token": token, "publicKey": jws.public_key_to_json(browser.key.public_key())}
    first = await browser.post_json("/login/certify", key)
    assert first.code == 200 and first.json()["email"] == "alice@example.com"
    again = await browser.post_json("/login/certify", key)
    assert again.code == 400 and again.json() == {
        "error": "This sign-in link was already used or has expired; ask for a new one."}


@pytest_twisted.ensureDeferred
async def test_a_link_expires(web):
    browser = web.browser()
    await browser.get("/login")
    await browser.post_json("/login/start", {"email": "alice@example.com"})
    web.clock.advance(901)
    page = await browser.post_json("/login/certify", {"token": web.mailer.token(),
                                                       "publicKey": jws.public_key_to_json(browser.key.public_key())})
    assert page.code == 400 and "already used or has expired" in page.json()["error"]


@pytest_twisted.ensureDeferred
async def test_the_certificate_binds_the_browsers_key_and_a_bad_key_keeps_the_link(web):
    browser = web.browser()
    await browser.get("/login")
    await browser.post_json("/login/start", {"email": "alice@example.com", "next": "/me"})
    token = web.mailer.token()
    weak = new_user_key(1024)
    page = await browser.post_json("/login/certify", {"token": token, "publicKey": jws.public_key_to_json(weak.public_key())})
    assert page.code == 400 and "The browser's key cannot be used (RSA key of 1024 bits is too small" in page.json()["error"]
    page = await browser.post_json("/login/certify", {"token": token, "publicKey": {"kty": "RSA", "n": "AQAB", "e": "AQAB", "junk": 1}})
    assert page.code == 400
    page = await browser.post_json("/login/certify", {"token": token, "publicKey": jws.public_key_to_json(browser.key.public_key())})
    assert page.code == 200
    body = page.json()
    assert body["next"] == "/me" and body["expires"] == int((web.clock.seconds() + 86400) * 1000)
    cert = jws.parse(body["certificate"], "certificate")
    jws.verify(cert, web.site.issuer.public_key, "certificate", "presence")
    assert cert.payload["iss"] == web.site.issuer.domain and cert.payload["principal"] == {"email": "alice@example.com"}
    assert cert.payload["public-key"] == jws.public_key_to_json(browser.key.public_key(), "browserid")  # as specified


@pytest.mark.parametrize("email", ["", "alice", "alice@", "@example.com", "a b@example.com", "alice@exa_mple.com",
                                   "x" * 65 + "@example.com"])
@pytest_twisted.ensureDeferred
async def test_a_bad_address_gets_a_clear_message(web, email):
    browser = web.browser()
    await browser.get("/login")
    page = await browser.post_json("/login/start", {"email": email})
    assert page.code == 400 and page.json() == {"error": "Give a valid email address, like alice@example.com."}
    assert web.mailer.sent == []


@pytest_twisted.ensureDeferred
async def test_links_per_address_are_limited(web):
    browser = web.browser()
    await browser.get("/login")
    for _ in range(5):
        assert (await browser.post_json("/login/start", {"email": "alice@example.com"})).code == 200
    page = await browser.post_json("/login/start", {"email": "alice@example.com"})
    assert page.code == 429 and page.json()["error"] == (
        "5 links were already sent to alice@example.com in the last 15 minutes; use one of them, or wait a little.")
    assert (await browser.post_json("/login/start", {"email": "bob@example.com"})).code == 200
    web.clock.advance(901)
    assert (await browser.post_json("/login/start", {"email": "alice@example.com"})).code == 200


@pytest_twisted.ensureDeferred
async def test_links_per_client_address_are_limited(sqlite_url):
    web = await WebNode.start(sqlite_url, login_links_per_client=4)
    try:
        browser = web.browser()
        await browser.get("/login")
        for i in range(4):
            assert (await browser.post_json("/login/start", {"email": f"u{i}@example.com"})).code == 200
        page = await browser.post_json("/login/start", {"email": "u9@example.com"})
        assert page.code == 429 and page.json()["error"] == (
            "This address asked for 4 sign-in links in the last 15 minutes; use one of them, or wait a little.")
        assert page.header("retry-after") == "225"   # one link's worth of the window: 900 s / 4
        assert len(web.mailer.sent) == 4
        web.clock.advance(225)
        assert (await browser.post_json("/login/start", {"email": "u9@example.com"})).code == 200
    finally:
        await web.stop()


@pytest_twisted.ensureDeferred
async def test_behind_a_balancer_the_client_is_the_last_forwarded_address(sqlite_url):
    web = await WebNode.start(sqlite_url, login_links_per_client=2, login_links_total=5,
                              client_address_header="X-Forwarded-For")
    try:
        browser = web.browser()
        await browser.get("/login")

        async def start(email: str, forwarded: str) -> int:
            page = await browser.post_json("/login/start", {"email": email},
                                           extra={"x-forwarded-for": [forwarded]})
            return page.code

        # what a client puts first is its own business: the balancer's (last) value counts
        assert [await start(f"a{i}@example.com", f"6.6.6.{i}, 10.0.0.1") for i in range(3)] == [200, 200, 429]
        assert await start("b@example.com", "10.0.0.2") == 200
        assert await start("c@example.com", "10.0.0.3") == 200
        # the overall limit (5 per window on this node) holds whatever the addresses
        assert await start("d@example.com", "10.0.0.4") == 200
        page = await browser.post_json("/login/start", {"email": "e@example.com"},
                                       extra={"x-forwarded-for": ["10.0.0.5"]})
        assert page.code == 429 and "Too many sign-in links" in page.json()["error"]
        assert int(page.header("retry-after")) > 0
    finally:
        await web.stop()


@pytest_twisted.ensureDeferred
async def test_a_mail_server_that_fails_is_said(web):
    web.mailer.fail = True
    browser = web.browser()
    await browser.get("/login")
    page = await browser.post_json("/login/start", {"email": "alice@example.com"})
    assert page.code == 503 and page.json() == {"error": "The sign-in mail could not be sent; try again in a moment."}


@pytest_twisted.ensureDeferred
async def test_assertions_that_do_not_sign_in(web):
    browser = web.browser()
    certified = await browser.certificate("alice@example.com")
    now = web.clock.seconds()

    async def attempt(assertion) -> str:
        page = await browser.post_json("/login/assertion", {"assertion": assertion})
        assert page.code == 400
        return page.json()["error"]

    assert "is for 'http://elsewhere.example'" in await attempt(
        make_assertion(certified["certificate"], browser.key, "http://elsewhere.example", now))
    assert "assertion expired" in await attempt(
        make_assertion(certified["certificate"], browser.key, web.public_url, now - 600))
    assert "signature does not verify with the certified user key" in await attempt(
        make_assertion(certified["certificate"], shared_key("someone-else"), web.public_url, now))
    forged = Issuer(web.site.issuer.domain, shared_key("forger")).certify(
        "alice@example.com", browser.key.public_key(), now)
    assert "signature does not verify with the key of" in await attempt(
        make_assertion(forged, browser.key, web.public_url, now))
    assert "not a backed identity assertion" in await attempt("garbage")
    assert (await browser.get("/myapps")).code == 303  # still signed out


@pytest_twisted.ensureDeferred
async def test_assertions_of_another_trusted_issuer_sign_in_too(sqlite_url, idp):
    web = await WebNode.start(sqlite_url, trusted_issuers=[idp.domain])
    try:
        browser = web.browser()
        await browser.get("/login")
        assertion = idp.assertion("carol@example.com", web.public_url, now=web.clock.seconds())
        page = await browser.post_json("/login/assertion", {"assertion": assertion, "next": "/me"})
        assert page.code == 200 and page.json() == {"email": "carol@example.com", "next": "/me"}
        assert "carol@example.com" in (await browser.get("/me")).text
    finally:
        await web.stop()


@pytest.mark.parametrize("next_path, kept", [
    ("/myapps", "/myapps"), ("https://evil.example/", "/"), ("//evil.example/x", "/"), ("/\\evil.example", "/"),
    ("javascript:alert(1)", "/"), ("/me?done=status", "/me?done=status"),
])
@pytest_twisted.ensureDeferred
async def test_where_to_go_after_signing_in_stays_on_this_site(web, next_path, kept):
    browser = web.browser()
    page = await browser.get("/login?" + urlencode({"next": next_path}))
    assert f'data-next="{kept}"' in page.text.replace("&amp;", "&")
    page = await browser.login("alice@example.com", next_path)
    assert page.json()["next"] == kept


# -- sessions ------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sign_out_ends_the_session_even_for_a_copied_cookie(web):
    browser = await web.signed_in("alice@example.com")
    stolen = browser.cookie("presence_session").value
    page = await browser.post("/logout")
    assert page.code == 303 and page.location == "/"
    assert (await browser.get("/myapps")).code == 303
    thief = web.browser()
    response = await thief.http.get(web.public_url + "/myapps", cookies={"presence_session": stolen},
                                    allow_redirects=False)
    assert response.code == 303
    assert await web.store._query("SELECT COUNT(*) FROM web_sessions") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_session_expires(web):
    browser = await web.signed_in("alice@example.com")
    web.clock.advance(86400 - 1)
    assert (await browser.get("/myapps")).code == 200
    web.clock.advance(2)
    page = await browser.get("/myapps")
    assert page.code == 303 and page.location.startswith("/login")


@pytest_twisted.ensureDeferred
async def test_a_forged_or_tampered_cookie_is_ignored(web):
    browser = await web.signed_in("alice@example.com")
    value = browser.cookie("presence_session").value
    sid, _, mac = value.partition(".")
    for forged in (f"{sid}.{mac[:-2]}AA", f"{sid}x.{mac}", sid, "", "a.b.c"):
        response = await web.browser().http.get(web.public_url + "/myapps", cookies={"presence_session": forged},
                                                allow_redirects=False)
        assert response.code == 303, forged


@pytest_twisted.ensureDeferred
async def test_cookies_are_secure_and_host_only_behind_https(sqlite_url):
    web = await WebNode.start(sqlite_url)
    try:
        https = f"https://127.0.0.1:{web.port.getHost().port}"
        web.site.sessions.secure = True
        web.node.config.public_url = https  # what the browser's origin would be behind https
        from presence.node import make_verifier

        web.node.verifier = make_verifier(web.node.config, web.clock, issuer=web.site.issuer)
        browser = web.browser()
        page = await browser.get("/login")
        csrf_cookie = next(c for c in set_cookies(page) if "presence_csrf=" in c)
        assert csrf_cookie.startswith("__Host-presence_csrf=") and "Secure" in csrf_cookie
        # The client keeps no Secure cookie over http: send the CSRF cookie by hand.
        seed = csrf_cookie.split(";")[0].split("=", 1)[1]
        headers = {"content-type": ["application/json"], "x-csrf-token": [page.csrf()]}
        cookies = {"__Host-presence_csrf": seed}
        await browser.http.post(web.public_url + "/login/start", data=json.dumps({"email": "a@example.com"}).encode(),
                                headers=headers, cookies=cookies)
        response = await browser.http.post(web.public_url + "/login/certify", data=json.dumps(
            {"token": web.mailer.token(), "publicKey": jws.public_key_to_json(browser.key.public_key())}).encode(),
            headers=headers, cookies=cookies)
        cert = (await response.json())["certificate"]
        assertion = make_assertion(cert, browser.key, https, web.clock.seconds())
        response = await browser.http.post(web.public_url + "/login/assertion", data=json.dumps(
            {"assertion": assertion}).encode(), headers=headers, cookies=cookies)
        assert response.code == 200
        session = next(c for c in response.headers.getRawHeaders("set-cookie") if "presence_session=" in c)
        assert session.startswith("__Host-presence_session=") and "Secure" in session and "HttpOnly" in session
    finally:
        await web.stop()


# -- CSRF ------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_sign_in_endpoints_need_the_csrf_token(web):
    browser = web.browser()
    await browser.get("/login")
    other = web.browser()
    await other.get("/login")
    for path, body in [("/login/start", {"email": "alice@example.com"}), ("/login/certify", {"token": "x"}),
                       ("/login/assertion", {"assertion": "x"})]:
        page = await browser.post_json(path, body, csrf=False)
        assert page.code == 403 and "security token does not match" in page.json()["error"], path
        browser.csrf, good = other.csrf, browser.csrf  # a token of another browser does not do either
        assert (await browser.post_json(path, body)).code == 403
        browser.csrf = good
    assert web.mailer.sent == []


@pytest_twisted.ensureDeferred
async def test_sign_out_needs_the_csrf_token(web):
    browser = await web.signed_in("alice@example.com")
    page = await browser.post("/logout", csrf=False)
    assert page.code == 403 and "This form is out of date" in page.text
    assert (await browser.get("/myapps")).code == 200


# -- delivering the link ------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_without_a_mail_server_the_link_is_in_the_log():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        how = await LogMailer().send_login_link("alice@example.com", "http://p.example/login/link#TOKEN")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert how == LOG
    assert [e["link"] for e in seen if e.get("event") == "login.link"] == ["http://p.example/login/link#TOKEN"]
    assert isinstance(mailer_from_config(Config(), reactor), LogMailer)


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, list[str], bytes]] = []

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from test"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: _Message(self, user)


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, delivery: _Delivery, user) -> None:
        self.delivery, self.user, self.lines = delivery, user, []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.delivery.messages.append((str(self.user.orig).encode(), [str(self.user.dest)], b"\n".join(self.lines)))
        return defer.succeed(None)

    def connectionLost(self):
        pass


class _SMTPFactory(smtp.SMTPFactory):
    def __init__(self, delivery: _Delivery):
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr):
        protocol = smtp.ESMTP()
        protocol.delivery = self.delivery
        protocol.factory = self
        protocol.host = b"mail.test"
        return protocol


@pytest_twisted.ensureDeferred
async def test_with_a_mail_server_the_link_is_mailed_and_not_logged():
    delivery = _Delivery()
    port = reactor.listenTCP(0, _SMTPFactory(delivery), interface="127.0.0.1")
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        config = Config(smtp_host="127.0.0.1", smtp_port=port.getHost().port, public_url="https://presence.example.org")
        mailer = mailer_from_config(config, reactor)
        assert isinstance(mailer, SMTPMailer) and mailer.sender == "presence@presence.example.org"
        link = "https://presence.example.org/login/link#SECRET-TOKEN"
        assert await mailer.send_login_link("alice@example.com", link) == MAIL
    finally:
        globalLogPublisher.removeObserver(seen.append)
        await port.stopListening()
    [(sender, recipients, raw)] = delivery.messages
    assert sender == b"presence@presence.example.org" and recipients == ["alice@example.com"]
    message = message_from_bytes(raw)
    assert message["To"] == "alice@example.com" and message["Subject"] == "Sign in to Presence at https://presence.example.org"
    assert link in message.get_payload(decode=True).decode()
    from twisted.logger import formatEvent

    assert not any("SECRET-TOKEN" in formatEvent(e) for e in seen)


@pytest_twisted.ensureDeferred
async def test_a_mail_server_that_is_down_fails_without_the_link_in_the_log():
    from tests.webnode import free_port
    from twisted.logger import formatEvent

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        mailer = SMTPMailer(reactor, "127.0.0.1", free_port(), "presence@p.example", "https://p.example")
        with pytest.raises(Exception):
            await mailer.send_login_link("alice@example.com", "https://p.example/login/link#SECRET-TOKEN")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any(e.get("event") == "login.mail_failed" for e in seen)
    assert not any("SECRET-TOKEN" in formatEvent(e) for e in seen)
