"""The attacker of `python -m bench hostile`: one attack of issue 14, in a process of its own.

    python -m bench.hostile_attacks CONFIG.json

It prepares (binds its servers, signs its certificates: nothing timed), prints one JSON line
{"ev": "ready", ...}, waits for "go" on stdin, attacks for `seconds`, and prints
{"ev": "result", "answers": {what the node answered: how often}, ...}. It runs apart from the bench
(which samples the node's memory) and from the healthy client, at a lower priority (the bench starts
it with nice), so its own CPU use stands for a remote attacker's as far as two cores allow.

Every attack is bounded: `connections` workers at once, each looping until the deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections import Counter
from typing import Awaitable, Callable

from bench import common
from bench.wsclient import CLOSE, PING, PONG, accept_key, frame, mask

HEAD_LIMIT = 16384   # a server's answer head we still read


class Tally:
    """What the node answered, counted by label, and a few figures per attack."""

    def __init__(self) -> None:
        self.answers: Counter[str] = Counter()
        self.attempts = 0
        self.sent = 0            # bytes written to the node's socket (what its kernel buffers took included)
        self.figures: dict[str, float] = {}

    def most(self, name: str, value: float) -> None:
        self.figures[name] = max(self.figures.get(name, 0), value)

    def add(self, name: str, value: float) -> None:
        self.figures[name] = self.figures.get(name, 0) + value


# -- wire helpers ---------------------------------------------------------------------------------------

def handshake(path: str, port: int, extra: str = "") -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    head = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()
    return head, key


async def ws_open(port: int, path: str = "/presence") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket after its opening handshake (ValueError if the node refused it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    head, key = handshake(path, port)
    writer.write(head)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not answer.startswith(b"HTTP/1.1 101") or accept_key(key) not in answer:
        writer.close()
        raise ValueError("handshake refused: " + answer.split(b"\r\n", 1)[0].decode("latin-1"))
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One frame from the node (unmasked): (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def read_message(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes]:
    """The next text message or close (answers pings): (opcode, payload)."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == PING:
            writer.write(frame(payload, PONG))
            continue
        if opcode == PONG:
            continue
        return opcode, payload


def close_code(payload: bytes) -> int | None:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None


def label_reply(opcode: int, payload: bytes) -> str:
    """A short name for what the node sent: "errno N", "OK", "close N"."""
    if opcode == CLOSE:
        return f"close {close_code(payload)}"
    try:
        reply = json.loads(payload)
    except ValueError:
        return "not JSON"
    if isinstance(reply, dict) and reply.get("result") == "KO":
        return f"errno {reply.get('errno')}"
    if isinstance(reply, dict) and reply.get("result") == "OK":
        return "OK"
    return "other message"


def raw_frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A masked client frame of up to 125 bytes, with FIN as given."""
    key = os.urandom(4)
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + key + mask(payload, key)


def drop(writer: asyncio.StreamWriter) -> None:
    try:
        writer.transport.abort()
    except Exception:
        pass


async def http_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, list[str]], bytes]:
    """An HTTP/1.1 answer: status, headers (lower-case names), body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get("transfer-encoding", [""])[0].lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        return code, headers, b"".join(parts)
    length = int(headers.get("content-length", ["0"])[0])
    body = await reader.readexactly(length) if length else b""
    return code, headers, body


async def workers(n: int, deadline: float, one: Callable[[int], Awaitable[None]], tally: Tally) -> None:
    """`n` workers, each running `one(i)` again and again until the deadline; a worker's unexpected
    error is counted (as "client error: <type>") and it goes on."""

    async def loop(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(one(i), max(0.05, deadline - time.monotonic()) + 5)
            except asyncio.TimeoutError:
                tally.answers["no answer until the end"] += 1
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                tally.answers[f"connection lost ({type(e).__name__})"] += 1
            except Exception as e:   # noqa: BLE001 - the attack goes on; what went wrong is reported
                tally.answers[f"client error: {type(e).__name__}: {str(e)[:80]}"] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(loop(i) for i in range(n)))


def left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# -- 1. fragments before authentication ---------------------------------------------------------------

