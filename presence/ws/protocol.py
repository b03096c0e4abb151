"""The Autobahn side: a thin protocol that hands frames to a session, and the factory that routes
a request path to the right session and remembers open connections for a clean stop."""

from __future__ import annotations

import json
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from presence.metrics import Metrics
from presence.ws.session import Peer, Session


@implementer(IPushProducer)
class _Backpressure:
    """Registered on the transport so the session learns when the peer stops reading."""

    def __init__(self, session: Session):
        self.session = session

    def pauseProducing(self) -> None:
        pause = getattr(self.session, "pause", None)
        if pause:
            pause()

    def resumeProducing(self) -> None:
        resume = getattr(self.session, "resume", None)
        if resume:
            resume()

    def stopProducing(self) -> None:
        pass


_SHARED_TRAFFIC = TrafficStats()
_HANDSHAKE_LEFTOVERS = ("http_request_data", "http_headers", "http_request_params", "http_response_data",
                        "http_status_line", "http_request_uri", "websocket_extensions", "websocket_protocols")


class PresenceServerProtocol(WebSocketServerProtocol):
    session: Session | None = None

    def onConnect(self, request):
        # route() raises ConnectionDeny for a path that is neither /presence nor /<appid>
        self.session = self.factory.route(request.path, self)
        return None

    def onOpen(self) -> None:
        # The opening handshake is over: its request and headers are not needed any more.
        for name in _HANDSHAKE_LEFTOVERS:
            self.__dict__.pop(name, None)
        # Autobahn counts octets and frames into these unconditionally; nobody reads them here,
        # so all connections share one object instead of a dozen counters each.
        self.trafficStats = _SHARED_TRAFFIC
        self.factory.open_connections.add(self)
        self.factory.metrics.connections[self.session.kind].inc()
        self.transport.registerProducer(_Backpressure(self.session), True)
        self.session.opened()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.session.binary()
        else:
            self.session.received(payload.decode("utf-8"))  # Autobahn has validated the UTF-8

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        # Break the cycles through this protocol (its transport; is_closed, resolved with the
        # protocol itself) so that reference counting frees a closed connection at once, without
        # waiting for (or surviving a freeze of) the garbage collector.
        self.transport = None
        self.is_open = self.is_closed = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self in self.factory.open_connections:
            self.factory.open_connections.discard(self)
            self.factory.metrics.connections[self.session.kind].dec()
        if self.session is not None:
            session, self.session = self.session, None
            session.lost()

    # -- Peer -----------------------------------------------------------------------------------------
    def send_json(self, message: Any) -> None:
        self.send(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def send(self, message: Any) -> None:
        """Payload bytes, or a message the factory prepared once for many connections."""
        if self.state == self.STATE_OPEN:
            if isinstance(message, bytes):
                self.sendMessage(message)
            else:
                self.sendPreparedMessage(message)

    def close(self, code: int, reason: str) -> None:
        # sendCloseFrame, not sendClose: a server may send 1001/1003/1011, which sendClose refuses.
        if self.state == self.STATE_OPEN:
            self.factory.metrics.closes[code].inc()
            self.sendCloseFrame(code, reason.encode("utf-8")[:120].decode("utf-8", "ignore").encode("utf-8"))


class PresenceServerFactory(WebSocketServerFactory):
    protocol = PresenceServerProtocol

    def __init__(self, route: Callable[[str, Peer], Session], reactor: Any, metrics: Metrics, *,
                 max_message: int, handshake_timeout: float, ping_interval: float):
        super().__init__(reactor=reactor)
        self.route = route
        self.metrics = metrics
        self.open_connections: set[PresenceServerProtocol] = set()
        self.setProtocolOptions(
            maxFramePayloadSize=max_message,
            maxMessagePayloadSize=max_message,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=5,
            failByDrop=False,  # protocol violations get a close frame with a code, not a bare drop
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_interval,
            perMessageCompressionAccept=lambda offers: None,
        )

        # Autobahn copies every setting (about thirty) into each connection unless the protocol class
        # has it already: give this factory a protocol class that holds them, once.
        settings = {name: getattr(self, name) for name in PresenceServerProtocol.CONFIG_ATTRS}
        self.protocol = type("PresenceServerProtocol", (PresenceServerProtocol,), {**settings, "CONFIG_ATTRS": ()})

    def close_all(self, code: int, reason: str) -> None:
        for protocol in list(self.open_connections):
            protocol.close(code, reason)


def not_found(path: str) -> ConnectionDeny:
    return ConnectionDeny(404, f"no websocket at {path}: use /presence for devices or /<appid> for applications")
