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


class KeyedLimit:
    """At most ``limit`` events per ``window`` seconds for each key (a token bucket per key, refilled
    continuously), remembering at most ``max_keys`` keys (past that the oldest are forgotten: a
    forgotten key starts afresh, so pair this with an overall limit)."""

    def __init__(self, limit: int, window: float, clock: IReactorTime, max_keys: int = 10_000):
        self.limit = limit
        self.rate = limit / window if window > 0 else float("inf")
        self.clock = clock
        self.max_keys = max_keys
        self.buckets: dict[object, tuple[float, float]] = {}   # key -> (tokens, stamp)

    def take(self, key: object = None) -> float:
        """0 if one more event is allowed now (and count it), else the seconds until one is."""
        if self.limit <= 0:
            return 0.0   # 0: no limit
        now = self.clock.seconds()
        tokens, stamp = self.buckets.pop(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - stamp) * self.rate)
        if tokens >= 1:
            tokens -= 1
            wait = 0.0
        else:
            wait = (1 - tokens) / self.rate
        self.buckets[key] = (tokens, now)   # most recently used last
        while len(self.buckets) > self.max_keys:
            del self.buckets[next(iter(self.buckets))]
        return wait
