"""The chaos checker's clients' wire: a JSON websocket client on asyncio streams and a one-shot HTTP
POST. Written apart from the node's code (only bench.wsclient's frame helpers are shared), so a
checker that agrees with the node is not agreeing with itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

from bench.wsclient import CLOSE, PING, TEXT, accept_key, frame, handshake, parse

CLOSED = object()   # what `next()` gives once the connection is gone


class Gone(Exception):
    """The connection closed (or a request went unanswered in time): whatever was in flight is unknown."""


class WS:
    """One websocket connection: `request()` sends a message and waits for its answer (messages of a
    connection are answered in order, one request in flight at a time); messages that are not
    answers (`is_push`) go to `on_push` as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_push, is_push):
        self.reader, self.writer = reader, writer
        self.on_push, self.is_push = on_push, is_push
        self.answers: asyncio.Queue = asyncio.Queue()
        self.lock = asyncio.Lock()
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int, path: str, on_push, is_push, timeout: float = 3.0) -> "WS":
        async def connect() -> WS:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16))
            writer.write(handshake(path, f"127.0.0.1:{port}", key))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101") or accept_key(key) not in head:
                writer.close()
                status = head.split(b"\r\n", 1)[0].decode("latin-1")
                raise Gone(f"handshake refused: {status}")
            return cls(reader, writer, on_push, is_push)

        try:
            return await asyncio.wait_for(connect(), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise Gone(f"cannot connect: {e!r}") from None

    async def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                frames, buf = parse(buf + data)
                for opcode, payload in frames:
                    if opcode in (TEXT, 0):
                        message = json.loads(payload)
                        if self.is_push(message):
                            self.on_push(message)
                        else:
                            self.answers.put_nowait(message)
                    elif opcode == PING:
                        self.writer.write(frame(payload, 0xA))
                    elif opcode == CLOSE:
                        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                        return
        except (OSError, ValueError, asyncio.CancelledError):
            pass
        finally:
            self.abort()

    def send(self, message: Any) -> None:
        if self.closed.is_set():
            raise Gone("closed")
        self.writer.write(frame(json.dumps(message).encode()))

    async def request(self, message: Any, timeout: float = 3.0) -> dict:
        """Send and wait for the answer; Gone if the connection closes or the answer takes longer
        than `timeout` (the connection is then dropped: a client cannot tell a later answer apart)."""
        async with self.lock:
            self.send(message)
            getter = asyncio.ensure_future(self.answers.get())
            closed = asyncio.ensure_future(self.closed.wait())
            try:
                done, _ = await asyncio.wait({getter, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if getter in done:
                return getter.result()
            getter.cancel()
            self.abort()
            raise Gone("no answer" if not done else f"closed ({self.close_code})")

    def abort(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.writer.transport.abort()
            if asyncio.current_task() is not self.task:
                self.task.cancel()

    async def close(self, code: int = 1000) -> None:
        """A clean close: the close frame, then the connection goes."""
        if not self.closed.is_set():
            try:
                self.writer.write(frame(code.to_bytes(2, "big"), CLOSE))
                await asyncio.wait_for(self.closed.wait(), 2.0)
            except (OSError, asyncio.TimeoutError):
                pass
        self.abort()


async def http_post(port: int, path: str, body: Any, bearer: str, timeout: float = 3.0) -> tuple[int, Any]:
    """POST JSON, `Connection: close`; (status, parsed body). Gone when there is no complete answer."""
    data = json.dumps(body).encode()

    async def exchange() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                         .encode() + data)
            raw = await reader.read(-1)
        finally:
            writer.transport.abort()
        head, sep, payload = raw.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.1 "):
            raise Gone("incomplete answer")
        headers = head.decode("latin-1").lower()
        if "transfer-encoding: chunked" in headers:
            payload = _dechunk(payload)
        return int(head.split()[1]), json.loads(payload)

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except (OSError, ValueError, asyncio.TimeoutError) as e:
        raise Gone(f"POST {path}: {e!r}") from None


def _dechunk(body: bytes) -> bytes:
    out, i = b"", 0
    while True:
        end = body.index(b"\r\n", i)
        size = int(body[i:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += body[end + 2:end + 2 + size]
        i = end + 2 + size + 2
