"""The chaos checker's fleet: people's devices, applications' connections and their notifications,
each behaving like a well-written client (reconnect with backoff, re-state the last status, retry a
notification answered errno 50 with the same text), and a Record of every answer and everything
received, which is what the invariants are checked against (bench.chaos_check).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from bench.chaos_wire import WS, Gone, http_post

STATUSES = ("online", "unavailable", "offline")


@dataclass
class Record:
    """Everything the clients were told. Plain data, so the checker's logic can be tested on
    hand-made records."""

    statuses: list[dict] = field(default_factory=list)       # {device, status, outcome, t}
    updates: list[dict] = field(default_factory=list)        # {app, conn, n, email, status, seq}
    sent: dict[str, dict] = field(default_factory=dict)      # text -> {app, email, attempts: [outcome]}
    received: list[dict] = field(default_factory=list)       # {device, email, id, message, n}
    acks: dict[int, str] = field(default_factory=dict)       # notification id -> ok | lost | maybe | ko
    arrivals: itertools.count = field(default_factory=itertools.count)
    # {who, node, event: open | ok | closed, t, n}: where each client was, to read a violation's story
    connections: list[dict] = field(default_factory=list)


class Device:
    """One device of one person: connects to a node with a fresh assertion, re-states its last
    status, reports statuses while traffic flows, acknowledges about half of what it receives."""

    def __init__(self, fleet: "Fleet", email: str, name: str):
        self.fleet, self.email, self.name = fleet, email, name
        self.key = f"{email}/{name}"
        self.intended: str | None = None   # the status it means to have (last one sent)
        self.busy = False                  # a status request is in flight
        self.ok: str | None = None         # the last status answered OK
        self.parked = False                # gone on purpose (closed, not reconnecting) until unparked
        self.ready = asyncio.Event()       # connected and its status re-stated
        self.ws: WS | None = None
        self.connects = 0

    def _push(self, message: dict) -> bool:
        return message.get("type") == "notifications"

    def _on_push(self, message: dict) -> None:
        rec = self.fleet.record
        for item in message.get("notifications", []):
            rec.received.append({"device": self.key, "email": self.email, "id": item["id"], "message": item["message"],
                                 "n": next(rec.arrivals)})
        ids = [item["id"] for item in message.get("notifications", []) if self.fleet.rng.random() < 0.5]
        if ids:
            asyncio.create_task(self._ack(self.ws, ids))

    async def _ack(self, ws: WS | None, ids: list[int]) -> None:
        """Acknowledge; errno 50 (the store went away, perhaps at the commit: it may have been
        applied) is sent again, as the protocol says is harmless, then counts as maybe made."""
        if ws is None:
            return
        outcome = "lost"
        for _ in range(3):
            try:
                answer = await ws.request({"type": "ack", "ids": ids})
            except Gone:
                outcome = "lost"
                break
            if answer.get("result") == "OK":
                outcome = "ok"
                break
            outcome = "maybe" if answer.get("errno") == 50 else "ko"
            if outcome == "ko":
                break
            await asyncio.sleep(0.3)
        for i in ids:
            if self.fleet.record.acks.get(i) != "ok":
                self.fleet.record.acks[i] = outcome

    async def _status(self, ws: WS, status: str) -> bool:
        self.intended = status
        entry = {"device": self.key, "email": self.email, "status": status, "outcome": "lost", "t": time.time()}
        self.fleet.record.statuses.append(entry)
        self.busy = True
        try:
            answer = await ws.request({"type": "status", "status": status})  # Gone: stays "lost"
        finally:
            self.busy = False
        if answer.get("result") == "OK":
            entry["outcome"], self.ok = "ok", status
            return True
        entry["outcome"] = f"errno {answer.get('errno')}"
        return False

    async def run(self) -> None:
        backoff = 0.05
        while not self.fleet.stopping:
            if self.parked:
                await self.fleet.wake.wait()
                continue
            node = self.fleet.pick_node()
            try:
                self.fleet.note(self.key, node, "open")
                self.ws = ws = await WS.open(node.ws, "/presence", self._on_push, self._push)
                answer = await ws.request({"type": "connect", "device": self.name,
                                           "assertion": self.fleet.assertion(self.email)})
                if answer.get("result") is not True:
                    raise Gone(f"connect refused: {answer}")
                self.fleet.note(self.key, node, "ok")
                self.connects += 1
                if self.intended is not None and not await self._status(ws, self.intended):
                    raise Gone("the re-stated status was refused")
                self.ready.set()
                backoff = 0.05
                await self._serve(ws)
            except Gone:
                pass
            finally:
                self.ready.clear()
                self.fleet.note(self.key, node, "closed")
                if self.ws is not None:
                    self.ws.abort()
            if not self.parked:
                await asyncio.sleep(backoff * (0.5 + self.fleet.rng.random()))
                backoff = min(backoff * 2, 1.0)

    async def _serve(self, ws: WS) -> None:
        """Report statuses while traffic flows; wait while it does not; leave when parked."""
        while not ws.closed.is_set() and not self.fleet.stopping:
            if self.parked:
                await ws.close()
                return
            if self.fleet.traffic.is_set():
                await self._status(ws, self.fleet.rng.choice(STATUSES))
                # sparse enough that a person's last change often falls in a fault's window
                await _either(ws.closed, self.fleet.stop_event, self.fleet.rng.uniform(0.5, 3.0))
            elif self.intended is not None and self.ok != self.intended:
                # errno 50 means "try again shortly" (the change may or may not have been applied
                # when the database went away at its commit), so a client sends it again
                if not await self._status(ws, self.intended):
                    await _either(ws.closed, self.fleet.stop_event, 0.5)
            else:
                await _either(ws.closed, self.fleet.wake, 1.0)


class AppConn:
    """One connection of one application: authenticates with the API key, records every update
    list, reconnects when closed. Also carries the application's websocket notifications."""

    def __init__(self, fleet: "Fleet", app: dict, index: int):
        self.fleet, self.app, self.index = fleet, app, index
        self.away = False                  # gone for a while on purpose (a deploy of the application)
        self.back = asyncio.Event()
        self.ready = asyncio.Event()
        self.ws: WS | None = None
        self.connects = 0

    def _push(self, message) -> bool:
        return isinstance(message, list)

    def _on_push(self, updates: list) -> None:
        rec = self.fleet.record
        for u in updates:
            rec.updates.append({"app": self.app["app_id"], "conn": f"{self.app['name']}#{self.index}",
                                "n": next(rec.arrivals), "email": u["email"], "status": u["status"],
                                "seq": u.get("seq")})

    async def leave(self, after: float, duration: float) -> None:
        """Close cleanly after `after` seconds and stay away `duration`: what it misses meanwhile
        must wait for it."""
        await asyncio.sleep(after)
        self.away, self.back = True, asyncio.Event()
        if self.ws is not None:
            await self.ws.close()
        await asyncio.sleep(duration)
        self.away = False
        self.back.set()

    async def run(self) -> None:
        backoff = 0.3
        while not self.fleet.stopping:
            if self.away:
                await _either(self.back, self.fleet.stop_event, None)
                continue
            node = self.fleet.pick_node()
            who = f"{self.app['name']}#{self.index}"
            try:
                self.fleet.note(who, node, "open")
                self.ws = ws = await WS.open(node.ws, "/" + self.app["app_id"], self._on_push, self._push)
                answer = await ws.request({"key": self.app["key"]})
                if answer.get("result") != "OK":
                    raise Gone(f"key refused: {answer}")
                self.fleet.note(who, node, "ok")
                self.connects += 1
                self.ready.set()
                backoff = 0.3
                await _either(ws.closed, self.fleet.stop_event, None)
            except Gone:
                pass
            finally:
                self.ready.clear()
                self.fleet.note(who, node, "closed")
                if self.ws is not None:
                    self.ws.abort()
            # applications reconnect less eagerly than devices: changes meanwhile must wait for them
            await asyncio.sleep(backoff * (0.5 + self.fleet.rng.random()))
            backoff = min(backoff * 2, 2.0)


