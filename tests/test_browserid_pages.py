"""The BrowserID provisioning and authentication pages in a real browser (Chromium via Playwright),
with a stand-in for a standard BrowserID client: it supplies navigator.id's provisioning and
authentication functions and records how the pages call them."""

from __future__ import annotations

import json
import time

import pytest_twisted

from presence.identity import jws
from tests.idp import shared_key
from tests.test_browser import BrowserThread, pytestmark  # noqa: F401 (skipped without Chromium)
from tests.webnode import WebNode

CLIENT = """
window.__calls = [];
navigator.id = {
  beginProvisioning: function (cb) { __calls.push(["beginProvisioning"]); cb(%(email)s, 3600); },
  genKeyPair: function (cb) { __calls.push(["genKeyPair"]); cb(%(key)s); },
  registerCertificate: function (certificate) { __calls.push(["registerCertificate", certificate]); },
  raiseProvisioningFailure: function (reason) { __calls.push(["raiseProvisioningFailure", reason]); },
  beginAuthentication: function (cb) { __calls.push(["beginAuthentication"]); cb(%(email)s); },
  completeAuthentication: function () { __calls.push(["completeAuthentication"]); },
  cancelAuthentication: function () { __calls.push(["cancelAuthentication"]); }
};
"""
DONE = {"provision": "registerCertificate raiseProvisioningFailure", "sign_in": "completeAuthentication"}


@pytest_twisted.async_yield_fixture
async def web(sqlite_url):
    node = await WebNode.start(sqlite_url)
    yield node
    await node.stop()


@pytest_twisted.async_yield_fixture
async def chromium():
    thread = BrowserThread()
    await thread.start()
    yield thread
    thread.stop()


def open_page(browser, url: str, cookies: list[dict], email: str, key: str, which: str) -> dict:
    """Open /browserid/<which> as a client would, once it called its last function (or showed the
    sign-in button): the calls, and whether the button is shown."""
    context = browser.new_context()
    try:
        if cookies:
            context.add_cookies(cookies)
        context.add_init_script(CLIENT % {"email": json.dumps(email), "key": json.dumps(key)})
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"{url}/browserid/{which}")
        ends = json.dumps(DONE[which].split())
        done = (f"window.__calls.some(c => {ends}.includes(c[0])) ||"
                " (document.getElementById('send') !== null && !document.getElementById('send').hidden)")
        # polled from here: page.evaluate is not subject to the page's CSP (no 'unsafe-eval'), which
        # wait_for_function's in-page polling is
        deadline = time.monotonic() + 15
        while not page.evaluate(done):
            assert time.monotonic() < deadline, f"the page did not finish: {page.evaluate('window.__calls')}"
            page.wait_for_timeout(20)
        return {"calls": page.evaluate("window.__calls"), "send": page.is_visible("#send")}
    finally:
        context.close()


def cookies_of(browser, url: str) -> list[dict]:
    return [{"name": c.name, "value": c.value, "url": url} for c in browser.cookies]


@pytest_twisted.ensureDeferred
async def test_the_provisioning_page_certifies_the_clients_key_for_the_signed_in_address(web, chromium):
    alice = await web.signed_in("alice@example.com")
    key = jws.public_key_to_json(shared_key("provisioned-user").public_key(), "browserid")
    seen = await chromium.run(open_page, chromium.browser, web.public_url, cookies_of(alice, web.public_url),
                              "alice@example.com", json.dumps(key), "provision")
    names = [c[0] for c in seen["calls"]]
    assert names == ["beginProvisioning", "genKeyPair", "registerCertificate"], seen
    certificate = jws.parse(seen["calls"][-1][1], "certificate")
    jws.verify(certificate, web.site.issuer.public_key, "certificate", "presence")
    assert certificate.payload["principal"] == {"email": "alice@example.com"}
    assert certificate.payload["public-key"] == key
    assert certificate.payload["exp"] - certificate.payload["iat"] == 3600 * 1000


@pytest_twisted.ensureDeferred
async def test_the_provisioning_page_raises_a_failure_for_an_address_not_signed_in(web, chromium):
    key = json.dumps(jws.public_key_to_json(shared_key("provisioned-user").public_key(), "browserid"))
    seen = await chromium.run(open_page, chromium.browser, web.public_url, [], "alice@example.com", key, "provision")
    assert seen["calls"] == [["beginProvisioning"],
                             ["raiseProvisioningFailure", "user is not authenticated as target user"]]
    bob = await web.signed_in("bob@example.com")
    seen = await chromium.run(open_page, chromium.browser, web.public_url, cookies_of(bob, web.public_url),
                              "alice@example.com", key, "provision")
    assert [c[0] for c in seen["calls"]] == ["beginProvisioning", "raiseProvisioningFailure"]


@pytest_twisted.ensureDeferred
async def test_the_authentication_page_completes_for_the_signed_in_address_and_offers_a_link_otherwise(web, chromium):
    alice = await web.signed_in("alice@example.com")
    seen = await chromium.run(open_page, chromium.browser, web.public_url, cookies_of(alice, web.public_url),
                              "alice@example.com", "{}", "sign_in")
    assert seen["calls"] == [["beginAuthentication"], ["completeAuthentication"]]
    seen = await chromium.run(open_page, chromium.browser, web.public_url, [], "alice@example.com", "{}", "sign_in")
    assert seen["calls"] == [["beginAuthentication"]] and seen["send"]
