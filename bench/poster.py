"""The live-notification poster: an application sending batches of notifications to a node at a set
rate, over HTTP (`POST /<appid>/notification`, keep-alive, `Authorization: Bearer <key>`) or over
its websocket (`{"type": "notify", ...}` after the key). Runs inside a generator process (the
`post` command of bench.generator).

Each item's message is "t<CLOCK_MONOTONIC of the send>", so a device that receives it knows the
post-to-device latency without any exchange between processes. Batches go out on `connections`
connections, one request in flight on each (a connection is free again when its answer came);
when every connection is busy the poster falls behind, which the answer reports as `lag`.
Answers are counted, not parsed: each item's result holds "OK" or "KO".
"""

from __future__ import annotations

import array
import asyncio
import base64
from collections import deque

from bench import common
from bench.wsclient import Conn, frame, now

OK, KO = b'"OK"', b'"KO"'


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: send a complete request, get (status, body) back through
    `owner.answered(conn, status, body)`. Content-Length and chunked bodies; nothing else."""

    def __init__(self, owner):
        self.owner = owner
        self.transport = None
        self.buf = b""
        self.status = 0
        self.length = -1          # body length (Content-Length); -1: chunked; None: no head yet
        self.body = b""
        self.head_done = False
        self.t = 0.0
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.opened.set_result(True)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before it opened"))
        self.owner.lost(self)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if not self.head_done:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buf = self.buf[:end].lower(), self.buf[end + 4:]
                self.status = int(head[9:12])
                self.length = -1
                for line in head.split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        self.length = int(line[15:])
                self.head_done, self.body = True, b""
            if self.length >= 0:
                if len(self.buf) < self.length:
                    return
                body, self.buf = self.buf[:self.length], self.buf[self.length:]
            else:  # chunked: size CRLF data CRLF ... 0 CRLF CRLF
                body = self._chunks()
                if body is None:
                    return
            self.head_done = False
            self.owner.answered(self, self.status, body)

    def _chunks(self) -> bytes | None:
        i, parts, buf = 0, [], self.buf
        while True:
            eol = buf.find(b"\r\n", i)
            if eol < 0:
                return None
            size = int(buf[i:eol].split(b";")[0], 16)
            if size == 0:
                end = buf.find(b"\r\n", eol + 2)  # no trailers expected: just the final CRLF
                if end < 0:
                    return None
                self.buf = buf[end + 2:]
                return b"".join(parts)
            if len(buf) < eol + 2 + size + 2:
                return None
            parts.append(buf[eol + 2:eol + 2 + size])
            i = eol + 2 + size + 2


class Poster:
    """Posts `rate` notifications per second for `duration` seconds in batches of `batch`, round
    robin over devices 0..devices-1 (their uids: common.note_uid)."""

    def __init__(self, cfg: dict, emit, progress_id: str):
        self.cfg = cfg
        self.emit = emit
        self.progress_id = progress_id
        self.via = cfg.get("via", "http")
        self.devices = cfg["devices"]
        self.batch = cfg["batch"]
        self.free: deque = deque()
        self.conns: list = []
        self.rtt = array.array("f")
        self.ok = self.ko = self.http_errors = self.requests = self.answers = 0
        self.error_sample = ""
        self.lost_conns = 0
        self.key = cfg["api_key"]
        # per device, the bytes of its item up to the timestamp: {"uid":"...","message":"t
        self.items = [b'{"uid":"%s","message":"t' % common.note_uid(i).encode() for i in range(self.devices)]
        self.next_device = 0
        app = cfg["app_id"]
        self.http_head = (f"POST /{app}/notification HTTP/1.1\r\nHost: {cfg['host']}:{cfg['port']}\r\n"
                          f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n").encode()

    # -- connections ------------------------------------------------------------------------------
    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sources = self.cfg["sources"]
        for n in range(self.cfg["connections"]):
            if self.via == "http":
                conn = HttpConn(self)
                await loop.create_connection(lambda c=conn: c, self.cfg["host"], self.cfg["port"],
                                             local_addr=(sources[n % len(sources)], 0))
                await conn.opened
            else:
                conn = Conn(self, "/" + self.cfg["app_id"], f"{self.cfg['host']}:{self.cfg['port']}")
                conn.flag = 0
                conn.auth = loop.create_future()
                await loop.create_connection(lambda c=conn: c, self.cfg["host"], self.cfg["port"],
                                             local_addr=(sources[n % len(sources)], 0))
                await asyncio.wait_for(conn.auth, 30)
            self.conns.append(conn)
            self.free.append(conn)

    def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abort()

    # Conn owner callbacks (websocket)
    def opened(self, conn) -> None:
        conn.send(frame(('{"key":"%s"}' % self.key).encode()))

    def text(self, conn, payload: bytes) -> None:
        if conn.flag == 0:  # the answer to the key
            conn.flag = 1
            if payload.startswith(b'{"result":"KO"'):
                conn.auth.set_exception(RuntimeError(payload[:200].decode("utf-8", "replace")))
            else:
                conn.auth.set_result(True)
        elif payload.startswith(b'{"type":"notified"'):
            self._answer(conn, 200, payload)
        elif payload.startswith(b'{"result":"KO"'):   # the whole notify message refused
            self._answer(conn, 400, payload)
        # anything else: status updates for the application, not ours to count

    def pong(self, conn, payload) -> None:
        pass

    def closed_by_peer(self, conn, code) -> None:
        pass

    def failed(self, conn, why: str) -> None:
        if not conn.auth.done():
            conn.auth.set_exception(RuntimeError(why))

    def lost(self, conn, *_) -> None:
        self.lost_conns += 1
        if len(self.error_sample) == 0:
            self.error_sample = "a poster connection was lost"

    # HttpConn owner callback
    def answered(self, conn, status: int, body: bytes) -> None:
        self._answer(conn, status, body)

    def _answer(self, conn, status: int, body: bytes) -> None:
        self.rtt.append((now() - conn.t) * 1000.0)
        self.answers += 1
        if status == 200:
            self.ok += body.count(OK)
            ko = body.count(KO)
        else:
            self.http_errors += 1
            ko = self.batch
        if ko:
            self.ko += ko
            if not self.error_sample:
                self.error_sample = f"{status} {body[:200].decode('utf-8', 'replace')}"
        self.free.append(conn)

    # -- the loop -----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        stamp = b"%.6f\"}" % now()
        n, k, items = self.devices, self.next_device, self.items
        parts = []
        for _ in range(self.batch):
            parts.append(items[k] + stamp)
            k = k + 1 if k + 1 < n else 0
        self.next_device = k
        return b"[" + b",".join(parts) + b"]"

    def _post(self, conn) -> None:
        if self.via == "http":
            body = self._body()
            data = self.http_head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        else:
            data = frame(b'{"type":"notify","notifications":' + self._body() + b"}")
        conn.t = now()
        conn.send(data)
        self.requests += 1

    async def run(self, rate: float, duration: float) -> dict:
        batches_per_s = rate / self.batch
        sent = 0
        lag = 0.0
        t0 = now()
        last_emit = t0
        while True:
            t = now()
            elapsed = t - t0
            if elapsed >= duration:
                break
            due = int(elapsed * batches_per_s) + 1 - sent
            while due > 0 and self.free:
                self._post(self.free.popleft())
                sent += 1
                due -= 1
            if due > 0:
                lag = max(lag, due / batches_per_s)
            if t - last_emit > 0.5:
                last_emit = t
                self.emit({"ev": "progress", "id": self.progress_id, "done": sent * self.batch})
            await asyncio.sleep(0.001)
        t_sent = now()
        deadline = t_sent + self.cfg.get("drain", 10.0)
        while self.answers < self.requests and now() < deadline:
            await asyncio.sleep(0.005)
        return {"posted": sent * self.batch, "requests": sent, "answers": self.answers, "ok": self.ok,
                "ko": self.ko, "http_errors": self.http_errors, "error_sample": self.error_sample,
                "lost_connections": self.lost_conns, "elapsed": t_sent - t0, "lag": lag,
                "rtt": base64.b64encode(self.rtt.tobytes()).decode()}