async def fragments(c: dict, deadline: float, t: Tally) -> None:
    """Many connections, each sending a text message in endless empty (even workers) or one-byte (odd)
    continuation frames, before authenticating; reconnect when closed."""
    port = c["ws_port"]

    async def one(i: int) -> None:
        reader, writer = await ws_open(port)
        t.attempts += 1
        payload = b"" if i % 2 == 0 else b"x"
        first = raw_frame(0x1, payload, fin=False)
        burst = raw_frame(0x0, payload, fin=False) * 2048
        closed = asyncio.get_running_loop().create_future()

        async def read() -> None:
            try:
                opcode, data = await read_message(reader, writer)
                closed.set_result(label_reply(opcode, data))
            except (ConnectionError, asyncio.IncompleteReadError):
                closed.set_result("reset before a close frame")

        reading = asyncio.create_task(read())
        try:
            writer.write(first)
            while not closed.done() and time.monotonic() < deadline:
                writer.write(burst)
                t.sent += len(burst)
                try:
                    await asyncio.wait_for(writer.drain(), left(deadline) + 0.01)
                except (ConnectionError, asyncio.TimeoutError):
                    break
            wait = 2.0 if time.monotonic() < deadline else 0.3   # past the deadline: cut, not waited for
            answer = await asyncio.wait_for(asyncio.shield(closed), wait) if not closed.done() else closed.result()
            t.answers[answer] += 1
        except asyncio.TimeoutError:
            t.answers["open at the end"] += 1
        finally:
            reading.cancel()
            drop(writer)

    await workers(c["connections"], deadline, one, t)


# -- 2. a hostile issuer streaming endless response headers --------------------------------------------

class EndlessHeads:
    """HTTP servers on loopback (one port each, a distinct issuer domain each, since the node caches a
    failed support document per domain for a minute) that answer any request with a status line and
    then header lines of 1 KB, as fast as the client reads, for ever."""

    def __init__(self, count: int):
        self.count = count
        self.servers: list[asyncio.base_events.Server] = []
        self.ports: list[int] = []
        self.fetches = 0
        self.most = 0

    async def start(self) -> None:
        for _ in range(self.count):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.fetches += 1
        written = 0
        line = b"X-Endless-%d: " + b"a" * 1000 + b"\r\n"
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            n = 0
            while n < 10_000_000:
                chunk = b"".join(line % (n + k) for k in range(64))
                n += 64
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()
        except Exception:
            pass
        finally:
            self.most = max(self.most, written)
            drop(writer)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _domain_assertions(domains: list[str], email_of: Callable[[str], str], audience: str) -> list[str]:
    """A valid-looking `connect` assertion per issuer domain: a certificate for `email_of(domain)` that
    the domain's (unfetchable) key would have to check, and an assertion signed by the certified key."""
    from presence.identity import Issuer, make_assertion, new_user_key

    user = new_user_key()
    issuer_key = new_user_key()
    now = time.time()
    sig = make_assertion("x", user, audience, now).split("~", 1)[1]
    out = []
    for domain in domains:
        cert = Issuer(domain, issuer_key).certify(email_of(domain), user.public_key(), now, 3600)
        out.append(f"{cert}~{sig}")
    return out


async def connect_with(c: dict, deadline: float, t: Tally, assertions: list[str]) -> None:
    """Workers that each open a device connection, send a `connect` with the next assertion and count
    the answer (the node closes the connection after a refusal)."""
    port = c["ws_port"]
    turn = iter(range(10**9))

    async def one(i: int) -> None:
        k = next(turn)
        text = json.dumps({"type": "connect", "assertion": assertions[k % len(assertions)], "device": "x"})
        reader, writer = await ws_open(port)
        t.attempts += 1
        try:
            writer.write(frame(text.encode()))
            opcode, payload = await asyncio.wait_for(read_message(reader, writer), 30)
            t.answers[label_reply(opcode, payload)] += 1
            if opcode != CLOSE:
                try:
                    opcode, payload = await asyncio.wait_for(read_message(reader, writer), 2)
                    if opcode == CLOSE:
                        t.answers[f"then {label_reply(opcode, payload)}"] += 1
                except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                    pass
        finally:
            drop(writer)

    await workers(c["connections"], deadline, one, t)


# -- 3. support-document fetches to internal addresses (SSRF) -----------------------------------------

def internal_names(count: int) -> list[str]:
    """Distinct DNS names that the resolver reads as internal IPv4 addresses (hex parts: `0x7f.0x1` is
    127.0.0.1): loopback, RFC 1918, CGNAT, link-local with the metadata service. Each is a fresh domain
    for the node's support-document cache, so each costs one fetch attempt."""
    families = [(0x7f,), (0xa,), (0xc0, 0xa8), (0xac, 0x10), (0xa9, 0xfe), (0x64, 0x40)]
    names = ["0xa9.0xfe.0xa9.0xfe", "0x7f.0x1"]
    n = 0
    while len(names) < count:
        prefix = families[n % len(families)]
        rest = [(n >> 8) & 0xFF, n & 0xFF, 1 + n % 254][: 4 - len(prefix)]
        names.append(".".join(f"0x{b:x}" for b in (*prefix, *rest)))
        n += 1
    return list(dict.fromkeys(names))[:count]


