"""Presence as a fallback BrowserID identity provider, and signing in to the pages.

Mozilla's Persona closed in 2016; this supplies what it did. Presence publishes its public key at
``/.well-known/browserid``, proves that a person owns an address with a one-time link (mailed, or
written to the node's log without a mail server), then certifies the key the person's browser made
with WebCrypto. The browser signs an assertion for the site's audience with that key and the server
checks it with the same Verifier as the devices' websocket, which knows Presence's key and trusts it
for any address; assertions of every other trusted issuer are accepted too.

The link carries its token in the fragment (``/login/link#<token>``), which browsers never send in a
request line, so it appears in no access log; the store keeps only its hash, and taking it is a
single DELETE, so it works once on any node.
"""

from __future__ import annotations

import os
import secrets
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from presence.identity import Issuer, IdentityError, new_user_key
from presence.identity import jws
from presence.identity.issuer import CERT_LIFETIME
from presence.identity.verifier import _EMAIL
from presence.keys import hash_key
from presence.ratelimit import KeyedLimit
from presence.secrets_at_rest import SecretBox, shared_secret
from presence.web.common import Problem, local_path, read_json, send_json

log = Logger()

LINKS_PER_WINDOW = 5  # one-time links per address per link lifetime: no mail bombing
# The BrowserID specification's key form ({"algorithm": "RS", "n"/"e" decimal}), which every other
# implementation (PyBrowserID, Persona's verifier) reads; Presence itself reads JWK keys as well.
KEY_FORMAT = "browserid"
AUTHENTICATION_PAGE = "/browserid/sign_in"
PROVISIONING_PAGE = "/browserid/provision"


def issuer_domain(public_url: str) -> str:
    """The issuer name Presence signs as: the public URL's host, with its port if not the default."""
    parts = urlsplit(public_url)
    host = (parts.hostname or "localhost").lower()
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load(pem: bytes, where: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < jws.MIN_RSA_BITS:
        raise ValueError(f"{where}: the identity key must be an RSA key of at least {jws.MIN_RSA_BITS} bits")
    return key


async def load_issuer(config: Any, store: Any, reactor: Any, now: float, box: SecretBox | None = None) -> Issuer:
    """Presence's own issuer: its key from --identity-key-file (made there if missing) or, shared by
    every node, from the database (made once, stored encrypted with ``box``: presence.secrets_at_rest)."""
    path = config.identity_key_file
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            key = _load(f.read(), path)
    else:
        key = await deferToThreadPool(reactor, reactor.getThreadPool(), new_user_key)
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_pem(key))
            log.info("made a new identity key in {path}", path=path, event="idp.key_created")
        else:
            box = box or SecretBox.from_config(config, store)
            made = _pem(key).decode("ascii")
            pem = await shared_secret(store, box, "identity_key", lambda: made, now)
            key = _load(pem.encode("ascii"), "the database's identity key")
    return Issuer(issuer_domain(config.public_url), key, KEY_FORMAT)


async def load_secret(config: Any, store: Any, now: float, box: SecretBox | None = None) -> bytes:
    """The secret that signs cookies: from --session-secret-file (made there if missing) or the
    database (stored encrypted with ``box``: presence.secrets_at_rest)."""
    path = config.session_secret_file
    if not path:
        box = box or SecretBox.from_config(config, store)
        return (await shared_secret(store, box, "session_secret", lambda: secrets.token_hex(32), now)).encode("ascii")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 32:
        raise ValueError(f"{path}: the session secret must have at least 32 characters")
    return secret


def valid_email(value: str) -> str | None:
    """The address lower-cased, or None: the same rule the assertion verifier applies."""
    value = value.strip()
    m = _EMAIL.match(value)
    if m is None or len(value) > 254 or len(m["local"]) > 64:
        return None
    return value.lower()


