"""Application streams on this node: batching status changes, fanning them out, and keeping them for
applications that do not keep up.

Which applications wait: the node registers in the store every application it holds connections of
(``subscriptions``); a change for an application no node holds is queued in the same transaction that
made it. What is left here is what only this node knows: the backlog of a connection that is closed
or overflows, a batch gathered when the last connection leaves, and changes that arrive for an
application that just left this node (the registry said someone held it; nobody does now).

No protocol lives here: a connection is a ``Subscriber`` (presence.subscriber) over a ``Sink`` (send
bytes, close), so all of it is testable with a Clock and a list.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from presence.batching import Grouped
from presence.metrics import Metrics
from presence.store import NodeFenced, PendingUpdate, Store
from presence.subscriber import Sink, Subscriber, _merge, encode_lists
from presence.unregister import Unregistrations
from presence.views import Update

log = Logger()


@dataclass
class _Channel:
    # A dict as an ordered set: a connection leaves in O(1) (an application may have 19,000, and
    # a reconnect storm closes them all at once).
    subscribers: dict[Subscriber, None] = field(default_factory=dict)
    # Every transition, in order: a connection that keeps up is told each one, not just the latest.
    batch: list[Update] = field(default_factory=list)
    # The number of the latest change published per person: an older one arriving later (another
    # node's change read from the log after this node's own newer one), or the same one again (a
    # replay, or this node's own change read back from the log) is not sent, so for one person an
    # application only ever sees the number grow.
    seen: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Fanout:
    """One application's list on its way to its connections, possibly over several reactor turns.

    It walks ``targets``, the application's connections when its turn came (those before ``pos``
    have it): a connection that leaves meanwhile is closed and skipped, and one that arrives
    meanwhile is appended (Streams.subscribe), so it still gets it, as from a flush in one go."""

    app_id: str
    channel: _Channel
    updates: list[Update]
    messages: list[Any]     # one prepared message, or the lists it was split into under max_message
    targets: list[Subscriber] = field(default_factory=list)
    pos: int = 0


class Streams:
    """Every application connected to this node, and the changes on their way to them."""

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        node: str = "node",
        batch_window: float = 0.05,
        pending_ttl: float = 3600.0,
        slow_limit: int = 10_000,
        slow_timeout: float = 30.0,
        retry_delay: float = 5.0,
        metrics: Metrics | None = None,
        max_message: int = 64 * 1024,
        slice_size: int = 500,
    ):
        self.max_message = max_message
        # Pushes per reactor turn. docs/performance.md measured ~36 us per push to one application's
        # 19,000 connections and ~55 us per application (encode, frame, push) to 19,000 applications,
        # under load: 500 keep a turn at ~20-30 ms, well under the 50 ms stall target of issue 8
        # (1,000 would be ~55 ms for the second), and a fan-out to 19,000 takes only ~40 turns.
        self.slice_size = max(1, slice_size)
        self.metrics = metrics or Metrics()
        self.prepare: Callable[[bytes], Any] = lambda payload: payload
        self.store = store
        self.clock = clock
        self.node = node
        self.batch_window = batch_window
        self.pending_ttl = pending_ttl
        self.slow_limit = slow_limit
        self.slow_timeout = slow_timeout
        self.retry_delay = retry_delay
        self.channels: dict[str, _Channel] = {}
        # Applications with a gathered batch, in arrival order (a dict as an ordered set).
        self._due: dict[str, None] = {}
        # The one timer for every application: the wait before the next flush, or its next slice.
        self._timer: IDelayedCall | None = None
        self._last_flush = float("-inf")       # when the latest flush started
        self._queue: deque[str] | None = None  # applications of the flush in progress (None: idle)
        self._fanout: _Fanout | None = None    # the one being sent now
        # Applications whose last connection here left recently: the registry may still have said we
        # hold them when a change was made, so its updates are queued here instead.
        self.recently_left: dict[str, float] = {}
        self.left_memory = 30.0
        # Waiting updates the store could not take yet (it was down); retried, never dropped.
        self._unsaved: dict[tuple[str, str], Update] = {}
        self._retry: IDelayedCall | None = None
        self._writes: set[Deferred] = set()
        self._keeping: dict[Deferred, int] = {}   # waiting-queue writes in flight: their smallest number
        # Connections come in bursts (a restart, a storm): registering and taking what waits is one
        # store transaction for all the applications that connect meanwhile.
        self._open = Grouped(self._open_batch)
        self._unregistrations = Unregistrations(store, clock, retry_delay, self.channels.__contains__)
        # Subscribe only while this node's incarnation is registered (a node sets it, as the hub's).
        self.fence = False
        self.on_fenced: Callable[[], None] = lambda: None

    # -- changes in ---------------------------------------------------------------------------
    def publish(self, updates: list[Update], queued: frozenset[str] = frozenset()) -> None:
        """Changes made here or received from another node; ``queued`` applications' updates are
        already waiting in the store."""
        for update in updates:
            channel = self.channels.get(update.app_id)
            if channel is not None:
                seen = channel.seen
                if update.seq <= seen.get(update.email, 0) and update.seq:
                    continue         # sent already (one number, one change), or older than what was
                seen[update.email] = update.seq
                channel.batch.append(update)
                self._due[update.app_id] = None
            elif update.app_id not in queued and self._left_recently(update.app_id):
                self._keep(update.app_id, [update])
        if self._due:
            self._schedule()

    def _left_recently(self, app_id: str) -> bool:
        left = self.recently_left.get(app_id)
        if left is None:
            return False
        if self.clock.seconds() - left > self.left_memory:
            del self.recently_left[app_id]
            return False
        return True

    # -- changes out --------------------------------------------------------------------------
    def _schedule(self) -> None:
        """Leading-edge batching: a change on a quiet node goes out on the next reactor turn (changes
        published in the same turn still go together); under load there is at most one flush per
        window, started ``batch_window`` after the previous one. A flush in progress is never
        overtaken: what arrives meanwhile is scheduled when it ends."""
        if self._timer is not None or self._queue is not None or not self._due:
            return
        wait = self._last_flush + self.batch_window - self.clock.seconds()
        self._timer = self.clock.callLater(max(wait, 0.0), self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        self._last_flush = self.clock.seconds()
        self._queue = deque(self._due)
        self._due = {}
        self._next_slice()

    def _next_slice(self) -> None:
        """At most ``slice_size`` pushes, then the reactor reads sockets and answers pings before the
        next ones: a fan-out to thousands of connections must not stall it."""
        self._timer = None
        more = True                  # if a push raises, the fan-out goes on past that connection
        try:
            more = self._send(self.slice_size)
        finally:
            if more:
                self._timer = self.clock.callLater(0, self._next_slice)
            else:
                self._queue = None
                self._schedule()

    def _send(self, budget: float) -> bool:
        """Go on with the flush in progress, ``budget`` pushes at most; True if some is left."""
        queue = self._queue
        delivered = 0
        while budget > 0:
            fanout = self._fanout
            if fanout is None:
                if not queue:
                    break
                fanout = self._fanout = self._take(queue.popleft())
                continue
            subscribers, messages, updates = fanout.targets, fanout.messages, fanout.updates
            while fanout.pos < len(subscribers) and budget > 0:
                subscriber = subscribers[fanout.pos]
                fanout.pos += 1      # before the push: if it raises, the fan-out goes on after it
                if subscriber.closed:
                    continue         # left since the fan-out began
                if subscriber.loading or subscriber.paused:
                    for message in messages:
                        subscriber.push(message, updates)     # kept in its backlog
                else:
                    send = subscriber.sink.send              # Subscriber.push's own fast path, inlined
                    for message in messages:
                        if not send(message):                # closing: kept for the waiting queue
                            subscriber.keep(updates)
                            break
                budget -= len(messages)
                delivered += len(updates)
            if fanout.pos >= len(subscribers):
                self._fanout = None
        if delivered:
            self.metrics.updates_delivered.inc(delivered)   # once per turn, not once per application
        return self._fanout is not None or bool(queue)

    def _take(self, app_id: str) -> _Fanout | None:
        """The application's batch as it is when its turn comes, encoded (and framed) once for all its
        connections; what arrives after this joins its next batch."""
        self._due.pop(app_id, None)
        channel = self.channels.get(app_id)
        if channel is None or not channel.batch:
            return None
        updates, channel.batch = channel.batch, []
        messages = [self.prepare(payload) for payload in encode_lists(updates, self.max_message)]
        m = self.metrics
        m.batch_size.observe(len(updates))
        now = self.clock.seconds()
        observe = m.delivery_latency.observe
        for update in updates:
            observe(now - update.at)
        return _Fanout(app_id, channel, updates, messages, list(channel.subscribers))

    # -- connections --------------------------------------------------------------------------
    async def subscribe(self, app_id: str, sink: Sink, catch_up: type[Subscriber] | None = None) -> Subscriber:
        """Attach a connection; it first receives what waited for the application, then live changes.

        ``catch_up``: the application said what it has (presence.sync): the connection is made of
        that class and stays loading, and what waited is not sent (the log or the state covers it)."""
        subscriber = (catch_up or Subscriber)(app_id, sink, self.clock, self.slow_limit, self.slow_timeout,
                                              self._overflowed, self.max_message)
        channel = self.channels.setdefault(app_id, _Channel())
        channel.subscribers[subscriber] = None
        if self._fanout is not None and self._fanout.channel is channel:
            self._fanout.targets.append(subscriber)    # arrived during its application's fan-out
        try:
            # Registered before taking what waits: a change made after this goes to a connection.
            await self._unregistrations.before_register(app_id)
            waiting = await self._open(app_id)
        except BaseException:
            self.unsubscribe(subscriber)
            raise
        kept = [u for (a, _), u in list(self._unsaved.items()) if a == app_id]
        for u in kept:
            del self._unsaved[(app_id, u.email)]
        updates = [Update(p.app_id, p.email, p.uid, p.status, p.at, p.seq, p.last_active) for p in waiting] + kept
        if subscriber.closed:
            self._keep(app_id, updates)   # it went while they were taken from the store: they wait again
            return subscriber
        if catch_up is not None:
            return subscriber
        seen = channel.seen
        for u in updates:
            if u.seq > seen.get(u.email, 0):
                seen[u.email] = u.seq
        subscriber.loaded(updates)
        return subscriber

    async def _open_batch(self, app_ids: list[str]) -> list[list[PendingUpdate]]:
        try:
            taken = await self.store.open_streams(self.node, app_ids, self.clock.seconds() - self.pending_ttl,
                                                  fence=self.fence)
        except NodeFenced:
            self.on_fenced()
            raise
        seen: set[str] = set()
        out = []
        for app_id in app_ids:   # two connections of one application in a batch: the first takes all
            out.append([] if app_id in seen else taken[app_id])
            seen.add(app_id)
        return out

    def unsubscribe(self, subscriber: Subscriber) -> None:
        channel = self.channels.get(subscriber.app_id)
        left = subscriber.detach()
        if channel is None:
            return
        if channel.subscribers.pop(subscriber, True) is True:
            return                   # already gone
        fanout = self._fanout
        if left:
            self._keep(subscriber.app_id, left)
        if not channel.subscribers:
            app_id = subscriber.app_id
            unsent: dict[str, Update] = {}
            if fanout is not None and fanout.channel is channel and subscriber in fanout.targets[fanout.pos:]:
                _merge(unsent, fanout.updates)   # the last connection left before its turn in a fan-out
            _merge(unsent, channel.batch)
            if unsent:
                self._keep(app_id, list(unsent.values()))
            del self.channels[app_id]
            self.recently_left[app_id] = self.clock.seconds()
            self._track(self._unregistrations.start(self.node, app_id), "unregister an application")

    def _overflowed(self, subscriber: Subscriber) -> None:
        self.metrics.slow_closed.inc()
        self.unsubscribe(subscriber)

    def close_all(self, code: int, reason: str) -> None:
        """Close every application connection (a node taken for dead: they reconnect, here or elsewhere)."""
        # Unsubscribed at once, not when each close completes: from now on their changes wait in
        # the store for whichever connection comes next.
        for channel in list(self.channels.values()):
            for subscriber in list(channel.subscribers):
                self.unsubscribe(subscriber)
                subscriber.sink.close(code, reason)

    def unsent_floor(self) -> int | None:
        """The smallest change number this node holds but has not handed to a socket or to the waiting
        queue yet (None: nothing): a node reports what lies below it as delivered, so a survivor
        that reaps it hands on everything above it. Walks every connection: called once a heartbeat."""
        floor: int | None = None

        def lower(updates: Iterable[Update]) -> None:
            nonlocal floor
            for u in updates:
                if floor is None or u.seq < floor:
                    floor = u.seq

        for channel in self.channels.values():
            lower(channel.batch)
            for subscriber in channel.subscribers:
                if subscriber.backlog:
                    lower(subscriber.backlog.values())
        if self._fanout is not None:
            lower(self._fanout.updates)
        lower(self._unsaved.values())
        for seqs in self._keeping.values():
            if floor is None or seqs < floor:
                floor = seqs
        return floor

    def close_app(self, app_id: str, code: int, reason: str) -> None:
        """Close every connection of one application (deactivated, deleted)."""
        channel = self.channels.get(app_id)
        for subscriber in list(channel.subscribers) if channel else []:
            subscriber.sink.close(code, reason)

    def connection_count(self) -> int:
        return sum(len(c.subscribers) for c in self.channels.values())

    # -- the waiting queue --------------------------------------------------------------------
    def _track(self, d: Deferred, what: str) -> None:
        """A write the clean stop must wait for."""
        self._writes.add(d)
        d.addErrback(lambda f: log.failure("could not {what}", f, what=what, event="store.write_failed"))
        d.addBoth(lambda _: self._writes.discard(d))

    def _keep(self, app_id: str, updates: list[Update]) -> None:
        rows = [PendingUpdate(app_id, u.email, u.uid, u.status, u.at, u.seq, u.last_active) for u in updates]
        d = ensureDeferred(self.store.queue_pending(rows))
        self._writes.add(d)
        self._keeping[d] = min(u.seq for u in updates)

        def failed(failure):
            log.failure("could not store {n} waiting updates for {app_id}; retrying", failure,
                        n=len(updates), app_id=app_id, event="pending.store_failed")
            for u in updates:
                key = (app_id, u.email)
                if key not in self._unsaved or self._unsaved[key].seq <= u.seq:
                    self._unsaved[key] = u
            self._schedule_retry()

        d.addErrback(failed)
        d.addBoth(lambda _: (self._writes.discard(d), self._keeping.pop(d, None)))

    def _schedule_retry(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(self.retry_delay, self._retry_unsaved)

    def _retry_unsaved(self) -> None:
        by_app: dict[str, list[Update]] = {}
        for (app_id, _), u in self._unsaved.items():
            by_app.setdefault(app_id, []).append(u)
        self._unsaved = {}
        for app_id, updates in by_app.items():
            self._keep(app_id, updates)

    async def flush(self) -> None:
        """Send every gathered batch now and wait until the waiting queue is written (clean stop).

        A fan-out in progress is finished first, in one go, then everything gathered since: no
        connection gets a later list before an earlier one, and no slice is left to run."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._last_flush = self.clock.seconds()
        self._queue = deque(app_id for app_id, channel in self.channels.items() if channel.batch)
        self._due = {}
        self._send(float("inf"))     # the fan-out in progress first, as always
        self._queue = None
        self._unregistrations.stop()
        while self._writes:
            await DeferredList(list(self._writes), consumeErrors=True)
        if self._unsaved:
            log.error("stopping with {n} waiting updates the store did not take", n=len(self._unsaved),
                      event="pending.lost_at_stop")
