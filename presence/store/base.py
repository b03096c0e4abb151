"""The store interface every backend implements, and the records it returns.

Times are float seconds since the epoch, given by the caller (so tests drive them with a Clock).
Every method is a coroutine; a backend raises StoreUnavailable when the database cannot be reached
(or after close()), so callers can turn it into one clear error instead of a traceback. A broken
constraint (a grant for an unknown app, a uid or app_id already taken) raises ValueError; an
unknown application id given to a state change raises KeyError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, TYPE_CHECKING, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from presence.views import Update

# Application states.
PENDING = "pending"      # registered, domain not verified yet; no app_id yet
VERIFIED = "verified"    # domain verified: has an app_id, no API key
ACTIVE = "active"        # has an API key: may open its stream


class StoreUnavailable(Exception):
    """The database cannot be reached or failed; nothing was changed."""


class CommitUnknown(StoreUnavailable):
    """The connection was lost while the transaction committed: it may or may not have been
    applied. A caller whose write is not harmless to repeat finds out which before it answers."""


class NodeFenced(StoreUnavailable):
    """This node's incarnation is no longer registered (another node took it for dead and cleaned up
    after it): nothing was changed, and the node must close everything and rejoin as a new one."""


@dataclass(frozen=True)
class App:
    id: int                      # internal, stable from registration on
    app_id: str | None           # public id, assigned when the domain is verified
    developer: str               # email of the owner
    domain: str
    name: str
    description: str
    verification_key: str        # 1024 chars, served by the developer at http://<domain>/__presence
    state: str                   # PENDING, VERIFIED or ACTIVE
    api_key_hash: str | None     # hex sha256 of the API key; the key itself is never stored
    created_at: float
    verified_at: float | None
    activated_at: float | None


@dataclass(frozen=True)
class Grant:
    email: str
    app_id: str
    uid: str                     # the person's id for this application only
    created_at: float


@dataclass(frozen=True)
class Device:
    email: str
    device: str
    node: str                    # the node holding its connection (or that held it, in the grace period)
    status: str
    last_seen: float
    session: str = ""            # the connection that owns the record; a newer one takes it over
    scope: frozenset[str] | None = None    # applications this session speaks to; None: all granted
    overrides: Mapping[str, str] = field(default_factory=dict)  # per-application status of a targeted change


@dataclass(frozen=True)
class PersonChange:
    """What one change of a person's devices did."""

    updates: list["Update"]      # the applications whose view of the person changed
    queued: frozenset[str]       # of those, the applications no node holds: their update waits in pending
    seq: int | None              # the change's number in the change log (None: no application saw a change)
    devices: dict[str, Device]   # the person's devices afterwards


@dataclass(frozen=True)
class Notification:
    """A live notification waiting in one person's queue for one application."""

    id: int
    email: str
    app_id: str
    app: str                     # the application's name and domain, as devices show them
    domain: str
    message: str
    action: str | None
    at: float

    def as_json(self) -> dict:
        return {"id": self.id, "appid": self.app_id, "app": self.app, "domain": self.domain,
                "message": self.message, "action": self.action, "at": round(self.at, 3)}


@dataclass(frozen=True)
class Queued:
    """What queueing one notification did: the item, its queue's size after it, and how many old
    items were dropped to make room."""

    notification: Notification
    queue_size: int
    dropped: int


@dataclass(frozen=True)
class LoggedChange:
    seq: int                     # its last number (a group commit's changes have one number each)
    origin: str                  # the node that made it
    at: float
    payload: str                 # JSON, see presence.changelog
    first: int = 0               # its first number (0: the same as seq)

    @property
    def numbers(self) -> range:
        return range(self.first or self.seq, self.seq + 1)


@dataclass(frozen=True)
class PersonStatus:
    email: str
    status: str
    changed_at: float


@dataclass(frozen=True)
class PersonState:
    """One granted person as one application sees them now (sync, resync, the HTTP queries)."""

    email: str
    uid: str
    status: str
    last_active: float | None    # when a device of theirs was last online (None: never)
    seq: int                     # the number of their last logged change: the state is current at it

    def as_json(self) -> dict:
        return {"email": self.email, "uid": self.uid, "status": self.status,
                "last_active": None if self.last_active is None else round(self.last_active, 3), "seq": self.seq}


