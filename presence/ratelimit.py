"""A token bucket: how many status messages a device may send, with short bursts allowed."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    __slots__ = ("rate", "burst", "clock", "tokens", "stamp")
    def __init__(self, rate: float, burst: int, clock: IReactorTime):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock.seconds()

    def take(self) -> bool:
        """True if one more message is allowed now."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
