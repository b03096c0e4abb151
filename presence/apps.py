"""Applications and grants: registration, domain verification, activation, and who may see whom.

Used by the web pages, by presence-admin and by the application websocket; it owns the secrets rules
(1024-character keys from ``secrets``, API keys stored hashed, compared in constant time).
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IReactorTime

from presence import changelog, errors
from presence.batching import Grouped
from presence.errors import PresenceError
from presence.keys import hash_key, key_matches, new_id, new_key
from presence.store import App, Grant, Store
from presence.store.base import ACTIVE, PENDING

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
MAX_NAME = 100
MAX_DESCRIPTION = 2000


def validate_domain(domain: str, allow_port: bool = False) -> str:
    """A lower-cased hostname (with ``:port`` only when allowed, for local and test setups)."""
    domain = domain.strip().lower()
    host, sep, port = domain.partition(":")
    if sep:
        if not allow_port:
            raise ValueError(f"{domain!r}: give a hostname without a port, like example.com")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{domain!r}: the port must be a number from 1 to 65535")
    if len(host) > 253 or not _HOSTNAME.match(host):
        raise ValueError(f"{domain!r} is not a hostname; give one like example.com")
    return domain


ROTATED = "the API key was rotated"
DEACTIVATED = "the application was deactivated"


class Applications:
    def __init__(self, store: Store, clock: IReactorTime, allow_ports: bool = False, origin: str = "presence-admin"):
        self.store = store
        self.clock = clock
        self.allow_ports = allow_ports
        self.origin = origin   # who logs the closing of an application's streams (a node, or the admin)
        # Applications connect in bursts (a node restarts, a load balancer moves them): their
        # lookups share round trips.
        self._lookup = Grouped(self._lookup_batch)

    async def _lookup_batch(self, app_ids: list[str]) -> list[App | None]:
        found = await self.store.get_apps(app_ids)
        return [found.get(app_id) for app_id in app_ids]

    async def register(self, developer: str, domain: str, name: str, description: str) -> App:
        domain = validate_domain(domain, self.allow_ports)
        name, description = name.strip(), description.strip()
        if not name or len(name) > MAX_NAME:
            raise ValueError(f"the name must have 1 to {MAX_NAME} characters")
        if len(description) > MAX_DESCRIPTION:
            raise ValueError(f"the description may have at most {MAX_DESCRIPTION} characters")
        return await self.store.create_app(developer, domain, name, description, new_key(), self.clock.seconds())

    async def mark_verified(self, app: App) -> App:
        """The domain proved ownership: the application gets its public id."""
        return await self.store.mark_verified(app.id, new_id(), self.clock.seconds())

    async def activate(self, app: App) -> tuple[App, str]:
        """A new API key (also rotates); returned once, only its hash is kept."""
        if app.state == PENDING:
            raise ValueError("verify the application's domain before activating it")
        key = new_key()
        now = self.clock.seconds()
        app = await self.store.set_api_key(app.id, hash_key(key), now, self._closing(app, ROTATED, now))
        return app, key

    async def deactivate(self, app: App) -> App:
        return await self.store.deactivate(app.id, self._closing(app, DEACTIVATED, self.clock.seconds()))

    def _closing(self, app: App, reason: str, now: float) -> tuple[str, float, str] | None:
        """What closes the application's streams on every node (close 4006), logged by the store in
        the transaction that rotates the key or deactivates it, if it was active: both, or neither.
        The node that logs it closes its own streams (presence.hub skips its own log entries)."""
        if not app.app_id:
            return None
        return self.origin, now, changelog.encode([], extras=[{"close_app": [app.app_id, errors.CLOSE_REVOKED, reason]}])

    async def authenticate(self, app_id: str, key: object) -> App:
        """The application stream's check: raises a PresenceError with the errno and close code to use."""
        if not isinstance(key, str) or not key:
            raise PresenceError(errors.BAD_FIELD, 'send {"key": "<your API key>"} first', errors.CLOSE_AUTH_FAILED)
        app = await self._lookup(app_id)
        if app is None:
            raise PresenceError(errors.UNKNOWN_APP, f"no application {app_id!r}", errors.CLOSE_UNKNOWN_APP)
        if app.state == PENDING:
            raise PresenceError(errors.APP_NOT_VERIFIED, "the application's domain is not verified yet",
                                errors.CLOSE_APP_NOT_READY)
        if app.state != ACTIVE:
            raise PresenceError(errors.APP_NOT_ACTIVE, "the application is not active; activate it at /myapps",
                                errors.CLOSE_APP_NOT_READY)
        if not key_matches(key, app.api_key_hash):
            raise PresenceError(errors.BAD_KEY, "wrong API key", errors.CLOSE_AUTH_FAILED)
        return app

    # -- grants ------------------------------------------------------------------------------------
    async def grant(self, email: str, app_id: str) -> Grant:
        app = await self.store.get_app(app_id)
        if app is None or app.state == PENDING:
            raise KeyError(f"no verified application {app_id!r}")
        return await self.store.add_grant(email.strip().lower(), app_id, new_id(), self.clock.seconds())

    async def revoke(self, email: str, app_id: str) -> bool:
        return await self.store.revoke_grant(email.strip().lower(), app_id)