# -- 4. oversized request bodies ---------------------------------------------------------------------------

BIG = 300 * 1024 * 1024


async def bodies(c: dict, deadline: float, t: Tally) -> None:
    """Anonymous POSTs of 300 MB to /<appid>/notification, announced (Content-Length, even workers) or
    chunked (odd), written as fast as the node takes them until it answers."""
    port = c["web_port"]
    chunk = b"\0" * (1024 * 1024)

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t.attempts += 1
        chunked = i % 2 == 1
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}"
        writer.write((f"POST /benchapp/notification HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode())
        piece = (b"100000\r\n" + chunk + b"\r\n") if chunked else chunk
        answered = asyncio.create_task(http_answer(reader))
        sent = 0
        t0 = time.monotonic()
        try:
            while not answered.done() and sent < BIG and time.monotonic() < deadline:
                writer.write(piece)
                sent += len(chunk)
                draining = asyncio.ensure_future(writer.drain())
                # Write more only once the node took this piece (nothing piles up here), or stop at
                # its answer.
                await asyncio.wait({draining, answered}, timeout=left(deadline) + 0.01,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not draining.done():
                    draining.cancel()
                    break
                if draining.exception() is not None:
                    break
            kind = "chunked" if chunked else "Content-Length"
            try:
                code, _, body = await asyncio.wait_for(answered, 10)
            except (ConnectionError, asyncio.IncompleteReadError):
                # The node hung up with body bytes unread: its answer can be lost to the TCP reset.
                t.answers[f"reset before the answer ({kind})"] += 1
                return
            errno = json.loads(body).get("errno") if body.startswith(b"{") else None
            t.answers[f"{code}" + (f" errno {errno}" if errno else "") + f" ({kind})"] += 1
            t.most("slowest answer ms", 1000 * (time.monotonic() - t0))
            t.sent += sent
        finally:
            answered.cancel()
            drop(writer)

    await workers(c["connections"], deadline, one, t)


# -- 5. peers that do not read ------------------------------------------------------------------------------

async def no_read(c: dict, deadline: float, t: Tally) -> None:
    """Connections that send requests as fast as the node reads them and never read a reply: bad JSON
    (even workers), or a well-formed status before `connect` (odd, errno 4). Each holds its connection
    until the deadline."""
    port = c["ws_port"]

    async def one(i: int) -> None:
        reader, writer = await ws_open(port)
        opened = time.monotonic()
        writer.transport.pause_reading()
        t.attempts += 1
        text = b"not json" if i % 2 == 0 else b'{"type":"status","status":"online"}'
        burst = b"".join(frame(text) for _ in range(64 * 1024 // (len(text) + 6)))
        sent = 0
        blocked = False
        try:
            while time.monotonic() < deadline:
                writer.write(burst)
                sent += len(burst)
                try:
                    await asyncio.wait_for(writer.drain(), min(1.0, left(deadline) + 0.01))
                except asyncio.TimeoutError:
                    blocked = blocked or time.monotonic() < deadline   # a second without taking a byte
                    await asyncio.wait_for(writer.drain(), left(deadline) + 0.01)
            answer = "open, its writes blocked" if blocked else "open, its writes all taken"
        except asyncio.TimeoutError:
            answer = "open, its writes blocked"
        except ConnectionError:
            answer = "closed by the node"
        if writer.transport.is_closing():
            answer = "closed by the node"
        if answer == "closed by the node":
            lived = time.monotonic() - opened
            t.figures["closed after s (first)"] = min(t.figures.get("closed after s (first)", lived), lived)
            t.most("closed after s (last)", lived)
        t.answers[answer] += 1
        t.sent += sent
        drop(writer)
        await asyncio.sleep(left(deadline))

    await workers(c["connections"], deadline, one, t)


# -- 6. deeply nested JSON ----------------------------------------------------------------------------------

async def nested(c: dict, deadline: float, t: Tally) -> None:
    """Before authentication, messages of 30,000 '[' (under the 32 KiB limit before authentication),
    eight in flight on each connection."""
    port = c["ws_port"]
    message = frame(b"[" * 30_000)

    async def one(i: int) -> None:
        reader, writer = await ws_open(port)
        try:
            inflight = 0
            while time.monotonic() < deadline:
                while inflight < 8:
                    writer.write(message)
                    t.sent += len(message)
                    t.attempts += 1
                    inflight += 1
                opcode, payload = await read_message(reader, writer)
                t.answers[label_reply(opcode, payload)] += 1
                if opcode == CLOSE:
                    return
                inflight -= 1
        finally:
            drop(writer)

    await workers(c["connections"], deadline, one, t)


# -- 9. sign-in link floods -----------------------------------------------------------------------------------

async def signin(c: dict, deadline: float, t: Tally) -> None:
    """One client (this address) asking for one-time sign-in links for ever new addresses, over a few
    keep-alive connections, each with the CSRF cookie and token of a GET /login."""
    port = c["web_port"]
    counter = iter(range(10**9))

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            code, headers, body = await http_answer(reader)
            cookies = "; ".join(v.split(";", 1)[0] for v in headers.get("set-cookie", []))
            marker = b'<meta name="csrf-token" content="'
            start = body.find(marker)
            if start < 0:
                raise RuntimeError(f"GET /login: {code} without a CSRF token")
            token = body[start + len(marker):body.find(b'"', start + len(marker))].decode()
            while time.monotonic() < deadline:
                data = json.dumps({"email": f"flood{next(counter)}@bench.test", "next": "/"}).encode()
                writer.write((f"POST /login/start HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookies}\r\n"
                              f"X-CSRF-Token: {token}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
                t.attempts += 1
                code, headers, _ = await http_answer(reader)
                t.answers[str(code)] += 1
                if headers.get("connection", [""])[0].lower() == "close":
                    return
        finally:
            drop(writer)

    await workers(c["connections"], deadline, one, t)


# -- 10. oversized handshake heads ----------------------------------------------------------------------------

async def heads(c: dict, deadline: float, t: Tally) -> None:
    """Complete opening handshakes with a 9 KiB head, each in one write, again and again."""
    port = c["ws_port"]
    head, _ = handshake("/presence", port, "X-Padding: " + "a" * 9216 + "\r\n")

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            t.sent += len(head)
            t.attempts += 1
            line = await asyncio.wait_for(reader.readline(), 10)
            parts = line.split()
            t.answers[parts[1].decode() if len(parts) > 1 else "no answer"] += 1
        finally:
            drop(writer)

    await workers(c["connections"], deadline, one, t)


# -- the process ------------------------------------------------------------------------------------------------

async def run(config: dict) -> None:
    name = config["attack"]
    t = Tally()
    ready: dict = {"ev": "ready"}
    server: EndlessHeads | None = None
    assertions: list[str] = []
    if name == "issuer":
        server = EndlessHeads(config["issuers"])
        await server.start()
        ready["issuers"] = [f"127.0.0.1:{p}" for p in server.ports]
        assertions = _domain_assertions(ready["issuers"], lambda d: "someone@hostile.bench.test", config["audience"])
    elif name == "ssrf":
        names = internal_names(config["domains"])
        assertions = _domain_assertions(names, lambda d: f"someone@{d}", config["audience"])
        ready["domains"] = len(names)
    print(json.dumps(ready), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    t0 = time.monotonic()
    deadline = t0 + config["seconds"]
    attack = {"fragments": fragments, "bodies": bodies, "no_read": no_read, "nested": nested,
              "signin": signin, "heads": heads}.get(name)
    if name == "idle":
        await asyncio.sleep(left(deadline))
    elif attack is not None:
        await attack(config, deadline, t)
    else:
        await connect_with(config, deadline, t, assertions)
    result = {"ev": "result", "answers": dict(t.answers.most_common()), "attempts": t.attempts,
              "mb_sent": round(t.sent / 2**20, 1), "seconds": round(time.monotonic() - t0, 2),
              "figures": {k: round(v, 1) for k, v in t.figures.items()}}
    if server is not None:
        result["figures"]["fetches the hostile issuers saw"] = server.fetches
        result["figures"]["most KiB written to one fetch"] = round(server.most / 1024, 1)
        server.close()
    print(json.dumps(result), flush=True)


def main(path: str) -> None:
    common.die_with_parent()
    with open(path) as f:
        config = json.load(f)
    common.lifetime_guard(config["seconds"] + 300)
    asyncio.run(run(config))


if __name__ == "__main__":
    main(sys.argv[1])
