"""The lean websocket server: the RFC 6455 rules in presence.ws.frames, and the connection in
presence.ws.server driven without sockets (StringTransport, Clock), plus its direct writes over a
real loopback socket."""

from __future__ import annotations

import base64
import os
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

from presence.metrics import Metrics
from presence.ws import frames
from presence.ws.frames import HandshakeError, ProtocolViolation
from presence.ws.server import PresenceServerFactory, Prepared, not_found

KEY = "dGhlIHNhbXBsZSBub25jZQ=="   # the example of RFC 6455 section 1.3


def request(path: str = "/presence", **extra: str) -> bytes:
    headers = {"Host": "node.example", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
               "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13", **extra}
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def masked(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04", rsv: int = 0) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + mask + frames.unmask(mask, payload)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Parse what a server sent (unmasked frames)."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "a server must not mask"
        n, head = b1 & 0x7F, 2
        if n == 126:
            n, head = struct.unpack("!H", data[pos + 2:pos + 4])[0], 4
        elif n == 127:
            n, head = struct.unpack("!Q", data[pos + 2:pos + 10])[0], 10
        out.append((b0 & 0x0F, data[pos + head:pos + head + n]))
        pos += head + n
    return out


class FakeSession:
    kind = "device"

    def __init__(self, peer):
        self.peer = peer
        self.events: list = []

    def opened(self):
        self.events.append("opened")

    def received(self, text):
        self.events.append(("text", text))

    def binary(self):
        self.events.append("binary")

    def lost(self):
        self.events.append("lost")

    def pause(self):
        self.events.append("pause")

    def resume(self):
        self.events.append("resume")


class Server:
    def __init__(self, clock=None, **options):
        self.clock = clock or Clock()
        self.sessions: list[FakeSession] = []
        settings = dict(max_message=1024, handshake_timeout=10, ping_interval=30)
        settings.update(options)
        self.factory = PresenceServerFactory(self.route, self.clock, Metrics(), **settings)

    def route(self, path, peer):
        if path != "/presence":
            raise not_found(path)
        session = FakeSession(peer)
        self.sessions.append(session)
        return session

    def connect(self, handshake: bytes | None = None):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        if handshake is not None:
            protocol.dataReceived(handshake)
        return protocol, transport

    def open(self):
        protocol, transport = self.connect(request())
        assert transport.value().startswith(b"HTTP/1.1 101 ")
        transport.clear()
        return protocol, transport, self.sessions[-1]


# -- the opening handshake -------------------------------------------------------------------------
def test_the_accept_key_is_the_one_of_the_rfc_example():
    answer = frames.accept(KEY)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("change, status", [
    ({"Upgrade": None}, 426),
    ({"Connection": "keep-alive"}, 400),
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400),
    ({"Sec-WebSocket-Key": "not base64!"}, 400),
    ({"Host": None}, 400),
])
def test_bad_handshakes_are_refused_with_a_status(change, status):
    with pytest.raises(HandshakeError) as e:
        frames.parse_request(request(**change)[:-4])
    assert e.value.status == status


def test_other_methods_and_versions_are_refused():
    with pytest.raises(HandshakeError) as e:
        frames.parse_request(request().replace(b"GET", b"POST")[:-4])
    assert e.value.status == 405
    with pytest.raises(HandshakeError) as e:
        frames.parse_request(request().replace(b"HTTP/1.1", b"HTTP/1.0")[:-4])
    assert e.value.status == 505


def test_the_path_drops_the_query_and_headers_are_case_insensitive():
    parsed = frames.parse_request(request("/app123?x=1").replace(b"Upgrade: websocket", b"UPGRADE: WebSocket")[:-4])
    assert parsed.path == "/app123"
    assert parsed.key == KEY


def test_a_handshake_split_over_many_packets_opens_once_it_is_whole():
    server = Server()
    protocol, transport = server.connect()
    data = request()
    for i in range(0, len(data), 7):
        assert transport.value() == b""
        protocol.dataReceived(data[i:i + 7])
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    assert server.sessions[0].events == ["opened"]
    assert protocol in server.factory.open_connections
    assert protocol not in server.factory.handshaking


def test_an_unknown_path_gets_404_with_the_reason_and_a_hang_up():
    server = Server()
    protocol, transport = server.connect(request("/nowhere"))
    assert transport.value().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"no websocket at /nowhere" in transport.value()
    assert transport.disconnecting
    assert server.sessions == [] and protocol not in server.factory.handshaking