@dataclass(frozen=True)
class PendingUpdate:
    """A change waiting for an application that has no connection: the latest per person."""

    app_id: str
    email: str
    uid: str
    status: str
    at: float
    seq: int = 0                 # the change log's number: a newer update (by number) replaces an older one
    # When a device of the person was last online (None: unknown); derived, so not part of equality.
    last_active: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reaped:
    """What cleaning up after one dead node did."""

    node: str                    # the dead incarnation
    people: int                  # people who had devices on it (now offline there)
    apps: list[str]              # applications it held
    changes: list[PersonChange]  # the offline changes, for the reaper to publish
    replayed: list["Update"]     # what it may not have delivered (logged again, with their own numbers)
    queued: frozenset[str]       # of those, the applications no live node holds: waiting for them


@dataclass(frozen=True)
class PairingRequest:
    """A device's pairing request as the person's page shows it."""

    name: str                    # the name the device suggested
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class PairedDevice:
    """A device paired through /pair: named in its certificate, listed on /me, revoked by deleting it."""

    id: str
    email: str
    name: str
    public_key: str              # JSON, BrowserID's form
    created_at: float
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class PairingAnswer:
    """A pairing device's poll: RFC 8628's error code, or "approved" with its paired device."""

    state: str
    device: PairedDevice | None = None


