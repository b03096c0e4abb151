"""A plain, untuned Autobahn broadcast server (Twisted, default options): what a straightforward
Autobahn service costs, to compare the node with.

    python -m bench.reference_autobahn --port PORT [--host 127.0.0.1] [--backlog 4096]

Paths as in bench.reference_floor: /trigger — each message is sent to every subscriber with
sendMessage, one by one; /probe — only pings (Autobahn answers them); anything else is a
subscriber, answered {"result":"OK"} for each message it sends.
"""

from __future__ import annotations

import argparse

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

from bench import common

OK = b'{"result":"OK"}'


class BroadcastProtocol(WebSocketServerProtocol):
    kind = "sub"

    def onConnect(self, request):
        self.kind = {"/trigger": "trigger", "/probe": "probe"}.get(request.path, "sub")

    def onOpen(self):
        if self.kind == "sub":
            self.factory.subscribers.add(self)

    def onMessage(self, payload, isBinary):
        if self.kind == "trigger":
            for subscriber in self.factory.subscribers:
                subscriber.sendMessage(payload)
        elif self.kind == "sub":
            self.sendMessage(OK)

    def onClose(self, wasClean, code, reason):
        self.factory.subscribers.discard(self)


class BroadcastFactory(WebSocketServerFactory):
    protocol = BroadcastProtocol

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.subscribers: set[BroadcastProtocol] = set()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--lifetime", type=float, default=3 * 3600)
    args = p.parse_args(argv)
    common.raise_nofile()
    common.die_with_parent()
    common.lifetime_guard(args.lifetime)

    from twisted.internet import reactor

    factory = BroadcastFactory(f"ws://{args.host}:{args.port}")
    reactor.listenTCP(args.port, factory, backlog=args.backlog, interface=args.host)
    reactor.callWhenRunning(print, "listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
