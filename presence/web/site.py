"""The pages of a node (Klein + Jinja2): routes, and what they share. The work is done by
idp.py (signing in), developer.py (/myapps) and people.py (the door hanger and /me).

| route | what |
| --- | --- |
| GET / | the front page |
| GET /static/* | the pages' stylesheet and scripts (navigator.id included) |
| GET /.well-known/browserid | Presence's identity provider support document |
| GET /login | sign in (navigator.id.request) |
| POST /login/start, /login/certify, /login/assertion | one-time link, certify the browser's key, sign in |
| GET /browserid/sign_in, /browserid/provision | the BrowserID authentication and provisioning pages (for a standard client's navigator.id) |
| POST /browserid/certify | certify a key for the signed-in address (the provisioning page) |
| GET /login/link | the page a one-time link opens (token in the fragment) |
| POST /logout | sign out |
| GET, POST /myapps | list and register applications |
| POST /myapps/<id>/verify, activate, rotate, deactivate | the application's life |
| GET, POST /<appid>/grant | the door hanger |
| GET /me, POST /me/status, POST /me/revoke | the person's page |
| GET /me/notifications, POST /me/dismiss | waiting notifications (JSON, polled by the page), dismissing one |
| POST /pair, /pair/token, /pair/renew | a device without a browser pairs (pairing.py, JSON, RFC 8628's manner; CORS, no cookie) |
| GET, POST /pair/browser | the popup where the person lets a page of another origin pair this browser as a device |
| GET, POST /me/pair, POST /me/unpair | the person approves a device's code; revokes a paired device |
| GET /device | the browser device: this browser reports the person's status and shows their notifications |
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException

from presence import __version__
from presence.mail import mailer_from_config
from presence.store import StoreUnavailable
from presence.verification import VerificationPoller, check_domain, safe_client
from presence.secrets_at_rest import SecretBox
from presence.web.common import Problem, arg, local_path, redirect, render, send_json, with_query
from presence.web.developer import DeveloperPages
from presence.web.device import DevicePage
from presence.web.idp import IdentityProvider, load_issuer, load_secret
from presence.pairing import Pairing, PairingOptions
from presence.web.pairing import PairingPages, cors
from presence.web.people import PeoplePages
from presence.web.session import Sessions
from presence.web.templates import environment

log = Logger()

CLEANUP_INTERVAL = 600.0
FRAMED_CSP = b"default-src 'self'; img-src 'self' data:; frame-ancestors 'self'; base-uri 'none'"


STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}


def static_files() -> dict[str, tuple[bytes, bytes]]:
    """The pages' stylesheet and scripts (package data), by name: read once, served from memory."""
    files = {}
    for entry in (resources.files("presence.web") / "static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix in STATIC_TYPES:
            files[entry.name] = (STATIC_TYPES[suffix], entry.read_bytes())
    return files


class WebSite:
    app = Klein()

    def __init__(self, node: Any, clock: Any = None, secret: bytes = b"", issuer: Any = None, mailer: Any = None,
                 http: Any = None):
        self.node = node
        self.config = config = node.config
        self.clock = clock or node.reactor
        self.store = node.store
        self.apps = node.apps
        self.hub = node.hub
        self.public_url = config.public_url.rstrip("/")
        self.templates = environment()
        self.static_files = static_files()
        self.sessions = Sessions(self.store, self.clock, secret, config.session_lifetime,
                                 secure=self.public_url.startswith("https:"))
        self.issuer = issuer
        self.idp = IdentityProvider(self, issuer, mailer or mailer_from_config(config, node.reactor),
                                    config.login_link_lifetime, config.login_links_per_client,
                                    config.login_links_total, config.client_address_header)
        self.developer = DeveloperPages(self)
        self.people = PeoplePages(self)
        self.device = DevicePage(self)
        self.pairing = PairingPages(self, Pairing(self.store, issuer, self.clock, self.public_url,
                                                  PairingOptions.from_config(config),
                                                  websocket=config.public_ws_url.rstrip("/") + "/presence"))
        self.http = http or safe_client(node.reactor, config.verify_allow_private, connect_timeout=config.verify_timeout,
                                        max_head=config.fetch_max_head, max_header_lines=config.fetch_max_header_lines)
        self.poller = VerificationPoller(self.store, self.apps, self.clock, config.node, self._check,
                                         config.verify_poll)
        self._cleanup = LoopingCall(self._expire)
        self._cleanup.clock = self.clock

    @classmethod
    async def open(cls, node: Any, clock: Any = None, mailer: Any = None, http: Any = None) -> WebSite:
        """Load what every node shares (the cookie secret, the identity key) from the store or files."""
        now = (clock or node.reactor).seconds()
        box = None
        if not (node.config.session_secret_file and node.config.identity_key_file):
            box = SecretBox.from_config(node.config, node.store)   # what the database keeps of them is encrypted
        secret = await load_secret(node.config, node.store, now, box)
        issuer = await load_issuer(node.config, node.store, node.reactor, now, box)
        return cls(node, clock, secret, issuer, mailer, http)

    async def start(self) -> None:
        """Resume this node's verification polls; forget expired sessions and links now and then."""
        resumed = await self.poller.resume()
        if resumed:
            log.info("resumed checking {n} application domains", n=resumed, event="verify.resumed")
        self._cleanup.start(CLEANUP_INTERVAL, now=False)

    def stop(self) -> None:
        self.poller.stop()
        if self._cleanup.running:
            self._cleanup.stop()

    async def _expire_async(self) -> None:
        try:
            await self.store.expire_web(self.clock.seconds())
        except StoreUnavailable as e:
            log.warn("could not forget expired sessions: {why}", why=e, event="web.expire_failed")

    def _expire(self) -> Any:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self._expire_async())

    async def _check(self, app: Any) -> None:
        await check_domain(self.http, self.clock, app.domain, app.verification_key, self.config.verify_timeout)

    def resource(self) -> Any:
        return self.app.resource()

    def verifier(self) -> Any:
        """The node's assertion verifier (the same as the devices')."""
        return self.node.verifier

    def entry_point(self, app_id: str) -> str:
        return self.node.entry_point(app_id)

    # -- shared by the handlers ----------------------------------------------------------------------
    async def page(self, request: Any, template: str, code: int = 200, **context: Any) -> bytes:
        user = await self.sessions.user(request)
        return render(self.templates, request, template, code, user=user, csrf=self.sessions.csrf_token(request),
                      version=__version__, node=self.config.node, **context)

    def to_login(self, request: Any, next_path: str | None = None) -> bytes:
        if next_path is None:
            next_path = request.uri.decode("utf-8", "replace")
        return redirect(request, with_query("/login", next=local_path(next_path)))

    def _guard(self, request: Any) -> None:
        if not self.sessions.csrf_ok(request):
            raise Problem(403, "This form is out of date (its security token does not match): reload the page"
                               " and try again.")

    async def _signed_in(self, request: Any) -> str | None:
        return await self.sessions.user(request)

    # -- errors ------------------------------------------------------------------------------------------
    @app.handle_errors(Problem)
    async def problem(self, request: Any, failure: Any) -> bytes:
        p = failure.value
        if p.retry_after is not None:
            request.setHeader(b"retry-after", str(max(1, math.ceil(p.retry_after))).encode())
        if (request.getHeader(b"content-type") or b"").startswith(b"application/json"):
            return send_json(request, p.code, {"error": p.message})
        return await self.page(request, "problem.html", code=p.code, title=p.title, message=p.message)

    @app.handle_errors(StoreUnavailable)
    async def unavailable(self, request: Any, failure: Any) -> bytes:
        log.warn("a page could not reach the store: {why}", why=failure.value, event="web.store_unavailable")
        message = "This Presence node cannot reach its database right now; nothing was changed. Try again in a moment."
        if (request.getHeader(b"content-type") or b"").startswith(b"application/json"):
            return send_json(request, 503, {"error": message})
        return render(self.templates, request, "problem.html", 503, user=None, csrf=self.sessions.csrf_token(request),
                      version=__version__, node=self.config.node, title="Try again in a moment", message=message)

    @app.handle_errors(Exception)
    async def failed(self, request: Any, failure: Any) -> bytes:
        if failure.check(HTTPException):
            code = failure.value.code
            message = "There is no page here." if code == 404 else "That cannot be done here."
            return await self.page(request, "problem.html", code=code, title="Not found" if code == 404 else "Error",
                                   message=message)
        log.failure("a page failed", failure, event="web.failed")
        return render(self.templates, request, "problem.html", 500, user=None, csrf=self.sessions.csrf_token(request),
                      version=__version__, node=self.config.node, title="Something went wrong",
                      message="Something went wrong on this node; nothing more can be said here. Try again later.")

    # -- the front page and static files ---------------------------------------------------------------------
    @app.route("/", methods=["GET"])
    async def index(self, request: Any) -> bytes:
        return await self.page(request, "index.html",
                               device_url=self.config.public_ws_url.rstrip("/") + "/presence",
                               app_url=self.entry_point("<appid>"))

    @app.route("/static/<string:name>", methods=["GET", "HEAD"])
    def static(self, request: Any, name: str) -> bytes:
        if name not in self.static_files:
            raise Problem(404, "There is no such file.")
        content_type, body = self.static_files[name]
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        # another origin's page may import the browser device module (no cookie is involved)
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cross-origin-resource-policy", b"cross-origin")
        return body

    # -- signing in ------------------------------------------------------------------------------------------------
    @app.route("/.well-known/browserid", methods=["GET"])
    def browserid(self, request: Any) -> bytes:
        return self.idp.support_document(request)

    @app.route("/login", methods=["GET"])
    async def login(self, request: Any) -> bytes:
        next_path = local_path(arg(request, "next", 2048))
        if await self._signed_in(request):
            return redirect(request, next_path)
        return await self.page(request, "login.html", next=next_path)

    @app.route("/browserid/<any(sign_in,provision):which>", methods=["GET"])
    async def browserid_page(self, request: Any, which: str) -> bytes:
        """A standard BrowserID client opens these in its dialog (provisioning in a hidden frame):
        framing by this origin is allowed, by any other not (the session cookie is SameSite too)."""
        template = "authenticate.html" if which == "sign_in" else "provision.html"
        body = await self.page(request, template)
        request.setHeader(b"content-security-policy", FRAMED_CSP)
        request.setHeader(b"x-frame-options", b"SAMEORIGIN")
        return body

    @app.route("/browserid/certify", methods=["POST"])
    async def browserid_certify(self, request: Any) -> bytes:
        return await self.idp.certify_signed_in(request)

    @app.route("/login/link", methods=["GET"])
    async def link(self, request: Any) -> bytes:
        return await self.page(request, "link.html")

    @app.route("/login/start", methods=["POST"])
    async def login_start(self, request: Any) -> bytes:
        return await self.idp.start(request)

    @app.route("/login/certify", methods=["POST"])
    async def login_certify(self, request: Any) -> bytes:
        return await self.idp.certify(request)

    @app.route("/login/assertion", methods=["POST"])
    async def login_assertion(self, request: Any) -> bytes:
        return await self.idp.login(request)

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: Any) -> bytes:
        self._guard(request)
        await self.sessions.logout(request)
        return redirect(request, "/")

    # -- developers -----------------------------------------------------------------------------------------------
    @app.route("/myapps", methods=["GET"])
    async def myapps(self, request: Any) -> bytes:
        developer = await self._signed_in(request)
        if developer is None:
            return self.to_login(request)
        return await self.developer.page(request, developer)

    @app.route("/myapps", methods=["POST"])
    async def register(self, request: Any) -> bytes:
        self._guard(request)
        developer = await self._signed_in(request)
        if developer is None:
            return self.to_login(request, "/myapps")
        return await self.developer.register(request, developer)

    @app.route("/myapps/<string:id>/<any(verify,activate,rotate,deactivate):action>", methods=["POST"])
    async def app_action(self, request: Any, id: str, action: str) -> bytes:
        self._guard(request)
        developer = await self._signed_in(request)
        if developer is None:
            return self.to_login(request, "/myapps")
        if action == "verify":
            return await self.developer.verify(request, developer, id)
        if action == "deactivate":
            return await self.developer.deactivate(request, developer, id)
        return await self.developer.activate(request, developer, id)  # on an active one: a rotation

    # -- people ---------------------------------------------------------------------------------------------------------
    @app.route("/me", methods=["GET"])
    async def me(self, request: Any) -> bytes:
        email = await self._signed_in(request)
        if email is None:
            return self.to_login(request)
        return await self.people.me(request, email)

    @app.route("/me/pair", methods=["GET"])
    async def me_pair(self, request: Any) -> bytes:
        email = await self._signed_in(request)
        if email is None:
            return self.to_login(request)
        return await self.pairing.page(request, email)

    @app.route("/pair", methods=["POST"])
    async def pair(self, request: Any) -> bytes:
        cors(request)
        return await self.pairing.start(request)

    @app.route("/pair/<any(token,renew):step>", methods=["POST"])
    async def pair_step(self, request: Any, step: str) -> bytes:
        cors(request)
        return await (self.pairing.token(request) if step == "token" else self.pairing.renew(request))

    @app.route("/pair", methods=["OPTIONS"])
    @app.route("/pair/<any(token,renew):step>", methods=["OPTIONS"])
    def pair_preflight(self, request: Any, step: str = "") -> bytes:
        return self.pairing.preflight(request)

    @app.route("/pair/browser", methods=["GET"])
    async def pair_browser_page(self, request: Any) -> bytes:
        email = await self._signed_in(request)
        if email is None:
            return self.to_login(request, "/pair/browser")
        return await self.pairing.popup(request, email)

    @app.route("/pair/browser", methods=["POST"])
    async def pair_browser(self, request: Any) -> bytes:
        self._guard(request)
        email = await self._signed_in(request)
        if email is None:
            raise Problem(403, "Sign in to Presence first (the page shows how), then approve again.")
        return await self.pairing.pair_browser(request, email)

    @app.route("/me/notifications", methods=["GET"])
    async def me_notifications(self, request: Any) -> bytes:
        return await self.people.notifications(request)

    @app.route("/me/<any(status,revoke,dismiss,pair,unpair):action>", methods=["POST"])
    async def me_action(self, request: Any, action: str) -> bytes:
        self._guard(request)
        email = await self._signed_in(request)
        if email is None:
            return self.to_login(request, "/me")
        if action == "status":
            return await self.people.set_status(request, email)
        if action == "dismiss":
            return await self.people.dismiss(request, email)
        if action == "pair":
            return await self.pairing.decide(request, email)
        if action == "unpair":
            return await self.pairing.revoke(request, email)
        return await self.people.revoke(request, email)

    @app.route("/device", methods=["GET"])
    async def device_page(self, request: Any) -> bytes:
        return await self.device.page(request)  # signed out too: the page signs this browser in itself

    @app.route("/<string:app_id>/grant", methods=["GET"])
    async def door(self, request: Any, app_id: str) -> bytes:
        return await self.people.door(request, app_id)

    @app.route("/<string:app_id>/grant", methods=["POST"])
    async def grant(self, request: Any, app_id: str) -> bytes:
        self._guard(request)
        email = await self._signed_in(request)
        if email is None:
            back = f"/{quote(app_id)}/grant?" + "&".join(
                f"{k}={quote(arg(request, k, 2048), safe='')}" for k in ("redirect", "id"))
            return self.to_login(request, back)
        return await self.people.decide(request, app_id, email)
