"""The device session (``/presence``): prove an email, then report statuses."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from presence import errors
from presence.errors import PresenceError
from presence.hub import Hub, Link
from presence.keys import new_id
from presence.metrics import Metrics
from presence.ratelimit import TokenBucket
from presence.store import StoreUnavailable
from presence.status import is_status
from presence.ws.session import OK_REPLY, Peer, Session, log, optional_ids

MAX_DEVICE_ID = 128


class DeviceSession(Session):
    kind = "device"
    __slots__ = ("hub", "verifier", "notifier", "bucket", "device", "session_id")

    def __init__(self, peer: Peer, hub: Hub, verifier: Any, clock: IReactorTime, auth_timeout: float,
                 rate: float, burst: int, metrics: Metrics, notifier: Any):
        super().__init__(peer, clock, auth_timeout, metrics)
        self.hub = hub
        self.notifier = notifier
        self.verifier = verifier
        self.bucket = TokenBucket(rate, burst, clock)
        self.device: Link | None = None
        self.session_id: str | None = None

    async def dispatch(self, message: dict) -> Any:
        kind = message.get("type")
        if kind == "connect":
            return await self.handle_connect(message)
        if kind == "status":
            return await self.handle_status(message)
        if kind == "ack":
            return await self.handle_ack(message)
        raise PresenceError(errors.UNKNOWN_TYPE, f"unknown message type {kind!r}; expected connect, status or ack")

    async def handle_connect(self, message: dict) -> dict:
        if self.device is not None:
            raise PresenceError(errors.ALREADY_CONNECTED, "this session is already connected")
        assertion = message.get("assertion")
        if not isinstance(assertion, str) or not assertion:
            raise PresenceError(errors.BAD_FIELD, "connect needs an assertion (a BrowserID assertion string)")
        device_id = message.get("device")
        if device_id is not None and (not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID):
            raise PresenceError(errors.BAD_FIELD, f"device must be a string of 1 to {MAX_DEVICE_ID} characters")
        scope = optional_ids(message)
        try:
            identity = await self.verifier.verify(assertion)
        except PresenceError as e:
            self.refused(e)
            raise PresenceError(e.errno, e.message, errors.CLOSE_AUTH_FAILED)
        if self.closed:
            return None
        email = identity.email.lower()
        if identity.pairing:
            # A paired device: refused once the person revoked it (presence.pairing); seen now.
            paired = await self.hub.store.touch_paired_device(identity.pairing, email, self.clock.seconds())
            if paired is None:
                e = PresenceError(errors.PAIRING_REVOKED, "this device's pairing was revoked on /me; pair it again",
                                  errors.CLOSE_AUTH_FAILED)
                self.refused(e)
                raise e
            device_id = device_id or paired.name
            if self.closed:
                return None
        self.authenticated()
        self.session_id = new_id()
        link = await self.hub.attach(email, device_id or "session:" + self.session_id, scope, self, identity.pairing)
        if self.closed:  # the connection went away (or was replaced) while we attached
            self.hub.detach(link, self)
            return None
        self.device = link
        self.metrics.handshakes["device"].inc()
        if self.log_connections:
            log.info("device {device} of {email} connected", device=link.device, email=email, event="device.connected")
        self.peer.send_json({"result": True, "session_id": self.session_id})
        try:
            waiting = await self.notifier.waiting(email)
        except StoreUnavailable as e:
            # Waiting notifications are sent on connect only: a device left open without them would
            # never get them. Closed, it reconnects and is given them then.
            log.warn("could not read {email}'s waiting notifications ({why}); closing the device so it reconnects",
                     email=email, why=e, event="device.waiting_failed")
            raise PresenceError(errors.UNAVAILABLE, "the node cannot reach its store; reconnect shortly",
                                errors.CLOSE_INTERNAL) from e
        if waiting and not self.closed:
            self.notify([n.as_json() for n in waiting])
        return None

    async def handle_status(self, message: dict) -> dict:
        if self.device is None:
            raise PresenceError(errors.NOT_CONNECTED, "send connect with an assertion first")
        status = message.get("status")
        if not is_status(status):
            raise PresenceError(errors.BAD_FIELD, "status must be online, unavailable or offline")
        app_ids = optional_ids(message)
        if not self.bucket.take():
            self.metrics.status_refused.inc()
            raise PresenceError(errors.SLOW_DOWN, "too many status changes; slow down")
        try:
            await self.hub.set_status(self.device, status, app_ids)
        except Exception:
            self.metrics.status_refused.inc()
            raise
        self.metrics.status_received.inc()
        return OK_REPLY

    async def handle_ack(self, message: dict) -> dict:
        if self.device is None:
            raise PresenceError(errors.NOT_CONNECTED, "send connect with an assertion first")
        acked = await self.notifier.ack(self.device.email, message.get("ids"))
        return {"result": "OK", "acked": acked}

    # -- as the hub's DeviceConnection ----------------------------------------------------------------
    def notify(self, notifications: list[dict]) -> None:
        if not self.closed:
            self.peer.send_json({"type": "notifications", "notifications": notifications})

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.peer.close(code, reason)

    def disconnected(self) -> None:
        if self.device is not None:
            self.hub.detach(self.device, self)
