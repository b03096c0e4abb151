"""Applications in sync: the state on connect (``"sync": true``) and resuming a stream (``"since": N``).

Both work the same way, so that nothing is missed and nothing is sent twice across the switch to
live changes:

1. The connection subscribes first (``Streams.subscribe`` with ``CatchingUp``): from then on every
   live change of the application is kept, in order and not merged, in ``held`` (bounded).
2. It is sent what it lacks, read from the store one page at a time, waiting while its socket is
   full: the change log after ``since`` (every transition, in order), or the current state of every
   granted person (``{"type": "state", "people": [...]}``). A log trimmed past ``since`` is said
   (``{"type": "resync", ...}``) and the state is sent instead.
3. ``N``, the log's head once that is done; the node waits until it has published every change up
   to ``N`` (so ``held`` has all of them), sends the held changes up to ``N`` that the connection
   does not have yet, then ``{"type": "synced", "seq": N}``, then the held ones after ``N``, and
   the connection goes live.

What the connection "has" is decided by number: after a replay up to ``pos`` it has every change up
to ``pos``; a state page is current at least at ``h0`` (the head read before the first page) and,
for a person who changed meanwhile, at that person's number (``people.seq``), remembered only for
those (bounded).
"""

from __future__ import annotations

import json
from time import perf_counter
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from presence import changelog
from presence.store import PersonState, Store, StoreUnavailable
from presence.streams import Streams
from presence.subscriber import Subscriber, _merge, encode_parts
from presence.views import Update

log = Logger()

# People read per store call, and log entries: the memory a catch-up holds at once (a log entry of a
# person with thousands of grants is up to a megabyte).
PAGE = 1000
LOG_PAGE = 200
# The reactor time a replay takes before it lets other work run.
TURN = 0.02


class CatchingUp(Subscriber):
    """A connection catching up: live changes are held in order (not merged per person) until it is
    released; past ``limit`` of them it is closed as a slow reader (they go to the waiting queue).

    Meanwhile ``backlog`` (unused until it goes live) holds each person's oldest held change, so the
    node's delivered mark (``Streams.unsent_floor`` reads backlogs) stays below what is held."""

    __slots__ = ("held", "_last", "_waiter", "mark")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.held: list[Update] | None = []
        self._last: list[Update] | None = None
        self._waiter: Deferred | None = None
        self.mark = 0           # the last number it was told it holds everything up to (synced)

    def keep(self, updates: list[Update]) -> None:
        if self.held is None:
            return super().keep(updates)
        if updates is self._last:
            return          # the same list again: a fan-out pushes it once per message it was split into
        self._last = updates
        self.held.extend(updates)
        backlog = self.backlog
        for u in updates:
            if u.email not in backlog:
                backlog[u.email] = u
        if len(self.held) > self.limit:
            self._overflow("too many changes while catching up")

    def prune(self, upto: int) -> None:
        """Forget held changes the connection has by now (numbers up to ``upto``)."""
        if self.held:
            self.held = [u for u in self.held if u.seq > upto]
            self.backlog = {}
            for u in self.held:
                self.backlog.setdefault(u.email, u)

    def resume(self) -> None:
        super().resume()
        self._wake()

    def detach(self) -> list[Update]:
        if self.held is not None:
            self.backlog = {}
            _merge(self.backlog, self.held)
        self.held = None
        self._wake()
        return super().detach()

    def writable(self) -> Deferred | None:
        """None if the socket takes more now; else a Deferred that fires when it does (or closes)."""
        if not self.paused or self.closed:
            return None
        if self._waiter is None:
            self._waiter = Deferred()
        return self._waiter

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)


class Gone(Exception):
    """The connection went while catching up: nothing more to do."""


