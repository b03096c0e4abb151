"""Fuzzing the websocket layer with Hypothesis: the frame parser, and both sessions (device and
application, on fakes of the hub, verifier, applications, streams and notifier) behind the real
server protocol, with random and mutated frames and messages cut into random reads.

What must hold: no exception escapes, no message is answered as an internal error, and every
connection ends with a reply to each message it delivered or with a close code docs/protocol.md
lists. Example counts are modest so that this runs in seconds.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from presence import errors
from presence.identity import Identity
from presence.errors import PresenceError
from presence.metrics import Metrics
from presence.ws import frames
from presence.ws.app import AppSession
from presence.ws.device import DeviceSession
from presence.ws.frames import ProtocolViolation
from presence.ws.server import PresenceServerFactory
from tests.test_ws_server import masked, request, server_frames, turns

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOCUMENTED_CLOSE = {1000, 1001, 1002, 1003, 1007, 1009, 4000, 4001, 4002, 4003, 4004, 4005, 4006}
METRICS = Metrics()


# -- the frame parser ------------------------------------------------------------------------------
def frame_bytes(fin: bool, rsv: int, opcode: int, payload: bytes, mask: bytes | None, lie: int | None) -> bytes:
    """A frame as a client might send it, possibly unmasked or with a length that lies."""
    n = len(payload) if lie is None else lie
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    return head + (mask + frames.unmask(mask, payload) if mask is not None else payload)


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), st.deferred(lambda: json_texts()).map(lambda t: t.encode("utf-8")),
                     st.sampled_from([b"", b"\xff", b"\xce\xba\xe1", struct.pack("!H", 1000), struct.pack("!H", 1005)]))


a_frame = st.builds(
    frame_bytes,
    fin=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 0, 1, 2, 4, 7]),
    opcode=st.sampled_from([0, 0, 1, 1, 1, 2, 8, 9, 10, 3, 11, 15]),
    payload=payloads(),
    mask=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.none()),
    lie=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 70_000), st.just(1 << 63), st.just((1 << 63) - 1)),
)


def mutated(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        if out:
            out[at % len(out)] = value
    return bytes(out)


wire = st.builds(mutated, st.lists(a_frame, max_size=12).map(b"".join),
                 st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))


@FUZZ
@given(st.one_of(st.binary(max_size=400), wire), st.integers(1, 70_000))
def test_the_frame_parser_returns_frames_or_a_documented_violation(data, limit):
    try:
        parsed, rest = frames.parse_frames(data, limit)
    except ProtocolViolation as e:
        assert e.code in (frames.PROTOCOL_ERROR, frames.TOO_BIG)
        return
    assert len(rest) <= len(data)
    for fin, opcode, payload in parsed:
        assert opcode in (0, 1, 2, 8, 9, 10) and len(payload) <= limit
        if opcode >= 8:
            assert fin and len(payload) <= 125
            if opcode == frames.CLOSE:
                try:
                    frames.parse_close(payload)
                except ProtocolViolation as e:
                    assert e.code in (frames.PROTOCOL_ERROR, frames.INVALID_DATA)


# -- both sessions behind the real protocol -------------------------------------------------------
class FakeVerifier:
    async def verify(self, assertion):
        if assertion == "good~assertion":
            return Identity("Alice@Example.com", "example.com", 0.0)
        raise PresenceError(errors.ASSERTION_MALFORMED, "the assertion is malformed")


class FakeHub:
    def __init__(self):
        self.attached = []

    async def attach(self, email, device, scope, connection, pairing=""):
        link = SimpleNamespace(email=email, device=device)
        self.attached.append(link)
        return link

    def detach(self, link, connection):
        self.attached.remove(link)

    async def set_status(self, link, status, app_ids):
        pass


class FakeNotifier:
    async def waiting(self, email):
        return []

    async def ack(self, email, ids):
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise PresenceError(errors.BAD_FIELD, "ids must be a list of integers")
        return 0

    async def send(self, app, items):
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise PresenceError(errors.NOTIFY_MALFORMED, "notifications must be a list of objects")
        return [{"result": "KO", "errno": errors.UNKNOWN_UID, "error": "no grant"} for _ in items]


class FakeApps:
    async def authenticate(self, app_id, key):
        if not isinstance(key, str):
            raise PresenceError(errors.BAD_FIELD, 'send {"key": "<your API key>"} first', errors.CLOSE_AUTH_FAILED)
        if key != "good-key":
            raise PresenceError(errors.BAD_KEY, "wrong API key", errors.CLOSE_AUTH_FAILED)
        return SimpleNamespace(app_id=app_id)


class FakeStreams:
    async def subscribe(self, app_id, sink):
        return SimpleNamespace(pause=lambda: None, resume=lambda: None)

    def unsubscribe(self, subscriber):
        pass


class Counting:
    """Counts the messages the protocol delivers to a session (each must get one reply here: the
    fakes answer at once)."""

    delivered = 0

    def received(self, text):
        Counting.delivered += 1
        super().received(text)


class Device(Counting, DeviceSession):
    __slots__ = ()


class App(Counting, AppSession):
    __slots__ = ()


def connect(path: str):
    clock = Clock()

    def route(path, peer):
        if path == "/presence":
            return Device(peer, FakeHub(), FakeVerifier(), clock, 10, 5.0, 10, METRICS, FakeNotifier())
        return App(peer, path[1:], FakeApps(), FakeStreams(), clock, 10, METRICS, FakeNotifier())

    factory = PresenceServerFactory(route, clock, METRICS, max_message=4096, max_auth_message=2048,
                                    handshake_timeout=10, ping_interval=0, max_fragments=8, max_output=1 << 20)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(request(path))
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    transport.clear()
    return clock, protocol, transport


def json_texts() -> st.SearchStrategy[str]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
    known = st.fixed_dictionaries(
        {"type": st.sampled_from(["connect", "status", "ack", "notify", "other", 7])},
        optional={"assertion": st.one_of(st.just("good~assertion"), st.text(max_size=30), values),
                  "device": st.one_of(st.text(max_size=140), values),
                  "application_ids": st.one_of(st.lists(st.text(max_size=22), max_size=5), values),
                  "status": st.one_of(st.sampled_from(["online", "unavailable", "offline", "away"]), values),
                  "ids": st.one_of(st.lists(st.integers(), max_size=4), values),
                  "notifications": values,
                  "key": st.one_of(st.just("good-key"), st.text(max_size=10), values)})
    deep = st.integers(1, 2000).map(lambda n: "[" * n + "]" * (n % 3))      # past ~1000: RecursionError
    return st.one_of(known.map(json.dumps), values.map(json.dumps), st.text(max_size=50), deep)


def messages_to_wire(texts: list[str], fragment: list[bool]) -> bytes:
    out = b""
    for text, cut in zip(texts, fragment + [False] * len(texts)):
        data = text.encode("utf-8")
        if cut and len(data) > 1:
            half = len(data) // 2
            out += masked(frames.TEXT, data[:half], fin=False) + masked(frames.PING, b"p") \
                + masked(frames.CONTINUATION, data[half:])
        else:
            out += masked(frames.TEXT, data)
    return out


def sessions_input():
    good = st.builds(messages_to_wire, st.lists(json_texts(), max_size=8), st.lists(st.booleans(), max_size=8))
    return st.one_of(good, good, st.builds(lambda a, b: a + b, good, wire),
                     st.builds(mutated, good, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                       min_size=1, max_size=3)))


@FUZZ
@given(path=st.sampled_from(["/presence", "/someapp"]), first=st.sampled_from(["", "connect", "key"]),
       data=sessions_input(), cuts=st.lists(st.integers(1, 400), max_size=20))
def test_both_sessions_answer_every_message_or_close_with_a_documented_code(path, first, data, cuts):
    failures: list = []

    def watch(event):
        if event.get("log_failure") is not None or event.get("event") == "session.error":
            failures.append(event)

    globalLogPublisher.addObserver(watch)
    try:
        clock, protocol, transport = connect(path)
        Counting.delivered = 0
        if first == "connect":
            data = masked(frames.TEXT, b'{"type": "connect", "assertion": "good~assertion"}') + data
        elif first == "key":
            data = masked(frames.TEXT, b'{"key": "good-key"}') + data
        pos = 0
        for cut in cuts + [len(data)]:                    # the bytes as some reads hand them over
            protocol.dataReceived(data[pos:pos + cut])    # nothing may escape
            pos += cut
            turns(clock)                                  # bursts are handled a slice per reactor turn
        sent = server_frames(transport.value())
        replies = [json.loads(p) for op, p in sent if op == frames.TEXT]
        closes = [frames.parse_close(p)[0] for op, p in sent if op == frames.CLOSE]
        assert all(op in (frames.TEXT, frames.CLOSE, frames.PONG) for op, _ in sent)
        assert set(closes) <= DOCUMENTED_CLOSE and len(closes) <= 1
        assert not any(r.get("errno") == errors.UNAVAILABLE for r in replies), replies
        if not closes:
            assert len(replies) == Counting.delivered      # one answer per message
            clock.advance(11)                              # and, unauthenticated, it ends with 4001
            closes = [frames.parse_close(p)[0] for op, p in server_frames(transport.value()) if op == frames.CLOSE]
            authenticated = any(r.get("result") is True or r.get("app_id") for r in replies)
            assert closes == ([] if authenticated else [4001])
        clock.advance(6)                                   # a close not answered is aborted
        if closes:
            assert transport.disconnecting
        protocol.connectionLost(None)
        assert not clock.getDelayedCalls() or not closes
    finally:
        globalLogPublisher.removeObserver(watch)
    assert not failures, failures
