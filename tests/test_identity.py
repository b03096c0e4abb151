"""The identity layer: JWS, support documents, the verifier's checks and trust rule, end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq

from presence.fetch import Fetcher, TreqFetcher
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from presence import errors
from presence.config import Config
from presence.identity import (
    Identity,
    IdentityError,
    Issuer,
    SupportDocuments,
    Verifier,
    make_assertion,
    normalize_origin,
)
from presence.identity import jws
from presence.identity.support import check_domain, support_url
from tests.idp import LoopbackIdP, idp, shared_key  # noqa: F401  (idp is a fixture)

NOW = 1_700_000_000.0
AUD = "http://localhost:8080"


def issuer_key():
    return shared_key("issuer")


def user_key():
    return shared_key("user")


def other_key():
    return shared_key("other")


# --- harness -----------------------------------------------------------------------------------


class FakeWeb(Resource):
    """Every host's /.well-known/browserid, chosen by the Host header; records each request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[str, Any] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.pending: list[Request] = []

    def serve(self, host: str, document: Any, code: int = 200, headers: dict | None = None) -> None:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.sites[host] = (code, body, headers or {})

    def hang(self, host: str) -> None:
        self.sites[host] = "hang"

    def fetches(self, host: str) -> int:
        return sum(1 for _, h, _ in self.requests if h == host)

    def render_GET(self, request: Request) -> Any:
        host = request.getHeader("host")
        self.requests.append(("https" if request.isSecure() else "http", host, request.path.decode()))
        site = self.sites.get(host)
        if site == "hang":
            self.pending.append(request)
            return NOT_DONE_YET
        if site is None or request.path != b"/.well-known/browserid":
            request.setResponseCode(404)
            return b"not found"
        code, body, headers = site
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class Env:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.web = FakeWeb()
        self.http = StubTreq(self.web)
        self.issuer = Issuer("example.com", issuer_key())
        self.web.serve("example.com", self.issuer.support_document())

    def support(self, insecure: bool = False, **kw: Any) -> SupportDocuments:
        kw.setdefault("ttl", 3600.0)
        kw.setdefault("timeout", 10.0)
        return SupportDocuments(TreqFetcher(self.http), self.clock, insecure=insecure, **kw)

    def verifier(self, audiences=(AUD,), trusted=(), insecure=False, support=None, **kw) -> Verifier:
        support = support or self.support(insecure)
        return Verifier(list(audiences), list(trusted), support, self.clock, insecure=insecure, **kw)

    def assertion(
        self,
        email: str = "alice@example.com",
        issuer: Issuer | None = None,
        audience: str = AUD,
        now: float | None = None,
        cert_lifetime: float = 3600.0,
        lifetime: float = 120.0,
        key_format: str = "jwk",
    ) -> str:
        issuer = issuer or self.issuer
        now = self.clock.seconds() if now is None else now
        cert = issuer.certify(email, user_key().public_key(), now, cert_lifetime, key_format)
        return make_assertion(cert, user_key(), audience, now, lifetime)


@pytest.fixture
def env() -> Env:
    return Env()


def result(d: Any) -> Any:
    """The result of an already fired Deferred or coroutine (StubTreq and Clock are synchronous)."""
    if not isinstance(d, Deferred):
        d = ensureDeferred(d)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def verify(verifier: Verifier, assertion: Any) -> Identity:
    return result(verifier.verify(assertion))


def refused(verifier: Verifier, assertion: Any, errno: int, *words: str) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        verify(verifier, assertion)
    error = info.value
    assert error.errno == errno, error.message
    assert error.close_code is None
    for word in words:
        assert word.lower() in error.message.lower(), error.message
    return error