def json_bytes(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


_string = json.encoder.encode_basestring_ascii   # what json.dumps does to a str, in C


def person_json(p: PersonState) -> bytes:
    """``json_bytes(p.as_json())``, written directly (100,000 of them per sync of a large application)."""
    return ('{"email":' + _string(p.email) + ',"uid":' + _string(p.uid) + ',"status":' + _string(p.status)
            + ',"last_active":' + ("null" if p.last_active is None else repr(round(p.last_active, 3)))
            + ',"seq":' + str(p.seq) + "}").encode("ascii")


def state_messages(people: list[PersonState], limit: int) -> list[bytes]:
    """``{"type": "state", "people": [...]}`` messages of at most ``limit`` bytes each."""
    head, tail = b'{"type":"state","people":[', b"]}"
    out, part, size = [], [], len(head) + len(tail)
    for person in people:
        item = person_json(person)
        if part and size + len(item) + 1 > limit:
            out.append(head + b",".join(part) + tail)
            part, size = [], len(head) + len(tail)
        part.append(item)
        size += len(item) + 1
    if part:
        out.append(head + b",".join(part) + tail)
    return out


class Syncer:
    """Catches application connections up (see the module docstring); plain, testable with a Clock."""

    def __init__(self, store: Store, streams: Streams, clock: IReactorTime, feed: Any = None, page: int = PAGE,
                 feed_timeout: float = 10.0, mark_interval: float = 1.0):
        self.store = store
        self.streams = streams
        self.clock = clock
        self.feed = feed            # presence.bus.ChangeFeed; None or not following: changes are made here
        self.page = page
        self.log_page = min(page, LOG_PAGE)
        self.feed_timeout = feed_timeout
        # Live connections that caught up: every ``mark_interval`` seconds each is told, with another
        # synced, the number up to which it holds every change (when that moved on).
        self.live: dict[CatchingUp, None] = {}
        self._marks = LoopingCall(self.mark)
        self._marks.clock = clock
        self.mark_interval = mark_interval

    async def subscribe(self, app_id: str, sink: Any) -> CatchingUp:
        return await self.streams.subscribe(app_id, sink, catch_up=CatchingUp)

    async def catch_up(self, sub: CatchingUp, since: int | None = None) -> int | None:
        """Replay after ``since`` (None: send the state), release, go live; returns N (None: gone)."""
        self.streams.metrics.catch_ups["sync" if since is None else "since"].inc()
        try:
            if since is None:
                floor = await self._state(sub)
            else:
                floor = await self._replay(sub, since)
            n = await self.store.last_change()
            await self._published(n, sub)
            self._release(sub, n, floor)
            if not sub.closed:
                sub.mark = n
                self.live[sub] = None
                if not self._marks.running:
                    self._marks.start(self.mark_interval, now=False)
            return n
        except Gone:
            return None

    # -- what the connection lacks ---------------------------------------------------------------------
    async def _replay(self, sub: CatchingUp, since: int) -> Callable[[Update], bool]:
        head = await self.store.last_change()
        if since > head:
            return await self._resync(sub, since, None, "since is ahead of this deployment's change log")
        pos = since
        while True:
            changes = await self.store.changes_since(pos, self.log_page)
            self._check(sub)
            first = changes[0].numbers.start if changes else None
            if (first is not None and first > pos + 1) or (first is None and pos < head):
                return await self._resync(sub, since, first, "the change log no longer holds every change after since")
            updates: list[Update] = []
            started = perf_counter()
            for change in changes:
                if perf_counter() - started > TURN:
                    # Entries of people with thousands of grants take milliseconds each to decode:
                    # send what is ready, and let the reactor breathe before the rest.
                    await self._send_updates(sub, updates)
                    updates = []
                    await deferLater(self.clock, 0, lambda: None)
                    self._check(sub)
                    started = perf_counter()
                start = change.numbers.start
                for u in changelog.decode(change.payload, change.seq)[0]:
                    # a reaper's re-logged older change (its own number) is in the log at that number too
                    if u.app_id == sub.app_id and u.seq > since and u.seq >= start:
                        updates.append(u)
                pos = change.seq
            await self._send_updates(sub, updates)
            sub.prune(pos)
            if len(changes) < self.log_page:
                return lambda u, pos=pos: u.seq > pos

    async def _resync(self, sub: CatchingUp, since: int, oldest: int | None, why: str) -> Callable[[Update], bool]:
        self.streams.metrics.catch_ups["resync"].inc()
        await self._send(sub, json_bytes({"type": "resync", "since": since, "oldest": oldest, "reason": why}))
        return await self._state(sub)

    async def _state(self, sub: CatchingUp) -> Callable[[Update], bool]:
        h0 = await self.store.last_change()
        # People whose state is newer than h0 (they changed while the pages were read): their number.
        newer: dict[str, int] = {}
        after = ""
        while True:
            people = await self.store.people_page(sub.app_id, after, self.page)
            self._check(sub)
            if not people:
                break
            for person in people:
                if person.seq > h0:
                    newer[person.email] = person.seq
            if len(newer) > sub.limit:
                sub._overflow("too many changes while the state was sent")
                raise Gone()
            sub.prune(h0)
            for payload in state_messages(people, self.streams.max_message):
                await self._send(sub, payload)
            after = people[-1].email
        return lambda u: u.seq > newer.get(u.email, h0)

    # -- the switch to live changes ------------------------------------------------------------------------
    async def _published(self, n: int, sub: CatchingUp) -> None:
        """Wait until this node has published every change up to ``n`` (then ``held`` has all of this
        application's). A node alone on its database publishes its changes as it commits them."""
        feed = self.feed
        if feed is None or not feed.follow:
            return
        turns = 0
        while feed.last < n:
            if turns * 0.005 > self.feed_timeout:
                raise StoreUnavailable("this node does not follow the change log; try again shortly")
            if turns % 20 == 0:
                feed.wake()           # a read now, rather than at the next announcement or poll
            await deferLater(self.clock, 0.005, lambda: None)
            turns += 1
            self._check(sub)

    def _release(self, sub: CatchingUp, n: int, lacks: Callable[[Update], bool]) -> None:
        """In one go, with no reactor turn in between: held changes up to ``n``, synced, the rest, live."""
        held = sorted((u for u in sub.held or () if lacks(u)), key=lambda u: u.seq)
        sub.held = None
        sub.backlog = {}
        limit = self.streams.max_message
        before = [u for u in held if u.seq <= n]
        later = [u for u in held if u.seq > n]
        parts = encode_parts(before, limit) if before else []
        parts.append((json_bytes({"type": "synced", "seq": n}), []))
        parts += encode_parts(later, limit) if later else []
        send = sub.sink.send
        for i, (payload, _) in enumerate(parts):
            if not send(payload):         # closing: what it was not sent goes to the waiting queue
                sub.keep([u for _, rest in parts[i:] for u in rest])
                break
        sub.loaded([])

    # -- marks: "you hold every change up to N" while live ---------------------------------------------------
    def mark(self) -> Deferred | None:
        """Tell each live connection the number up to which it holds every change of its application.
        Live lists carry numbers out of order across people (a node publishes its own changes as it
        commits them, the others' as it reads them from the log), so the highest number seen is no
        place to resume from; the last synced is."""
        for sub in [s for s in self.live if s.closed]:
            del self.live[sub]
        if not self.live:
            if self._marks.running:
                self._marks.stop()
            return None
        feed = self.feed
        if feed is not None and feed.follow:
            self._send_marks(feed.last)       # every change up to it has been published here
            return None
        # Alone on its database, a node publishes a change as it commits it: by the time the head
        # read after it comes back, everything up to it is published.
        d = ensureDeferred(self.store.last_change())
        d.addCallbacks(self._send_marks, lambda f: None)
        return d

    def stop(self) -> None:
        if self._marks.running:
            self._marks.stop()
        self.live.clear()

    def _send_marks(self, head: int) -> None:
        streams = self.streams
        fanout = streams._fanout
        for sub in list(self.live):
            if sub.closed or sub.paused or sub.loading:
                continue
            upto = head
            channel = streams.channels.get(sub.app_id)
            pending = list(channel.batch) if channel is not None else []
            if fanout is not None and fanout.app_id == sub.app_id:
                pending += fanout.updates
            pending += sub.backlog.values()
            if pending:
                upto = min(upto, min(u.seq for u in pending) - 1)   # published here, not handed to it yet
            if upto > sub.mark and sub.sink.send(json_bytes({"type": "synced", "seq": upto})):
                sub.mark = upto

    # -- sending ---------------------------------------------------------------------------------------------
    async def _send_updates(self, sub: CatchingUp, updates: list[Update]) -> None:
        for payload, _ in encode_parts(updates, self.streams.max_message) if updates else ():
            await self._send(sub, payload)

    async def _send(self, sub: CatchingUp, payload: bytes) -> None:
        """Send, then wait while the socket is full: a catch-up never piles up in the socket's buffer."""
        self._check(sub)
        if not sub.sink.send(payload):
            raise Gone()
        waiter = sub.writable()
        if waiter is not None:
            await waiter
            self._check(sub)

    @staticmethod
    def _check(sub: CatchingUp) -> None:
        if sub.closed:
            raise Gone()
