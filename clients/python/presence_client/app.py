"""An application's client: the people who granted it, kept true live and across any drop, and its
notifications.

    async with PresenceApp("ws://node:8081", app_id, key, http_url="http://node:8080") as app:
        async for change in app.changes():
            print(change.email, change.status)

It asks for the whole state on its first connection, then resumes from the last `synced` after any
drop (on any node: give several URLs and it moves on to the next when one fails), reconnecting with
exponential backoff and full jitter. Close codes no reconnection can fix (4002, 4003, 4004, 4006)
end it with `Stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import urllib.parse
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from presence_client.backoff import Backoff
from presence_client.connection import END as _END, MAX_QUEUE, Answers, as_list, open_websocket, end, hang_up, raise_if_final
from presence_client.errors import RequestError, Stopped
from presence_client.http import request_json
from presence_client.state import AppState, Change, Person

log = logging.getLogger("presence_client.app")

# errno of a refused key message: the node closes right after with 4002-4004 (docs/protocol.md).
FATAL_AUTH_ERRNOS = {3, 30, 31, 32, 33}

OnChange = Callable[[Change], Awaitable[None] | None]


class PresenceApp:
    """One application's stream. `people` (uid -> Person) is the state it holds; `synced_seq` the
    number it would resume from."""

    def __init__(self, ws_url: str | Sequence[str], app_id: str, key: str, http_url: str | Sequence[str] | None = None,
                 *, on_change: OnChange | None = None, backoff: Backoff | None = None):
        self.app_id = app_id
        self._key = key
        suffix = "/" + app_id
        self.ws_urls = [u if u.endswith(suffix) else u + suffix for u in as_list(ws_url)]
        self.http_urls = as_list(http_url) if http_url else []
        self.on_change = on_change
        self.backoff = backoff or Backoff()
        self.state = AppState()
        self.connected = asyncio.Event()   # set while a connection is live (after the key's OK)
        self.synced = asyncio.Event()      # set at every `synced`; cleared when a connection drops
        self.connections = 0               # how many connections were authenticated, for the curious
        self._url_index = 0
        self._ws: Any = None
        self._answers = Answers()
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.error: BaseException | None = None

    # -- what a program reads --------------------------------------------------------------------------
    @property
    def people(self) -> dict[str, Person]:
        return self.state.people

    @property
    def synced_seq(self) -> int | None:
        return self.state.synced_seq

    @property
    def url(self) -> str:
        """The websocket URL in use (or tried next)."""
        return self.ws_urls[self._url_index]

    # -- running ---------------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        """Run the connection loop in a task (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"presence-app-{self.app_id}")
        return self._task

    async def __aenter__(self) -> PresenceApp:
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            # the loop's end, an error included, was the program's to see (error, the iterators):
            # taken here, so no "exception was never retrieved" is left behind
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait(self) -> None:
        """Until the loop ends: returns after close(), raises Stopped if the node refused us."""
        await self.start()

    async def wait_synced(self, timeout: float | None = None) -> int:
        """Until the client holds every change up to a `synced` number; returns that number."""
        self.start()
        waiter = asyncio.ensure_future(self.synced.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self._task in done:
                self._task.result()
                raise Stopped("the client was closed")
            raise TimeoutError("no synced within the timeout")
        assert self.synced_seq is not None
        return self.synced_seq

    def changes(self) -> AsyncIterator[Change]:
        """Every change applied to `people` from this call on (starting the loop if needed): the
        first state's people, live changes, replays, and what a resync corrects. Ends after close();
        raises Stopped when the node refuses the application."""
        if self._queue is None:
            self._queue = asyncio.Queue(MAX_QUEUE)
        self.start()
        return self._iterate(self._queue)

    async def _iterate(self, queue: asyncio.Queue[Any]) -> AsyncIterator[Change]:
        while True:
            item = await queue.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def run(self) -> None:
        """Connect, catch up, stay live; reconnect after any drop until close() or a fatal close."""
        try:
            while not self._closing:
                try:
                    await self._connection()
                except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, ValueError) as e:
                    (log.warning if self.backoff.attempt == 0 else log.info)("connection to %s failed: %s", self.url, e)
                if self._closing:
                    return
                self._url_index = (self._url_index + 1) % len(self.ws_urls)
                delay = self.backoff.delay()
                log.info("reconnecting to %s in %.2f s", self.url, delay)
                await asyncio.sleep(delay)
        except Exception as e:   # Stopped, or an on_change callback's own error: changes() raises it
            self.error = e
            raise
        finally:
            self._closing = True
            if self._queue is not None:
                end(self._queue)

    async def _connection(self) -> None:
        ws = await open_websocket(self.url)
        self._ws = ws
        try:
            await ws.send(json.dumps(self.state.hello(self._key)))
            answer = json.loads(await ws.recv())
            if not isinstance(answer, dict) or answer.get("result") != "OK":
                errno = answer.get("errno") if isinstance(answer, dict) else None
                if errno in FATAL_AUTH_ERRNOS:
                    raise Stopped(f"the node refused the application: {answer.get('error')}", errno=errno)
                raise ValueError(f"unexpected answer to the key: {answer!r}")
            self.backoff.connected()
            self.connections += 1
            self.connected.set()
            async for raw in ws:
                await self._handle(json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self.connected.clear()
            self.synced.clear()
            self.backoff.disconnected()
            await hang_up(ws, self._answers)
        raise_if_final(ws)
        log.info("connection to %s closed: %s %s", self.url, ws.close_code, ws.close_reason)

    async def _handle(self, message: Any) -> None:
        if isinstance(message, list):
            await self._emit(self.state.apply_updates(message))
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "state":
            await self._emit(self.state.apply_state(message["people"]))
        elif kind == "resync":
            log.info("resync: %s", message.get("reason"))
            self.state.begin_state()
        elif kind == "synced":
            await self._emit(self.state.synced(message["seq"]))
            self.synced.set()
        elif kind == "notified" or message.get("result") == "KO":
            self._answers.answer(message)

    async def _emit(self, changes: list[Change]) -> None:
        for change in changes:
            if self._queue is not None:
                # A program that stops reading stops this reader too: the node then holds the
                # changes (and closes a reader too slow, 4005), and the client resumes with since.
                await self._queue.put(change)
            if self.on_change is not None:
                result = self.on_change(change)
                if inspect.isawaitable(result):
                    await result

    # -- notifications and queries ---------------------------------------------------------------------
    async def notify(self, items: list[dict[str, Any]], via: str | None = None) -> list[dict[str, Any]]:
        """Send notifications (`{"uid", "message", "action"?}` each); returns one result per item,
        in order (`{"result": "OK", "queue_size": n}` or `{"result": "KO", "errno", "error"}`).

        `via` is "http" (the default when an http_url was given) or "ws" (the live connection).
        A failure of the whole request raises RequestError (errno 44 carries `retry_after`)."""
        via = via or ("http" if self.http_urls else "ws")
        if via == "ws":
            return await self._notify_ws(items)
        status, answer = await self._http("POST", f"/{self.app_id}/notification", items)
        return answer

    async def _notify_ws(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ws = self._ws
        if ws is None or not self.connected.is_set():
            raise ConnectionError("not connected: notify over HTTP, or wait for `connected`")
        answer = self._answers.expect()
        await ws.send(json.dumps({"type": "notify", "notifications": items}))
        message = await answer
        if message.get("type") == "notified":
            return message["results"]
        raise RequestError(message.get("error", "refused"), errno=message.get("errno"),
                           retry_after=message.get("retry_after"))

    async def fetch_people(self, limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """Every person over HTTP (`GET /<appid>/people`, page by page) and the smallest page `seq`:
        what the application could go on from with `since`."""
        people: list[dict[str, Any]] = []
        seqs: list[int] = []
        cursor: str | None = None
        while True:
            query = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
            _, page = await self._http("GET", f"/{self.app_id}/people?{urllib.parse.urlencode(query)}")
            people += page["people"]
            seqs.append(page["seq"])
            cursor = page.get("next")
            if not cursor:
                return people, min(seqs)

    async def _http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if not self.http_urls:
            raise ValueError("no http_url was given")
        last: BaseException | None = None
        for base in self.http_urls:   # the first node that answers
            try:
                status, answer, headers = await request_json(method, base + path, body,
                                                             {"authorization": f"Bearer {self._key}"})
            except OSError as e:
                last = e
                continue
            if status != 200:
                answer = answer if isinstance(answer, dict) else {}
                retry = answer.get("retry_after", headers.get("retry-after"))
                raise RequestError(f"{method} {path}: {status} {answer.get('error', '')}".strip(), status,
                                   answer.get("errno"), float(retry) if retry is not None else None)
            return status, answer
        raise ConnectionError(f"no node answered: {last}")