def test_an_endless_request_head_is_refused():
    server = Server()
    protocol, transport = server.connect(b"GET /presence HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000)
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting


def test_frames_sent_right_after_the_handshake_are_not_lost():
    server = Server()
    protocol, transport = server.connect(request() + masked(frames.TEXT, b'{"a":1}'))
    assert server.sessions[0].events == ["opened", ("text", '{"a":1}')]


def test_a_handshake_that_never_ends_is_dropped_by_the_deadline_wheel():
    server = Server(handshake_timeout=2)
    server.factory.startFactory()
    protocol, transport = server.connect(b"GET /presence HTTP/1.1\r\n")
    server.clock.advance(1.5)
    assert not transport.disconnecting
    server.clock.advance(1.0)
    assert transport.disconnecting          # StringTransport records abortConnection this way
    assert protocol not in server.factory.handshaking
    server.factory.stopFactory()


# -- frames ----------------------------------------------------------------------------------------
def test_unmask_is_its_own_inverse_at_every_length():
    for n in (0, 1, 3, 4, 5, 125, 126, 65535, 65536, 100_003):
        data = os.urandom(n)
        mask = os.urandom(4)
        once = frames.unmask(mask, data)
        assert frames.unmask(mask, once) == data
        if n:
            assert once[0] == data[0] ^ mask[0] and once[-1] == data[-1] ^ mask[(n - 1) % 4]


@pytest.mark.parametrize("n", [0, 5, 125, 126, 65535, 65536, 70000])
def test_frames_of_every_length_encoding_round_trip(n):
    payload = os.urandom(n)
    parsed, rest = frames.parse_frames(masked(frames.BINARY, payload) * 2, 100_000)
    assert [f.payload for f in parsed] == [payload, payload] and rest == b""
    assert server_frames(frames.encode(frames.BINARY, payload)) == [(frames.BINARY, payload)]


def test_an_unfinished_frame_stays_in_the_buffer():
    data = masked(frames.TEXT, b"hello world")
    for cut in range(len(data)):
        parsed, rest = frames.parse_frames(data[:cut], 1024)
        assert parsed == [] and rest == data[:cut]


@pytest.mark.parametrize("data, code", [
    (bytes((0x81, 0x05)) + b"hello", 1002),                                  # not masked
    (masked(frames.TEXT, b"x", rsv=0x40), 1002),                             # RSV1 without extension
    (masked(0x3, b"x"), 1002),                                               # unknown opcode
    (masked(frames.PING, b"x", fin=False), 1002),                            # fragmented control frame
    (masked(frames.PING, b"x" * 126), 1002),                                 # control frame too long
    (struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + b"\0" * 4, 1002),            # length's top bit
    (struct.pack("!BBQ", 0x82, 0xFF, 10**9), 1009),                           # announced too big
])
def test_framing_violations(data, code):
    with pytest.raises(ProtocolViolation) as e:
        frames.parse_frames(data, 1024)
    assert e.value.code == code


def test_a_frame_over_the_limit_is_refused_from_its_header_alone():
    with pytest.raises(ProtocolViolation) as e:
        frames.parse_frames(struct.pack("!BBH", 0x81, 0xFE, 2000), 1024)   # 4 bytes: no payload yet
    assert e.value.code == 1009


@pytest.mark.parametrize("payload, expected", [
    (b"", (None, "")), (b"\x03\xe8", (1000, "")), (struct.pack("!H", 4001) + "bye ü".encode(), (4001, "bye ü")),
])
def test_close_payloads(payload, expected):
    assert frames.parse_close(payload) == expected


@pytest.mark.parametrize("payload, code", [
    (b"\x03", 1002), (struct.pack("!H", 1005), 1002), (struct.pack("!H", 999), 1002),
    (struct.pack("!H", 5000), 1002), (struct.pack("!H", 1000) + b"\xff", 1007),
])
def test_bad_close_payloads(payload, code):
    with pytest.raises(ProtocolViolation) as e:
        frames.parse_close(payload)
    assert e.value.code == code


def test_a_long_close_reason_is_cut_on_a_character_boundary():
    [(opcode, payload)] = server_frames(frames.close_frame(4000, "é" * 100))
    assert opcode == frames.CLOSE and len(payload) <= 125
    assert frames.parse_close(payload) == (4000, "é" * 61)


# -- the connection --------------------------------------------------------------------------------
def test_text_messages_reach_the_session_whole_fragmented_or_not():
    protocol, transport, session = Server().open()
    protocol.dataReceived(masked(frames.TEXT, "héllo".encode()))
    protocol.dataReceived(masked(frames.TEXT, b'{"a"', fin=False) + masked(frames.PING, b"p")
                          + masked(frames.CONTINUATION, b":", fin=False))
    protocol.dataReceived(masked(frames.CONTINUATION, b"1}"))
    assert session.events == ["opened", ("text", "héllo"), ("text", '{"a":1}')]
    assert server_frames(transport.value()) == [(frames.PONG, b"p")]   # a ping in between is answered


def test_binary_messages_are_handed_to_the_session_to_refuse():
    protocol, transport, session = Server().open()
    protocol.dataReceived(masked(frames.BINARY, b"\x00\x01"))
    assert session.events == ["opened", "binary"]


@pytest.mark.parametrize("data, code", [
    (masked(frames.TEXT, b"\xff\xfe"), 1007),
    (masked(frames.CONTINUATION, b"x"), 1002),
    (masked(frames.TEXT, b"a", fin=False) + masked(frames.TEXT, b"b"), 1002),
    (masked(frames.TEXT, b"a" * 1025), 1009),
    (masked(frames.TEXT, b"a" * 600, fin=False) + masked(frames.CONTINUATION, b"a" * 600), 1009),
    (bytes((0x81, 0x05)) + b"hello", 1002),
])
def test_a_peer_that_breaks_the_protocol_is_told_why_and_dropped(data, code):
    protocol, transport, session = Server().open()
    protocol.dataReceived(data)
    [(opcode, payload)] = server_frames(transport.value())
    assert opcode == frames.CLOSE and frames.parse_close(payload)[0] == code
    assert transport.disconnecting
    assert [e for e in session.events if e != "opened"] == []     # nothing half-parsed was delivered
    protocol.dataReceived(masked(frames.TEXT, b"after"))           # and nothing after it is
    protocol.connectionLost(None)
    assert session.events == ["opened", "lost"]


def test_a_close_from_the_peer_is_answered_with_its_code_then_the_server_hangs_up():
    server = Server()
    protocol, transport, session = server.open()
    protocol.dataReceived(masked(frames.CLOSE, struct.pack("!H", 1000) + b"bye") + masked(frames.TEXT, b"late"))
    assert server_frames(transport.value()) == [(frames.CLOSE, struct.pack("!H", 1000))]
    assert transport.disconnecting and session.events == ["opened"]
    protocol.connectionLost(None)
    assert session.events == ["opened", "lost"]
    assert protocol not in server.factory.open_connections
    assert protocol.transport is None and protocol.session is None   # no cycle left to collect


def test_a_close_the_server_starts_waits_for_the_answer_then_hangs_up():
    server = Server()
    protocol, transport, session = server.open()
    protocol.close(4001, "unknown application")
    assert server_frames(transport.value()) == [(frames.CLOSE, struct.pack("!H", 4001) + b"unknown application")]
    protocol.send(b'["ignored"]')                                   # nothing goes after a close frame
    assert len(server_frames(transport.value())) == 1
    assert not transport.disconnecting
    protocol.dataReceived(masked(frames.CLOSE, struct.pack("!H", 4001)))
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert not server.clock.getDelayedCalls()                       # the close timer is gone


def test_a_peer_that_never_answers_the_close_is_aborted():
    server = Server(close_timeout=5)
    protocol, transport, session = server.open()
    protocol.close(1001, "node stopping")
    server.clock.advance(4.9)
    assert not transport.disconnecting
    server.clock.advance(0.2)
    assert transport.disconnecting


def test_prepared_frames_and_payloads_are_sent_as_text_frames():
    server = Server()
    protocol, transport, session = server.open()
    prepared = server.factory.prepare(b'[{"email":"a@example.com","status":"online"}]')
    assert isinstance(prepared, Prepared)
    protocol.send(prepared)
    protocol.send(b"[]")
    protocol.send_json({"result": "OK"})
    assert server_frames(transport.value()) == [
        (frames.TEXT, b'[{"email":"a@example.com","status":"online"}]'), (frames.TEXT, b"[]"),
        (frames.TEXT, b'{"result":"OK"}')]


def test_backpressure_reaches_the_session():
    protocol, transport, session = Server().open()
    assert transport.producer is protocol and transport.streaming
    protocol.pauseProducing()
    protocol.resumeProducing()
    assert session.events == ["opened", "pause", "resume"]


def test_a_connection_is_a_slots_object():
    protocol, transport, session = Server().open()
    assert not hasattr(protocol, "__dict__")


def test_keep_alive_pings_a_silent_peer_and_drops_it_when_it_does_not_answer():
    server = Server(ping_interval=30)
    server.factory.SWEEP_SLICE = 2        # several reactor turns per sweep
    server.factory.startFactory()
    talkative = [server.open() for _ in range(3)]
    silent, silent_transport, _ = server.open()
    answering, answering_transport, _ = server.open()

    def sweep():
        server.clock.advance(30)
        for _ in range(5):
            server.clock.advance(0)       # the sweep's further slices

    sweep()                               # everyone was heard since they connected
    assert silent_transport.value() == b""
    for protocol, _, _ in talkative:
        protocol.dataReceived(masked(frames.TEXT, b"{}"))
    sweep()
    assert server_frames(silent_transport.value()) == [(frames.PING, b"")]
    assert server_frames(answering_transport.value()) == [(frames.PING, b"")]
    for protocol, transport, _ in talkative:
        assert transport.value() == b""
    answering.dataReceived(masked(frames.PONG, b""))
    sweep()
    assert silent_transport.disconnecting
    assert not answering_transport.disconnecting
    server.factory.stopFactory()


# -- over a real socket ----------------------------------------------------------------------------
class _SlowReader(Protocol):
    """A client that stops reading until the server has written far more than the socket holds."""

    def __init__(self):
        self.data = b""
        self.done = Deferred()
        self.expected = 0

    def connectionMade(self):
        self.transport.write(request())

    def dataReceived(self, data):
        self.data += data
        if b"\r\n\r\n" in self.data and self.transport.producer is None and not hasattr(self, "paused"):
            self.paused = True
            self.transport.pauseProducing()
            reactor.callLater(0.3, self.transport.resumeProducing)
        head, _, rest = self.data.partition(b"\r\n\r\n")
        if self.expected and rest and len(rest) >= self.expected and not self.done.called:
            self.done.callback(rest)


@pytest_twisted.ensureDeferred
async def test_direct_writes_keep_their_order_when_the_socket_is_full():
    """Messages go straight to the socket while nothing is buffered and through Twisted's buffer
    once the socket is full: the peer must get every byte in order either way."""
    messages = [(b"%06d" % i) * 5000 for i in range(200)]      # 30 KB each, 6 MB in all
    sent = []

    class Sender(FakeSession):
        def opened(self):
            for m in messages:
                self.peer.send(m)
            sent.append(len(self.peer.transport.dataBuffer) + self.peer.transport._tempDataLen)

    server = Server(clock=reactor, max_message=64 * 1024)
    server.route = lambda path, peer: Sender(peer)
    server.factory.route = server.route
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.factory)
    client = _SlowReader()
    client.expected = sum(len(frames.encode(frames.TEXT, m)) for m in messages)
    try:
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        timer = reactor.callLater(20, client.done.cancel)
        rest = await client.done
        timer.cancel()
        assert sent[0] > 0        # the socket filled up, so both paths were taken
        assert [payload for _, payload in server_frames(rest)] == messages
    finally:
        client.transport.loseConnection()
        await port.stopListening()
        await deferLater(reactor, 0.05, lambda: None)


