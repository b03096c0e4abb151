"""A paired device's client: connect with a fresh assertion, report a status, receive and acknowledge
notifications, renew the certificate in time, and reconnect after any drop.

    device = PresenceDevice.from_file("device.json")
    async with device:                       # connects, reports "online"
        await device.set_status("unavailable")

A revoked device (close 4007, errno 16, 403 on renewal) raises `Revoked` and does not retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, Sequence

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from presence_client import pairing
from presence_client.backoff import Backoff
from presence_client.connection import END as _END, MAX_QUEUE, Answers, open_websocket, end, hang_up, raise_if_final
from presence_client.credentials import Credentials
from presence_client.errors import ERRNO_REVOKED, RequestError, Revoked, Stopped
from presence_client.idle import IdleHook, IdleWatcher

log = logging.getLogger("presence_client.device")

STATUSES = ("online", "unavailable", "offline")
# errno of a refused connect that no retry fixes: the assertion is malformed, expired, for another
# audience, from an issuer that may not vouch, or does not verify (15, fetching, is worth a retry).
FATAL_CONNECT_ERRNOS = {10, 11, 12, 13, 14}
MAX_SEEN = 10_000   # notification ids remembered, so one delivered twice is shown once

OnNotification = Callable[[dict[str, Any]], Any]


class PresenceDevice:
    """One device of one person. `status` is what it reports (sent again on every connection)."""

    def __init__(self, credentials: Credentials, *, state_path: str | os.PathLike[str] | None = None,
                 ws_url: str | None = None, on_notification: OnNotification | None = None, auto_ack: bool = True,
                 application_ids: Sequence[str] | None = None, backoff: Backoff | None = None,
                 status: str = "online"):
        self.credentials = credentials
        self.state_path = state_path
        self.ws_url = (ws_url or credentials.ws_url).rstrip("/") + "/presence"
        self.on_notification = on_notification
        self.auto_ack = auto_ack
        self.application_ids = list(application_ids) if application_ids is not None else None
        self.backoff = backoff or Backoff()
        self.status = status
        self.connected = asyncio.Event()
        self.session_id: str | None = None
        self.error: BaseException | None = None
        self._ws: Any = None
        self._answers = Answers()
        self._sending = asyncio.Lock()
        self._seen: dict[int, None] = {}   # the latest MAX_SEEN ids, oldest first
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._fatal: Stopped | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: Any) -> PresenceDevice:
        """The device whose credentials `presence-device pair` (or `Credentials.save`) wrote; renewed
        certificates are written back there."""
        return cls(Credentials.load(path), state_path=path, **options)

    # -- running ---------------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="presence-device")
        return self._task

    async def __aenter__(self) -> PresenceDevice:
        self.start()
        await self.wait_connected()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def wait_connected(self, timeout: float | None = 30.0) -> None:
        """Until the device is connected with its status reported; raises what ended the loop."""
        task = self.start()
        waiter = asyncio.ensure_future(self.connected.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if task in done:
                task.result()
                raise Stopped("the device was closed")
            raise TimeoutError("not connected within the timeout")

    async def wait(self) -> None:
        """Until the loop ends: after close(), or with Revoked/Stopped."""
        await self.start()

    async def run(self) -> None:
        """Connect and stay connected until close(); Revoked or Stopped end it."""
        renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        try:
            while not self._closing:
                try:
                    await self._connection()
                except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, RequestError, ValueError) as e:
                    (log.warning if self.backoff.attempt == 0 else log.info)("device connection failed: %s", e)
                if self._fatal is not None:
                    raise self._fatal
                if self._closing:
                    return
                await asyncio.sleep(self.backoff.delay())
        except Exception as e:   # Revoked, Stopped, or a callback's own error: the iterator raises it
            self.error = e
            raise
        finally:
            self._closing = True
            renewer.cancel()
            if self._queue is not None:
                end(self._queue)

    async def close(self, offline: bool = True) -> None:
        """Report `offline` (unless told not to) and close; the loop ends."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            if offline and self.connected.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._request({"type": "status", "status": "offline"}), 5)
            await ws.close()
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            # the loop's end, an error included, was the program's to see (error, the iterators):
            # taken here, so no "exception was never retrieved" is left behind
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _connection(self) -> None:
        if self.credentials.renewal_due():
            try:
                await self.renew()
            except (RequestError, OSError) as e:
                if self.credentials.expired():
                    raise Stopped(f"the certificate expired and could not be renewed ({e}): pair again") from e
                log.warning("renewal failed, connecting with the current certificate: %s", e)
        ws = await open_websocket(self.ws_url)
        self._ws = ws
        reader: asyncio.Task[None] | None = None
        try:
            hello: dict[str, Any] = {"type": "connect", "assertion": self.credentials.assertion(),
                                     "device": self.credentials.device}
            if self.application_ids is not None:
                hello["application_ids"] = self.application_ids
            await ws.send(json.dumps(hello))
            answer = await self._first_answer(ws)
            if answer.get("result") is not True:
                errno = answer.get("errno")
                if errno == ERRNO_REVOKED:
                    raise Revoked(f"revoked: {answer.get('error')}", errno=errno)
                if errno in FATAL_CONNECT_ERRNOS:
                    raise Stopped(f"the node refused the device's assertion: {answer.get('error')}", errno=errno)
                raise ValueError(f"connect refused: {answer!r}")
            self.session_id = answer.get("session_id")
            reader = asyncio.get_running_loop().create_task(self._read(ws))
            await self._request({"type": "status", "status": self.status})
            self.backoff.connected()
            self.connected.set()
            await reader
        except (ConnectionClosed, ConnectionError):
            pass   # closed, or closed while a request waited (its close code is read below)
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
            self._ws = None
            self.connected.clear()
            self.backoff.disconnected()
            await hang_up(ws, self._answers)
        raise_if_final(ws)

    async def _first_answer(self, ws: Any) -> dict[str, Any]:
        """The answer to `connect` (nothing else comes before it)."""
        while True:
            message = json.loads(await ws.recv())
            if isinstance(message, dict) and "type" not in message:
                return message

    async def _read(self, ws: Any) -> None:
        try:
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    message = json.loads(raw)
                    if not isinstance(message, dict):
                        continue
                    if message.get("type") == "notifications":
                        await self._notifications(message.get("notifications") or [])
                    elif "type" not in message:
                        self._answers.answer(message)
        finally:
            # whatever waits for an answer (the status sent on connect, too) learns the end now
            self._answers.fail(ConnectionError("the connection to the node was lost"))

    async def _send(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send a request and return the future of its answer. Answers come in the order of the
        requests, so the slot is taken and the message sent under one lock: an ack sent from the
        reader and a status sent by the program cannot swap answers."""
        async with self._sending:
            ws = self._ws
            if ws is None:
                raise ConnectionError("not connected")
            answer = self._answers.expect()
            await ws.send(json.dumps(message))
            return answer

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        reply = await (await self._send(message))
        if reply.get("result") == "KO":
            raise RequestError(reply.get("error", "refused"), errno=reply.get("errno"))
        return reply

    # -- status ----------------------------------------------------------------------------------------
    async def set_status(self, status: str) -> None:
        """Report `status` now if connected (and on every later connection). Raises RequestError
        (errno 20) if the node says to slow down; the status is then sent again at the next change
        or connection."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        self.status = status
        if self.connected.is_set():
            await self._request({"type": "status", "status": status})

    async def watch_idle(self, idle_seconds: IdleHook, idle_after: float = 300.0, check_every: float = 5.0) -> None:
        """Forever: `unavailable` once the hook says the user was idle `idle_after` seconds, `online`
        again at activity. Run it as a task next to the device; it never touches `offline`."""
        watcher = IdleWatcher(idle_seconds, idle_after, check_every)
        while not self._closing:
            wanted, wait = await asyncio.to_thread(watcher.decide)
            if wanted != self.status and self.status != "offline":
                try:
                    await self.set_status(wanted)
                except (RequestError, ConnectionError) as e:
                    log.info("status %s not sent yet: %s", wanted, e)
                    wait = min(wait, 1.0)
            await asyncio.sleep(wait)

    # -- notifications ---------------------------------------------------------------------------------
    async def notifications(self) -> AsyncIterator[dict[str, Any]]:
        """Every new notification (an id shown once, although the node may deliver it twice)."""
        if self._queue is None:
            self._queue = asyncio.Queue(MAX_QUEUE)
        self.start()
        while (item := await self._queue.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    async def _notifications(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            if item.get("id") in self._seen:
                continue
            if self._queue is not None and self._queue.full():
                # Nobody reads them: left unacknowledged on the node, which gives them again on
                # the next connection, rather than held here without bound.
                log.warning("%d notifications wait unread; notification %s left on the node",
                            self._queue.qsize(), item.get("id"))
                continue
            self._seen[item.get("id")] = None
            if len(self._seen) > MAX_SEEN:
                del self._seen[next(iter(self._seen))]
            if self._queue is not None:
                self._queue.put_nowait(item)
            if self.on_notification is not None:
                result = self.on_notification(item)
                if inspect.isawaitable(result):   # never awaited here: it could wait for an answer we read
                    asyncio.ensure_future(result)
        ids = [item["id"] for item in items if isinstance(item.get("id"), int) and item["id"] in self._seen]
        if self.auto_ack and ids:
            self._send_ack(ids)

    def _send_ack(self, ids: list[int]) -> None:
        """Acknowledge without waiting for the answer (it is read by the loop that calls this)."""
        async def send() -> None:
            with contextlib.suppress(ConnectionError, ConnectionClosed):
                answer = await self._send({"type": "ack", "ids": ids})
                answer.add_done_callback(lambda f: f.cancelled() or f.exception())

        asyncio.ensure_future(send())

    async def ack(self, ids: list[int]) -> int:
        """Acknowledge notifications (with auto_ack=False): how many the node removed."""
        return (await self._request({"type": "ack", "ids": list(ids)}))["acked"]

    # -- renewal ---------------------------------------------------------------------------------------
    async def renew(self) -> None:
        """A fresh certificate for the same key and pairing, saved to the state file."""
        self.credentials = await pairing.renew(self.credentials)
        if self.state_path is not None:
            self.credentials.save(self.state_path)
        log.info("certificate renewed")

    async def _renew_loop(self) -> None:
        """While running: renew when a third of the lifetime is left (retrying on failure, at most
        every minute, while the certificate holds)."""
        while True:
            await asyncio.sleep(max(0.0, self.credentials.renew_at() - time.time()))
            try:
                await self.renew()
            except Revoked as e:
                self._fatal = e   # the loop raises it once the connection is closed
                if self._ws is not None:
                    await self._ws.close()
                return
            except Exception as e:   # the node is away: try again later, the certificate still holds
                log.warning("renewal failed: %s", e)
                await asyncio.sleep(max(60.0, (self.credentials.lifetime()[1] - time.time()) / 10))
