"""The people's pages: the door hanger that grants an application access, and ``/me`` where a person
sets their status, sees their devices and waiting notifications, and revokes applications.

The door hanger sends people back only to the application's verified domain (the host, and its port
when the domain names one, else the scheme's default), so it cannot be used as an open redirect.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.logger import Logger

from presence.hub import PAGE_DEVICE
from presence.status import STATUSES
from presence.store import StoreUnavailable
from presence.store.base import PENDING, Notification
from presence.web.common import Problem, ago, arg, redirect, send_json, when, with_query

log = Logger()

MAX_REDIRECT = 2000
MAX_ID = 256
_DEFAULT_PORTS = {"http": 80, "https": 443}

DONE = {
    "status": "Your status is set.",
    "revoked": "Revoked: that application gets no more updates about you.",
    "none": "That application had no access to revoke.",
    "dismissed": "Dismissed: that notification is gone, and no device of yours will receive it again.",
    "gone": "That notification was already gone (dismissed, acknowledged by a device, or expired).",
    "paired": "Paired: the device takes its certificate within a few seconds and reports your status from then on.",
    "denied": "Denied: that device was not paired.",
    "unpaired": "Revoked: that device can no longer report your status, and its connection was closed.",
    "nodevice": "That device was not paired (already revoked?).",
}


def action_link(url: str | None) -> str | None:
    """``url`` if it may be a link on the page: an http(s) URL with a host (checked when queued, and
    again here), else None."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in _DEFAULT_PORTS and parts.netloc else None


def notification_view(note: Notification) -> dict[str, Any]:
    """What /me and /me/notifications show of one waiting notification (escaped by the template, or
    set as text by the page's script)."""
    return {"id": note.id, "app": note.app, "domain": note.domain, "message": note.message,
            "action": action_link(note.action), "at": round(note.at, 3), "when": when(note.at)}


def check_redirect(url: str, domain: str) -> str:
    """``url`` if it may receive people coming back from the door hanger of an application at
    ``domain``; else a Problem saying why."""
    if not url:
        raise Problem(400, "The application did not say where to send you back (no redirect address).")
    if len(url) > MAX_REDIRECT:
        raise Problem(400, "The redirect address is too long.")
    if "\\" in url or any(ord(c) < 0x21 or c == "\x7f" for c in url):
        raise Problem(400, "The redirect address has characters a web address may not have.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Problem(400, "The redirect address is not a valid web address.") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise Problem(400, "The redirect address must be an http or https address.")
    if "@" in parts.netloc:
        raise Problem(400, "The redirect address may not hold a user name or password.")
    host, _, want_port = domain.partition(":")
    same_port = (port == int(want_port)) if want_port else port in (None, _DEFAULT_PORTS[parts.scheme])
    if parts.hostname.lower() != host or not same_port:
        raise Problem(400, f"The redirect address is not on {domain}, the application's verified domain;"
                           " Presence only sends you back there.")
    return url


def back_to(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + [(k, v) for k, v in params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


class PeoplePages:
    def __init__(self, site: Any):
        self.site = site

    async def _door(self, request: Any, app_id: str) -> tuple[Any, str, str]:
        app = await self.site.store.get_app(app_id) if app_id.isalnum() and len(app_id) <= 64 else None
        if app is None or app.state == PENDING:
            raise Problem(404, "There is no such application here.")
        url = check_redirect(arg(request, "redirect", MAX_REDIRECT), app.domain)
        state = arg(request, "id", MAX_ID)
        if len(state) > MAX_ID:
            raise Problem(400, f"The application's id parameter is longer than {MAX_ID} characters.")
        return app, url, state

    async def door(self, request: Any, app_id: str) -> bytes:
        """GET /<appid>/grant: who asks, and Accept or Decline."""
        app, url, state = await self._door(request, app_id)
        email = await self.site.sessions.user(request)
        if email is None:
            return self.site.to_login(request)
        granted = await self.site.store.get_grant(email, app.app_id)
        return await self.site.page(request, "grant.html", app=app, redirect_url=url, state=state,
                                    granted=granted is not None)

    async def decide(self, request: Any, app_id: str, email: str) -> bytes:
        """POST /<appid>/grant: Accept makes the grant and sends the person's id for this application."""
        app, url, state = await self._door(request, app_id)
        if arg(request, "decision") == "accept":
            grant = await self.site.apps.grant(email, app.app_id)
            log.info("{email} granted application {app_id}", email=email, app_id=app.app_id, event="web.granted")
            return redirect(request, back_to(url, result="granted", uid=grant.uid, id=state))
        return redirect(request, back_to(url, result="declined", id=state))

    async def me(self, request: Any, email: str, code: int = 200, problem: str | None = None) -> bytes:
        store, now = self.site.store, self.site.clock.seconds()
        status = await store.get_status(email)
        devices = [{"name": "this page" if d.device == PAGE_DEVICE else d.device, "status": d.status,
                    "seen": when(d.last_seen), "ago": ago(d.last_seen, now)}
                   for d in await store.list_devices(email)]
        grants = []
        for grant in await store.list_grants(email=email):
            app = await store.get_app(grant.app_id)
            if app is not None:
                grants.append({"app": app, "since": when(grant.created_at), "uid": grant.uid})
        page = next((d["status"] for d in devices if d["name"] == "this page"), None)
        paired = await self.site.pairing.devices(email, {d["name"] for d in devices})
        notes = [notification_view(n) for n in await self.site.node.notifier.waiting(email)]
        return await self.site.page(request, "me.html", code=code, status=status.status if status else "offline",
                                    page_status=page, devices=devices, grants=grants, statuses=STATUSES,
                                    notifications=notes, paired=paired, problem=problem, done=DONE.get(arg(request, "done")))

    async def notifications(self, request: Any) -> bytes:
        """GET /me/notifications: the waiting notifications as JSON, for the page's script to poll."""
        try:
            email = await self.site.sessions.user(request)
            if email is None:
                return send_json(request, 401,
                                 {"error": "You are signed out: sign in again to see your notifications."})
            notes = await self.site.node.notifier.waiting(email)
        except StoreUnavailable:
            return send_json(request, 503, {"error": "This Presence node cannot reach its database right now."})
        return send_json(request, 200, {"notifications": [notification_view(n) for n in notes]})

    async def dismiss(self, request: Any, email: str) -> bytes:
        """POST /me/dismiss: acknowledge one of the person's own notifications (as a device's ack would:
        no device receives it again)."""
        raw = arg(request, "id", 20)
        valid = raw.isascii() and raw.isdigit() and len(raw) < 19
        acked = await self.site.node.notifier.ack(email, [int(raw)]) if valid else 0
        return redirect(request, with_query("/me", done="dismissed" if acked else "gone"))

    async def set_status(self, request: Any, email: str) -> bytes:
        status = arg(request, "status", 20)
        if status not in STATUSES:
            return await self.me(request, email, code=400,
                                 problem="Choose a status: online, unavailable or offline.")
        await self.site.hub.set_page_status(email, status)
        return redirect(request, with_query("/me", done="status"))

    async def revoke(self, request: Any, email: str) -> bytes:
        app_id = arg(request, "app", 64)
        revoked = await self.site.apps.revoke(email, app_id) if app_id else False
        if revoked:
            log.info("{email} revoked application {app_id}", email=email, app_id=app_id, event="web.revoked")
        return redirect(request, with_query("/me", done="revoked" if revoked else "none"))
