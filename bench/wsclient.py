"""A lean websocket client for load generation: opening handshake, masked client frames, and just
enough frame parsing to find payloads. Nothing here parses JSON; callers look for markers in bytes.

`Conn` is an asyncio protocol; what to do with each text payload is up to its `owner` (the
generator), which keeps per-connection state small: a few slots per socket.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_LINGER0 = struct.pack("ii", 1, 0)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def handshake(path: str, host: str, key: bytes) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key, done by one big-integer operation (C speed, no Python loop)."""
    n = len(payload)
    if not n:
        return b""
    keystream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")).to_bytes(n, "little")


def frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One complete, masked client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return header + key + mask(payload, key)


def server_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """An unmasked frame, as a server sends it (used by the floor reference)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def parse(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete frames at the start of `buf` as (opcode, payload), and the incomplete rest.

    Masked frames (from clients, for the floor reference) are unmasked. Continuation frames are
    returned as they are (opcode 0): callers only look for markers in payloads.
    """
    frames = []
    i, n = 0, len(buf)
    while n - i >= 2:
        b1 = buf[i + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if n - i < 4:
                break
            length = int.from_bytes(buf[i + 2:i + 4], "big")
            head = 4
        elif length == 127:
            if n - i < 10:
                break
            length = int.from_bytes(buf[i + 2:i + 10], "big")
            head = 10
        masked = b1 & 0x80
        if masked:
            head += 4
        end = i + head + length
        if end > n:
            break
        payload = buf[i + head:end]
        if masked:
            payload = mask(payload, buf[i + head - 4:i + head])
        frames.append((buf[i] & 0x0F, payload))
        i = end
    return frames, buf[i:]


# Connection states.
CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)


class Conn(asyncio.Protocol):
    """One client websocket. The owner gets `opened(conn)`, `text(conn, payload)`, `lost(conn)`.

    `ident`, `role`, `group`, `auth`, `flag` and `t` (a timestamp) are the owner's to use.
    """

    __slots__ = ("owner", "path", "host", "ident", "role", "group", "auth", "state", "transport", "buf", "key",
                 "t", "flag")

    def __init__(self, owner, path: str, host: str, ident: int = 0, role: str = ""):
        self.owner = owner
        self.path = path
        self.host = host
        self.ident = ident
        self.role = role
        self.group = None
        self.auth = None
        self.state = CONNECTING
        self.transport = None
        self.buf = b""
        self.key = base64.b64encode(os.urandom(16))
        self.t = 0.0
        self.flag = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.state = HANDSHAKE
        transport.write(handshake(self.path, self.host, self.key))

    def data_received(self, data: bytes) -> None:
        if self.state == OPEN:
            if self.buf:
                data = self.buf + data
            frames, self.buf = parse(data)
            for opcode, payload in frames:
                if opcode == TEXT or opcode == 0:
                    self.owner.text(self, payload)
                elif opcode == PING:
                    self.transport.write(frame(payload, PONG))
                elif opcode == PONG:
                    self.owner.pong(self, payload)
                elif opcode == CLOSE:
                    self.state = CLOSED
                    self.owner.closed_by_peer(self, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None)
                    self.abort()
                    return
            return
        if self.state != HANDSHAKE:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 16384:
                self.fail("handshake answer too long")
            return
        head, rest = self.buf[:end], self.buf[end + 4:]
        self.buf = b""
        if not head.startswith(b"HTTP/1.1 101") or accept_key(self.key) not in head:
            self.fail("handshake refused: " + head.split(b"\r\n", 1)[0].decode("latin-1"))
            return
        self.state = OPEN
        self.owner.opened(self)
        if rest:
            self.data_received(rest)

    def connection_lost(self, exc) -> None:
        was = self.state
        self.state = CLOSED
        self.transport = None
        self.owner.lost(self, was)

    # -- for the owner -------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Send an already built frame."""
        if self.transport is not None:
            self.transport.write(data)

    def fail(self, why: str) -> None:
        self.owner.failed(self, why)
        self.abort()

    def abort(self) -> None:
        """Drop the connection with a reset (no TIME_WAIT left on the generator's ports)."""
        t = self.transport
        if t is not None:
            sock = t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                except OSError:
                    pass
            t.abort()


async def open_conn(loop: asyncio.AbstractEventLoop, conn: Conn, host: str, port: int, source: str) -> None:
    """Start connecting `conn` from `source`; its owner hears the rest."""
    await loop.create_connection(lambda: conn, host, port, local_addr=(source, 0))


def now() -> float:
    """CLOCK_MONOTONIC: comparable across the bench's processes on one machine."""
    return time.monotonic()
