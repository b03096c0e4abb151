"""``/myapps``: a developer registers applications, verifies their domain, activates them.

Every rule (what a domain or a name may be, which state allows what, how keys are made and kept)
is Applications'; this module only asks, and shows the answers. A developer sees and changes only
their own applications: another's is "not found", exactly like one that does not exist.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from presence import errors
from presence.apps import DEACTIVATED, MAX_DESCRIPTION, MAX_NAME, ROTATED, validate_domain
from presence.store.base import ACTIVE, PENDING
from presence.web.common import Problem, arg, redirect, when, with_query

log = Logger()

DONE = {
    "registered": "Registered. Now serve the verification key below, then press Verify.",
    "verified": "Verified: the domain proved it is yours. Activate the application to get its API key.",
    "checking": "Not verified yet; see why below. Presence keeps checking in the background.",
    "deactivated": "Deactivated: the API key no longer works and the application's connections were closed.",
    "activated": "Activated. The application can now connect with its API key.",
    "rotated": "Rotated: the old API key no longer works and the connections that used it were closed.",
}


class DeveloperPages:
    def __init__(self, site: Any):
        self.site = site

    async def _own(self, request: Any, developer: str, id: str) -> Any:
        app = await self.site.store.get_app_by_id(int(id)) if id.isdigit() and len(id) < 18 else None
        if app is None or app.developer != developer:
            raise Problem(404, "There is no such application among yours.")
        return app

    async def page(self, request: Any, developer: str, code: int = 200, form: dict | None = None,
                   errors_: dict | None = None, shown_key: tuple[int, str] | None = None,
                   done: str | None = None) -> bytes:
        site = self.site
        shown_key = shown_key or site.sessions.take_key(request)
        apps = await site.store.list_apps(developer=developer)
        rows = []
        for app in apps:
            poll = await site.store.get_verification(app.id) if app.state == PENDING else None
            rows.append({
                "app": app,
                "state": {"pending": "waiting for domain verification", "verified": "verified",
                          "active": "active"}[app.state],
                "url": f"http://{app.domain}/__presence",
                "entry_point": site.entry_point(app.app_id) if app.app_id else None,
                "poll": poll,
                "checked": when(poll.checked_at) if poll else None,
                "next_check": when(poll.next_at) if poll and poll.next_at else None,
                "until": when(poll.poll_until) if poll else None,
                "key": shown_key[1] if shown_key and shown_key[0] == app.id else None,
            })
        code_done = arg(request, "done")
        done = done or DONE.get(code_done)
        return await site.page(request, "myapps.html", code=code, rows=rows, form=form or {},
                               errors=errors_ or {}, done=done, done_ok=code_done != "checking", max_name=MAX_NAME,
                               max_description=MAX_DESCRIPTION, local=site.apps.allow_ports)

    async def register(self, request: Any, developer: str) -> bytes:
        form = {name: arg(request, name, limit) for name, limit in
                (("domain", 300), ("name", MAX_NAME + 100), ("description", MAX_DESCRIPTION + 100))}
        problems = {}
        if not form["domain"].strip():
            problems["domain"] = "Give the application's domain, like example.com."
        else:
            try:
                validate_domain(form["domain"], self.site.apps.allow_ports)
            except ValueError as e:
                problems["domain"] = str(e)[:400] + "."
        name = form["name"].strip()
        if not name:
            problems["name"] = "Give the application a name (people see it when they grant it access)."
        elif len(name) > MAX_NAME:
            problems["name"] = f"The name may have at most {MAX_NAME} characters; this one has {len(name)}."
        description = form["description"].strip()
        if len(description) > MAX_DESCRIPTION:
            problems["description"] = (f"The description may have at most {MAX_DESCRIPTION} characters;"
                                       f" this one has {len(description)}.")
        if not problems:
            try:
                app = await self.site.apps.register(developer, form["domain"], form["name"], form["description"])
            except ValueError as e:
                problems["form"] = str(e)
            else:
                log.info("{developer} registered application {id} for {domain}", developer=developer, id=app.id,
                         domain=app.domain, event="web.app_registered")
                return redirect(request, with_query("/myapps", done="registered") + f"#app-{app.id}")
        return await self.page(request, developer, code=400, form=form, errors_=problems)

    async def verify(self, request: Any, developer: str, id: str) -> bytes:
        app = await self._own(request, developer, id)
        if app.state != PENDING:
            return redirect(request, with_query("/myapps", done="verified") + f"#app-{app.id}")
        app, failure = await self.site.poller.verify(app)
        return redirect(request, with_query("/myapps", done="checking" if failure else "verified") + f"#app-{app.id}")

    async def activate(self, request: Any, developer: str, id: str) -> bytes:
        """Make a new API key and show it this once (rotating closes the connections using the old one).

        Post/redirect/get: the answer is a redirect to /myapps, which shows the key handed over in a
        cookie and clears it, so reloading that page neither posts again (rotating the key just
        copied) nor shows the key again."""
        app = await self._own(request, developer, id)
        if app.state == PENDING:
            raise Problem(400, "Verify the application's domain before activating it.")
        was_active = app.state == ACTIVE
        app, key = await self.site.apps.activate(app)   # a rotation closes the streams on every other node
        if was_active:
            self.site.hub.streams.close_app(app.app_id, errors.CLOSE_REVOKED, ROTATED)
        log.info("{developer} {what} application {app_id}", developer=developer, app_id=app.app_id,
                 what="rotated the API key of" if was_active else "activated", event="web.app_activated")
        self.site.sessions.hand_over_key(request, app.id, key)
        return redirect(request, with_query("/myapps", done="rotated" if was_active else "activated") + f"#app-{app.id}")

    async def deactivate(self, request: Any, developer: str, id: str) -> bytes:
        app = await self._own(request, developer, id)
        if app.state == ACTIVE:
            app = await self.site.apps.deactivate(app)   # and closes its streams on every other node
            self.site.hub.streams.close_app(app.app_id, errors.CLOSE_REVOKED, DEACTIVATED)
            log.info("{developer} deactivated application {app_id}", developer=developer, app_id=app.app_id,
                     event="web.app_deactivated")
        return redirect(request, with_query("/myapps", done="deactivated") + f"#app-{app.id}")