# -- hostile input (issue 14) ----------------------------------------------------------------------
def turns(clock) -> None:
    """Run the reactor turns a connection asked for (callLater(0))."""
    while any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
        clock.advance(0)


def test_a_burst_of_messages_is_handled_a_slice_per_reactor_turn_without_reading_meanwhile():
    from presence.ws.server import FRAMES_PER_TURN

    server = Server()
    protocol, transport, session = server.open()
    protocol.dataReceived(masked(frames.TEXT, b"{}") * (FRAMES_PER_TURN * 3 + 5) + masked(frames.TEXT, b"[", fin=False))
    assert len(session.events) == 1 + FRAMES_PER_TURN
    assert transport.producerState == "paused"                    # its socket waits meanwhile
    assert [call.getTime() for call in server.clock.getDelayedCalls()] == [0]   # the rest: in the next turn
    turns(server.clock)
    assert len(session.events) == 1 + FRAMES_PER_TURN * 3 + 5
    assert transport.producerState == "producing"                 # and is read again once all was handled
    protocol.dataReceived(masked(frames.CONTINUATION, b"]"))       # the unfinished message went on
    assert session.events[-1] == ("text", "[]")


def test_a_burst_from_a_peer_that_does_not_read_is_finished_but_its_socket_stays_unread():
    from presence.ws.server import FRAMES_PER_TURN

    server = Server()
    protocol, transport, session = server.open()
    protocol.dataReceived(masked(frames.TEXT, b"{}") * (FRAMES_PER_TURN * 2))
    protocol.pauseProducing()
    turns(server.clock)
    assert len(session.events) == 1 + FRAMES_PER_TURN * 2 + 1     # opened, the messages, "pause"
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"


