"""Echo servers for the conformance run (tests/test_ws_conformance.py), each in a process of its own:

    python -m tests.wsecho presence     # an echo session on presence.ws.server (binary refused, 1003)
    python -m tests.wsecho autobahn     # Autobahn's own Twisted server, the reference for the 9.x timings

Each listens on a free loopback port and prints it on its first line of output. And the client:

    python -m tests.wsecho fuzz ws://127.0.0.1:PORT CONCURRENCY CASE...   # kosoku, one JSON line per case

kosoku runs in a process of its own too: its runtime sometimes aborts while the interpreter exits, so
the runner prints its results and leaves with os._exit.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor

from presence.metrics import Metrics
from presence.ws import frames
from presence.ws.server import PresenceServerFactory

# The 9.x cases send messages of up to 16 MiB, some in 64-byte fragments (9.3.1: 65,536 of them).
MAX_MESSAGE = 16 * 1024 * 1024
MAX_FRAGMENTS = 1 << 17


class EchoSession:
    """Sends every text message back; binary is refused as the node's sessions refuse it."""

    kind = "device"
    __slots__ = ("peer",)

    def __init__(self, peer):
        self.peer = peer

    def opened(self) -> None:
        pass

    def received(self, text: str) -> None:
        self.peer.send(text.encode("utf-8"))

    def binary(self) -> None:
        self.peer.close(frames.UNSUPPORTED, "binary frames are not supported; send JSON text")

    def lost(self) -> None:
        pass


def presence_factory() -> PresenceServerFactory:
    return PresenceServerFactory(lambda path, peer: EchoSession(peer), reactor, Metrics(), max_message=MAX_MESSAGE,
                                 handshake_timeout=10, ping_interval=0, max_fragments=MAX_FRAGMENTS,
                                 max_output=4 * MAX_MESSAGE)


def autobahn_factory():
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload, is_binary):
            self.sendMessage(payload, is_binary)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    return factory


def fuzz(url: str, concurrency: int, cases: list[str]) -> None:
    import asyncio

    from kosoku import FailureError, run_fuzzingclient

    try:
        results = asyncio.run(run_fuzzingclient(url, cases, concurrency=concurrency))
    except FailureError as e:
        results = e.results
    for r in results:
        print(json.dumps({"case": r.case_id, "behavior": r.behavior.value, "close": r.behavior_close.value,
                          "code": r.remote_close_code, "ms": r.duration, "received": repr(r.received)[:300]}))
    sys.stdout.flush()
    os._exit(0)


def main(which: str) -> None:
    if which == "fuzz":
        fuzz(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    factory = presence_factory() if which == "presence" else autobahn_factory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "presence")
