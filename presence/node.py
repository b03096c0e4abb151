"""One Presence node as a Twisted service: the store, the core, and the two listeners.

Start: open the store (retrying with a clear message while it is down), mark devices left by an
unclean stop offline, then listen. Stop: stop listening, mark this node's devices offline, deliver or
queue what is pending, close websockets with a close frame, close the store.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.server import Site

from presence import errors, systemd
from presence.apps import Applications
from presence.config import Config
from presence.bus import ChangeFeed
from presence.cluster import Cluster
from presence.hub import Hub
from presence.store import StoreUnavailable, open_store
from presence.streams import Streams
from presence.ws.app import AppSession
from presence.ws.device import DeviceSession
from presence.ws.protocol import PresenceServerFactory, not_found

log = Logger()

_APP_PATH = re.compile(r"^/([A-Za-z0-9_-]{1,64})$")


def make_verifier(config: Config, clock: Any, http_client: Any = None) -> Any:
    import treq

    from presence.identity import Verifier

    return Verifier.from_config(config, http_client or treq, clock)


class Node(Service):
    name = "presence-node"

    def __init__(self, config: Config, reactor: Any = None, verifier: Any = None, store: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.store = store or open_store(config.database, reactor=reactor)
        self.streams = Streams(self.store, reactor, config.node, config.batch_window, config.pending_ttl,
                               config.slow_limit, config.slow_timeout)
        self.hub = Hub(self.store, self.streams, reactor, config.node, config.grace)
        shared = config.database.startswith(("postgresql:", "postgres:"))
        self.feed = ChangeFeed(self.store, reactor, self.hub.apply, listen_url=config.database if shared else None)
        self.cluster = Cluster(self.store, self.hub, self.feed, reactor, config.node, config.node_timeout,
                               config.log_retention)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self.apps = Applications(self.store, reactor, allow_ports=config.insecure_identity)
        self.verifier = verifier or make_verifier(config, reactor)
        self.ws_factory = PresenceServerFactory(
            self.route, reactor, max_message=config.max_message,
            handshake_timeout=config.handshake_timeout, ping_interval=config.ping_interval)
        self.web_port: Any = None
        self.ws_port: Any = None
        self._expiry = LoopingCall(self._expire_pending)
        self._expiry.clock = reactor
        self._started: Deferred | None = None
        self._stopping = False
        self.ready = False

    # -- routing websocket paths to sessions ----------------------------------------------------------
    def route(self, path: str, peer: Any):
        c = self.config
        if path == "/presence":
            return DeviceSession(peer, self.hub, self.verifier, self.reactor, c.auth_timeout,
                                 c.device_rate, c.device_burst)
        match = _APP_PATH.match(path)
        if match:
            return AppSession(peer, match.group(1), self.apps, self.streams, self.reactor, c.auth_timeout)
        raise not_found(path)

    def entry_point(self, app_id: str) -> str:
        return self.config.public_ws_url.rstrip("/") + "/" + app_id

    # -- start ----------------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._started = ensureDeferred(self.start())
        self._started.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        if not self._stopping:
            log.failure("the node could not start", failure, event="node.start_failed")

    async def start(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.store.open()
                break
            except StoreUnavailable as e:
                if self._stopping:
                    return
                log.error("cannot open the store ({why}); retrying in {delay:.0f}s. "
                          "Check --database and that the database server runs.", why=e, delay=delay,
                          event="store.unavailable")
                systemd.status(f"waiting for the store ({e}); retrying in {delay:.0f}s")
                await deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 30.0)
        await self.feed.start()
        await self.cluster.join()
        recovered = await self.hub.clear_node(self.config.node)
        if recovered:
            log.info("marked {n} people offline whose devices were on this node when it last stopped", n=recovered,
                     event="node.recovered")
        self._expiry.start(60, now=False)
        self._heartbeat.start(self.config.heartbeat, now=False)
        from presence.web.site import WebSite

        self.web_port = await endpoints.serverFromString(self.reactor, self.config.web).listen(
            Site(WebSite(self).app.resource()))
        self.ws_port = await endpoints.serverFromString(self.reactor, self.config.ws).listen(self.ws_factory)
        self.ready = True
        log.info("presence node {node} ready: pages on {web}, websockets on {ws}", node=self.config.node,
                 web=self.config.web, ws=self.config.ws, event="node.ready")
        systemd.ready(f"serving: pages on {self.config.web}, websockets on {self.config.ws}")

    async def _expire_pending_async(self) -> None:
        try:
            n = await self.store.expire_pending(self.reactor.seconds() - self.config.pending_ttl)
            if n:
                log.info("expired {n} waiting updates older than {ttl:g}s", n=n, ttl=self.config.pending_ttl,
                         event="pending.expired")
        except StoreUnavailable as e:
            log.warn("could not expire waiting updates: {why}", why=e, event="pending.expire_failed")

    def _expire_pending(self) -> Deferred:
        return ensureDeferred(self._expire_pending_async())

    def _beat(self) -> Deferred:
        return ensureDeferred(self.cluster.beat())

    # -- stop -----------------------------------------------------------------------------------------
    def stopService(self) -> Deferred:
        super().stopService()
        return ensureDeferred(self.stop())

    async def stop(self) -> None:
        systemd.stopping()
        log.info("presence node {node} stopping", node=self.config.node, event="node.stopping")
        self._stopping = True
        if self._started is not None and not self._started.called:
            self._started.cancel()
        for port in (self.web_port, self.ws_port):
            if port is not None:
                await port.stopListening()
        for loop in (self._expiry, self._heartbeat):
            if loop.running:
                loop.stop()
        if not self.ready:
            self.feed.stop()
            return
        await self.hub.stop()
        await self.streams.flush()
        self.ws_factory.close_all(errors.CLOSE_GOING_AWAY, "node stopping; reconnect")
        for _ in range(50):  # wait up to ~5 s for close handshakes
            if not self.ws_factory.open_connections:
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        for protocol in list(self.ws_factory.open_connections):
            protocol.dropConnection(abort=True)
        await self.streams.flush()
        try:
            await self.cluster.leave()
        except StoreUnavailable as e:
            log.error("could not leave the node registry: {why}", why=e, event="cluster.leave_failed")
        self.feed.stop()
        await self.store.close()
        log.info("presence node {node} stopped", node=self.config.node, event="node.stopped")
