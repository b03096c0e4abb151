"""A load-generator process: holds a share of the connections and runs the scenarios' client side.

    python -m bench.generator CONFIG.json

It certifies its devices' emails at start (RSA signing, before any timing), prints
{"ev": "ready"}, then reads one JSON command per line on stdin and answers each with one JSON line
on stdout carrying the command's "id" (long commands also print {"ev": "progress"} lines). It exits
when stdin closes, on "exit", or after its lifetime.

Hot paths look for markers in bytes and never parse JSON. Times are CLOCK_MONOTONIC, comparable
with the other bench processes.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import re
import sys
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from bench import common
from bench.wsclient import OPEN, Conn, frame, now

# Conn.flag values
NEW, AUTHING, READY, WAIT_STATUS, FAILED = 0, 1, 2, 3, -1

STATUS_FRAMES_TEXT = (b'{"type":"status","status":"online"}', b'{"type":"status","status":"unavailable"}')
# A change as an application receives it: the device index and the status' first letter, in
# either field order, found by one C-speed regex.
UPDATE = re.compile(
    rb'"email":"d(\d+)@[^"]*"[^}]*?"status":"([ou])|"status":"([ou])[^}]*?"email":"d(\d+)@')
KO = b'"KO"'
# Live notifications as a device receives them: each item's message carries its send time
NOTE_STAMP = re.compile(rb'"message":"t([0-9.]+)"')
NOTE_ID = re.compile(rb'"id":(\d+)')


@dataclass(eq=False)
class Group:
    name: str
    host: str
    port: int
    specs: list  # (path, ident, role, auth frame maker or None)
    conns: list = field(default_factory=list)
    total: int = 0
    authed: int = 0
    failed: int = 0
    errors: list = field(default_factory=list)
    t_last_auth: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sem: asyncio.Semaphore | None = None
    then_status: bool = False      # storm: a device sends a changed status right after connecting
    observe: bool = False          # ... which counts once the observer application has it
    # fan-out
    armed: bytes = b""
    got: int = 0
    t_first: float = 0.0
    t_last: float = 0.0
    all_got: asyncio.Event = field(default_factory=asyncio.Event)
    dropping: bool = False


class Generator:
    def __init__(self, config: dict):
        self.config = config
        self.index = config["index"]
        self.G = config["generators"]
        self.sources = config["sources"]
        self.inflight = config.get("inflight", 256)
        self.loop = asyncio.get_running_loop()
        self.groups: dict[str, Group] = {}
        self._source = 0
        self.devices = list(common.devices_of(self.index, self.G, config["devices"]))
        # per device (index k = global // G): its last status bit and when each status was sent
        self.status_bit = [1] * len(self.devices)   # "unavailable": the first change is online
        self.sent_at = [[0.0, 0.0] for _ in self.devices]
        self.status_frames = (frame(STATUS_FRAMES_TEXT[0]), frame(STATUS_FRAMES_TEXT[1]))
        self.recording: array.array | None = None
        self.matched = 0
        self.awaiting: dict[int, int] = {}      # storm: device index -> status bit not yet observed
        self.t_current = 0.0
        self.current = asyncio.Event()
        self.device_replies = 0
        self.device_errors = 0
        self.error_sample = ""
        self.certs: dict[str, str] = {}
        self._sig = ("", 0.0)
        # cross-node: a second observer connection (on another node), with its own send times
        self.sent_c: list | None = None
        self.recording_c: array.array | None = None
        self.matched_c = 0
        # live notifications received by devices (role "ndev")
        self.note_rec: array.array | None = None
        self.note_got = 0
        self.note_messages = 0
        self.note_ack = True
        self.acks = 0
        self.ack_replies = 0
        self.ack_errors = 0
        self.ack_error_sample = ""

    # -- identity ------------------------------------------------------------------------------------
    def load_identity(self, emit) -> None:
        from presence.identity import Issuer, jws
        from presence.identity.issuer import CERT_LIFETIME

        c = self.config
        with open(c["issuer_pem"], "rb") as f:
            issuer = Issuer(c["issuer_domain"], serialization.load_pem_private_key(f.read(), None))
        with open(c["user_pem"], "rb") as f:
            self.user_key = serialization.load_pem_private_key(f.read(), None)
        public = jws.public_key_to_json(self.user_key.public_key(), "jwk")
        emails = [common.device_email(i) for i in self.devices] + c.get("stars", [])
        t = time.time()
        for n, email in enumerate(emails):
            self.certs[email] = issuer.certify(email, public, t, CERT_LIFETIME)
            if n % 500 == 0:
                emit({"ev": "progress", "id": "init", "done": n})

    def assertion_sig(self) -> str:
        """The assertion half (audience and times, signed by the user key): the same for every
        email, so one signature serves all devices; renewed every minute (it lives 120 s)."""
        from presence.identity import make_assertion

        sig, made = self._sig
        if time.time() - made > 60:
            t = time.time()
            sig = make_assertion("x", self.user_key, self.config["audience"], t).split("~", 1)[1]
            self._sig = (sig, t)
        return sig

    def device_connect(self, email: str) -> bytes:
        text = '{"type":"connect","assertion":"%s~%s","device":"phone"}' % (self.certs[email], self.assertion_sig())
        return frame(text.encode())

    def app_key(self) -> bytes:
        return frame(('{"key":"%s"}' % self.config["api_key"]).encode())

    # -- Conn owner callbacks ------------------------------------------------------------------------
    def opened(self, conn: Conn) -> None:
        group = conn.group
        maker = conn.auth
        if maker is None:
            self._authed(conn, group)
        else:
            conn.flag = AUTHING
            conn.send(maker())

    def text(self, conn: Conn, payload: bytes) -> None:
        flag = conn.flag
        if flag == READY:
            role = conn.role
            if role == "sub":
                group = conn.group
                if group.armed and not conn.t and group.armed in payload:
                    t = conn.t = now()
                    group.got += 1
                    if group.got == 1:
                        group.t_first = t
                    group.t_last = t
                    if group.got >= len(group.conns):
                        group.all_got.set()
            elif role == "obs":
                self._observed(payload)
            elif role == "dev":
                self.device_replies += 1
                if KO in payload:
                    self.device_errors += 1
                    self.error_sample = payload[:200].decode("utf-8", "replace")
            elif role == "obsc":
                self._observed_c(payload)
            elif role == "ndev":
                self._notified(conn, payload)
        elif flag == AUTHING:
            group = conn.group
            if payload.startswith(b'{"result":"KO"') or payload.startswith(b'{"result":false'):
                self._failed(conn, group, payload[:200].decode("utf-8", "replace"))
                conn.abort()
            else:
                self._authed(conn, group)
        elif flag == WAIT_STATUS:
            # storm against a reference: the status' answer is what "current" means there
            conn.flag = READY
            self._current(conn.ident)

    def pong(self, conn: Conn, payload: bytes) -> None:
        pass

    def closed_by_peer(self, conn: Conn, code) -> None:
        group = conn.group
        if conn.flag in (NEW, AUTHING):
            self._failed(conn, group, f"closed by the server with {code}")

    def failed(self, conn: Conn, why: str) -> None:
        self._failed(conn, conn.group, why)

    def lost(self, conn: Conn, was: int) -> None:
        group = conn.group
        if conn.flag in (NEW, AUTHING) and not group.dropping:
            self._failed(conn, group, "connection lost before authentication")

    # -- connection bookkeeping -----------------------------------------------------------------------
    def _authed(self, conn: Conn, group: Group) -> None:
        if conn.flag == READY:
            return
        conn.flag = READY
        group.authed += 1
        group.t_last_auth = now()
        group.sem.release()
        if group.then_status:
            k = conn.ident // self.G
            bit = self.status_bit[k] = 1 - self.status_bit[k]
            if group.observe:
                self.awaiting[conn.ident] = bit
                self.sent_at[k][bit] = now()
            else:
                conn.flag = WAIT_STATUS
                self.awaiting[conn.ident] = bit
            conn.send(self.status_frames[bit])
        self._maybe_done(group)

    def _failed(self, conn: Conn, group: Group, why: str) -> None:
        if conn.flag == FAILED:
            return
        was_ready = conn.flag == READY
        conn.flag = FAILED
        if was_ready:
            return
        group.failed += 1
        if len(group.errors) < 5:
            group.errors.append(why)
        group.sem.release()
        self._maybe_done(group)

    def _maybe_done(self, group: Group) -> None:
        if group.authed + group.failed >= group.total:
            group.done.set()

    def _observed(self, payload: bytes) -> None:
        t = now()
        G = self.G
        rec = self.recording
        for a, b, c, d in UPDATE.findall(payload):
            idx = int(a or d)
            bit = 0 if (b or c) == b"o" else 1
            k = idx // G
            sent = self.sent_at[k]
            if sent[bit]:
                if rec is not None:
                    rec.append((t - sent[bit]) * 1000.0)
                sent[bit] = 0.0
                self.matched += 1
            if self.awaiting.get(idx) == bit:
                self._current(idx, t)

    def _observed_c(self, payload: bytes) -> None:
        """The second observer (cross-node: another node than the first), matched on its own copy of
        the send times."""
        t = now()
        G = self.G
        rec = self.recording_c
        sent_c = self.sent_c
        for a, b, c, d in UPDATE.findall(payload):
            sent = sent_c[int(a or d) // G]
            bit = 0 if (b or c) == b"o" else 1
            if sent[bit]:
                if rec is not None:
                    rec.append((t - sent[bit]) * 1000.0)
                sent[bit] = 0.0
                self.matched_c += 1

    def _notified(self, conn: Conn, payload: bytes) -> None:
        """A device's message: live notifications (time each, acknowledge them) or the answer to an ack."""
        if payload.startswith(b'{"type":"notifications"'):
            t = now()
            rec = self.note_rec
            stamps = NOTE_STAMP.findall(payload)
            if rec is not None:
                for stamp in stamps:
                    rec.append((t - float(stamp)) * 1000.0)
            self.note_got += len(stamps)
            self.note_messages += 1
            if self.note_ack:
                conn.send(frame(b'{"type":"ack","ids":[' + b",".join(NOTE_ID.findall(payload)) + b"]}"))
                self.acks += 1
        else:
            self.ack_replies += 1
            if KO in payload:
                self.ack_errors += 1
                self.ack_error_sample = payload[:200].decode("utf-8", "replace")

    def _current(self, idx: int, t: float | None = None) -> None:
        self.awaiting.pop(idx, None)
        self.t_current = t or now()
        if not self.awaiting:
            self.current.set()

    def _next_source(self) -> str:
        self._source = (self._source + 1) % len(self.sources)
        return self.sources[self._source]

    async def _open(self, conn: Conn, group: Group) -> None:
        try:
            await self.loop.create_connection(lambda: conn, group.host, group.port, local_addr=(self._next_source(), 0))
        except OSError as e:
            self._failed(conn, group, f"connect: {e}")

    async def _connect_group(self, group: Group, specs: list, tick) -> None:
        """Connect `specs` into `group` (at most `inflight` handshakes at a time); returns when each
        is authenticated or failed. `tick()` reports progress about twice a second."""
        group.specs = group.specs + specs if group.conns else list(specs)
        group.total += len(specs)
        group.done = asyncio.Event()
        if group.sem is None:
            group.sem = asyncio.Semaphore(self.inflight)
        self._maybe_done(group)
        last = now()
        for path, ident, role, auth in specs:
            await group.sem.acquire()
            conn = Conn(self, path, f"{group.host}:{group.port}", ident, role)
            conn.group = group
            conn.auth = auth
            group.conns.append(conn)
            self.loop.create_task(self._open(conn, group))
            if now() - last > 0.5:
                last = now()
                tick()
        while not group.done.is_set():
            try:
                await asyncio.wait_for(group.done.wait(), 0.5)
            except asyncio.TimeoutError:
                tick()

    def _specs(self, cmd: dict) -> list:
        kind = cmd["kind"]
        if kind == "devices":
            path = cmd.get("path", "/presence")
            auth = cmd.get("auth", True)
            role = cmd.get("role", "dev")
            return [(path, i, role, (lambda e=common.device_email(i): self.device_connect(e)) if auth else None)
                    for i in self.devices]
        if kind == "star":
            email = cmd["email"]
            return [(cmd.get("path", "/presence"), 0, "star",
                     (lambda: self.device_connect(email)) if cmd.get("auth", True) else None)]
        if kind == "apps":
            role = cmd.get("role", "sub")
            if role == "obsc" and self.sent_c is None:
                self.sent_c = [[0.0, 0.0] for _ in self.devices]
            paths = cmd["paths"] if "paths" in cmd else [cmd["path"]] * cmd["count"]
            key = self.app_key if cmd.get("auth", True) else None
            return [(p, n, role, key) for n, p in enumerate(paths)]
        raise ValueError(f"unknown kind {kind!r}")

    # -- commands ------------------------------------------------------------------------------------
    async def cmd_connect(self, cmd: dict, emit) -> dict:
        name = cmd["group"]
        group = self.groups.get(name)
        if group is not None and not cmd.get("append"):
            self._drop(self.groups.pop(name))
            group = None
        if group is None:
            group = self.groups[name] = Group(name, cmd["host"], cmd["port"], [])
        before = group.authed, group.failed, len(group.errors)
        t0 = now()
        tick = lambda: emit({"ev": "progress", "id": cmd["id"], "done": group.authed - before[0]})  # noqa: E731
        await self._connect_group(group, self._specs(cmd), tick)
        return {"t0": t0, "t_end": group.t_last_auth if group.authed > before[0] else now(),
                "ok": group.authed - before[0], "failed": group.failed - before[1], "errors": group.errors[before[2]:]}

    def _drop(self, group: Group) -> int:
        group.dropping = True
        n = 0
        for conn in group.conns:
            if conn.transport is not None:
                conn.abort()
                n += 1
        return n

    async def cmd_close(self, cmd: dict, emit) -> dict:
        group = self.groups.pop(cmd["group"], None)
        n = self._drop(group) if group else 0
        await asyncio.sleep(0)
        return {"closed": n}

    async def cmd_count(self, cmd: dict, emit) -> dict:
        group = self.groups.get(cmd["group"])
        return {"open": sum(1 for c in group.conns if c.state == OPEN and c.flag == READY) if group else 0}

    async def cmd_arm(self, cmd: dict, emit) -> dict:
        group = self.groups[cmd["group"]]
        for conn in group.conns:
            conn.t = 0.0
        group.got = 0
        group.t_first = group.t_last = 0.0
        group.all_got = asyncio.Event()
        group.armed = cmd["marker"].encode()
        if not group.conns:
            group.all_got.set()
        return {"armed": len(group.conns)}

    async def cmd_trigger(self, cmd: dict, emit) -> dict:
        conn = self.groups[cmd["group"]].conns[0]
        data = frame(cmd["text"].encode())
        t = now()
        conn.send(data)
        return {"t": t}

    async def cmd_wait(self, cmd: dict, emit) -> dict:
        group = self.groups[cmd["group"]]
        try:
            await asyncio.wait_for(group.all_got.wait(), cmd["timeout"])
        except asyncio.TimeoutError:
            pass
        group.armed = b""
        return {"got": group.got, "total": len(group.conns), "t_first": group.t_first, "t_last": group.t_last}

    async def cmd_ramp(self, cmd: dict, emit) -> dict:
        """Send `rate` status changes per second for `duration` seconds, round robin over this
        generator's devices (each alternates online/unavailable, so every message is a change),
        then wait up to `drain` seconds for the observer to have them all."""
        devs = [c for c in self.groups["dev"].conns if c.flag == READY]
        rate, duration = cmd["rate"], cmd["duration"]
        if not devs or rate <= 0:
            return {"sent": 0, "matched": 0, "errors": 0, "lat": "", "elapsed": duration}
        G = self.G
        frames = self.status_frames
        bits, sent_at = self.status_bit, self.sent_at
        rec = self.recording = array.array("f")
        self.matched = 0
        sent_c = self.sent_c
        if sent_c is not None:
            self.recording_c = array.array("f")
            self.matched_c = 0
        errors0 = self.device_errors
        n = len(devs)
        sent = k = 0
        lag = 0.0
        t0 = now()
        last_emit = t0
        while True:
            t = now()
            elapsed = t - t0
            if elapsed >= duration:
                break
            due = int(elapsed * rate) + 1 - sent
            if due > 1:
                lag = max(lag, (due - 1) / rate)
            for _ in range(due):
                conn = devs[k]
                k = k + 1 if k + 1 < n else 0
                j = conn.ident // G
                bit = bits[j] = 1 - bits[j]
                sent_at[j][bit] = ts = now()
                if sent_c is not None:
                    sent_c[j][bit] = ts
                conn.send(frames[bit])
            sent += max(due, 0)
            if t - last_emit > 0.5:
                last_emit = t
                emit({"ev": "progress", "id": cmd["id"], "done": sent})
            await asyncio.sleep(0.002)
        t_sent = now()
        deadline = t_sent + cmd["drain"]
        while (self.matched < sent or (sent_c is not None and self.matched_c < sent)) and now() < deadline:
            await asyncio.sleep(0.02)
        self.recording = None
        # devices whose last status never reached the observer (a change coalesced with a later one
        # of the same person is not missing; a last one that never came is)
        last = [(conn.ident // G) for conn in devs]
        missing = sum(1 for j in last if sent_at[j][bits[j]])
        second = {}
        if sent_c is not None:
            second = {"matched_c": self.matched_c, "lat_c": base64.b64encode(self.recording_c.tobytes()).decode(),
                      "last_missing_c": sum(1 for j in last if sent_c[j][bits[j]])}
            self.recording_c = None
        return {**second, "sent": sent, "matched": self.matched, "errors": self.device_errors - errors0,
                "last_missing": missing,
                "error_sample": self.error_sample if self.device_errors > errors0 else "",
                "elapsed": t_sent - t0, "lag": lag, "lat": base64.b64encode(rec.tobytes()).decode()}

    async def cmd_storm(self, cmd: dict, emit) -> dict:
        """Drop every connection of `groups` at once, reconnect them all; devices then send a changed
        status. Done when all are back and (with `observe`) the observer has every new status."""
        groups = [self.groups[name] for name in cmd["groups"]]
        errors0 = self.device_errors
        self.awaiting = {}
        self.current = asyncio.Event()
        t0 = now()
        for group in groups:
            self._drop(group)
        await asyncio.sleep(0)
        fresh = []
        for group in groups:
            g = Group(group.name, group.host, group.port, [])
            g.then_status = group.name == "dev"
            g.observe = cmd.get("observe", False)
            self.groups[group.name] = g
            fresh.append(g)
        tick = lambda: emit({"ev": "progress", "id": cmd["id"], "done": sum(g.authed for g in fresh)})  # noqa: E731
        await asyncio.gather(*(self._connect_group(g, old.specs, tick) for g, old in zip(fresh, groups)))
        t_back = max(g.t_last_auth for g in fresh)
        # Wait for the observer to have every new status; give up once nothing new arrived for
        # `stuck` seconds (a change the server lost never comes). The event may have fired while
        # the set was momentarily empty during the reconnects, hence the loop on the set itself.
        deadline = now() + cmd["timeout"]
        seen = len(self.awaiting)
        quiet_since = now()
        while self.awaiting and now() < deadline and now() - quiet_since < cmd.get("stuck", 10.0):
            self.current.clear()
            try:
                await asyncio.wait_for(self.current.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if len(self.awaiting) < seen:
                seen, quiet_since = len(self.awaiting), now()
        return {"t0": t0, "t_back": t_back, "t_current": max(self.t_current, t_back),
                "ok": sum(g.authed for g in fresh), "failed": sum(g.failed for g in fresh),
                "not_current": len(self.awaiting), "errors": [e for g in fresh for e in g.errors][:5],
                "status_errors": self.device_errors - errors0,
                "error_sample": self.error_sample if self.device_errors > errors0 else ""}

    # -- live notifications -----------------------------------------------------------------------
    async def cmd_note_record(self, cmd: dict, emit) -> dict:
        """Start timing the notifications this generator's devices receive (from zero)."""
        self.note_rec = array.array("f")
        self.note_ack = cmd.get("ack", True)
        self.note_got = self.note_messages = self.acks = self.ack_replies = self.ack_errors = 0
        self.ack_error_sample = ""
        return {"recording": True}

    async def cmd_note_count(self, cmd: dict, emit) -> dict:
        return {"got": self.note_got, "acks": self.acks, "ack_replies": self.ack_replies}

    async def cmd_note_stop(self, cmd: dict, emit) -> dict:
        rec, self.note_rec = self.note_rec, None
        return {"got": self.note_got, "messages": self.note_messages, "acks": self.acks,
                "ack_replies": self.ack_replies, "ack_errors": self.ack_errors,
                "ack_error_sample": self.ack_error_sample,
                "lat": base64.b64encode(rec.tobytes()).decode() if rec is not None else ""}

    async def cmd_post(self, cmd: dict, emit) -> dict:
        """Post live notifications as an application (bench.poster), at cmd["rate"] for cmd["duration"] s."""
        from bench.poster import Poster

        poster = Poster({**cmd, "sources": self.sources}, emit, cmd["id"])
        try:
            await poster.open()
            return await poster.run(cmd["rate"], cmd["duration"])
        finally:
            poster.close()

    async def cmd_exit(self, cmd: dict, emit) -> dict:
        for group in list(self.groups.values()):
            self._drop(group)
        self.groups.clear()
        asyncio.get_running_loop().call_later(0.05, sys.exit, 0)
        return {"bye": True}


async def main(path: str) -> None:
    with open(path) as f:
        config = json.load(f)
    common.raise_nofile()
    common.lifetime_guard(config.get("lifetime", 3600))
    out = sys.stdout

    def emit(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    gen = Generator(config)
    gen.load_identity(emit)
    emit({"ev": "ready", "devices": len(gen.devices)})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def run(cmd: dict) -> None:
        try:
            result = await getattr(gen, "cmd_" + cmd["cmd"])(cmd, emit)
        except Exception as e:  # reported to the controller, which stops the run
            result = {"error": f"{type(e).__name__}: {e}"}
        result["id"] = cmd["id"]
        emit(result)

    while True:
        line = await reader.readline()
        if not line:
            break
        loop.create_task(run(json.loads(line)))
    for group in gen.groups.values():
        gen._drop(group)


if __name__ == "__main__":
    common.die_with_parent()
    asyncio.run(main(sys.argv[1]))
