"""One application connection as the fan-out sees it, and the JSON lists it is sent.

A Subscriber sends while its socket keeps up; while the socket is full, or while what waited for the
application is still being loaded, it keeps the latest change per person instead (bounded), and it
is closed past its limits with what it had not been sent going back to the waiting queue.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from presence import errors
from presence.views import Update

log = Logger()


_string = json.encoder.encode_basestring_ascii   # what json.dumps does to a str, in C


def encode(updates: Iterable[Update]) -> bytes:
    """``[u.as_json() for u in updates]`` as compact JSON, written directly: a fan-out to 19,000
    applications encodes 19,000 lists, and this is several times faster than ``json.dumps`` of
    dicts (tests/test_streams.py holds the two equal)."""
    return ("[" + ",".join([
        '{"email":' + _string(u.email) + ',"status":' + _string(u.status) + ',"uid":' + _string(u.uid)
        + ',"at":' + repr(round(u.at, 3)) + ',"seq":' + str(u.seq) + ',"last_active":'
        + ("null" if u.last_active is None else repr(round(u.last_active, 3))) + "}"
        for u in updates]) + "]").encode("ascii")


def encode_parts(updates: list[Update], limit: int) -> list[tuple[bytes, list[Update]]]:
    """The updates as one list, or as several lists of at most ``limit`` bytes each (a peer refuses
    larger messages, which would lose what was taken from the waiting queue), each with its updates."""
    payload = encode(updates)
    if len(payload) <= limit or len(updates) == 1:
        return [(payload, updates)]
    half = len(updates) // 2
    return encode_parts(updates[:half], limit) + encode_parts(updates[half:], limit)


def encode_lists(updates: list[Update], limit: int) -> list[bytes]:
    return [payload for payload, _ in encode_parts(updates, limit)]


class Sink(Protocol):
    def send(self, message: Any) -> bool:
        """``message``: the payload bytes, or what ``Streams.prepare`` made of them (a websocket
        frame framed once for every connection of an application). False: not taken (the
        connection is closing), so the subscriber keeps it for the waiting queue."""

    def close(self, code: int, reason: str) -> None: ...


def _merge(into: dict[str, Update], updates: Iterable[Update]) -> None:
    """Keep only the latest update per person, by the change log's number (never by a node's clock)."""
    for u in updates:
        old = into.get(u.email)
        if old is None or u.seq >= old.seq:
            into[u.email] = u


class Subscriber:
    """One application connection as the fan-out sees it.

    It sends while the socket keeps up. While the transport's buffer is full (paused) or the waiting
    updates are still being loaded, changes are coalesced per person; past ``limit`` people or
    ``timeout`` seconds paused the connection is closed and what it had not been sent goes back to the
    waiting queue, so a slow reader costs bounded memory and loses nothing.
    """

    # One per application connection: slots keep it small.
    __slots__ = ("max_message", "app_id", "sink", "clock", "limit", "timeout", "on_overflow", "loading", "paused",
                 "closed", "backlog", "_stall")

    def __init__(
        self,
        app_id: str,
        sink: Sink,
        clock: IReactorTime,
        limit: int,
        timeout: float,
        on_overflow: Callable[["Subscriber"], None],
        max_message: int = 64 * 1024,
    ):
        self.max_message = max_message
        self.app_id = app_id
        self.sink = sink
        self.clock = clock
        self.limit = limit
        self.timeout = timeout
        self.on_overflow = on_overflow
        self.loading = True
        self.paused = False
        self.closed = False
        self.backlog: dict[str, Update] = {}
        self._stall: IDelayedCall | None = None

    def push(self, message: Any, updates: list[Update]) -> None:
        if self.closed:
            return
        if self.loading or self.paused or not self.sink.send(message):
            self.keep(updates)

    def keep(self, updates: list[Update]) -> None:
        """Updates this connection could not be sent now: they go out later, or back to the waiting
        queue when it goes (never dropped because the socket was closing)."""
        _merge(self.backlog, updates)
        if len(self.backlog) > self.limit:
            self._overflow("too many changes waiting for a slow reader")

    def loaded(self, waiting: list[Update]) -> None:
        """The updates that waited while the application was away: they go out first, live ones after."""
        merged: dict[str, Update] = {}
        _merge(merged, waiting)
        _merge(merged, self.backlog.values())
        self.backlog = merged
        self.loading = False
        if not self.paused:
            self._drain()

    def pause(self) -> None:
        self.paused = True
        if self._stall is None and not self.closed:
            self._stall = self.clock.callLater(self.timeout, self._overflow, "the reader stalled")

    def resume(self) -> None:
        self.paused = False
        self._cancel_stall()
        if not self.loading:
            self._drain()

    def detach(self) -> list[Update]:
        """Stop; return what this connection was never sent."""
        self.closed = True
        self._cancel_stall()
        left, self.backlog = list(self.backlog.values()), {}
        return left

    def _drain(self) -> None:
        """Send the backlog list by list while the socket takes it: once it is full (paused), what is
        left stays in the backlog, bounded by ``limit``, instead of piling up in the socket's buffer
        (a waiting queue of 100,000 people would be megabytes there)."""
        if self.backlog and not self.closed:
            updates = sorted(self.backlog.values(), key=lambda u: u.seq)
            self.backlog = {}
            parts = encode_parts(updates, self.max_message)
            for i, (payload, _) in enumerate(parts):
                if not self.sink.send(payload):
                    _merge(self.backlog, [u for _, rest in parts[i:] for u in rest])
                    return
                if self.paused or self.closed:
                    _merge(self.backlog, [u for _, rest in parts[i + 1:] for u in rest])
                    return

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _overflow(self, why: str) -> None:
        self._stall = None
        if self.closed:
            return
        log.warn("closing slow application connection of {app_id}: {why}", app_id=self.app_id, why=why,
                 event="application.too_slow")
        self.on_overflow(self)
        self.sink.close(errors.CLOSE_TOO_SLOW, f"too slow: {why}; changes kept for the next connection")
