"""Following the change log: how a node hears about changes made by the other nodes.

Every change a node makes is numbered in the store's log (``Store.change_person``) and announced
with PostgreSQL ``NOTIFY presence, '<number>'``. A follower LISTENs on a dedicated connection and, on
each announcement, reads every change after the last one it applied, in order. Announcements are
only a wake-up call: several arriving together cause one read (batching), a lost one is caught by a
poll every ``poll_interval`` seconds, and after the listening connection drops the follower reconnects
with backoff and replays what it missed from the log. Nothing is lost as long as the log keeps the
changes (``--log-retention``).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from presence.metrics import Metrics
from presence.store import LoggedChange, Store, StoreUnavailable

log = Logger()

CHANNEL = "presence"


class ChangeFeed:
    def __init__(self, store: Store, clock: IReactorTime, apply: Callable[[LoggedChange], None],
                 listen_url: str | None = None, poll_interval: float = 2.0, batch: int = 1000,
                 metrics: Metrics | None = None, follow: bool = True):
        self.metrics = metrics or Metrics()
        self.store = store
        self.clock = clock
        self.apply = apply
        self.listen_url = listen_url
        self.batch = batch
        self.last = 0                      # the last change applied
        # Alone on its database (SQLite), a node makes every change itself: nothing to follow.
        self.follow = follow
        # Called when the log was trimmed past what this node read: it missed changes for good.
        self.on_gap: Callable[[int, int], None] = lambda last, first: None
        self.connected = False             # the LISTEN connection is up
        self.replays = 0                   # reconnects that replayed from the log
        self._reading: Deferred | None = None
        self._again = False
        self._listener: Any = None
        self._retry: IDelayedCall | None = None
        self._delay = 0.5
        self._stopped = False
        self._poll = LoopingCall(self.wake)
        self._poll.clock = clock
        self._poll_interval = poll_interval

    async def start(self) -> None:
        """Start from the end of the log: a node that just started has no one to tell the past to."""
        self.last = await self.store.last_change()
        if not self.follow or self._poll.running:   # (a start retried after the store went away)
            return
        if self.listen_url:
            await self._listen()
        self._poll.start(self._poll_interval, now=False)

    async def head(self) -> int:
        """The last change this node has seen: every one up to it was applied (or, not following,
        made here and published when it was committed)."""
        if not self.follow:
            self.last = await self.store.last_change()
        return self.last

    def stop(self) -> None:
        self._stopped = True
        if self._poll.running:
            self._poll.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                listener.close()
            except Exception:
                pass
        self.connected = False

    # -- reading the log --------------------------------------------------------------------------
    def wake(self, *_: Any) -> Deferred | None:
        """Read what is new; announcements arriving while a read runs cause one more read after it."""
        if self._reading is not None:
            self._again = True
            return None
        reading = ensureDeferred(self._read())
        if not reading.called:       # one that ended at once has already cleared _reading
            self._reading = reading
        return reading

    async def _read(self) -> None:
        try:
            while True:
                self._again = False
                changes = await self.store.changes_since(self.last, self.batch)
                if changes and changes[0].numbers.start != self.last + 1:
                    # Numbers have no gaps (commit order, one counter): the log was trimmed past us.
                    first = changes[0].numbers.start
                    log.error("the change log was trimmed past what this node read (changes {first} to {last} are "
                              "gone)", first=self.last + 1, last=first - 1, event="bus.gap")
                    self.on_gap(self.last, first)
                    return
                for change in changes:
                    try:
                        self.apply(change)
                    except Exception:
                        log.failure("applying change {seq} failed", seq=change.seq, event="bus.apply_failed")
                    self.last = change.seq
                if len(changes) < self.batch and not self._again:
                    return
        except StoreUnavailable as e:
            log.warn("cannot read the change log ({why}); the next poll tries again", why=e, event="bus.read_failed")
        except Exception:
            # Never out of here: the poll's LoopingCall would stop for good on a failed Deferred,
            # and a node would follow the log only while its LISTEN connection lives.
            log.failure("reading the change log failed; the next poll tries again", event="bus.read_error")
        finally:
            self._reading = None

    # -- the listening connection --------------------------------------------------------------------
    async def _listen(self) -> None:
        from presence.store.postgres import _Connection

        connection = _Connection(self.clock)
        connection.on_lost = lambda: self._lost(connection)
        try:
            await connection.connect(self.listen_url)
            connection.addNotifyObserver(self.wake)
            await connection.runOperation(f"LISTEN {CHANNEL}")
        except Exception as e:
            try:
                connection.close()
            except Exception:
                pass
            log.warn("cannot listen for changes ({why}); retrying in {delay:g}s", why=e, delay=self._delay,
                     event="bus.listen_failed")
            self._schedule_reconnect()
            return
        self._listener = connection
        self.connected = True
        self._delay = 0.5
        self.wake()  # replay whatever was logged while we were not listening

    def _lost(self, connection: Any) -> None:
        if connection is not self._listener or self._stopped:
            return
        self._listener = None
        self.connected = False
        log.warn("lost the change-log listener; reconnecting in {delay:g}s", delay=self._delay, event="bus.lost")
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._stopped:
            return
        delay, self._delay = self._delay, min(self._delay * 2, 30.0)

        def again() -> None:
            self.replays += 1
            self.metrics.bus_replays.inc()
            ensureDeferred(self._listen())

        self._retry = self.clock.callLater(delay, again)
