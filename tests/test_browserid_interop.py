"""BrowserID as the specification writes it, checked against an independent implementation
(PyBrowserID 0.14) both ways: its LocalVerifier accepts what Presence's identity provider issues
(support document, certificates from a one-time link and from the provisioning page), and a device
connects with an assertion PyBrowserID made for an issuer served on loopback. Also: the errno table
of docs/protocol.md says what the verifier answers."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import pytest_twisted
from browserid import LocalVerifier
from browserid import jwt as bid_jwt
from browserid.supportdoc import SupportDocumentManager
from browserid.utils import bundle_certs_and_assertion

from presence import errors
from presence.identity import jws, make_assertion
from presence.node import Node
from presence.web.idp import issuer_domain
from tests.idp import shared_key
from tests.test_node_e2e import AUDIENCE, config
from tests.webnode import WebNode
from tests.wsclient import WSClient

APP = "https://app.example"


@pytest_twisted.async_yield_fixture
async def web(sqlite_url):
    node = await WebNode.start(sqlite_url)
    yield node
    await node.stop()


async def pybrowserid_verifier(web: WebNode) -> LocalVerifier:
    """PyBrowserID's verifier, given Presence's support document as Presence serves it (PyBrowserID
    would fetch it over https; the node here is plain http on loopback)."""
    page = await web.browser().get("/.well-known/browserid")
    assert page.code == 200
    issuer = issuer_domain(web.public_url)
    documents = SupportDocumentManager()
    documents.cache[issuer] = (None, page.json())
    return LocalVerifier(audiences=[APP], trusted_secondaries=[issuer], supportdocs=documents)


@pytest_twisted.ensureDeferred
async def test_the_support_document_is_in_the_specified_form(web):
    document = (await web.browser().get("/.well-known/browserid")).json()
    numbers = web.site.issuer.public_key.public_numbers()
    assert document["public-key"] == {"algorithm": "RS", "n": str(numbers.n), "e": str(numbers.e)}
    assert document["authentication"] == "/browserid/sign_in"
    assert document["provisioning"] == "/browserid/provision"
    for page in ("/browserid/sign_in", "/browserid/provision"):
        answer = await web.browser().get(page)
        assert answer.code == 200 and "/static/browserid-pages.js" in answer.text
        assert "/static/presence-id.js" not in answer.text   # it would replace the client's navigator.id
        assert "frame-ancestors 'self'" in answer.header("content-security-policy")


@pytest_twisted.ensureDeferred
async def test_pybrowserid_accepts_a_certificate_from_a_one_time_link(web):
    browser = web.browser()
    certified = await browser.certificate("alice@example.com")
    assertion = make_assertion(certified["certificate"], browser.key, APP, time.time())
    verifier = await pybrowserid_verifier(web)
    result = verifier.verify(assertion)
    assert result["status"] == "okay" and result["email"] == "alice@example.com"
    assert result["issuer"] == issuer_domain(web.public_url) and result["audience"] == APP


@pytest_twisted.ensureDeferred
async def test_pybrowserid_accepts_a_certificate_from_the_provisioning_page(web):
    browser = await web.signed_in("alice@example.com")
    user_key = shared_key("provisioned-user")
    numbers = user_key.public_key().public_numbers()
    specified = {"algorithm": "RS", "n": str(numbers.n), "e": str(numbers.e)}   # what genKeyPair hands over
    page = await browser.post_json("/browserid/certify", {"email": "alice@example.com", "publicKey": specified,
                                                          "duration": 3600})
    assert page.code == 200, page.text
    certificate = page.json()["certificate"]
    payload = jws.parse(certificate, "certificate").payload
    assert payload["public-key"] == specified and payload["exp"] - payload["iat"] == 3600 * 1000
    verifier = await pybrowserid_verifier(web)
    assert verifier.verify(make_assertion(certificate, user_key, APP, time.time()))["email"] == "alice@example.com"


@pytest_twisted.ensureDeferred
async def test_the_provisioning_page_certifies_only_the_signed_in_address(web):
    anonymous = web.browser()
    await anonymous.get("/browserid/provision")
    key = jws.public_key_to_json(shared_key("provisioned-user").public_key(), "browserid")
    page = await anonymous.post_json("/browserid/certify", {"email": "alice@example.com", "publicKey": key})
    assert page.code == 403 and page.json() == {"error": "user is not authenticated as target user"}
    alice = await web.signed_in("alice@example.com")
    page = await alice.post_json("/browserid/certify", {"email": "bob@example.com", "publicKey": key})
    assert page.code == 403
    page = await alice.post_json("/browserid/certify", {"email": "alice@example.com", "publicKey": key}, csrf=False)
    assert page.code == 403 and "security token" in page.json()["error"]
    page = await alice.post_json("/browserid/certify", {"email": "alice@example.com", "publicKey": {"algorithm": "DS"}})
    assert page.code == 400 and "not supported" in page.json()["error"]


def _pybrowserid_key(name: str) -> tuple[dict[str, str], bid_jwt.RS256Key]:
    numbers = shared_key(name).private_numbers()
    public = {"algorithm": "RS", "n": str(numbers.public_numbers.n), "e": str(numbers.public_numbers.e)}
    return public, bid_jwt.RS256Key({**public, "d": str(numbers.d)})


@pytest_twisted.async_yield_fixture
async def node(idp, tmp_path):
    issuer_public, issuer_private = _pybrowserid_key("pybrowserid-issuer")
    idp.support.document = {"public-key": issuer_public, "authentication": "/a", "provisioning": "/p"}
    running = Node(config(idp, tmp_path))
    await running.start()
    yield running, issuer_private
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_device_connects_with_an_assertion_pybrowserid_made(idp, node):
    running, issuer_private = node
    user_public, user_private = _pybrowserid_key("pybrowserid-user")
    now = int(time.time() * 1000)
    certificate = bid_jwt.generate({"iss": idp.domain, "iat": now, "exp": now + 3600_000,
                                    "public-key": user_public, "principal": {"email": "carol@example.com"}},
                                   issuer_private)
    assertion = bid_jwt.generate({"aud": AUDIENCE, "exp": now + 120_000}, user_private)
    client = await WSClient.connect(running.ws_port.getHost().port, "/presence")
    client.send({"type": "connect", "assertion": bundle_certs_and_assertion([certificate], assertion)})
    reply = await client.receive()
    assert reply["result"] is True, reply
    client.send({"type": "status", "status": "online"})
    assert await client.receive() == {"result": "OK"}
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_pybrowserid_signature_without_its_leading_zero_byte_is_accepted(idp, node):
    # PyBrowserID's pure-Python RSA drops a signature's leading zero bytes (one signature in 256):
    # made until it happens, such an assertion is accepted like any other.
    running, issuer_private = node
    user_public, user_private = _pybrowserid_key("pybrowserid-user")
    now = int(time.time() * 1000)
    certificate = bid_jwt.generate({"iss": idp.domain, "iat": now, "exp": now + 3600_000,
                                    "public-key": user_public, "principal": {"email": "dave@example.com"}},
                                   issuer_private)
    for shift in range(5000):
        assertion = bid_jwt.generate({"aud": AUDIENCE, "exp": now + 120_000 - shift}, user_private)
        if len(jws.b64url_decode(assertion.rsplit(".", 1)[1])) < 256:
            break
    else:
        pytest.fail("no short signature in 5000 tries")
    client = await WSClient.connect(running.ws_port.getHost().port, "/presence")
    client.send({"type": "connect", "assertion": bundle_certs_and_assertion([certificate], assertion)})
    reply = await client.receive()
    assert reply["result"] is True, reply
    client.close()


# -- docs/protocol.md says what the verifier answers ------------------------------------------------------------

def _errno_rows() -> dict[int, str]:
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.*?) \|", text, re.M)}


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_the_documented_errno_of_an_unsupported_algorithm_is_the_codes(alg):
    header = jws.b64url_encode(b'{"alg":"%s"}' % alg.encode())
    body = jws.b64url_encode(b"{}")
    with pytest.raises(jws.IdentityError) as refused:
        jws.parse(f"{header}.{body}.AAAA", "certificate")
    rows = _errno_rows()
    assert refused.value.errno == errors.ASSERTION_SIGNATURE == 14
    assert "algorithm" in rows[14] and "algorithm" not in rows[errors.ASSERTION_MALFORMED]


def test_the_docs_say_an_unfetchable_support_document_of_the_email_domain_is_15():
    rows = _errno_rows()
    assert errors.ASSERTION_UNAVAILABLE == 15 and "email's domain" in rows[15] and "fetched" in rows[15]
    assert "no usable support document" in rows[errors.ASSERTION_ISSUER]