class Poster:
    """One application sending notifications while traffic flows, each with a text of its own,
    over HTTP or its websocket; retries (same text) an answer of errno 50 or no answer, 3 tries."""

    def __init__(self, fleet: "Fleet", app: dict, conns: list[AppConn]):
        self.fleet, self.app, self.conns = fleet, app, conns
        self.count = itertools.count()
        self.busy = False   # a notification's attempts are not over

    async def run(self) -> None:
        rng = self.fleet.rng
        people = sorted(self.app["uids"])
        while not self.fleet.stopping:
            if not self.fleet.traffic.is_set():
                await _either(self.fleet.wake, self.fleet.stop_event, 1.0)
                continue
            email = rng.choice(people)
            text = f"{self.app['name']}-{next(self.count)}-{email}"
            entry = self.fleet.record.sent[text] = {"app": self.app["app_id"], "email": email, "attempts": []}
            self.busy = True
            for _ in range(3):
                outcome = await self._send(email, text, entry)
                entry["attempts"].append(outcome)
                if outcome not in ("errno 50", "lost"):
                    break
                await asyncio.sleep(0.3)
            self.busy = False
            await _either(self.fleet.stop_event, self.fleet.wake, rng.uniform(0.1, 0.4))

    async def _send(self, email: str, text: str, entry: dict) -> str:
        item = [{"uid": self.app["uids"][email], "message": text}]
        conn = self.fleet.rng.choice(self.conns)
        try:
            if self.fleet.rng.random() < 0.3 and conn.ws is not None and conn.ready.is_set():
                entry.setdefault("via", []).append([f"ws:{self.app['name']}#{conn.index}", round(time.time(), 3)])
                answer = await conn.ws.request({"type": "notify", "notifications": item})
                result = answer["results"][0] if answer.get("type") == "notified" else answer
            else:
                node = self.fleet.pick_node()
                entry.setdefault("via", []).append([node.name, round(time.time(), 3)])
                status, body = await http_post(node.web, f"/{self.app['app_id']}/notification",
                                               item, self.app["key"])
                result = body[0] if status == 200 and isinstance(body, list) else body
        except Gone:
            return "lost"
        return "ok" if result.get("result") == "OK" else f"errno {result.get('errno')}"


