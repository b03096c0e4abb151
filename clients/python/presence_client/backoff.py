"""Reconnection delays: exponential with full jitter, bounded, and reset after a stable connection.

Full jitter (a uniform delay between 0 and the exponential bound) spreads the reconnections of many
clients that lost the same node at the same moment, so that they do not all land on the next node
together.
"""

from __future__ import annotations

import random
import time
from typing import Callable


class Backoff:
    """`delay()` gives the next wait; `connected()` and `disconnected()` tell it how the last
    connection went, so that one that stayed up `stable` seconds starts the series again."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, stable: float = 30.0,
                 rand: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic):
        if not 0 < base <= cap:
            raise ValueError("need 0 < base <= cap")
        self.base, self.cap, self.stable = base, cap, stable
        self.attempt = 0
        self._rand, self._clock = rand, clock
        self._since: float | None = None

    def bound(self) -> float:
        """The upper bound of the next delay: base * 2**attempt, at most `cap`."""
        return min(self.cap, self.base * 2 ** min(self.attempt, 62))

    def delay(self) -> float:
        """The next delay, uniform in [0, bound()]; each call raises the bound for the next."""
        value = self._rand() * self.bound()
        self.attempt += 1
        return value

    def connected(self) -> None:
        self._since = self._clock()

    def disconnected(self) -> None:
        """A connection ended: if it lived `stable` seconds, the next delay is short again."""
        if self._since is not None and self._clock() - self._since >= self.stable:
            self.attempt = 0
        self._since = None

    def reset(self) -> None:
        self.attempt = 0
