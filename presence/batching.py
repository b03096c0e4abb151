"""Group commit for any store call: the requests that arrive while one batch is with the store make
up the next batch, so a burst of thousands of callers costs a few round trips, not one each."""

from __future__ import annotations

from typing import Awaitable, Callable, Generic, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

T = TypeVar("T")
R = TypeVar("R")


class Grouped(Generic[T, R]):
    """``run(items)`` answers a whole batch at once, one result per item, in order."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 500):
        self.run = run
        self.max_batch = max_batch
        self._queue: list[tuple[T, Deferred]] = []
        self._running = False

    def __call__(self, item: T) -> Deferred:
        d: Deferred = Deferred()
        self._queue.append((item, d))
        if not self._running:
            self._running = True
            ensureDeferred(self._drain())
        return d

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                try:
                    results = await self.run([item for item, _ in batch])
                except Exception:
                    failure = Failure()
                    for _, d in batch:
                        d.errback(failure)
                    continue
                for (_, d), result in zip(batch, results):
                    d.callback(result)
        finally:
            self._running = False