@dataclass(frozen=True, slots=True)
class LoginLink:
    """A one-time login link, as taken (once) from the store."""

    email: str
    next_path: str               # the local page to go to once signed in
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class WebSession:
    email: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Verification:
    """Where the background polling of an application's domain stands."""

    app: int                     # App.id
    node: str                    # the node that polls
    attempts: int
    last_error: str
    checked_at: float
    next_at: float | None        # None: polling stopped (gave up)
    poll_until: float


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema to the latest version (running upgrades in order)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a trivial query."""

    async def schema_version(self) -> int: ...

    # -- developers and applications ------------------------------------------------------
    async def add_developer(self, email: str, now: float) -> None:
        """Idempotent."""

    async def create_app(
        self, developer: str, domain: str, name: str, description: str, verification_key: str, now: float
    ) -> App:
        """A new PENDING application (adds the developer if needed)."""

    async def get_app(self, app_id: str) -> App | None:
        """By public app id."""

    async def get_apps(self, app_ids: list[str]) -> dict[str, App]:
        """Several applications by public id in one round trip (a burst of connects); unknown ids
        are left out."""

    async def get_app_by_id(self, id: int) -> App | None: ...

    async def list_apps(self, developer: str | None = None) -> list[App]:
        """Ordered by id."""

    async def mark_verified(self, id: int, app_id: str, now: float) -> App:
        """PENDING -> VERIFIED with the given app_id; an already verified app is returned unchanged."""

    async def set_api_key(self, id: int, api_key_hash: str, now: float,
                          log: tuple[str, float, str] | None = None) -> App:
        """VERIFIED or ACTIVE -> ACTIVE with this key hash (activate and rotate). KeyError if unknown,
        ValueError if still PENDING. ``log`` (origin, time, payload) is logged in the same
        transaction if the application was active (a rotation closes its streams everywhere)."""

    async def deactivate(self, id: int, log: tuple[str, float, str] | None = None) -> App:
        """ACTIVE -> VERIFIED, key hash and activated_at cleared; any other state is returned unchanged.
        ``log`` as for set_api_key."""

    async def delete_app(self, id: int) -> None:
        """Removes the app, its grants and its pending updates."""

    # -- grants ----------------------------------------------------------------------------
    async def add_grant(self, email: str, app_id: str, uid: str, now: float) -> Grant:
        """Idempotent: an existing grant is returned as it is (its uid is kept)."""

    async def get_grant(self, email: str, app_id: str) -> Grant | None: ...

    async def revoke_grant(self, email: str, app_id: str) -> bool:
        """Deletes the grant and the app's pending updates for that person; False if there was none."""

    async def list_grants(self, email: str | None = None, app_id: str | None = None) -> list[Grant]:
        """Filtered by either or both; ordered by (email, app_id)."""

    # -- people: the one way their devices change ----------------------------------------------
    async def change_person(self, email: str, mutate: Callable[[dict[str, Device]], None], node: str,
                            now: float, extra: Mapping | None = None) -> PersonChange:
        """In one transaction, with the person locked against other nodes: read their devices and
        grants, let ``mutate`` change the dict of devices (device id -> Device: replace, add or delete
        entries; it may return extra fields to log, like ``extra``), write the result and the person's overall status, work out which applications'
        views changed, queue those updates for the applications no node holds, and append the change
        (with ``extra`` fields) to the change log, numbered in commit order."""

    async def change_people(self, changes: list[tuple[str, Callable[[dict[str, Device]], None], Mapping | None]],
                            node: str, now: float, held: Container[str] = (), fence: bool = False) -> list[PersonChange]:
        """Several (email, mutate, extra) changes as change_person does them, in order, in one
        transaction (group commit), logged as one change; one PersonChange per change.

        ``held``: applications the caller holds connections of, so certainly subscribed: the store
        need not look them up to know they are not queued (a person may have granted thousands).
        ``fence``: refuse (NodeFenced) unless ``node`` is registered: a reaped node writes nothing."""

    async def emails_on_node(self, node: str) -> list[str]:
        """People with a device record on a node (to clean up after it)."""

    # -- the node registry, subscriptions and the change log ---------------------------------------
    async def register_node(self, node: str, now: float, last_applied: int, label: str = "") -> None:
        """Upsert this incarnation's row (``label``: the --node name it runs under)."""

    async def heartbeat(self, node: str, now: float, last_applied: int) -> bool:
        """False if the node's row is gone (another node decided it was dead)."""

    async def reap_node(self, reaper: str, now: float, before: float | None = None, label: str | None = None,
                        held: Container[str] = (), node: str | None = None) -> Reaped | None:
        """Clean up after one dead node in one transaction (see presence/store/sql_changes.py): the
        longest silent one with a heartbeat older than ``before``, or an earlier incarnation of
        ``label``, or ``node`` itself; None if there is none."""

    async def now(self) -> float:
        """The database's clock: heartbeats are written and compared on it, never on a node's."""

    async def subscribe(self, node: str, app_id: str) -> None:
        """This node holds connections of the application (idempotent)."""

    async def unsubscribe(self, node: str, app_id: str) -> None: ...

    async def take_subscriptions(self, node: str) -> list[str]:
        """Remove and return a (dead) node's subscriptions."""

    async def subscribed(self, app_ids: list[str]) -> set[str]:
        """Which of these applications some node holds."""

    async def log_change(self, origin: str, now: float, payload: str) -> int:
        """Append a change made outside change_person (a survivor's replay); returns its number."""

    async def changes_since(self, seq: int, limit: int = 1000) -> list[LoggedChange]:
        """Logged changes after ``seq``, in order."""

    async def last_change(self) -> int: ...

    async def trim_changes(self, before: float) -> int:
        """Forget logged changes older than ``before``; returns how many."""

    # -- devices and statuses ----------------------------------------------------------------
    async def list_devices(self, email: str) -> list[Device]: ...

    async def get_status(self, email: str) -> PersonStatus | None: ...

    # -- the state of an application's people (presence/store/sql_people.py) -------------------
    async def people_page(self, app_id: str, after: str = "", limit: int = 1000) -> list[PersonState]:
        """The application's granted people with an email after ``after``, by email, at most
        ``limit`` (keyset pagination: a page costs the same wherever it starts)."""

    async def person_state(self, app_id: str, uid: str) -> PersonState | None:
        """One granted person by their uid for this application; None without a grant."""

    # -- live notifications -------------------------------------------------------------------
    async def queue_notifications(self, app_id: str, items: list[tuple[str, str, str | None]], now: float,
                                  limit: int, origin: str | None = None) -> list[Queued | None]:
        """Queue (uid, message, action) items for the people behind the application's uids, in one
        transaction; a queue longer than ``limit`` loses its oldest items. An item whose uid has no
        grant (never granted, or revoked) gets None and stores nothing. With ``origin``, the queued
        items are logged for the other nodes' devices in the same transaction."""

    async def pending_notifications(self, email: str, not_before: float) -> list[Notification]:
        """Everything waiting for a person (every application), oldest first; older than
        ``not_before`` is left out (and expires)."""

    async def pending_notifications_of(self, emails: list[str], not_before: float) -> dict[str, list[Notification]]:
        """``pending_notifications`` of several people in one round trip (devices connecting in a
        burst); people with nothing waiting are left out."""

    async def ack_notifications(self, email: str, ids: list[int]) -> int:
        """Remove the person's items with these ids; returns how many there were."""

    async def ack_notifications_of(self, pairs: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Several people's acknowledgements in one transaction: remove each (email, id) that is
        that person's; returns the pairs that were removed."""

    async def expire_notifications(self, before: float) -> int: ...

    # -- waiting updates for applications without a connection -----------------------------
    async def queue_pending(self, updates: list[PendingUpdate]) -> None:
        """Upsert by (app_id, email): a newer update (by ``at``) replaces an older one, never the reverse."""

    async def open_streams(self, node: str, app_ids: list[str], not_before: float,
                           fence: bool = False) -> dict[str, list[PendingUpdate]]:
        """``subscribe`` then ``take_pending`` for several applications, in one transaction (a burst
        of application connects costs one round trip)."""

    async def take_pending(self, app_id: str, not_before: float) -> list[PendingUpdate]:
        """Remove and return the app's waiting updates, ordered by ``at``; those older than
        not_before are deleted and not returned."""

    async def expire_pending(self, before: float) -> int:
        """Delete every waiting update older than ``before``; returns how many."""

    async def count_pending(self, app_id: str | None = None) -> int: ...

    async def pending_stats(self) -> tuple[int, float | None]:
        """How many updates wait, and the ``at`` of the oldest (None if none)."""

    # -- the web pages: one-time login links, sessions, shared secrets, verification polling ------
    async def add_login_token(self, token_hash: str, email: str, next_path: str, now: float,
                              expires_at: float) -> None:
        """Keep a one-time login link (by the hash of its token)."""

    async def take_login_token(self, token_hash: str, now: float) -> LoginLink | None:
        """Remove the link and return it; None if unknown, already used or expired (so a link works once,
        on any node)."""

    async def count_login_tokens(self, email: str, since: float) -> int:
        """Links made for an address since ``since`` (used or not expired yet): a rate limit."""

    # -- pairing devices without a browser (presence.pairing) ---------------------------------------
    async def add_pairing_request(self, device_hash: str, user_hash: str, public_key: str, name: str,
                                  now: float, expires_at: float) -> None:
        """Keep a pending pairing request (by the hashes of its codes)."""

    async def get_pairing_request(self, user_hash: str, now: float) -> PairingRequest | None:
        """The pending, unexpired request with this user code hash."""

    async def decide_pairing(self, user_hash: str, now: float, email: str, name: str | None,
                             pairing_id: str) -> str:
        """Approve (a ``name``) or deny (None) a pending request once: "approved", "denied", "taken"
        or "gone"."""

    async def poll_pairing(self, device_hash: str, now: float, interval: float) -> PairingAnswer:
        """A device's poll; a decided request's answer is taken once."""

    async def add_paired_device(self, pairing_id: str, email: str, name: str, public_key: str,
                                now: float) -> PairedDevice | None:
        """Pair a device directly (the browser pairing popup); None if the name is the person's already."""

    async def touch_paired_device(self, pairing_id: str, email: str, now: float) -> PairedDevice | None:
        """Note the device seen now; None if it is not paired (revoked)."""

    async def list_paired_devices(self, email: str) -> list[PairedDevice]: ...

    async def revoke_paired_device(self, email: str, pairing_id: str, origin: str = "", now: float = 0.0,
                                   payload: str | None = None) -> PairedDevice | None:
        """Delete the paired device, logging ``payload`` in the same transaction; None if it was not
        the person's."""

    async def add_session(self, id_hash: str, email: str, now: float, expires_at: float) -> None: ...

    async def get_session(self, id_hash: str, now: float) -> WebSession | None:
        """None if unknown, logged out or expired."""

    async def delete_session(self, id_hash: str) -> None: ...

    async def expire_web(self, now: float) -> int:
        """Delete expired sessions and login links; returns how many."""

    async def web_secret(self, name: str, candidate: str, now: float) -> str:
        """The secret stored under ``name``; if there is none yet, store ``candidate`` and return it
        (several nodes starting together all get the one that was stored first)."""

    async def save_verification(self, verification: Verification) -> None:
        """Upsert by application."""

    async def get_verification(self, app: int) -> Verification | None: ...

    async def list_verifications(self, node: str) -> list[Verification]:
        """The polls a node runs (to resume them after a restart)."""

    async def delete_verification(self, app: int) -> None: ...
