"""What both clients share: opening a websocket to one of several nodes, and answers matched to
requests in order.

A node handles the messages of one connection strictly in order and answers each request once, so
answers are matched to requests first in, first out; pushes (status changes, notifications) are
told apart by their shape.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Sequence

from websockets.asyncio.client import ClientConnection, connect

from presence_client.errors import stop_error

OPEN_TIMEOUT = 10.0
MAX_QUEUE = 10_000   # items an iterator's queue holds for a program that reads them
END = object()       # the end of an iterator's queue


def end(queue: asyncio.Queue[Any]) -> None:
    """Put END on an iterator's queue, even a full one (its reader takes what is there first)."""
    try:
        queue.put_nowait(END)
    except asyncio.QueueFull:
        asyncio.ensure_future(queue.put(END))


def as_list(urls: str | Sequence[str]) -> list[str]:
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("need at least one URL")
    return [u.rstrip("/") for u in urls]


async def open_websocket(url: str, open_timeout: float = OPEN_TIMEOUT) -> ClientConnection:
    """A websocket as the node speaks it: no compression (the node offers none), no proxy, and
    messages up to 16 MiB (a state message is at most the node's --max-message)."""
    return await connect(url, compression=None, proxy=None, open_timeout=open_timeout,
                         max_size=16 * 1024 * 1024, ping_interval=20, ping_timeout=20, close_timeout=5)


class Answers:
    """Futures for the answers of requests sent on one connection, oldest first."""

    def __init__(self) -> None:
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()

    def expect(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future

    def answer(self, message: Any) -> bool:
        """Give `message` to the oldest request; False if none was waiting. A request whose caller
        stopped waiting (cancelled) still takes its own answer, so the next one gets the next."""
        if not self._waiting:
            return False
        future = self._waiting.popleft()
        if not future.done():
            future.set_result(message)
        return True

    def fail(self, error: BaseException) -> None:
        """The connection is gone: every request still waiting fails with `error`."""
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


async def hang_up(ws: ClientConnection, answers: Answers) -> None:
    """A connection ended: what waited for an answer fails, and the socket closes."""
    answers.fail(ConnectionError("the connection to the node was lost"))
    await ws.close()


def raise_if_final(ws: ClientConnection) -> None:
    """Raise what a close code says no reconnection can fix (bad credentials, revoked, deactivated)."""
    fatal = stop_error(ws.close_code, ws.close_reason or "")
    if fatal is not None:
        raise fatal
