"""What every websocket session shares: JSON parsing, handling one message after the other, the
authentication deadline, and turning errors into replies."""

from __future__ import annotations

import json
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from presence import errors
from presence.errors import PresenceError
from presence.metrics import Metrics
from presence.store import StoreUnavailable

log = Logger()


class Peer(Protocol):
    """The socket as a session sees it (presence.ws.server.PresenceServerProtocol, or a list in tests)."""

    def send_json(self, message: Any) -> None: ...

    def send(self, message: Any) -> bool:
        """False if the connection no longer takes messages (closing or closed)."""

    def close(self, code: int, reason: str) -> None: ...

    # and, optionally, authenticated(): the session proved who its peer is (larger messages allowed)


OK_REPLY = json.dumps({"result": "OK"}, separators=(",", ":")).encode("utf-8")


def parse(text: str) -> dict:
    try:
        message = json.loads(text)
    except ValueError:
        raise PresenceError(errors.MALFORMED, "not valid JSON")
    except RecursionError:   # nested deeper than the interpreter's stack: hostile, not a node failure
        raise PresenceError(errors.MALFORMED, "not valid JSON: nested too deeply")
    if not isinstance(message, dict):
        raise PresenceError(errors.MALFORMED, "a message must be a JSON object")
    return message


def optional_ids(message: dict, name: str = "application_ids") -> frozenset[str] | None:
    value = message.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 1000:
        raise PresenceError(errors.BAD_FIELD, f"{name} must be a list of application ids (strings)")
    return frozenset(value)


class Session:
    """Messages of one connection are handled strictly in order, even when handling one waits on
    the store or the network; a client that piles up messages meanwhile is told to slow down."""

    max_waiting = 32
    kind = ""   # "device" or "application", for metrics
    log_connections = False   # Node sets it on its own subclasses from --log-connections
    # One of these per connection: slots keep it small.
    __slots__ = ("peer", "clock", "auth_timeout", "metrics", "closed", "_tail", "_waiting", "_deadline")

    def __init__(self, peer: Peer, clock: IReactorTime, auth_timeout: float, metrics: Metrics):
        self.peer = peer
        self.clock = clock
        self.metrics = metrics
        self.auth_timeout = auth_timeout
        self.closed = False
        self._tail: Deferred = succeed(None)
        self._waiting = 0
        self._deadline: IDelayedCall | None = None

    # -- called by the protocol ------------------------------------------------------------------
    def opened(self) -> None:
        self._deadline = self.clock.callLater(self.auth_timeout, self._too_late)

    def received(self, text: str) -> None:
        if self._waiting >= self.max_waiting:
            self.peer.send_json(PresenceError(errors.SLOW_DOWN, "too many messages waiting; slow down").reply())
            return
        self._waiting += 1
        tail = self._tail
        # Nothing in progress (fired, and not waiting on a message chained to it): start now,
        # without chaining a callback.
        if tail.called and not tail.paused:
            self._tail = ensureDeferred(self._handle(text))
        else:
            self._tail.addBoth(lambda _: ensureDeferred(self._handle(text)))

    def binary(self) -> None:
        self.fail(PresenceError(errors.BINARY, "binary frames are not supported; send JSON text",
                                errors.CLOSE_UNSUPPORTED))

    def lost(self) -> None:
        self.closed = True
        self.authenticated()
        self.disconnected()

    # -- for subclasses ------------------------------------------------------------------------------
    async def dispatch(self, message: dict) -> Any:
        raise NotImplementedError

    def disconnected(self) -> None:
        pass

    def authenticated(self) -> None:
        """Stop the authentication deadline, and let the peer take messages up to --max-message
        (until now --max-auth-message)."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        raise_limit = getattr(self.peer, "authenticated", None)   # test peers (lists) have no limit
        if raise_limit is not None:
            raise_limit()

    def fail(self, error: PresenceError) -> None:
        if self.closed:
            return
        self.peer.send_json(error.reply())
        if error.close_code is not None:
            self.closed = True
            self.peer.close(error.close_code, error.message)

    # -- inside -------------------------------------------------------------------------------------
    async def _handle(self, text: str) -> None:
        self._waiting -= 1
        if self.closed:
            return
        try:
            reply = await self.dispatch(parse(text))
        except PresenceError as e:
            self.fail(e)
        except StoreUnavailable as e:
            log.warn("store unavailable while handling a message: {why}", why=e, event="session.store_unavailable")
            self.fail(PresenceError(errors.UNAVAILABLE, "the node cannot reach its store; try again shortly"))
        except Exception:
            log.failure("unexpected error while handling a message", event="session.error")
            self.fail(PresenceError(errors.UNAVAILABLE, "internal error; try again shortly"))
        else:
            if reply is not None and not self.closed:
                if type(reply) is bytes:     # a reply encoded once for all (OK_REPLY)
                    self.peer.send(reply)
                else:
                    self.peer.send_json(reply)

    def refused(self, error: PresenceError) -> None:
        """Count an authentication that failed (the protocol's failures, by errno)."""
        self.metrics.handshake_failures[self.kind][error.errno].inc()
        log.info("{kind} authentication refused (errno {errno}): {message}", kind=self.kind, errno=error.errno,
                 message=error.message, event=self.kind + ".refused")

    def _too_late(self) -> None:
        self._deadline = None
        self.metrics.handshake_failures[self.kind][errors.AUTH_TIMEOUT].inc()
        log.info("{kind} did not authenticate within {timeout:g}s", kind=self.kind, timeout=self.auth_timeout,
                 event=self.kind + ".auth_timeout")
        self.fail(PresenceError(errors.AUTH_TIMEOUT, f"not authenticated within {self.auth_timeout:g} seconds",
                                errors.CLOSE_AUTH_TIMEOUT))
