"""Request bodies are bounded before they are read: 413 at once for a Content-Length over --max-body,
413 as soon as a chunked body grows past it, nothing reaching a resource (so nothing authenticated
or stored); bodies within the limit pass untouched."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource

from presence import errors
from presence.web.bodies import limited_site
from tests.test_notifications import running  # noqa: F401 (fixture)


class Raw(Protocol):
    """A client that writes what it is told and collects the answer until the server closes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred = Deferred()
        self.answered: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


async def connect(port: int) -> Raw:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw())


def within(d: Deferred, seconds: float) -> Deferred:
    return d.addTimeout(seconds, reactor)


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def render_POST(self, request) -> bytes:
        body = request.content.read()
        self.seen.append(len(body))
        return b"got %d" % len(body)


@pytest_twisted.ensureDeferred
async def test_bodies_are_bounded_before_they_are_read():
    echo = Echo()
    port = reactor.listenTCP(0, limited_site(echo, max_body=1000), interface="127.0.0.1")
    number = port.getHost().port
    try:
        # Content-Length over the limit: 413 at once, the body never sent.
        client = await connect(number)
        client.transport.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n"
                               b"Expect: 100-continue\r\n\r\n")
        await within(client.closed, 2)
        assert client.data.startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in client.data
        body = json.loads(client.data.split(b"\r\n\r\n", 1)[1])
        assert body == {"result": "KO", "errno": errors.BATCH_TOO_LARGE,
                        "error": "the request body may have at most 1000 bytes"}

        # Chunked: 413 as soon as it grows past the limit.
        client = await connect(number)
        client.transport.write(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            client.transport.write(b"190\r\n" + b"x" * 400 + b"\r\n")
        await within(client.closed, 2)
        assert client.data.startswith(b"HTTP/1.1 413 ")
        assert echo.seen == []  # nothing reached the resource

        # Within the limit: untouched.
        client = await connect(number)
        client.transport.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
                               + b"y" * 1000)
        await within(client.closed, 2)
        assert client.data.startswith(b"HTTP/1.1 200 ") and client.data.endswith(b"got 1000")
        assert echo.seen == [1000]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_anonymous_huge_notification_post_is_refused_at_once(running):  # noqa: F811
    port = running.node.web_port.getHost().port
    client = await connect(port)
    client.transport.write(b"POST /someapp/notification HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n")
    client.transport.write(b"[" * 65536)   # the start of the body: not waited for
    await within(client.closed, 2)
    assert client.data.startswith(b"HTTP/1.1 413 ")
    assert json.loads(client.data.split(b"\r\n\r\n", 1)[1])["errno"] == errors.BATCH_TOO_LARGE
