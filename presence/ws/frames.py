"""RFC 6455 on the server side, without I/O: the opening handshake and the frames.

Pure functions over bytes, so every rule is testable without a socket. ``presence.ws.server`` feeds
them what a connection receives; nothing here keeps per-connection state (a connection's buffer
and its unfinished message live on the protocol, in slots).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import NamedTuple

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN = frozenset((CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG))

# Close codes of RFC 6455 section 7.4.1 this side sends.
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED, INVALID_DATA, TOO_BIG, INTERNAL_ERROR = (
    1000, 1001, 1002, 1003, 1007, 1009, 1011)

MAX_REQUEST = 8192          # bytes of an opening handshake request, headers included
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    """The opening handshake is refused with an HTTP status."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers


class ProtocolViolation(Exception):
    """The peer broke the framing rules: the connection closes with ``code``."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Request(NamedTuple):
    path: str
    key: str
    headers: dict[str, str]


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


# -- the opening handshake -------------------------------------------------------------------------
def parse_request(head: bytes) -> Request:
    """``head``: the request up to (not including) the blank line that ends its headers."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:      # pragma: no cover - latin-1 decodes anything
        raise HandshakeError(400, "the request is not HTTP")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HandshakeError(400, "the request line is not HTTP")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HandshakeError(505, "a websocket handshake needs HTTP/1.1")
    if method != "GET":
        raise HandshakeError(405, "a websocket handshake is a GET request", (("Allow", "GET"),))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HandshakeError(400, "a header line is malformed")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "host" not in headers:
        raise HandshakeError(400, "the Host header is missing")
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise HandshakeError(426, "this is a websocket endpoint: send Upgrade: websocket",
                             (("Upgrade", "websocket"), ("Connection", "Upgrade")))
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeError(400, "Connection: Upgrade is missing")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "only websocket version 13 is supported", (("Sec-WebSocket-Version", "13"),))
    key = headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise HandshakeError(400, "the request target must be a path")
    return Request(path, key, headers)


def _tokens(value: str) -> set[str]:
    if "," not in value:                 # the usual case: one token
        return {value.strip().lower()}
    return {t.strip().lower() for t in value.split(",")}


def accept(key: str) -> bytes:
    """The 101 answer to a request with ``key``: no subprotocol, no extension."""
    digest = base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + digest + b"\r\n\r\n")


_STATUS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           426: "Upgrade Required", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


def refusal(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    body = reason.encode("utf-8") + b"\n"
    lines = [f"HTTP/1.1 {status} {_STATUS.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


# -- frames ----------------------------------------------------------------------------------------
def encode(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (servers do not mask)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    # A control frame carries at most 125 bytes: the code and up to 123 of the reason, cut on a
    # character boundary.
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode(CLOSE, struct.pack("!H", code) + text)


def unmask(mask: bytes, data: bytes) -> bytes:
    # XOR as one big integer: C speed without a per-byte Python loop.
    n = len(data)
    if not n:
        return data
    if n >= _LARGE and _large_unmask() is not None:
        return _large_unmask()(bytes(mask), data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


_LARGE = 256 * 1024
_nvx: list = []


def _large_unmask():
    """Autobahn's vectorised XOR in C (NVX), when it is built: four times the speed of the big
    integer on a payload of megabytes (the conformance run's 9.x cases). Optional (the `speedups`
    extra): without autobahn the big integer does it. Looked up once, lazily."""
    if not _nvx:
        try:
            from autobahn.websocket.xormasker import USES_NVX, create_xor_masker
        except ImportError:       # autobahn is optional (pip install 'presence[speedups]')
            USES_NVX = False
        _nvx.append((lambda mask, data: create_xor_masker(mask, len(data)).process(data)) if USES_NVX else None)
    return _nvx[0]


def parse_frames(buffer: bytes, max_payload: int, max_frames: int = 0) -> tuple[list[Frame], bytes]:
    """Complete frames at the start of ``buffer`` (at most ``max_frames`` of them, unless 0), and
    what is left of it (an unfinished frame, or the frames past ``max_frames``).

    Raises ProtocolViolation for anything a client must not send; a frame announcing more than
    ``max_payload`` bytes is refused as soon as its header is read, before it is buffered.
    """
    frames: list[Frame] = []
    pos, end = 0, len(buffer)
    max_frames = max_frames or -1
    while end - pos >= 2 and len(frames) != max_frames:
        b0, b1 = buffer[pos], buffer[pos + 1]
        fin, opcode, length = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        if b0 & 0x70:
            raise ProtocolViolation(PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        if opcode not in _KNOWN:
            raise ProtocolViolation(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not b1 & 0x80:
            raise ProtocolViolation(PROTOCOL_ERROR, "a client must mask its frames")
        if opcode >= CLOSE and (not fin or length > 125):
            raise ProtocolViolation(PROTOCOL_ERROR, "a control frame must be final and at most 125 bytes")
        head = 2
        if length == 126:
            if end - pos < 4:
                break
            length = int.from_bytes(buffer[pos + 2:pos + 4], "big")
            head = 4
        elif length == 127:
            if end - pos < 10:
                break
            length = int.from_bytes(buffer[pos + 2:pos + 10], "big")
            if length >> 63:
                raise ProtocolViolation(PROTOCOL_ERROR, "the payload length's top bit is set")
            head = 10
        if length > max_payload:
            raise ProtocolViolation(TOO_BIG, f"a frame of {length} bytes is over the limit of {max_payload}")
        start = pos + head + 4
        if end - start < length:
            break
        frames.append(Frame(fin, opcode, unmask(buffer[pos + head:start], buffer[start:start + length])))
        pos = start + length
    return frames, buffer[pos:] if pos else buffer


_VALID_CLOSE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a close frame the peer sent (None: it gave no code)."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolViolation(PROTOCOL_ERROR, "a close frame's code must be two bytes")
    code = int.from_bytes(payload[:2], "big")
    if code not in _VALID_CLOSE:
        raise ProtocolViolation(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(INVALID_DATA, "the close reason is not UTF-8")
    return code, reason
