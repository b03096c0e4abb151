"""Helpers of the web page tests: a node's pages on a loopback port, with a Clock for time and a
mailer that records links, and a cookie-keeping HTTP client that signs in like a browser would
(one-time link, certified key, assertion), only with a key made in Python."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from http.cookiejar import CookieJar
from typing import Any
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import Site

from presence.config import Config
from presence.identity import jws, make_assertion
from presence.node import Node, make_verifier
from presence.store import open_store
from presence.web.site import WebSite
from tests.idp import shared_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingMailer:
    """Keeps the links instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = False

    async def send_login_link(self, email: str, link: str) -> str:
        if self.fail:
            raise ConnectionRefusedError("no mail server")
        self.sent.append((email, link))
        return "log"

    def token(self, email: str | None = None) -> str:
        links = [link for to, link in self.sent if email is None or to == email.lower()]
        return urlsplit(links[-1]).fragment


class Page:
    def __init__(self, response: Any, text: str):
        self.response = response
        self.code = response.code
        self.text = text

    def header(self, name: str) -> str | None:
        values = self.response.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def location(self) -> str | None:
        return self.header("location")

    def json(self) -> Any:
        return json.loads(self.text)

    def csrf(self) -> str:
        return re.search(r'<meta name="csrf-token" content="([^"]*)"', self.text).group(1)


class Browser:
    """One person's HTTP client: keeps cookies and the last CSRF token; follows no redirect."""

    def __init__(self, web: WebNode):
        self.web = web
        self.cookies = CookieJar()
        self.http = HTTPClient(Agent(reactor), cookiejar=self.cookies)
        self.csrf = ""
        self.key = shared_key("browser-user")

    def url(self, path: str) -> str:
        return self.web.public_url + path

    async def _page(self, response: Any) -> Page:
        page = Page(response, (await treq.content(response)).decode("utf-8"))
        if '<meta name="csrf-token"' in page.text:
            self.csrf = page.csrf()
        return page

    async def get(self, path: str) -> Page:
        return await self._page(await self.http.get(self.url(path), allow_redirects=False))

    async def post(self, path: str, data: dict[str, str] | None = None, csrf: bool = True) -> Page:
        fields = dict(data or {})
        if csrf:
            fields.setdefault("csrf", self.csrf)
        return await self._page(await self.http.post(self.url(path), data=fields, allow_redirects=False))

    async def post_json(self, path: str, body: dict[str, Any], csrf: bool = True,
                        extra: dict[str, list[str]] | None = None) -> Page:
        headers = {"content-type": ["application/json"], **(extra or {})}
        if csrf:
            headers["x-csrf-token"] = [self.csrf]
        response = await self.http.post(self.url(path), data=json.dumps(body).encode(), headers=headers,
                                        allow_redirects=False)
        return await self._page(response)

    def cookie(self, name: str) -> Any:
        return next((c for c in self.cookies if c.name == name), None)

    async def certificate(self, email: str, next_path: str = "/") -> dict[str, Any]:
        """Ask for a link and trade its token and this browser's key for a certificate."""
        if not self.csrf:
            await self.get("/login")
        start = await self.post_json("/login/start", {"email": email, "next": next_path})
        assert start.code == 200, start.text
        token = self.web.mailer.token(email)
        certify = await self.post_json("/login/certify", {
            "token": token, "publicKey": jws.public_key_to_json(self.key.public_key(), "jwk")})
        assert certify.code == 200, certify.text
        return certify.json()

    async def login(self, email: str, next_path: str = "/") -> Page:
        certified = await self.certificate(email, next_path)
        assertion = make_assertion(certified["certificate"], self.key, self.web.public_url, self.web.clock.seconds())
        page = await self.post_json("/login/assertion", {"assertion": assertion, "next": next_path})
        assert page.code == 200, page.text
        await self.get("/")  # a fresh CSRF token for the signed-in session
        return page


# One secrets key for every node of a test run (never the working directory's presence-secrets.key).
TEST_SECRETS_KEY = os.path.join(tempfile.mkdtemp(prefix="presence-test-"), "secrets.key")


class WebNode:
    """A node's pages on 127.0.0.1 (the node is built, not started: no websockets, no cluster)."""

    def __init__(self, node: Node, site: WebSite, clock: Clock, mailer: RecordingMailer, port: Any):
        self.node = node
        self.site = site
        self.clock = clock
        self.mailer = mailer
        self.port = port
        self.store = node.store
        self.public_url = node.config.public_url

    @classmethod
    async def start(cls, database: str, http: Any = None, **overrides: Any) -> WebNode:
        port = free_port()
        values = dict(web=f"tcp:{port}:interface=127.0.0.1", ws="tcp:0:interface=127.0.0.1",
                      public_url=f"http://127.0.0.1:{port}", public_ws_url="ws://127.0.0.1:9",
                      database=database, node="web-test", insecure_identity=True, verify_allow_private=True,
                      verify_timeout=5.0, secrets_key_file=TEST_SECRETS_KEY)
        values.update(overrides)
        config = Config(**values)
        store = open_store(database)
        await store.open()
        clock = Clock()
        clock.advance(time.time())
        node = Node(config, store=store)
        await node.cluster.join()   # registered, as a started node is: its writes are fenced by it
        mailer = RecordingMailer()
        site = await WebSite.open(node, clock=clock, mailer=mailer, http=http)
        node.verifier = make_verifier(config, clock, issuer=site.issuer)
        node.web = site
        listening = reactor.listenTCP(port, Site(site.resource()), interface="127.0.0.1")
        return cls(node, site, clock, mailer, listening)

    def browser(self) -> Browser:
        return Browser(self)

    async def signed_in(self, email: str) -> Browser:
        browser = self.browser()
        await browser.login(email)
        return browser

    async def stop(self) -> None:
        self.site.stop()
        await self.port.stopListening()
        await self.store.close()


class KeyServer:
    """``http://127.0.0.1:<port>/__presence``: what a developer's site serves (changeable by tests)."""

    class _Resource(Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.body = b""
            self.code = 404
            self.content_type = b"text/plain"
            self.fetches = 0

        def render_GET(self, request: Any) -> bytes:
            self.fetches += 1
            request.setResponseCode(self.code)
            request.setHeader(b"content-type", self.content_type)
            return self.body

    def __init__(self) -> None:
        self.resource = self._Resource()
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.domain = f"127.0.0.1:{self.port.getHost().port}"

    def serve(self, key: str, code: int = 200, content_type: bytes = b"text/plain") -> None:
        self.resource.body = key.encode() + b"\n"
        self.resource.code = code
        self.resource.content_type = content_type

    async def stop(self) -> None:
        await self.port.stopListening()