def closed_with(transport) -> int | None:
    sent = [payload for opcode, payload in server_frames(transport.value()) if opcode == frames.CLOSE]
    return frames.parse_close(sent[-1])[0] if sent else None


def test_a_complete_handshake_head_over_the_limit_in_one_read_gets_431():
    server = Server()
    head = request(**{"X-Padding": "a" * 9 * 1024})
    assert len(head) > 9 * 1024 and head.endswith(b"\r\n\r\n")
    protocol, transport = server.connect(head)
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting and server.sessions == []


def test_a_handshake_head_just_under_the_limit_opens():
    server = Server()
    head = request(**{"X-Padding": "a"})
    head = request(**{"X-Padding": "a" * (frames.MAX_REQUEST - len(head) + 5)})
    assert len(head) - 4 == frames.MAX_REQUEST
    protocol, transport = server.connect(head)
    assert transport.value().startswith(b"HTTP/1.1 101 ")


def test_assembling_a_fragmented_message_costs_its_size_not_the_square_of_its_fragments():
    """Regression: every continuation frame re-added the sizes of all earlier ones (40,000 empty
    fragments took 10.7 s of CPU)."""
    import time

    n = 40_000
    protocol, transport, session = Server(max_message=1 << 20, max_fragments=n + 1).open()
    data = masked(frames.TEXT, b"[", fin=False) + masked(frames.CONTINUATION, b"1", fin=False) * (n - 2) \
        + masked(frames.CONTINUATION, b"]")
    started = time.process_time()
    for i in range(0, len(data), 65536):          # as the transport hands it over: 64 KiB reads
        protocol.dataReceived(data[i:i + 65536])
        turns(protocol.factory.clock)
    took = time.process_time() - started
    assert session.events == ["opened", ("text", "[" + "1" * (n - 2) + "]")]
    assert took < 2.0, f"{n} fragments took {took:.2f}s of CPU"


