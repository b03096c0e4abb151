"""Taking an application out of the registry of subscriptions when its last connection on this node
has gone: in order with the next registration, and retried while the store is away.

The registry row says "this node holds the application": other nodes then leave its changes to us
instead of queueing them. Two ways it could lie, both found by the chaos checker's reasoning:

- a removal sent without waiting can commit *after* the next connection's registration (another
  connection of the pool), deleting the row of a live connection: its changes are queued for a
  reconnect that does not come, and a reaper does not hand them on;
- a removal that fails (the database went away) leaves the row for ever, so nobody queues the
  application's changes though nobody here sends them.

So a registration first waits for the removal in flight (cutting its retry short: the connection
that came back makes it moot), and a failed removal is retried until it lands or a connection of
the application is back.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from presence.store import StoreUnavailable

log = Logger()


class Unregistrations:
    def __init__(self, store, clock: IReactorTime, retry_delay: float, holds: Callable[[str], bool]):
        self.store, self.clock, self.retry_delay, self.holds = store, clock, retry_delay, holds
        self._running: dict[str, Deferred] = {}     # app_id -> its removal (statement or retry wait)
        self._sleeping: dict[str, Deferred] = {}    # app_id -> the wait before its next attempt

    def start(self, node: str, app_id: str) -> Deferred:
        """Remove ``node``'s row of ``app_id``; the Deferred fires (never fails) when that is settled."""
        d = ensureDeferred(self._run(node, app_id))
        self._running[app_id] = d

        def done(_):
            if self._running.get(app_id) is d:
                del self._running[app_id]
        d.addBoth(done)
        return d

    async def before_register(self, app_id: str) -> None:
        """Wait until no removal of ``app_id`` can land after a registration made from now on."""
        sleeping = self._sleeping.get(app_id)
        if sleeping is not None:
            sleeping.cancel()          # a connection is back: the removal gives up at once
        running = self._running.get(app_id)
        if running is not None:
            waiter: Deferred = Deferred()
            running.addBoth(lambda result: (waiter.callback(None), result)[1])
            await waiter

    def stop(self) -> None:
        """A clean stop: no more retries (leaving the registry removes every row of the node)."""
        for sleeping in list(self._sleeping.values()):
            sleeping.cancel()

    async def _run(self, node: str, app_id: str) -> None:
        while not self.holds(app_id):
            try:
                await self.store.unsubscribe(node, app_id)
                return
            except StoreUnavailable as e:
                log.warn("could not take application {app_id} out of the registry ({why}); retrying in {delay}s",
                         app_id=app_id, why=e, delay=self.retry_delay, event="streams.unregister_retry")
            except Exception:
                log.failure("could not take application {app_id} out of the registry", app_id=app_id,
                            event="streams.unregister_failed")
                return
            sleeping: Deferred = Deferred(lambda d: call.cancel() if call.active() else None)
            call = self.clock.callLater(self.retry_delay, sleeping.callback, None)
            self._sleeping[app_id] = sleeping
            try:
                await sleeping
            except CancelledError:
                return
            finally:
                self._sleeping.pop(app_id, None)
