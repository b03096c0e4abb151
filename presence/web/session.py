"""Signed session cookies and CSRF tokens for the pages.

The session cookie holds a random id and its HMAC; the store keeps only the id's hash with the email
and the expiry, so logout (deleting the row) ends the session on every node, and a stolen database
gives no usable cookie. Cookies are HttpOnly and SameSite=Lax (the door hanger is reached by a link
from the application's site); with an https public URL they are Secure and carry the ``__Host-``
prefix.

A CSRF token is the HMAC of a random per-browser cookie: every state-changing form carries it (or,
for the pages' scripts, the ``X-CSRF-Token`` header), and a site that cannot read our cookie cannot
forge it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from presence.keys import hash_key

SESSION = "presence_session"
CSRF = "presence_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = b"x-csrf-token"
NEW_KEY = "presence_new_key"
NEW_KEY_LIFETIME = 300   # seconds the redirect after an activation has to show the new API key


def _mac(secret: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(secret, f"{purpose}|{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Sessions:
    def __init__(self, store: Any, clock: Any, secret: bytes, lifetime: float, secure: bool):
        self.store = store
        self.clock = clock
        self.secret = secret
        self.lifetime = lifetime
        self.secure = secure

    def cookie_name(self, base: str) -> bytes:
        return (("__Host-" if self.secure else "") + base).encode("ascii")

    def _set(self, request: Any, base: str, value: str, max_age: int | None = None) -> None:
        request.addCookie(self.cookie_name(base), value.encode("ascii"), path=b"/", httpOnly=True,
                          secure=self.secure, sameSite="lax",
                          max_age=None if max_age is None else str(max_age).encode())

    # -- sessions ----------------------------------------------------------------------------------
    async def login(self, request: Any, email: str) -> None:
        """Start a session for ``email`` (a new id: a session fixed before login is worthless)."""
        sid = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        await self.store.add_session(hash_key(sid), email, now, now + self.lifetime)
        self._set(request, SESSION, f"{sid}.{_mac(self.secret, 'session', sid)}", int(self.lifetime))
        self._new_csrf(request)
        request.presence_user = email

    def _session_id(self, request: Any) -> str | None:
        raw = request.getCookie(self.cookie_name(SESSION))
        if not raw:
            return None
        sid, _, mac = raw.decode("ascii", "replace").partition(".")
        if not sid or not hmac.compare_digest(mac.encode(), _mac(self.secret, "session", sid).encode()):
            return None
        return sid

    async def user(self, request: Any) -> str | None:
        """The signed-in person's email, or None (no cookie, bad signature, logged out, expired)."""
        if hasattr(request, "presence_user"):
            return request.presence_user
        sid = self._session_id(request)
        session = None if sid is None else await self.store.get_session(hash_key(sid), self.clock.seconds())
        request.presence_user = session.email if session else None
        return request.presence_user

    async def logout(self, request: Any) -> None:
        sid = self._session_id(request)
        if sid is not None:
            await self.store.delete_session(hash_key(sid))
        self._set(request, SESSION, "", 0)
        self._new_csrf(request)
        request.presence_user = None

    # -- a new API key, carried across the redirect after activating (post/redirect/get) ---------------
    def hand_over_key(self, request: Any, app: int, key: str) -> None:
        """Keep ``key`` for the next page of this session only: a signed, short-lived cookie (so any
        node can show it, and the database never holds it), which that page clears."""
        sid = self._session_id(request) or ""
        value = f"{app}.{key}"
        self._set(request, NEW_KEY, f"{value}.{_mac(self.secret, 'new-key|' + sid, value)}", NEW_KEY_LIFETIME)

    def take_key(self, request: Any) -> tuple[int, str] | None:
        """The (application, API key) handed over by the previous response, once; None otherwise."""
        raw = request.getCookie(self.cookie_name(NEW_KEY))
        if not raw:
            return None
        self._set(request, NEW_KEY, "", 0)
        value, _, mac = raw.decode("ascii", "replace").rpartition(".")
        app, _, key = value.partition(".")
        sid = self._session_id(request) or ""
        if not app.isdigit() or not key or not hmac.compare_digest(
                mac.encode(), _mac(self.secret, "new-key|" + sid, value).encode()):
            return None
        return int(app), key

    # -- CSRF ----------------------------------------------------------------------------------------
    def _new_csrf(self, request: Any) -> str:
        seed = secrets.token_urlsafe(24)
        self._set(request, CSRF, seed)
        request.presence_csrf = seed
        return seed

    def csrf_token(self, request: Any) -> str:
        """The token to put in this page's forms (setting the browser's CSRF cookie if it has none)."""
        seed = getattr(request, "presence_csrf", None)
        if seed is None:
            raw = request.getCookie(self.cookie_name(CSRF))
            seed = raw.decode("ascii", "replace") if raw else self._new_csrf(request)
            request.presence_csrf = seed
        return _mac(self.secret, "csrf", seed)

    def csrf_ok(self, request: Any) -> bool:
        """Whether the request carries the token of this browser's CSRF cookie (form field or header)."""
        raw = request.getCookie(self.cookie_name(CSRF))
        sent = (request.args.get(CSRF_FIELD.encode()) or [b""])[0] or request.getHeader(CSRF_HEADER) or b""
        if isinstance(sent, str):
            sent = sent.encode("latin-1", "replace")
        if not raw or not sent:
            return False
        return hmac.compare_digest(sent, _mac(self.secret, "csrf", raw.decode("ascii", "replace")).encode())