@pytest.mark.parametrize("payload", [b"", b"x"])
def test_a_message_in_more_fragments_than_the_limit_is_refused_with_1009(payload):
    protocol, transport, session = Server(max_fragments=16).open()
    protocol.dataReceived(masked(frames.TEXT, payload, fin=False)
                          + masked(frames.CONTINUATION, payload, fin=False) * 14)    # 15 frames: fine
    assert not transport.disconnecting
    protocol.dataReceived(masked(frames.CONTINUATION, payload, fin=False) * 100)
    assert closed_with(transport) == 1009 and transport.disconnecting
    assert session.events == ["opened"] and protocol._parts is None


def test_the_limit_of_fragments_allows_exactly_that_many():
    protocol, transport, session = Server(max_fragments=3).open()
    protocol.dataReceived(masked(frames.TEXT, b"a", fin=False) + masked(frames.CONTINUATION, b"b", fin=False)
                          + masked(frames.CONTINUATION, b"c"))
    assert session.events == ["opened", ("text", "abc")] and not transport.disconnecting


def test_a_fragmented_binary_message_is_refused_at_its_first_frame_and_never_assembled():
    protocol, transport, session = Server().open()
    protocol.dataReceived(masked(frames.BINARY, b"\x00" * 100, fin=False))
    assert session.events == ["opened", "binary"]
    assert closed_with(transport) == 1003                       # the protocol closes if the session did not
    assert protocol._parts is None
    protocol.dataReceived(masked(frames.CONTINUATION, b"\x00" * 100, fin=False) * 50)
    assert protocol._parts is None and session.events == ["opened", "binary"]
    assert closed_with(transport) == 1003                       # nothing more was said: data after a close is dropped
    protocol.dataReceived(masked(frames.CLOSE, struct.pack("!H", 1003)))
    assert transport.disconnecting


