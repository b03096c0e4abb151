"""Driving the asyncio Python client (clients/python) from the reactor's tests: the client runs in an
event loop of its own, in a thread; the test hands it coroutines and waits on the reactor."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from presence_client import Credentials, jws


class AsyncioThread:
    """An asyncio event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="asyncio-client", daemon=True)
        self.thread.start()

    async def run(self, coroutine: Awaitable[Any], timeout: float = 30.0) -> Any:
        """Run `coroutine` in the client's loop; its result (or exception), awaited on the reactor."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return await deferToThread(future.result, timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """`fn()` in the client's loop, waited for (for quick reads of the client's state)."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    async def until(self, condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        """Wait on the reactor until `condition()`, evaluated in the client's loop, is truthy."""
        deadline = reactor.seconds() + timeout
        while not (value := self.call(condition)):
            if reactor.seconds() > deadline:
                raise AssertionError(f"waited {timeout:g} s for {what}")
            await deferLater(reactor, 0.02, lambda: None)
        return value

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        # closed here: a loop left to the garbage collector warns from its finalizer, at whatever
        # depth a later test happens to be (a deeply recursive one then fails on it)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def idp_credentials(idp, email: str, device: str, audience: str, http_url: str, ws_url: str, key_name: str) -> Credentials:
    """Credentials of a device whose key the test IdP certified (what pairing would give it)."""
    from tests.idp import shared_key

    key = shared_key(key_name)
    return Credentials(email, device, idp.certificate(email, user_key=key), jws.key_to_pem(key), audience,
                       http_url, ws_url)
