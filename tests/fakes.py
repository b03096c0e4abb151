"""Small stand-ins for the socket side (never for the store): they record what was sent."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.task import deferLater


class ListPeer:
    """A Peer / Sink that keeps what it was given."""

    def __init__(self):
        self.sent: list = []
        self.closed: tuple[int, str] | None = None

    def send_json(self, message):
        self.sent.append(message)

    def send(self, payload: bytes) -> bool:
        if self.closed is not None:
            return False             # as a closing connection: not taken
        self.sent.append(json.loads(payload))
        return True

    def close(self, code, reason):
        self.closed = (code, reason)


async def until(condition, what: str, timeout: float = 10.0, step: float = 0.01) -> None:
    """Wait (on the real reactor) until ``condition()`` (a bool, or an awaitable of one: a store query)
    is true; fail naming ``what`` was waited for."""
    deadline = reactor.seconds() + timeout
    while True:
        met = condition()
        if hasattr(met, "__await__"):
            met = await met
        if met:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        await deferLater(reactor, step, lambda: None)


async def eventually(condition, timeout: float = 5.0, step: float = 0.01):
    """Wait (on the real reactor) until condition() is true; store calls run in threads or sockets."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, step, lambda: None)
        waited += step
