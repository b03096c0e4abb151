"""A websocket client for end-to-end tests over real loopback sockets."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.task import deferLater


class _Protocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client.messages.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(code, reason)


class WSClient:
    def __init__(self) -> None:
        self.messages: DeferredQueue = DeferredQueue()
        self.protocol: _Protocol | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed: Deferred = Deferred()
        self._open: Deferred = Deferred()

    @classmethod
    async def connect(cls, port: int, path: str, host: str = "127.0.0.1", *, tls: Any = None,
                      url_host: str | None = None) -> "WSClient":
        """``tls``: client TLS options (``optionsForClientTLS``) for wss://; ``url_host``: the host
        the URL names (the Host header), when it differs from the address connected to."""
        client = cls()
        endpoint = TCP4ClientEndpoint(reactor, host, port)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        factory = WebSocketClientFactory(f"{'wss' if tls else 'ws'}://{url_host or host}:{port}{path}", reactor=reactor)
        factory.protocol = _Protocol
        factory.client = client
        await endpoint.connect(factory)
        await _within(client._open, 5, "the websocket did not open")
        return client

    def _opened(self, protocol: _Protocol) -> None:
        self.protocol = protocol
        self._open.callback(self)

    def _closed(self, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        if not self._open.called:
            self._open.errback(ConnectionError(f"closed during the handshake: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback(code)

    def send(self, message: Any) -> None:
        self.protocol.sendMessage(json.dumps(message).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.protocol.sendMessage(payload, isBinary=binary)

    async def receive(self, timeout: float = 5.0) -> Any:
        return await _within(self.messages.get(), timeout, "no message arrived")

    async def nothing_more(self, wait: float = 0.3) -> None:
        """Assert no message arrives within ``wait`` seconds: an absence has no event to wait on.

        The default suits one in-process node: the tests run it with --batch-window 0.02, and a
        message the node is about to send goes out within a batch window of the change that caused
        it, so 0.3 s is 15 windows. Callers waiting across processes pass (and explain) more."""
        await deferLater(reactor, wait, lambda: None)
        assert not self.messages.pending, f"unexpected messages: {self.messages.pending}"

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        return await _within(self.closed, timeout, "the websocket was not closed")

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.sendClose(1000)

    def drop(self) -> None:
        if self.protocol is not None:
            self.protocol.transport.abortConnection()


async def _within(d: Deferred, timeout: float, what: str) -> Any:
    timer = reactor.callLater(timeout, d.cancel)
    try:
        return await d
    except Exception as e:
        if not timer.active():
            raise AssertionError(f"{what} within {timeout}s") from e
        raise
    finally:
        if timer.active():
            timer.cancel()