def token(header: Any, payload: Any, key=None, signature: bytes | None = None) -> str:
    """A JWS with arbitrary header and payload (for what Issuer would never produce)."""
    h = jws.b64url_encode(json.dumps(header).encode())
    p = jws.b64url_encode(json.dumps(payload).encode())
    if signature is None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = (key or issuer_key()).sign(f"{h}.{p}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{h}.{p}.{jws.b64url_encode(signature)}"


def cert_claims(**overrides: Any) -> dict[str, Any]:
    claims = {
        "iss": "example.com",
        "iat": int(NOW * 1000),
        "exp": int((NOW + 3600) * 1000),
        "public-key": jws.public_key_to_json(user_key().public_key()),
        "principal": {"email": "alice@example.com"},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def assertion_claims(**overrides: Any) -> dict[str, Any]:
    claims = {"aud": AUD, "exp": int((NOW + 120) * 1000)}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def backed(cert: dict | str, asr: dict | str) -> str:
    c = cert if isinstance(cert, str) else token({"alg": "RS256"}, cert, issuer_key())
    a = asr if isinstance(asr, str) else token({"alg": "RS256"}, asr, user_key())
    return f"{c}~{a}"


# --- good assertions ---------------------------------------------------------------------------


@pytest.mark.parametrize("issuer_format", ["jwk", "browserid"])
@pytest.mark.parametrize("user_format", ["jwk", "browserid"])
def test_good_assertion_both_key_formats(env, issuer_format, user_format):
    env.web.serve("example.com", env.issuer.support_document(issuer_format))
    identity = verify(env.verifier(), env.assertion(key_format=user_format))
    assert identity == Identity("alice@example.com", "example.com", NOW + 3600)


def test_identity_is_frozen_and_email_lowercased(env):
    identity = verify(env.verifier(), env.assertion(email="Alice.Smith@Example.COM"))
    assert identity.email == "alice.smith@example.com"
    with pytest.raises(Exception):
        identity.email = "mallory@example.com"  # type: ignore[misc]


def test_assertion_without_iat_is_fine(env):
    a = backed(cert_claims(), assertion_claims())
    assert verify(env.verifier(), a).email == "alice@example.com"


def test_hand_made_browserid_formats_are_accepted(env):
    env.web.serve("example.com", {"public-key": jws.public_key_to_json(issuer_key().public_key(), "browserid")})
    key = jws.public_key_to_json(user_key().public_key(), "browserid")
    assert key["algorithm"] == "RS" and key["n"].isdigit()
    a = backed(cert_claims(**{"public-key": key}), assertion_claims())
    assert verify(env.verifier(), a).issuer == "example.com"


# --- times -------------------------------------------------------------------------------------


def test_expired_certificate(env):
    a = env.assertion(now=NOW - 7200, cert_lifetime=3600, lifetime=10_000)
    refused(env.verifier(), a, errors.ASSERTION_EXPIRED, "certificate expired")


def test_expired_assertion(env):
    a = env.assertion(now=NOW - 600, lifetime=120)
    refused(env.verifier(), a, errors.ASSERTION_EXPIRED, "assertion expired")


def test_expiry_within_skew_is_tolerated(env):
    a = env.assertion(now=NOW - 200, lifetime=120)  # expired 80 s ago, skew 120 s
    assert verify(env.verifier(), a).email == "alice@example.com"
    refused(env.verifier(skew=30), a, errors.ASSERTION_EXPIRED, "assertion expired")


def test_certificate_issued_in_the_future(env):
    cert = env.issuer.certify("alice@example.com", user_key().public_key(), NOW + 3600, 3600)
    a = make_assertion(cert, user_key(), AUD, NOW)
    refused(env.verifier(), a, errors.ASSERTION_EXPIRED, "certificate issued in the future")


def test_certificate_iat_slightly_ahead_is_tolerated(env):
    cert = env.issuer.certify("alice@example.com", user_key().public_key(), NOW + 60, 3600)
    assert verify(env.verifier(), make_assertion(cert, user_key(), AUD, NOW)).email


def test_assertion_issued_in_the_future(env):
    a = backed(cert_claims(), assertion_claims(iat=int((NOW + 600) * 1000), exp=int((NOW + 700) * 1000)))
    refused(env.verifier(), a, errors.ASSERTION_EXPIRED, "assertion issued in the future")


def test_an_assertion_valid_until_the_year_3000_is_refused(env):
    year_3000 = 32503680000.0
    a = env.assertion(lifetime=year_3000 - NOW)
    refused(env.verifier(), a, errors.ASSERTION_EXPIRED, "assertion expires at 3000-01-01", "at most")
    a = env.assertion(lifetime=601 + 120)   # just past the default 600 s plus the 120 s skew
    refused(env.verifier(), a, errors.ASSERTION_EXPIRED, "more than 600 s from now")
    assert verify(env.verifier(), env.assertion(lifetime=600 + 120)).email  # within
    assert verify(env.verifier(max_assertion_lifetime=3600), env.assertion(lifetime=3000)).email


def test_a_certificate_valid_for_more_than_a_day_is_refused(env):
    refused(env.verifier(), env.assertion(cert_lifetime=86400 + 121), errors.ASSERTION_EXPIRED,
            "certificate expires at", "more than 86400 s from now")
    assert verify(env.verifier(), env.assertion(cert_lifetime=86400)).email  # Presence's own IdP: one day
    refused(env.verifier(max_certificate_lifetime=3600), env.assertion(cert_lifetime=7200),
            errors.ASSERTION_EXPIRED, "more than 3600 s from now")


def test_the_lifetimes_and_skew_come_from_the_options(env):
    config = Config(max_assertion_lifetime=60, max_certificate_lifetime=7200, clock_skew=5)
    v = Verifier.from_config(config, http_client=TreqFetcher(env.http), clock=env.clock)
    assert (v.max_assertion_lifetime, v.max_certificate_lifetime, v.skew) == (60, 7200, 5)


def test_expires_at_is_the_certificate_expiry(env):
    identity = verify(env.verifier(), env.assertion(cert_lifetime=600))
    assert identity.expires_at == NOW + 600


# --- audience ----------------------------------------------------------------------------------


def test_wrong_audience(env):
    a = env.assertion(audience="http://evil.example:8080")
    refused(env.verifier(), a, errors.ASSERTION_AUDIENCE, "evil.example", AUD)


@pytest.mark.parametrize(
    "accepted, audience",
    [
        ("https://presence.example", "https://presence.example:443"),
        ("https://presence.example:443", "https://presence.example"),
        ("http://presence.example", "http://presence.example:80"),
        ("http://localhost:8080", "HTTP://LocalHost:8080/"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_audience_normalization(env, accepted, audience):
    assert verify(env.verifier(audiences=[accepted]), env.assertion(audience=audience)).email


@pytest.mark.parametrize(
    "audience",
    [
        "https://localhost:8080",  # other scheme
        "http://localhost:8081",  # other port
        "http://localhost",  # default port 80, not 8080
        "http://localhost:8080/app",  # not an origin
        "http://user@localhost:8080",
        "localhost:8080",
        "",
    ],
)
def test_audience_mismatch(env, audience):
    refused(env.verifier(), env.assertion(audience=audience), errors.ASSERTION_AUDIENCE)


def test_any_of_several_audiences(env):
    v = env.verifier(audiences=[AUD, "https://presence.example"])
    assert verify(v, env.assertion(audience="https://presence.example:443")).email


def test_normalize_origin():
    assert normalize_origin("HTTPS://Example.COM") == "https://example.com:443"
    assert normalize_origin("ws://example.com") == "ws://example.com:80"
    assert normalize_origin("http://example.com:8080/") == "http://example.com:8080"
    assert normalize_origin("http://example.com/x") is None
    assert normalize_origin("http://example.com?q") is None
    assert normalize_origin("ftp://example.com") is None
    assert normalize_origin("http://example.com:99999") is None
    assert normalize_origin("nonsense") is None


def test_bad_configured_audience_is_refused(env):
    with pytest.raises(ValueError):
        env.verifier(audiences=["example.com"])
    with pytest.raises(ValueError):
        env.verifier(audiences=[])


# --- trust -------------------------------------------------------------------------------------


def test_untrusted_issuer(env):
    evil = Issuer("evil.example", other_key())
    env.web.serve("evil.example", evil.support_document())
    a = env.assertion(issuer=evil)
    error = refused(env.verifier(), a, errors.ASSERTION_ISSUER, "evil.example", "example.com")
    assert env.web.fetches("evil.example") == 0, error.message  # its key is not even fetched


def test_untrusted_issuer_for_a_domain_without_browserid(env):
    evil = Issuer("evil.example", other_key())
    env.web.serve("evil.example", evil.support_document())
    a = env.assertion(email="bob@mail.example", issuer=evil)
    refused(env.verifier(), a, errors.ASSERTION_ISSUER, "evil.example", "mail.example", "no BrowserID support document")


def test_untrusted_issuer_when_the_email_domain_is_down(env):
    evil = Issuer("evil.example", other_key())
    env.web.serve("evil.example", evil.support_document())
    env.web.serve("mail.example", b"oops", code=503)
    a = env.assertion(email="bob@mail.example", issuer=evil)
    error = refused(env.verifier(), a, errors.ASSERTION_UNAVAILABLE, "mail.example", "could not fetch")
    assert "503" not in error.message  # the status is for the log


def test_trusted_issuer_certifies_any_address(env):
    fallback = Issuer("login.example.net", other_key())
    env.web.serve("login.example.net", fallback.support_document())
    v = env.verifier(trusted=["Login.Example.NET"])
    for email in ("bob@gmail.example", "carol@example.org"):
        identity = verify(v, env.assertion(email=email, issuer=fallback))
        assert identity == Identity(email, "login.example.net", NOW + 3600)
    assert env.web.fetches("gmail.example") == 0  # no need to ask the address's domain
    assert env.web.fetches("login.example.net") == 1


def test_delegated_authority(env):
    delegate = Issuer("idp.example.net", other_key())
    env.web.serve("example.com", {"authority": "idp.example.net"})
    env.web.serve("idp.example.net", delegate.support_document())
    v = env.verifier()
    # The delegate signs as itself...
    assert verify(v, env.assertion(issuer=delegate)) == Identity("alice@example.com", "idp.example.net", NOW + 3600)
    # ...or on behalf of the domain, whose key is then the delegate's.
    on_behalf = Issuer("example.com", other_key())
    assert verify(v, env.assertion(issuer=on_behalf)).issuer == "example.com"
    # The domain's own old key no longer counts.
    refused(v, env.assertion(), errors.ASSERTION_SIGNATURE, "certificate", "idp.example.net")


def test_delegation_over_several_hops(env):
    final = Issuer("c.example", other_key())
    env.web.serve("example.com", {"authority": "a.example"})
    env.web.serve("a.example", {"authority": "b.example"})
    env.web.serve("b.example", {"authority": "c.example"})
    env.web.serve("c.example", final.support_document())
    assert verify(env.verifier(), env.assertion(issuer=final)).issuer == "c.example"
    # Every intermediate domain is an authority for example.com too.
    b = Issuer("b.example", other_key())
    assert verify(env.verifier(), env.assertion(issuer=b)).issuer == "b.example"


def test_delegation_to_someone_else(env):
    evil = Issuer("evil.example", other_key())
    env.web.serve("evil.example", evil.support_document())
    env.web.serve("example.com", {"authority": "idp.example.net"})
    env.web.serve("idp.example.net", Issuer("idp.example.net", issuer_key()).support_document())
    refused(env.verifier(), env.assertion(issuer=evil), errors.ASSERTION_ISSUER, "delegates to idp.example.net")


def test_delegation_loop(env):
    env.web.serve("example.com", {"authority": "a.example"})
    env.web.serve("a.example", {"authority": "example.com"})
    refused(env.verifier(), env.assertion(), errors.ASSERTION_UNAVAILABLE, "loop")


def test_too_many_delegations(env):
    env.web.serve("example.com", {"authority": "d1.example"})
    for i in range(1, 10):
        env.web.serve(f"d{i}.example", {"authority": f"d{i + 1}.example"})
    refused(env.verifier(), env.assertion(), errors.ASSERTION_UNAVAILABLE, "delegations")
    assert env.web.fetches("d7.example") == 0


def test_delegation_to_an_ip_is_refused(env):
    env.web.serve("example.com", {"authority": "127.0.0.1"})
    refused(env.verifier(), env.assertion(), errors.ASSERTION_UNAVAILABLE, "IP address")


# --- signatures --------------------------------------------------------------------------------


def test_certificate_signed_by_another_key(env):
    forger = Issuer("example.com", other_key())
    refused(env.verifier(), env.assertion(issuer=forger), errors.ASSERTION_SIGNATURE, "certificate")


def test_assertion_signed_by_another_key_than_certified(env):
    cert = env.issuer.certify("alice@example.com", user_key().public_key(), NOW)
    a = make_assertion(cert, other_key(), AUD, NOW)
    refused(env.verifier(), a, errors.ASSERTION_SIGNATURE, "assertion", "certified")
    assert env.web.requests == []  # refused offline


def _swap_payload(jws_token: str, payload: dict) -> str:
    header, _, signature = jws_token.split(".")
    return ".".join([header, jws.b64url_encode(json.dumps(payload).encode()), signature])


def test_tampered_certificate_payload(env):
    cert, asr = env.assertion().split("~")
    forged = _swap_payload(cert, cert_claims(principal={"email": "boss@example.com"}))
    refused(env.verifier(), f"{forged}~{asr}", errors.ASSERTION_SIGNATURE, "certificate")


def test_tampered_assertion_payload(env):
    cert, asr = env.assertion(audience="http://other.example").split("~")
    forged = _swap_payload(asr, assertion_claims())
    refused(env.verifier(), f"{cert}~{forged}", errors.ASSERTION_SIGNATURE, "assertion")


def test_truncated_signature(env):
    cert, asr = env.assertion().split("~")
    refused(env.verifier(), f"{cert}~{asr[:-8]}", errors.ASSERTION_SIGNATURE, "assertion")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
@pytest.mark.parametrize("part", ["certificate", "assertion"])
def test_alg_none_is_refused(env, alg, part):
    if part == "certificate":
        a = backed(token({"alg": alg}, cert_claims(), signature=b""), assertion_claims())
    else:
        a = backed(cert_claims(), token({"alg": alg}, assertion_claims(), signature=b""))
    refused(env.verifier(), a, errors.ASSERTION_SIGNATURE, part, "unsigned")
    assert env.web.requests == []


@pytest.mark.parametrize("alg", ["HS256", "RS128", "DS128", "ES256", "PS256"])
def test_other_algorithms_are_refused(env, alg):
    a = backed(token({"alg": alg}, cert_claims()), assertion_claims())
    refused(env.verifier(), a, errors.ASSERTION_SIGNATURE, "not supported", alg)


def test_missing_alg(env):
    a = backed(token({}, cert_claims()), assertion_claims())
    refused(env.verifier(), a, errors.ASSERTION_SIGNATURE, "certificate")


# --- malformed ---------------------------------------------------------------------------------


def _good_parts(env):
    return env.assertion().split("~")


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda c, a: "", ["expected <certificate>~<assertion>"]),
        (lambda c, a: c, ["expected <certificate>~<assertion>"]),
        (lambda c, a: f"{c}~", ["expected <certificate>~<assertion>"]),
        (lambda c, a: f"~{a}", ["expected <certificate>~<assertion>"]),
        (lambda c, a: f"{c}~{c}~{a}", ["chains"]),
        (lambda c, a: f"{c.rsplit('.', 1)[0]}~{a}", ["certificate", "3 dot-separated"]),
        (lambda c, a: f"{c}.x~{a}", ["certificate", "3 dot-separated"]),
        (lambda c, a: f"!!{c}~{a}", ["certificate", "header", "base64url"]),
        (lambda c, a: f"{c}~{a.replace('.', '.+/', 1)}", ["assertion", "payload", "base64url"]),
        (lambda c, a: f"{c}~{a}!", ["assertion", "signature", "base64url"]),
        (lambda c, a: f"{c}~x{a}", ["assertion", "header"]),
        (lambda c, a: f"{jws.b64url_encode(b'not json')}.{c.split('.', 1)[1]}~{a}", ["certificate", "header", "not JSON"]),
        (lambda c, a: f"{jws.b64url_encode(b'[1]')}.{c.split('.', 1)[1]}~{a}", ["certificate", "not a JSON object"]),
        (lambda c, a: f"{c}~{a.split('.')[0]}.{jws.b64url_encode(b'{')}.{a.split('.')[2]}", ["assertion", "payload", "not JSON"]),
        (lambda c, a: f"{c}~{a.split('.')[0]}.{jws.b64url_encode(bytes([255, 254]))}.{a.split('.')[2]}", ["not JSON"]),
        (lambda c, a: "x" * 20_000, ["longer"]),
    ],
)
def test_malformed_strings(env, make, words):
    c, a = _good_parts(env)
    refused(env.verifier(), make(c, a), errors.ASSERTION_MALFORMED, *words)
    assert env.web.requests == []


@pytest.mark.parametrize("value", [None, 42, b"bytes", ["a", "b"]])
def test_not_a_string(env, value):
    refused(env.verifier(), value, errors.ASSERTION_MALFORMED, "not a string")


@pytest.mark.parametrize(
    "cert, words",
    [
        (cert_claims(iss=None), ["'iss'"]),
        (cert_claims(exp=None), ["'exp'"]),
        (cert_claims(**{"public-key": None}), ["'public-key'"]),
        (cert_claims(principal=None), ["'principal'"]),
        (cert_claims(principal={}), ["'email'"]),
        (cert_claims(principal={"email": 42}), ["'email'", "type"]),
        (cert_claims(exp="tomorrow"), ["'exp'", "type"]),
        (cert_claims(exp=True), ["'exp'", "type"]),
        (cert_claims(iat="now"), ["'iat'", "type"]),
        (cert_claims(iss=["example.com"]), ["'iss'", "type"]),
        (cert_claims(principal="alice@example.com"), ["'principal'", "type"]),
    ],
)
def test_missing_or_bad_certificate_fields(env, cert, words):
    refused(env.verifier(), backed(cert, assertion_claims()), errors.ASSERTION_MALFORMED, "certificate", *words)


@pytest.mark.parametrize(
    "asr, words",
    [
        (assertion_claims(aud=None), ["'aud'"]),
        (assertion_claims(exp=None), ["'exp'"]),
        (assertion_claims(aud=["http://localhost:8080"]), ["'aud'", "type"]),
        (assertion_claims(exp="soon"), ["'exp'", "type"]),
        (assertion_claims(iat=False), ["'iat'", "type"]),
    ],
)
def test_missing_or_bad_assertion_fields(env, asr, words):
    refused(env.verifier(), backed(cert_claims(), asr), errors.ASSERTION_MALFORMED, "assertion", *words)


@pytest.mark.parametrize(
    "email",
    ["alice", "alice@", "@example.com", "alice@@example.com", "al ice@example.com", "alice@-example.com",
     "alice@example..com", "alice.@example.com", "alice@exa_mple.com", "a" * 65 + "@example.com",
     "alice@127.0.0.1:8443", "<alice@example.com>"],
)
def test_bad_email_syntax(env, email):
    a = backed(cert_claims(principal={"email": email}), assertion_claims())
    refused(env.verifier(), a, errors.ASSERTION_MALFORMED, "not a valid email address")


@pytest.mark.parametrize(
    "key, words",
    [
        ({"kty": "EC", "crv": "P-256"}, ["EC"]),
        ({"algorithm": "DS", "y": "1"}, ["DS"]),
        ({"n": "1", "e": "3"}, ["neither"]),
        ({"kty": "RSA", "n": "abc+", "e": "AQAB"}, ["base64url"]),
        ({"algorithm": "RS", "n": "0x10", "e": "65537"}, ["decimal"]),
        ({"kty": "RSA", "n": jws.b64url_encode((2**1023 + 1).to_bytes(128, "big")), "e": "AQAB"}, ["too small"]),
        ({"algorithm": "RS", "n": str(2**2047 + 1), "e": "4"}, ["exponent"]),
    ],
)
def test_bad_certified_public_key(env, key, words):
    a = backed(cert_claims(**{"public-key": key}), assertion_claims())
    refused(env.verifier(), a, errors.ASSERTION_MALFORMED, "public-key", *words)


# --- support documents -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document, code, words",
    [
        (b"not found", 404, ["no BrowserID support document"]),
        (b"gone", 410, ["no BrowserID support document"]),
        (b"moved", 302, ["no BrowserID support document"]),
        (b"<html>hello</html>", 200, ["not JSON"]),
        (b"\xff\xfe", 200, ["not JSON"]),
        ([1, 2], 200, ["not a JSON object"]),
        ({"authentication": "/a", "provisioning": "/p"}, 200, ["neither 'public-key' nor 'authority'"]),
        ({"public-key": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}, 200, ["bad public-key", "too small"]),
        ({"public-key": "nope"}, 200, ["bad public-key"]),
        ({"public-key": {"kty": "RSA"}, "authentication": 3}, 200, ["'authentication'"]),
        ({"disabled": True}, 200, ["disabled"]),
        ({"authority": "not a domain!"}, 200, ["bad authority"]),
        (b"boom", 500, ["could not fetch"]),
    ],
)
def test_support_document_unusable(env, document, code, words):
    env.web.serve("example.com", document, code=code)
    error = refused(env.verifier(), env.assertion(), errors.ASSERTION_UNAVAILABLE, "example.com", *words)
    if code != 200:
        assert str(code) not in error.message  # the status goes to the log, not to the client


def test_support_document_too_big(env):
    doc = env.issuer.support_document()
    doc["padding"] = "x" * (64 * 1024)
    env.web.serve("example.com", doc)
    refused(env.verifier(), env.assertion(), errors.ASSERTION_UNAVAILABLE, "larger than 65536 bytes")


def test_support_document_too_big_without_content_length(env):
    env.web.hang("example.com")
    d = ensureDeferred(env.verifier().verify(env.assertion()))
    (request,) = env.web.pending
    for _ in range(20):
        request.write(b"x" * 4096)
        env.http.flush()
    with pytest.raises(IdentityError) as info:
        result(d)
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE
    assert "larger than" in info.value.message


def test_custom_size_limit(env):
    support = env.support(max_size=100)
    refused(env.verifier(support=support), env.assertion(), errors.ASSERTION_UNAVAILABLE, "larger than 100 bytes")


def test_support_document_timeout(env):
    env.web.hang("example.com")
    d = ensureDeferred(env.verifier().verify(env.assertion()))
    env.clock.advance(9)
    assert not d.called
    env.clock.advance(1)
    with pytest.raises(IdentityError) as info:
        result(d)
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE
    assert "could not fetch https://example.com/.well-known/browserid" in info.value.message
    assert "10s" not in info.value.message and "timed out" not in info.value.message


def test_slow_body_times_out_too(env):
    env.web.hang("example.com")
    d = ensureDeferred(env.verifier().verify(env.assertion()))
    (request,) = env.web.pending
    request.write(b'{"public-key": ')
    env.http.flush()
    env.clock.advance(10)
    with pytest.raises(IdentityError) as info:
        result(d)
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE


def test_unreachable_host():
    class Refusing:
        def get(self, url, **kw):
            from twisted.internet.defer import fail
            from twisted.internet.error import ConnectionRefusedError

            return fail(ConnectionRefusedError("nobody home"))

    support = SupportDocuments(TreqFetcher(Refusing()), Clock(), 3600, False, 10)
    with pytest.raises(IdentityError) as info:
        result(support.document("example.com"))
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE
    assert info.value.message == "example.com: could not fetch https://example.com/.well-known/browserid"
    assert "nobody home" in info.value.detail  # for the log only


def test_redirects_are_not_followed(env):
    env.web.serve("example.com", b"", code=301, headers={"location": "https://elsewhere.example/.well-known/browserid"})
    env.web.serve("elsewhere.example", env.issuer.support_document())
    refused(env.verifier(), env.assertion(), errors.ASSERTION_UNAVAILABLE, "no BrowserID support document")
    assert env.web.fetches("elsewhere.example") == 0


# --- caching -----------------------------------------------------------------------------------


def test_documents_are_cached_for_ttl(env):
    v = env.verifier()
    verify(v, env.assertion())
    verify(v, env.assertion(email="bob@example.com"))
    assert env.web.fetches("example.com") == 1
    env.clock.advance(3599)
    verify(v, env.assertion())
    assert env.web.fetches("example.com") == 1
    env.clock.advance(2)
    verify(v, env.assertion())
    assert env.web.fetches("example.com") == 2


def test_a_new_key_is_seen_after_ttl(env):
    v = env.verifier()
    verify(v, env.assertion())
    rotated = Issuer("example.com", other_key())
    env.web.serve("example.com", rotated.support_document())
    refused(v, env.assertion(issuer=rotated), errors.ASSERTION_SIGNATURE)
    env.clock.advance(3601)
    assert verify(v, env.assertion(issuer=rotated)).email == "alice@example.com"


def test_failures_are_cached_briefly(env):
    env.web.serve("example.com", b"nope", code=404)
    v = env.verifier(support=env.support(failure_ttl=60))
    refused(v, env.assertion(), errors.ASSERTION_UNAVAILABLE)
    refused(v, env.assertion(), errors.ASSERTION_UNAVAILABLE)
    assert env.web.fetches("example.com") == 1
    env.web.serve("example.com", env.issuer.support_document())
    env.clock.advance(61)
    assert verify(v, env.assertion()).email == "alice@example.com"
    assert env.web.fetches("example.com") == 2


def test_cache_is_bounded(env):
    for name in ("a", "b", "c"):
        env.web.serve(f"{name}.example", env.issuer.support_document())
    support = env.support(max_entries=2)
    for name in ("a", "b", "c"):
        result(support.document(f"{name}.example"))
    result(support.document("c.example"))
    assert env.web.fetches("c.example") == 1
    result(support.document("a.example"))  # the oldest was forgotten
    assert env.web.fetches("a.example") == 2


def test_concurrent_lookups_share_one_fetch(env):
    env.web.hang("example.com")
    v = env.verifier()
    first = ensureDeferred(v.verify(env.assertion()))
    second = ensureDeferred(v.verify(env.assertion(email="bob@example.com")))
    direct = v.support.document("example.com")
    assert len(env.web.pending) == 1 and not first.called
    request = env.web.pending[0]
    request.write(json.dumps(env.issuer.support_document()).encode())
    request.finish()
    env.http.flush()
    assert result(first).email == "alice@example.com"
    assert result(second).email == "bob@example.com"
    assert result(direct).public_key is not None
    assert env.web.fetches("example.com") == 1


def test_cancelling_one_lookup_does_not_cancel_the_others(env):
    env.web.hang("example.com")
    support = env.support()
    first = support.document("example.com")
    second = support.document("example.com")
    first.cancel()
    first.addErrback(lambda f: None)
    request = env.web.pending[0]
    request.write(json.dumps(env.issuer.support_document()).encode())
    request.finish()
    env.http.flush()
    assert result(second).domain == "example.com"


# --- transport security ------------------------------------------------------------------------


def test_https_only_unless_insecure(env):
    verify(env.verifier(), env.assertion())
    assert env.web.requests == [("https", "example.com", "/.well-known/browserid")]


@pytest.mark.parametrize(
    "domain, insecure, url",
    [
        ("example.com", False, "https://example.com/.well-known/browserid"),
        ("example.com", True, "https://example.com/.well-known/browserid"),
        ("127.0.0.1:8443", True, "http://127.0.0.1:8443/.well-known/browserid"),
        ("localhost", True, "http://localhost/.well-known/browserid"),
        ("idp.test:8080", True, "http://idp.test:8080/.well-known/browserid"),
        ("[::1]:8080", True, "http://[::1]:8080/.well-known/browserid"),
    ],
)
def test_support_urls(domain, insecure, url):
    assert support_url(domain, insecure) == url


@pytest.mark.parametrize(
    "domain, secure_ok, insecure_ok",
    [
        ("example.com", True, True),
        ("Login.Example.NET", True, True),
        ("127.0.0.1", False, True),
        ("127.0.0.1:8443", False, True),
        ("example.com:443", False, True),
        ("[::1]:8443", False, True),
        ("::1", False, False),  # ambiguous: IPv6 literals need brackets
        ("localhost", False, True),
        ("idp.localhost", False, True),
        ("intranet", False, True),
        ("10.1", False, True),
        ("example.com:0", False, False),
        ("example.com:99999", False, False),
        ("exa mple.com", False, False),
        ("-example.com", False, False),
        ("example.com/path", False, False),
        ("user@example.com", False, False),
        ("", False, False),
    ],
)
def test_check_domain(domain, secure_ok, insecure_ok):
    for insecure, ok in ((False, secure_ok), (True, insecure_ok)):
        if ok:
            assert check_domain(domain, insecure) == domain.lower()
        else:
            with pytest.raises(ValueError):
                check_domain(domain, insecure)


def test_ip_issuers_need_insecure(env):
    ip_issuer = Issuer("127.0.0.1", issuer_key())
    env.web.serve("127.0.0.1", ip_issuer.support_document())
    a = env.assertion(email="alice@127.0.0.1", issuer=ip_issuer)
    refused(env.verifier(), a, errors.ASSERTION_ISSUER, "IP address")
    assert env.web.requests == []
    assert verify(env.verifier(insecure=True), a).issuer == "127.0.0.1"
    assert env.web.requests == [("http", "127.0.0.1", "/.well-known/browserid")]


def test_port_issuers_need_insecure(env):
    local = Issuer("127.0.0.1:8443", issuer_key())
    env.web.serve("127.0.0.1:8443", local.support_document())
    with pytest.raises(ValueError):
        env.verifier(trusted=["127.0.0.1:8443"])
    refused(env.verifier(), env.assertion(issuer=local), errors.ASSERTION_ISSUER, "issues its own")
    assert env.web.fetches("127.0.0.1:8443") == 0
    env.web.requests.clear()
    v = env.verifier(trusted=["127.0.0.1:8443"], insecure=True)
    assert verify(v, env.assertion(issuer=local)).issuer == "127.0.0.1:8443"
    assert env.web.requests == [("http", "127.0.0.1:8443", "/.well-known/browserid")]


def test_secure_support_refuses_local_domains_directly(env):
    with pytest.raises(IdentityError) as info:
        result(env.support().document("127.0.0.1:8443"))
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE
    assert env.web.requests == []


# --- local issuers -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_local_issuer_needs_no_fetch(env, as_json):
    node = Issuer("presence.example", other_key())
    key = jws.public_key_to_json(node.public_key, "browserid") if as_json else node.public_key
    v = env.verifier(trusted=["presence.example"], local_issuers={"Presence.Example": key})
    identity = verify(v, env.assertion(email="bob@mail.example", issuer=node))
    assert identity == Identity("bob@mail.example", "presence.example", NOW + 3600)
    assert env.web.requests == []


def test_local_issuer_key_is_checked(env):
    impostor = Issuer("presence.example", issuer_key())
    v = env.verifier(trusted=["presence.example"], local_issuers={"presence.example": other_key().public_key()})
    refused(v, env.assertion(email="bob@mail.example", issuer=impostor), errors.ASSERTION_SIGNATURE, "certificate")


def test_local_issuer_is_a_key_not_a_trust_grant(env):
    node = Issuer("presence.example", other_key())
    v = env.verifier(local_issuers={"presence.example": node.public_key})
    refused(v, env.assertion(email="bob@mail.example", issuer=node), errors.ASSERTION_ISSUER)
    assert verify(v, env.assertion(email="bob@presence.example", issuer=node)).email == "bob@presence.example"


def test_local_issuer_may_be_a_loopback_name(env):
    node = Issuer("localhost:8080", other_key())
    v = env.verifier(local_issuers={"localhost:8080": node.public_key}, insecure=True, trusted=["localhost:8080"])
    assert verify(v, env.assertion(issuer=node)).issuer == "localhost:8080"


# --- configuration, jws ------------------------------------------------------------------------


def test_from_config(env):
    config = Config(public_url="http://presence.example:8080", audiences=["https://app.example"],
                    trusted_issuers=["login.example.net"], support_cache_ttl=10.0)
    fallback = Issuer("login.example.net", other_key())
    env.web.serve("login.example.net", fallback.support_document())
    v = Verifier.from_config(config, http_client=TreqFetcher(env.http), clock=env.clock)
    assert v.support.ttl == 10.0 and not v.insecure
    assert verify(v, env.assertion(email="x@y.example", issuer=fallback, audience="https://app.example:443")).email
    assert verify(v, env.assertion(issuer=fallback, audience="http://presence.example:8080")).email
    refused(v, env.assertion(issuer=fallback), errors.ASSERTION_AUDIENCE)


def test_jws_round_trip_and_keys():
    t = jws.sign({"hello": "world"}, user_key())
    parsed = jws.parse(t, "token")
    assert parsed.header == {"alg": "RS256"} and parsed.payload == {"hello": "world"}
    jws.verify(parsed, user_key().public_key(), "token", "the user key")
    with pytest.raises(IdentityError):
        jws.verify(parsed, other_key().public_key(), "token", "another key")
    public = user_key().public_key()
    for fmt in ("jwk", "browserid"):
        back = jws.public_key_from_json(jws.public_key_to_json(public, fmt))
        assert back.public_numbers() == public.public_numbers()
    assert jws.public_key_to_json(public)["e"] == "AQAB"
    with pytest.raises(ValueError):
        jws.public_key_to_json(public, "pem")


@pytest.mark.parametrize("text", ["a+b", "a/b", "a b", "abcde", "é"])
def test_b64url_decode_rejects(text):
    with pytest.raises(ValueError):
        jws.b64url_decode(text)


def test_b64url_decode_accepts_padding():
    assert jws.b64url_decode("YQ") == jws.b64url_decode("YQ==") == b"a"


# --- end to end over loopback ------------------------------------------------------------------


def _loopback_verifier(idp: LoopbackIdP, **kw: Any) -> Verifier:
    support = SupportDocuments(Fetcher(reactor, allow_private=True), reactor, ttl=3600, insecure=True, timeout=5)
    return Verifier([AUD], [idp.domain], support, reactor, insecure=True, **kw)


@pytest_twisted.ensureDeferred
async def test_end_to_end_over_loopback(idp):
    v = _loopback_verifier(idp)
    identity = await v.verify(idp.assertion("alice@example.com", AUD))
    assert identity.email == "alice@example.com"
    assert identity.issuer == idp.domain
    identity = await v.verify(idp.assertion("bob@example.org", AUD, key_format="browserid"))
    assert identity.email == "bob@example.org"
    assert idp.support.fetches == 1


@pytest_twisted.ensureDeferred
async def test_end_to_end_refusals(idp):
    v = _loopback_verifier(idp)
    with pytest.raises(IdentityError) as info:
        await v.verify(idp.assertion("alice@example.com", "http://elsewhere.example"))
    assert info.value.errno == errors.ASSERTION_AUDIENCE
    idp.support.code = 404
    with pytest.raises(IdentityError) as info:
        await v.verify(idp.assertion("alice@example.com", AUD))
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE
    assert "no BrowserID support document" in info.value.message and "404" not in info.value.message


@pytest_twisted.ensureDeferred
async def test_end_to_end_issuer_down():
    server = LoopbackIdP.listen()
    assertion = server.assertion("alice@example.com", AUD)
    v = _loopback_verifier(server)
    await server.stop()
    with pytest.raises(IdentityError) as info:
        await v.verify(assertion)
    assert info.value.errno == errors.ASSERTION_UNAVAILABLE
    assert "could not fetch" in info.value.message


# --- the certificate cache -----------------------------------------------------------------------


def test_a_certificate_presented_again_costs_one_rsa_check_not_two(env, monkeypatch):
    checked = []
    real = jws.verify
    monkeypatch.setattr(jws, "verify", lambda token, key, what, whose: (checked.append(what), real(token, key, what, whose)))
    verifier = env.verifier()
    cert = env.issuer.certify("alice@example.com", user_key().public_key(), NOW)
    for _ in range(3):
        assert verify(verifier, make_assertion(cert, user_key(), AUD, NOW)).email == "alice@example.com"
    assert checked == ["assertion", "certificate", "assertion", "assertion"]
    # the assertion half is always checked: a cached certificate does not excuse a bad signature on it
    refused(verifier, make_assertion(cert, other_key(), AUD, NOW), errors.ASSERTION_SIGNATURE, "assertion")


def test_a_forged_certificate_is_not_excused_by_a_cached_genuine_one(env):
    verifier = env.verifier()
    cert, asr = env.assertion().split("~")
    verify(verifier, f"{cert}~{asr}")
    forged = _swap_payload(cert, cert_claims(principal={"email": "boss@example.com"}))
    refused(verifier, f"{forged}~{asr}", errors.ASSERTION_SIGNATURE, "certificate")


def test_the_certificate_cache_is_bounded(env):
    verifier = env.verifier()
    verifier.max_verified_certs = 3
    for i in range(5):
        verify(verifier, env.assertion(email=f"u{i}@example.com"))
    assert len(verifier._verified_certs) == 3


def test_a_cached_failure_does_not_grow_with_every_caller():
    """A failed lookup is cached for a while; every caller gets its own copy of the error, so its
    traceback (and the callers' frames it keeps alive) does not grow with each lookup."""
    import traceback

    class Refusing:
        def get(self, url, **kw):
            from twisted.internet.defer import fail
            from twisted.internet.error import ConnectionRefusedError

            return fail(ConnectionRefusedError("nobody home"))

    support = SupportDocuments(TreqFetcher(Refusing()), Clock(), 3600, False, 10)
    depths = []
    for _ in range(200):
        d = support.document("example.com")
        failures = []
        d.addErrback(failures.append)
        try:
            failures[0].raiseException()
        except IdentityError as e:
            depths.append(len(traceback.extract_tb(e.__traceback__)))
    assert max(depths) <= depths[0] + 2        # not one frame more per lookup