def test_before_authentication_messages_have_a_smaller_limit():
    server = Server(max_message=1024, max_auth_message=256)
    protocol, transport, session = server.open()
    protocol.dataReceived(masked(frames.TEXT, b"a" * 256))
    assert session.events[-1] == ("text", "a" * 256)
    protocol.dataReceived(masked(frames.TEXT, b"a" * 257))
    assert closed_with(transport) == 1009 and transport.disconnecting

    protocol, transport, session = server.open()                 # fragments count whole, too
    protocol.dataReceived(masked(frames.TEXT, b"a" * 200, fin=False) + masked(frames.CONTINUATION, b"a" * 100))
    assert closed_with(transport) == 1009

    protocol, transport, session = server.open()
    protocol.authenticated()
    protocol.dataReceived(masked(frames.TEXT, b"a" * 1000))
    assert session.events[-1] == ("text", "a" * 1000) and not transport.disconnecting
    protocol.dataReceived(masked(frames.TEXT, b"a" * 1025))
    assert closed_with(transport) == 1009


def test_a_peer_that_stops_reading_is_not_read_either_and_is_closed_past_max_output():
    server = Server(max_output=1000, close_timeout=5)
    protocol, transport, session = server.open()
    protocol.pauseProducing()                                     # the transport's buffer is full
    assert transport.producerState == "paused"                    # so its requests are not read meanwhile
    protocol.send(b"x" * 600)
    assert closed_with(transport) is None
    protocol.send(b"x" * 600)                                     # over 1000 bytes unread
    assert closed_with(transport) == 4005
    assert len(transport.value()) < 700 + 100                     # the second message was dropped
    protocol.send(b"x" * 600)                                     # and nothing goes after the close frame
    assert len(server_frames(transport.value())) == 2
    server.clock.advance(5.1)
    assert transport.disconnecting                                # it never answered the close


def test_what_was_written_before_the_peer_caught_up_does_not_count():
    server = Server(max_output=1000)
    protocol, transport, session = server.open()
    protocol.pauseProducing()
    protocol.send(b"x" * 900)
    protocol.resumeProducing()
    assert transport.producerState == "producing"
    protocol.pauseProducing()
    protocol.send(b"x" * 900)
    assert closed_with(transport) is None
    assert session.events == ["opened", "pause", "resume", "pause"]


class _Replying(FakeSession):
    """Answers every message, as a session answers bad JSON."""

    def received(self, text):
        t = self.peer.transport
        self.events.append(len(t.dataBuffer) + t._tempDataLen)
        self.peer.send_json({"result": "KO", "errno": 1, "error": "not valid JSON" + " " * 40})


class _Flooder(Protocol):
    """Sends bad JSON as fast as the socket takes it and never reads."""

    def connectionMade(self):
        self.transport.write(request())
        self.transport.pauseProducing()                           # never read
        self.frame = masked(frames.TEXT, b"{") * 1000
        self.sent = 0
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.sent < 40_000_000:
            self.transport.write(self.frame)
            self.sent += len(self.frame)

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True


@pytest_twisted.ensureDeferred
async def test_a_peer_that_sends_without_reading_costs_bounded_memory():
    """Regression: one connection sending bad JSON without reading added 52 MB of RSS: every reply
    was buffered. Now the node stops reading a peer that does not read its replies."""
    from tests.fakes import eventually

    server = Server(clock=reactor, max_message=64 * 1024)
    server.route = lambda path, peer: server.sessions.append(_Replying(peer)) or server.sessions[-1]
    server.factory.route = server.route
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.factory)
    flooder = _Flooder()
    try:
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: flooder))
        await eventually(lambda: server.factory.open_connections, timeout=10)
        [protocol] = server.factory.open_connections
        t = protocol.transport
        # The node's buffer for the peer filled up (Twisted paused it), and the flooder's own buffer
        # backs up: the node no longer reads it. (The kernel's buffers may still move a little, so
        # what is checked is the bound on what the node holds, at every message it handled.)
        ft = flooder.transport
        await eventually(lambda: t.producerPaused and flooder.paused and len(ft.dataBuffer) + ft._tempDataLen > 65536,
                         timeout=20)
        for _ in range(50):                                       # reactor turns in which a reading node would go on
            await deferLater(reactor, 0, lambda: None)
        buffered = [n for n in server.sessions[0].events if isinstance(n, int)]
        bound = 64 * 1024 + 65536 // 6 * 70          # Twisted's 64 KiB, plus replies to the rest of one 64 KiB read
        assert max(buffered) < bound and len(t.dataBuffer) + t._tempDataLen < bound + 100
    finally:
        flooder.transport.abortConnection()
        await port.stopListening()
        await deferLater(reactor, 0.05, lambda: None)