async def _either(a: asyncio.Event, b: asyncio.Event, timeout: float | None) -> None:
    """Until either event is set or `timeout` passes."""
    waits = {asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class Fleet:
    """`people` people with 1-2 devices each, applications granted by subsets of them with 1-2
    connections each, and their posters; `traffic` on or off; `settled()` says when every client
    that should be connected is."""

    def __init__(self, rng: random.Random, nodes: list, apps: dict[str, dict], people: list[str],
                 assertion: Callable[[str], str]):
        self.rng, self.nodes, self.assertion = rng, nodes, assertion
        self.record = Record()
        self.traffic, self.wake, self.stop_event = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.stopping = False
        self.devices = [Device(self, email, f"d{j}") for email in people for j in range(rng.choice((1, 2)))]
        self.conns = {name: [AppConn(self, {**app, "name": name}, i) for i in range(rng.choice((1, 2)))]
                      for name, app in apps.items()}
        self.posters = [Poster(self, {**app, "name": name}, self.conns[name]) for name, app in apps.items()]
        self.tasks: list[asyncio.Task] = []

    def pick_node(self):
        return self.rng.choice(self.nodes)

    def note(self, who: str, node, event: str) -> None:
        self.record.connections.append({"who": who, "node": node.name, "event": event, "t": round(time.time(), 3),
                                        "n": next(self.record.arrivals)})

    def start(self) -> None:
        clients = [*self.devices, *(c for cs in self.conns.values() for c in cs), *self.posters]
        self.tasks = [asyncio.create_task(c.run()) for c in clients]

    def set_traffic(self, on: bool) -> None:
        """Traffic on: statuses and notifications flow, and a few devices leave (parked) or come
        back. Off: only reconnections."""
        if on:
            for d in self.devices:  # the parked come back; a few others leave at some moment
                d.parked = False
                if self.rng.random() < 0.15:
                    self.tasks.append(asyncio.create_task(self._park(d, self.rng.uniform(0, 6))))
            for c in (c for cs in self.conns.values() for c in cs):
                if self.rng.random() < 0.4:
                    self.tasks.append(asyncio.create_task(c.leave(self.rng.uniform(0, 3), self.rng.uniform(1, 3))))
            self.traffic.set()
        else:
            self.traffic.clear()
        self.wake.set()
        self.wake = asyncio.Event()

    async def _park(self, device: Device, after: float) -> None:
        await _either(self.stop_event, self.wake, after)  # or traffic stops first: then it stays
        if self.traffic.is_set():
            device.parked = True

    def live_devices(self) -> list[Device]:
        return [d for d in self.devices if not d.parked]

    def settled(self) -> bool:
        return (all(d.ready.is_set() and not d.busy for d in self.live_devices())
                and not any(d.ws is not None and not d.ws.closed.is_set() for d in self.devices if d.parked)
                and all(c.ready.is_set() and not c.away for cs in self.conns.values() for c in cs)
                and not any(p.busy for p in self.posters))

    def reconnects(self) -> int:
        return sum(d.connects for d in self.devices) + sum(c.connects for cs in self.conns.values() for c in cs)

    async def stop(self) -> None:
        self.stopping = True
        self.stop_event.set()
        self.wake.set()
        for d in self.devices:
            if d.ws is not None:
                d.ws.abort()
        for c in (c for cs in self.conns.values() for c in cs):
            if c.ws is not None:
                c.ws.abort()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
