"""A BrowserID identity provider with real keys, served on 127.0.0.1 by the real reactor.

Use the `idp` fixture (expose it with `pytest_plugins = ["tests.idp"]` in tests/conftest.py):

    @pytest_twisted.ensureDeferred
    async def test_login(idp):
        assertion = idp.assertion("alice@example.com", "http://localhost:8080")
        # the verifier must run with insecure identity and trust idp.domain ("127.0.0.1:PORT")

Its domain carries a port, which is not a valid email domain, so verifiers must list it in
trusted_issuers (it then certifies any address) and run with insecure identity (plain http,
loopback issuer).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from presence.identity import Issuer, make_assertion, new_user_key
from presence.identity.support import WELL_KNOWN

_keys: dict[str, rsa.RSAPrivateKey] = {}


def shared_key(name: str) -> rsa.RSAPrivateKey:
    """A 2048-bit key made once per test run: generating one costs ~0.1 s."""
    if name not in _keys:
        _keys[name] = new_user_key()
    return _keys[name]


class SupportResource(Resource):
    """Serves one support document; `document`/`code` can be changed by tests, `fetches` counts."""

    isLeaf = True

    def __init__(self, document: dict[str, Any]):
        super().__init__()
        self.document: dict[str, Any] | bytes = document
        self.code = 200
        self.fetches = 0

    def render_GET(self, request: Request) -> bytes:
        self.fetches += 1
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        if isinstance(self.document, bytes):
            return self.document
        return json.dumps(self.document).encode()


def browserid_root(support: Resource) -> Resource:
    """A resource tree with `support` at /.well-known/browserid."""
    root = Resource()
    well_known = Resource()
    root.putChild(b".well-known", well_known)
    well_known.putChild(WELL_KNOWN.rsplit("/", 1)[1].encode(), support)
    return root


class LoopbackIdP:
    """An identity provider at `domain` ("127.0.0.1:PORT") that certifies any address."""

    def __init__(self, issuer: Issuer, support: SupportResource, port: IListeningPort, factory: WrappingFactory):
        self.issuer = issuer
        self.domain = issuer.domain
        self.support = support
        self.user_key = shared_key("idp-user")
        self._port = port
        self._factory = factory

    @classmethod
    def listen(cls, reactor: Any = None, key_format: str = "jwk") -> LoopbackIdP:
        """Listen on 127.0.0.1 on a free port."""
        if reactor is None:
            from twisted.internet import reactor
        support = SupportResource({})
        # WrappingFactory keeps track of open connections, so that stop() can close them.
        factory = WrappingFactory(Site(browserid_root(support)))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        issuer = Issuer(f"127.0.0.1:{port.getHost().port}", shared_key("idp-issuer"), key_format)
        support.document = issuer.support_document()
        return cls(issuer, support, port, factory)

    def certificate(
        self,
        email: str,
        *,
        now: float | None = None,
        cert_lifetime: float = 3600.0,
        user_key: rsa.RSAPrivateKey | None = None,
        key_format: str | None = None,
    ) -> str:
        """A certificate for `email` binding `user_key` (default: a shared one)."""
        key = user_key or self.user_key
        now = time.time() if now is None else now
        return self.issuer.certify(email, key.public_key(), now, cert_lifetime, key_format)

    def assertion(
        self,
        email: str,
        audience: str,
        *,
        now: float | None = None,
        lifetime: float = 120.0,
        cert_lifetime: float = 3600.0,
        user_key: rsa.RSAPrivateKey | None = None,
        key_format: str | None = None,
    ) -> str:
        """A complete backed assertion of `email` for `audience` (an origin like http://host:port)."""
        key = user_key or self.user_key
        now = time.time() if now is None else now
        cert = self.certificate(email, now=now, cert_lifetime=cert_lifetime, user_key=key, key_format=key_format)
        return make_assertion(cert, key, audience, now, lifetime)

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        for protocol in list(self._factory.protocols):
            protocol.transport.abortConnection()
        await self._port.stopListening()


@pytest_twisted.async_yield_fixture
async def idp():
    """A LoopbackIdP on 127.0.0.1:<free port>, stopped after the test."""
    server = LoopbackIdP.listen()
    try:
        yield server
    finally:
        await server.stop()
