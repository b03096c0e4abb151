"""Pairing over HTTP: the device's JSON calls (``/pair``, ``/pair/token``, ``/pair/renew``) and the
person's pages (``/me/pair`` to approve a code, *Revoke* on ``/me``). The rules are presence.pairing.

The device's calls carry no cookie and need no CSRF token: they act on nothing of a signed-in
person. Their errors are RFC 8628's: ``{"error": "<code>", "error_description": "..."}``. They answer
CORS (``Access-Control-Allow-Origin: *``, no credentials), so that a browser device on another origin
(``static/presence-pairing.js``) can renew its certificate.

``/pair/browser`` is the popup such a page opens: the signed-in person sees the origin that asks (the
browser's ``event.origin``, never a parameter) and approves; its POST (session cookie, CSRF token, no
CORS) pairs the page's key at once. The page refuses to be framed and runs only its own script.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.logger import Logger

from presence.identity import IdentityError
from presence.pairing import Pairing, PairingError, clean_name, normalize_user_code
from presence.web.common import Problem, ago, arg, read_json, redirect, send_json, when, with_query

log = Logger()

# The popup: its own script and stylesheet only, nothing framing it, forms and fetches to this origin.
POPUP_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
             b" form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
CORS = {b"access-control-allow-origin": b"*"}
PREFLIGHT = {**CORS, b"access-control-allow-methods": b"POST", b"access-control-allow-headers": b"content-type",
             b"access-control-max-age": b"600"}


def cors(request: Any, headers: dict[bytes, bytes] = CORS) -> None:
    for name, value in headers.items():
        request.setHeader(name, value)


class PairingPages:
    def __init__(self, site: Any, pairing: Pairing):
        self.site = site
        self.pairing = pairing

    # -- the device --------------------------------------------------------------------------------------
    def _answer(self, request: Any, error: PairingError) -> bytes:
        if error.retry_after is not None:
            request.setHeader(b"retry-after", str(max(1, math.ceil(error.retry_after))).encode())
        return send_json(request, error.code, error.body())

    def _body(self, request: Any) -> dict[str, Any]:
        try:
            return read_json(request)
        except Problem as p:
            raise PairingError("invalid_request", p.message) from None

    async def start(self, request: Any) -> bytes:
        try:
            body = self._body(request)
            answer = await self.pairing.start(body.get("publicKey"), body.get("name"), self.site.idp.client(request))
        except PairingError as e:
            return self._answer(request, e)
        return send_json(request, 200, answer)

    async def token(self, request: Any) -> bytes:
        try:
            answer = await self.pairing.token(self._body(request).get("device_code"))
        except PairingError as e:
            return self._answer(request, e)
        log.info("paired device {device} of {email} took its certificate", device=answer["device"],
                 email=answer["email"], event="pair.certified")
        return send_json(request, 200, answer)

    async def renew(self, request: Any) -> bytes:
        try:
            try:
                identity = await self.site.verifier().verify(self._body(request).get("assertion"))
            except IdentityError as e:
                raise PairingError("invalid_grant", f"the assertion does not verify: {e.message}") from None
            answer = await self.pairing.renew(identity)
        except PairingError as e:
            return self._answer(request, e)
        return send_json(request, 200, answer)

    def preflight(self, request: Any) -> bytes:
        """OPTIONS on the device's calls: any origin may POST JSON, without credentials."""
        cors(request, PREFLIGHT)
        request.setResponseCode(204)
        return b""

    # -- a browser on another origin: the popup ------------------------------------------------------
    async def popup(self, request: Any, email: str) -> bytes:
        """GET /pair/browser: the consent page (its script, static/pair-browser.js, does the talking)."""
        body = await self.site.page(request, "pair-browser.html", email=email)
        request.setHeader(b"content-security-policy", POPUP_CSP)
        request.setHeader(b"x-frame-options", b"DENY")
        return body

    async def pair_browser(self, request: Any, email: str) -> bytes:
        """POST /pair/browser ``{publicKey, origin, name}``: the person approved; the answer is
        /pair/token's, which the popup posts to that origin only."""
        try:
            body = self._body(request)
            answer = await self.pairing.pair_browser(email, body.get("publicKey"), body.get("origin"), body.get("name"))
        except PairingError as e:
            return self._answer(request, e)
        log.info("{email} paired browser device {name} of {origin}", email=email, name=answer["device"],
                 origin=body.get("origin"), event="pair.browser")
        return send_json(request, 200, answer)

    # -- the person ---------------------------------------------------------------------------------------
    async def page(self, request: Any, email: str, code: int = 200, problem: str | None = None,
                   user_code: str = "", pending: Any = None) -> bytes:
        """GET /me/pair: a box for the code (``?code=`` fills it), or the device that asks, to name it."""
        if not user_code and not problem:
            user_code = normalize_user_code(arg(request, "code", 20)) or ""
        return await self.site.page(request, "pair.html", code=code, problem=problem, user_code=user_code,
                                    pending=pending, name=pending.name if pending else "")

    async def decide(self, request: Any, email: str) -> bytes:
        """POST /me/pair: a code (then the device is shown), or the decision on it."""
        typed = arg(request, "code", 40)
        user_code = normalize_user_code(typed)
        wait = self.pairing.limit_codes(email, self.site.idp.client(request))
        if wait:
            raise Problem(429, "Too many codes were entered; wait a few minutes and try again.", retry_after=wait)
        pending = await self.pairing.pending(user_code) if user_code else None
        if pending is None:
            return await self.page(request, email, 400, "No device is waiting with this code (codes are valid"
                                   " for a few minutes and only once); check it, or start pairing again on the"
                                   " device.", typed[:20])
        decision = arg(request, "decision", 20)
        if decision == "deny":
            await self.pairing.decide(email, user_code, None)
            log.info("{email} denied a device's pairing", email=email, event="pair.denied")
            return redirect(request, with_query("/me", done="denied"))
        if decision != "approve":
            return await self.page(request, email, user_code=user_code, pending=pending)
        name = clean_name(arg(request, "name", 200))
        if name is None:
            return await self.page(request, email, 400, "Name the device (1 to 64 characters).", user_code, pending)
        result = await self.pairing.decide(email, user_code, name)
        if result == "taken":
            return await self.page(request, email, 400, f"You already have a device named {name!r}; choose"
                                   " another name, or revoke that one on your page first.", user_code, pending)
        if result != "approved":
            return await self.page(request, email, 400, "This code is no longer valid; start pairing again on"
                                   " the device.")
        log.info("{email} paired device {name}", email=email, name=name, event="pair.approved")
        return redirect(request, with_query("/me", done="paired"))

    async def devices(self, email: str, live: set[str]) -> list[dict[str, Any]]:
        """The person's paired devices as /me lists them (``live``: names of devices connected now)."""
        now = self.site.clock.seconds()
        return [{"id": d.id, "name": d.name, "since": when(d.created_at),
                 "seen": "connected now" if d.name in live else
                 ("never" if d.last_seen is None else ago(d.last_seen, now)),
                 "seen_at": when(d.last_seen)}
                for d in await self.site.store.list_paired_devices(email)]

    async def revoke(self, request: Any, email: str) -> bytes:
        """POST /me/unpair: the device's connect and renewal are refused from now on, and its live
        connection is closed on every node."""
        pairing_id = arg(request, "id", 64)
        device = await self.site.hub.revoke_pairing(email, pairing_id) if pairing_id else None
        if device is None:
            return redirect(request, with_query("/me", done="nodevice"))
        log.info("{email} revoked paired device {name}", email=email, name=device.name, event="pair.revoked")
        return redirect(request, with_query("/me", done="unpaired"))
