"""The websocket listener: a lean RFC 6455 server protocol that hands messages to a session, and
the factory that routes a request path to the right session, remembers open connections for a
clean stop, and runs the one timer wheel for handshake deadlines and keep-alive pings.

Why not Autobahn's server protocol (Autobahn remains the client of the tests and the reference of
the benchmark): a node holds tens of thousands of idle connections, and an Autobahn server
connection carries an instance dictionary of about seventy attributes, a deque and timers of its
own (8.96 KiB of RSS per idle connection, measured in bench/), where this one is a slots object of
a few words on top of Twisted's transport. It speaks only what Presence needs: text messages (no
extensions, no subprotocols), pings, and the close handshake; the framing rules are in
``presence.ws.frames``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

from twisted.internet import tcp
from twisted.internet.interfaces import IProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from presence.errors import CLOSE_TOO_SLOW
from presence.metrics import Metrics
from presence.ws import frames
from presence.ws.frames import HandshakeError, ProtocolViolation
from presence.ws.session import Peer, Session

log = Logger()

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)
FRAMES_PER_TURN = 64          # frames of one connection handled per reactor turn; the rest in the next
_GROW_IN_PLACE = 64 * 1024   # an unfinished frame over this many bytes is buffered in a bytearray


class Prepared(bytes):
    """A whole text frame, made once and written as is to many connections."""

    __slots__ = ()


@implementer(IProtocol, IPushProducer)
class PresenceServerProtocol:
    """One connection. Also the producer registered on its transport, so that the session learns
    when the peer stops reading (pause) and catches up (resume)."""

    __slots__ = ("factory", "transport", "session", "state", "_buffer", "_parts", "_size", "_limit", "_unread",
                 "_idle", "_direct", "_close_timer")

    def __init__(self, factory: "PresenceServerFactory"):
        self.factory = factory
        self.transport: Any = None
        self.session: Session | None = None
        self.state = _HANDSHAKE
        self._buffer = b""
        self._parts: list[bytes] | None = None   # the frames of an unfinished fragmented (text) message
        self._size = 0                           # and their bytes so far
        self._limit = factory.max_auth_message   # largest message: smaller until the session authenticates
        self._unread: int | None = None          # bytes written since the peer stopped reading (None: it reads)
        self._idle = 0                           # keep-alive: sweeps since the peer was last heard
        self._direct = False
        self._close_timer: Any = None

    # -- IProtocol --------------------------------------------------------------------------------
    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        # Only a TCP transport has the buffers _write looks at (and it checks for TLS on it).
        self._direct = isinstance(transport, tcp.Connection)
        self.connectionMade()

    def connectionMade(self) -> None:
        self.factory.handshaking[self] = self.factory.clock.seconds()

    def logPrefix(self) -> str:
        return "PresenceServerProtocol"

    def dataReceived(self, data: bytes) -> None:
        self._idle = 0
        buffer = self._buffer
        if not buffer:
            self._buffer = data
        elif type(buffer) is bytearray:
            buffer += data                  # a large frame on its way: appended in place (see _frames)
        else:
            self._buffer = buffer + data
        try:
            if self.state == _HANDSHAKE:
                self._handshake()
            if self.state in (_OPEN, _CLOSING) and self._buffer:
                self._frames()
        except ProtocolViolation as e:
            self._fail(e.code, e.reason)

    def connectionLost(self, reason: Any = None) -> None:
        factory = self.factory
        factory.handshaking.pop(self, None)
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        was_open = self.state in (_OPEN, _CLOSING)
        self.state = _CLOSED
        session, self.session = self.session, None
        if was_open and self in factory.open_connections:
            factory.open_connections.discard(self)
            factory.metrics.connections[session.kind].inc(-1)
        if was_open and session is not None:
            session.lost()
        # No cycle through the transport survives the connection: reference counting frees both.
        self.transport = None
        self._buffer = b""
        self._parts = None

    # -- IPushProducer ----------------------------------------------------------------------------
    def pauseProducing(self) -> None:
        """The transport's buffer is full: the peer does not read what we write. Stop reading what it
        sends until it does (its requests would only pile up replies), and count what is written
        meanwhile against --max-output."""
        self._unread = 0
        self._reading(False)
        pause = getattr(self.session, "pause", None)
        if pause:
            pause()

    def resumeProducing(self) -> None:
        self._unread = None
        self._reading(True)
        resume = getattr(self.session, "resume", None)
        if resume:
            resume()

    def _reading(self, on: bool) -> None:
        t = self.transport
        while t is not None and not hasattr(t, "pauseProducing"):
            t = getattr(t, "transport", None)   # TLS: the TCP connection under it
        if t is not None and self.state != _CLOSED:
            t.resumeProducing() if on else t.pauseProducing()

    def stopProducing(self) -> None:
        pass

    # -- the opening handshake --------------------------------------------------------------------
    def _handshake(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end > frames.MAX_REQUEST or (end < 0 and len(self._buffer) > frames.MAX_REQUEST):
            self._refuse(HandshakeError(431, f"the handshake request is over {frames.MAX_REQUEST} bytes"))
            return
        if end < 0:
            return
        head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
        try:
            request = frames.parse_request(head)
            self.session = self.factory.route(request.path, self)
        except HandshakeError as e:
            self._refuse(e)
            return
        factory = self.factory
        factory.handshaking.pop(self, None)
        self.state = _OPEN
        self._write(frames.accept(request.key))
        factory.open_connections.add(self)
        factory.metrics.connections[self.session.kind].inc()
        self.transport.registerProducer(self, True)
        self.session.opened()

    def _refuse(self, error: HandshakeError) -> None:
        self.factory.handshaking.pop(self, None)
        self.state = _CLOSED
        self._buffer = b""
        self.transport.write(frames.refusal(error.status, error.reason, error.headers))
        self.transport.loseConnection()

    # -- frames -----------------------------------------------------------------------------------
    def _frames(self) -> bool:
        """Handle the frames in the buffer; True if some are left for a later turn."""
        received, rest = frames.parse_frames(self._buffer, self._limit, FRAMES_PER_TURN)
        # What is left is the start of an unfinished frame. A large one comes in many reads: joining
        # each read to all of it before (bytes + bytes) would cost the square of its size, so it
        # grows in place in a bytearray until it is whole.
        if len(rest) > _GROW_IN_PLACE and type(rest) is bytes:
            rest = bytearray(rest)
        self._buffer = rest
        for fin, opcode, payload in received:
            if self.state == _CLOSED:
                return False
            if opcode == frames.CLOSE:
                self._peer_closed(payload)
            elif opcode == frames.PING:
                if self.state == _OPEN:
                    self._write(frames.encode(frames.PONG, payload))
            elif opcode == frames.PONG:
                pass                       # hearing from the peer is what keep-alive wants
            elif self.state == _OPEN:      # data after our close frame is dropped (RFC 6455 5.5.1)
                self._data(fin, opcode, payload)
        if len(received) == FRAMES_PER_TURN and self._buffer and self.state != _CLOSED:
            # More frames may be waiting: the rest in a later reactor turn, so that one peer's burst
            # (tens of thousands of small messages in one read) does not stall everyone else. Its
            # socket is not read meanwhile.
            self._reading(False)
            self.factory.clock.callLater(0, self._more)
            return True
        return False

    def _more(self) -> None:
        if self.state not in (_OPEN, _CLOSING) or self.transport is None:
            return
        try:
            if self._frames():
                return
        except ProtocolViolation as e:
            self._fail(e.code, e.reason)
            return
        if self.state != _CLOSED and self._unread is None:   # unless the peer does not read our replies
            self._reading(True)

    def _data(self, fin: bool, opcode: int, payload: bytes) -> None:
        parts = self._parts
        if opcode == frames.CONTINUATION:
            if parts is None:
                raise ProtocolViolation(frames.PROTOCOL_ERROR, "a continuation frame without a message to continue")
            # A running total (not a sum over the parts per frame) and a count: assembling a message
            # costs its size, however it is cut.
            size = self._size + len(payload)
            if size > self._limit:
                raise ProtocolViolation(frames.TOO_BIG, f"a message over the limit of {self._limit} bytes")
            if len(parts) >= self.factory.max_fragments:
                raise ProtocolViolation(frames.TOO_BIG, f"a message in more than {self.factory.max_fragments} frames")
            parts.append(payload)
            if not fin:
                self._size = size
                return
            payload, self._parts, self._size = b"".join(parts), None, 0
        elif parts is not None:
            raise ProtocolViolation(frames.PROTOCOL_ERROR, "a new message before the fragmented one ended")
        elif opcode == frames.BINARY:
            # Refused at its first frame: a fragmented binary message is never assembled.
            self.session.binary()
            if self.state == _OPEN:
                self.close(frames.UNSUPPORTED, "binary frames are not supported; send JSON text")
            return
        elif not fin:
            self._parts, self._size = [payload], len(payload)
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation(frames.INVALID_DATA, "a text message must be UTF-8")
        self.session.received(text)

    def _peer_closed(self, payload: bytes) -> None:
        code, _ = frames.parse_close(payload)
        if self.state != _OPEN:
            # The peer answered our close: it has read everything we sent, so nothing is left to
            # flush. Hang up at once: over TLS a graceful loseConnection waits for the peer's
            # close_notify, which a client waiting for the server to drop TCP (RFC 6455 7.1.1) never
            # sends, and the close timer would hold every TLS connection close_timeout seconds.
            self.state = _CLOSING
            self.abort()
            return
        # Answer with the same code; the server closes the TCP connection (RFC 6455 7.1.1) once the
        # answer is out, and gives up after close_timeout if the peer holds TLS shutdown open.
        self._write(frames.close_frame(code if code is not None else frames.NORMAL))
        self.state = _CLOSING
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.factory.clock.callLater(self.factory.close_timeout, self.abort)

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: tell it why and hang up (RFC 6455 7.1.7)."""
        self._buffer, self._parts, self._size = b"", None, 0
        was_open, self.state = self.state == _OPEN, _CLOSING
        if was_open:
            self.factory.metrics.closes[code].inc()
            self._write(frames.close_frame(code, reason))
        self.transport.loseConnection()

    # -- writing ----------------------------------------------------------------------------------
    def _write(self, data: bytes) -> bool:
        """False only when --max-output refused it (the connection is then closing)."""
        t = self.transport
        # Twisted's write() buffers and waits for the socket to become writable (an epoll
        # registration and a reactor turn per message); when nothing is buffered, sending at once
        # keeps the order and saves both, which is most of a fan-out's cost beyond send() itself.
        # What the socket does not take goes through write() as usual (tests/test_ws_server.py).
        # With TLS on the connection (ssl: listeners), bytes must go through write() to be encrypted.
        if self._direct and not t.TLS and not t.dataBuffer and not t._tempDataLen and t.connected and not t.disconnecting:
            # The socket itself, not writeSomeData (a memoryview and a retry wrapper per call): a
            # fan-out does this 19,000 times in a row. A socket that cannot take it all, or fails,
            # leaves the rest to write(), which buffers it or finds the connection lost.
            try:
                sent = t.socket.send(data)
            except OSError:          # EAGAIN, EINTR, or a broken connection: write() will tell
                sent = 0
            if sent == len(data):
                return True
            data = data[sent:]
        elif self._unread is not None:
            # The peer does not read (the transport paused us): bounded by --max-output, past it the
            # connection is closed (and aborted if it does not answer the close in time).
            self._unread += len(data)
            if self._unread > self.factory.max_output and self.state == _OPEN:
                log.info("closing a connection that does not read: over {limit} bytes wait for it",
                         limit=self.factory.max_output, event="websocket.output_overflow")
                self.close(CLOSE_TOO_SLOW, f"too slow: over {self.factory.max_output} bytes unread")
                return False
        t.write(data)
        return True

    # -- Peer -------------------------------------------------------------------------------------
    def send_json(self, message: Any) -> None:
        self.send(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def send(self, message: bytes) -> bool:
        """Payload bytes, or a frame the factory prepared once for many connections. False if it was
        not taken: the connection is closing, or the peer stopped reading past --max-output."""
        if self.state != _OPEN:
            return False
        return self._write(message if type(message) is Prepared else frames.encode(frames.TEXT, message))

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake; the peer has ``close_timeout`` seconds to answer it."""
        if self.state != _OPEN:
            return
        self.factory.metrics.closes[code].inc()
        self.state = _CLOSING
        self._write(frames.close_frame(code, reason))
        self._close_timer = self.factory.clock.callLater(self.factory.close_timeout, self.abort)

    def authenticated(self) -> None:
        """The session authenticated its peer: messages up to --max-message from now on."""
        self._limit = self.factory.max_message

    def ping(self) -> None:
        if self.state == _OPEN:
            self._write(frames.encode(frames.PING, b""))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class PresenceServerFactory(Factory):
    """Every connection of the listener, and one wheel for their deadlines (no timer each)."""

    def __init__(self, route: Callable[[str, Peer], Session], reactor: IReactorTime, metrics: Metrics, *,
                 max_message: int, handshake_timeout: float, ping_interval: float, close_timeout: float = 5.0,
                 max_auth_message: int | None = None, max_fragments: int = 1024, max_output: int = 8 << 20):
        self.route = route
        self.clock = reactor
        self.metrics = metrics
        self.max_message = max_message
        # None: no smaller limit before authentication (sessions without one, such as the tests' echo)
        self.max_auth_message = max_message if max_auth_message is None else min(max_auth_message, max_message)
        self.max_fragments = max_fragments
        self.max_output = max_output
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout
        self.open_connections: set[PresenceServerProtocol] = set()
        self.handshaking: dict[PresenceServerProtocol, float] = {}
        self._deadlines = LoopingCall(self._expire_handshakes)
        self._deadlines.clock = reactor
        self._pings = LoopingCall(self._sweep)
        self._pings.clock = reactor
        self._sweeping: Iterator[PresenceServerProtocol] | None = None

    def buildProtocol(self, addr: Any) -> PresenceServerProtocol:
        return PresenceServerProtocol(self)

    def prepare(self, payload: bytes) -> Prepared:
        return Prepared(frames.encode(frames.TEXT, payload))

    def startFactory(self) -> None:
        self._deadlines.start(min(1.0, self.handshake_timeout / 4), now=False)
        if self.ping_interval > 0:
            self._pings.start(self.ping_interval, now=False)

    def stopFactory(self) -> None:
        for loop in (self._deadlines, self._pings):
            if loop.running:
                loop.stop()
        self._sweeping = None

    # -- the wheel --------------------------------------------------------------------------------
    def _expire_handshakes(self) -> None:
        too_old = self.clock.seconds() - self.handshake_timeout
        for protocol, since in list(self.handshaking.items()):
            if since <= too_old:
                del self.handshaking[protocol]
                log.info("dropped a connection that did not finish its handshake within {timeout:g}s",
                         timeout=self.handshake_timeout, event="websocket.handshake_timeout")
                protocol.abort()

    SWEEP_SLICE = 2000  # connections looked at per reactor turn: a sweep never stalls the loop

    def _sweep(self) -> None:
        """Every ping interval: a peer heard since the last sweep is fine; one not heard gets a
        ping; one that did not answer the last ping either is dropped."""
        if self._sweeping is None:
            self._sweeping = iter(list(self.open_connections))
            self._sweep_slice()

    def _sweep_slice(self) -> None:
        if self._sweeping is None:
            return
        looked = 0
        for protocol in self._sweeping:
            if protocol.state == _OPEN:
                protocol._idle += 1
                if protocol._idle == 2:
                    protocol.ping()
                elif protocol._idle > 2:
                    log.info("dropped a connection that did not answer a ping within {interval:g}s",
                             interval=self.ping_interval, event="websocket.ping_timeout")
                    protocol.abort()
            looked += 1
            if looked == self.SWEEP_SLICE:
                self.clock.callLater(0, self._sweep_slice)
                return
        self._sweeping = None


def not_found(path: str) -> HandshakeError:
    return HandshakeError(404, f"no websocket at {path}: use /presence for devices or /<appid> for applications")