class IdentityProvider:
    """The JSON endpoints of signing in; ``site`` is the WebSite (store, clock, sessions, ...)."""

    def __init__(self, site: Any, issuer: Issuer, mailer: Any, link_lifetime: float, per_client: int = 10,
                 total: int = 300, client_header: str = ""):
        self.site = site
        self.issuer = issuer
        self.mailer = mailer
        self.link_lifetime = link_lifetime
        self.per_client = KeyedLimit(per_client, link_lifetime, site.clock)
        self.total = KeyedLimit(total, link_lifetime, site.clock)
        self.client_header = client_header.encode("latin-1").lower()

    def client(self, request: Any) -> str:
        """The client's address: the last value of --client-address-header (what the balancer in front
        added), else the connection's peer."""
        if self.client_header:
            value = request.getHeader(self.client_header)
            if value:
                return value.decode("latin-1").rsplit(",", 1)[-1].strip()[:100]
        peer = request.getClientAddress()
        return str(getattr(peer, "host", peer))

    def support_document(self, request: Any) -> bytes:
        document = {"public-key": jws.public_key_to_json(self.issuer.public_key, KEY_FORMAT),
                    "authentication": AUTHENTICATION_PAGE, "provisioning": PROVISIONING_PAGE}
        body = send_json(request, 200, document)
        request.setHeader(b"cache-control", b"public, max-age=300")
        return body

    def _csrf(self, request: Any) -> None:
        if not self.site.sessions.csrf_ok(request):
            raise Problem(403, "This page is out of date (its security token does not match); reload it and try again.")

    async def start(self, request: Any) -> bytes:
        """Make a one-time link for an address and send it."""
        self._csrf(request)
        body = read_json(request)
        email = valid_email(str(body.get("email", ""))[:300])
        if email is None:
            raise Problem(400, "Give a valid email address, like alice@example.com.")
        next_path = local_path(str(body.get("next", "/")))
        store, now = self.site.store, self.site.clock.seconds()
        minutes = round(self.link_lifetime / 60)
        client = self.client(request)
        wait = self.per_client.take(client)
        if wait:
            log.info("too many sign-in links asked for from {client}", client=client, event="login.limited_client")
            raise Problem(429, f"This address asked for {self.per_client.limit} sign-in links in the last {minutes}"
                               " minutes; use one of them, or wait a little.", retry_after=wait)
        wait = self.total.take()
        if wait:
            log.warn("this node sent {n} sign-in links in {minutes} minutes: sending no more for now",
                     n=self.total.limit, minutes=minutes, event="login.limited_total")
            raise Problem(429, "Too many sign-in links are being sent right now; try again in a few minutes.",
                          retry_after=wait)
        if await store.count_login_tokens(email, now - self.link_lifetime) >= LINKS_PER_WINDOW:
            raise Problem(429, f"{LINKS_PER_WINDOW} links were already sent to {email} in the last {minutes}"
                               " minutes; use one of them, or wait a little.", retry_after=self.link_lifetime)
        token = secrets.token_urlsafe(32)
        await store.add_login_token(hash_key(token), email, next_path, now, now + self.link_lifetime)
        link = self.site.public_url + "/login/link#" + token
        try:
            via = await self.mailer.send_login_link(email, link)
        except Exception:
            raise Problem(503, "The sign-in mail could not be sent; try again in a moment.") from None
        return send_json(request, 200, {"email": email, "via": via,
                                        "minutes": round(self.link_lifetime / 60)})

    async def certify(self, request: Any) -> bytes:
        """Exchange a one-time link's token and the browser's public key for a certificate."""
        self._csrf(request)
        body = read_json(request)
        token, public_key = body.get("token"), body.get("publicKey")
        if not isinstance(token, str) or not token or len(token) > 200:
            raise Problem(400, "This sign-in link is incomplete; open the link from the mail (or the log) again.")
        try:
            key = jws.public_key_from_json(public_key)
        except ValueError as e:
            raise Problem(400, f"The browser's key cannot be used ({e}).") from None
        now = self.site.clock.seconds()
        link = await self.site.store.take_login_token(hash_key(token), now)
        if link is None:
            raise Problem(400, "This sign-in link was already used or has expired; ask for a new one.")
        certificate = self.issuer.certify(link.email, jws.public_key_to_json(key, KEY_FORMAT), now, CERT_LIFETIME)
        log.info("certified a browser key for {email}", email=link.email, event="idp.certified")
        return send_json(request, 200, {"email": link.email, "certificate": certificate, "next": link.next_path,
                                        "expires": int((now + CERT_LIFETIME) * 1000)})

    async def certify_signed_in(self, request: Any) -> bytes:
        """The provisioning page's step: certify the key a BrowserID client made (navigator.id.genKeyPair)
        for the address signed in to the pages, and only that one; the client asked for ``email``."""
        self._csrf(request)
        body = read_json(request)
        signed_in = await self.site.sessions.user(request)
        email = valid_email(str(body.get("email", ""))[:300])
        if signed_in is None or email != signed_in:
            raise Problem(403, "user is not authenticated as target user")
        try:
            key = jws.public_key_from_json(body.get("publicKey"))
        except ValueError as e:
            raise Problem(400, f"The key cannot be used ({e}).") from None
        duration = body.get("duration")
        lifetime = CERT_LIFETIME
        if isinstance(duration, (int, float)) and not isinstance(duration, bool) and 60 <= duration:
            lifetime = min(float(duration), CERT_LIFETIME)   # cert_duration asked for, at most a day
        now = self.site.clock.seconds()
        certificate = self.issuer.certify(email, jws.public_key_to_json(key, KEY_FORMAT), now, lifetime)
        log.info("certified a key for {email} (provisioning)", email=email, event="idp.certified")
        return send_json(request, 200, {"email": email, "certificate": certificate})

    async def login(self, request: Any) -> bytes:
        """Sign in with a backed assertion for this site (from Presence or any other trusted issuer)."""
        self._csrf(request)
        body = read_json(request)
        assertion = body.get("assertion")
        try:
            identity = await self.site.verifier().verify(assertion)
        except IdentityError as e:
            raise Problem(400, f"Signing in failed: {e.message}.") from None
        if identity.pairing:
            # A paired device's certificate proves an address only to report its status: one a
            # person was tricked into approving (RFC 8628's remote phishing) must not open their pages.
            raise Problem(400, "Signing in failed: a paired device's certificate cannot sign in to the pages.")
        await self.site.sessions.login(request, identity.email)
        log.info("{email} signed in to the pages", email=identity.email, event="web.login")
        return send_json(request, 200, {"email": identity.email, "next": local_path(str(body.get("next", "/")))})
