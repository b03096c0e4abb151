"""The application session (``/<appid>``): authenticate with the API key, then receive status lists."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from presence import errors
from presence.apps import Applications
from presence.errors import PresenceError
from presence.metrics import Metrics
from presence.store import StoreUnavailable
from presence.streams import Streams
from presence.subscriber import Subscriber
from presence.ws.session import Peer, Session, log


def catch_up_fields(message: dict) -> tuple[int | None, bool]:
    """``since`` (a change number, to resume after) and ``sync`` (send the state first), checked."""
    since, sync = message.get("since"), message.get("sync", False)
    if since is not None and (type(since) is not int or since < 0):
        raise PresenceError(errors.BAD_FIELD, "since must be a change number (an integer >= 0)", errors.CLOSE_AUTH_FAILED)
    if type(sync) is not bool:
        raise PresenceError(errors.BAD_FIELD, "sync must be true or false", errors.CLOSE_AUTH_FAILED)
    if since is not None and sync:
        raise PresenceError(errors.BAD_FIELD, "send since or sync, not both (since resumes; sync sends the state)",
                            errors.CLOSE_AUTH_FAILED)
    return since, sync


class AppSession(Session):
    kind = "application"
    syncer: Any = None    # presence.sync.Syncer: Node sets it on its subclass (no slot per connection)
    __slots__ = ("notifier", "app", "app_id", "apps", "streams", "subscriber", "_authenticating")

    def __init__(self, peer: Peer, app_id: str, apps: Applications, streams: Streams, clock: IReactorTime,
                 auth_timeout: float, metrics: Metrics, notifier: Any):
        super().__init__(peer, clock, auth_timeout, metrics)
        self.notifier = notifier
        self.app: Any = None
        self.app_id = app_id
        self.apps = apps
        self.streams = streams
        self.subscriber: Subscriber | None = None
        self._authenticating = False

    async def dispatch(self, message: dict) -> Any:
        if self.subscriber is None and not self._authenticating:
            return await self.handle_key(message)
        if message.get("type") == "notify" and self.app is not None:
            return await self.handle_notify(message)
        raise PresenceError(errors.UNKNOWN_TYPE, 'unknown message type; an application may send {"type": "notify"}')

    async def handle_notify(self, message: dict) -> dict:
        results = await self.notifier.send(self.app, message.get("notifications"))
        return {"type": "notified", "results": results}

    async def handle_key(self, message: dict) -> None:
        self._authenticating = True
        try:
            since, sync = catch_up_fields(message)
            app = await self.apps.authenticate(self.app_id, message.get("key"))
        except PresenceError as e:
            self._authenticating = False
            self.refused(e)
            raise
        if self.closed:
            return None
        self.authenticated()
        self.app = app
        self.metrics.handshakes["application"].inc()
        if self.log_connections:
            log.info("application {app_id} connected", app_id=app.app_id, event="application.connected")
        self.peer.send_json({"result": "OK", "app_id": app.app_id})
        try:
            if since is None and not sync:
                subscriber = await self.streams.subscribe(self.app_id, self)
            else:
                subscriber = await self.syncer.subscribe(self.app_id, self)
        except StoreUnavailable as e:
            # After OK, an open connection must be a live one: closed, the application reconnects
            # (here or elsewhere) and takes what waits; left open, it would hear nothing again.
            log.warn("could not register application {app_id}'s stream ({why}); closing it so it reconnects",
                     app_id=self.app_id, why=e, event="application.subscribe_failed")
            raise PresenceError(errors.UNAVAILABLE, "the node cannot reach its store; reconnect shortly",
                                errors.CLOSE_INTERNAL) from e
        except Exception as e:
            log.failure("unexpected error registering application {app_id}'s stream", app_id=self.app_id,
                        event="application.subscribe_error")
            raise PresenceError(errors.UNAVAILABLE, "internal error; reconnect shortly", errors.CLOSE_INTERNAL) from e
        if self.closed:
            self.streams.unsubscribe(subscriber)
            return None
        self.subscriber = subscriber
        if since is not None or sync:
            try:
                await self.syncer.catch_up(subscriber, since)
            except Exception as e:
                # Held changes go back to the waiting queue; the application resumes again later.
                log.warn("catching up application {app_id} failed: {why}", app_id=self.app_id, why=e,
                         event="application.catch_up_failed")
                self.peer.send_json(PresenceError(errors.UNAVAILABLE, "could not catch up; reconnect and resume").reply())
                self.close(errors.CLOSE_INTERNAL, "could not catch up; reconnect and resume")
        return None

    # -- as the fan-out's Sink and the transport's producer ---------------------------------------------
    def send(self, message: Any) -> bool:
        return not self.closed and self.peer.send(message)

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.peer.close(code, reason)

    def pause(self) -> None:
        if self.subscriber is not None:
            self.subscriber.pause()

    def resume(self) -> None:
        if self.subscriber is not None:
            self.subscriber.resume()

    def disconnected(self) -> None:
        if self.subscriber is not None:
            self.streams.unsubscribe(self.subscriber)
            self.subscriber = None
