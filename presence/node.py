"""One Presence node as a Twisted service: the store, the core, and its listeners.

Start: open the metrics listener (if any: it says "not ready" meanwhile), open the store (retrying
with a clear message while it is down), join the other nodes, mark devices left by an unclean stop
offline, then listen for pages and websockets.

Stop (SIGTERM): stop accepting; close device connections with 1001 ("reconnect elsewhere"), spread
over --drain-time so a restart does not make every client reconnect in the same second; the devices
then count as dropped (offline after --grace unless they reconnect, here or on another node); once
their grace has run out, the applications connected here have heard it, and are closed too; what is
pending is written, the node leaves the registry and closes the store. A stop takes at most about
drain-time + grace + a few seconds.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from presence import errors, systemd
from presence.apps import Applications
from presence.config import Config
from presence.bus import ChangeFeed
from presence.cluster import Cluster, incarnation
from presence.hub import Hub
from presence.metrics import Metrics
from presence.public_urls import log_unreachable
from presence.notifications import Notifier
from presence.store import StoreUnavailable, open_store
from presence.streams import Streams
from presence.sync import Syncer
from presence.ws.app import AppSession
from presence.ws.device import DeviceSession
from presence.web.bodies import limited_site
from presence.ws.server import PresenceServerFactory, not_found

log = Logger()

_APP_PATH = re.compile(r"^/([A-Za-z0-9_-]{1,64})$")


def make_verifier(config: Config, clock: Any, http_client: Any = None, issuer: Any = None) -> Any:
    """The assertion verifier of devices and pages; ``issuer`` (Presence's own identity provider) is
    known without a fetch and trusted for any address, since it proved each one with a one-time link.
    Support documents are fetched with presence.fetch (unless ``http_client`` is given)."""
    from presence.identity import Verifier

    local = {issuer.domain: issuer.public_key} if issuer is not None else None
    verifier = Verifier.from_config(config, http_client, clock, local_issuers=local)
    if issuer is not None:
        verifier.trusted_issuers = verifier.trusted_issuers | {issuer.domain}
    return verifier


# gc's third threshold: this many middle-generation collections before a full one (never, in practice).
NO_AUTOMATIC_FULL_COLLECTION = 1_000_000_000

def _exit_failed() -> None:
    """The process's last act after a start that failed: twistd's clean stop is done (logs, pid
    file), and it would exit 0; a supervisor must see a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class Node(Service):
    name = "presence-node"
    # twistd's node (presence.tap) exits with status 1 when its start fails for a reason it does
    # not retry (a port taken, a bad option); nodes built in process (tests) leave that to the caller.
    exit_on_start_failure = False

    def __init__(self, config: Config, reactor: Any = None, verifier: Any = None, store: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.store = store or open_store(config.database, reactor=reactor)
        if hasattr(self.store, "instrument"):
            self.store.instrument(self.metrics.observe_store)
        # This start's identity in the store: the rows it owns are this incarnation's (presence.cluster).
        self.incarnation = incarnation(config.node)
        self.streams = Streams(self.store, reactor, self.incarnation, config.batch_window, config.pending_ttl,
                               config.slow_limit, config.slow_timeout, metrics=self.metrics,
                               max_message=config.max_message)
        self.hub = Hub(self.store, self.streams, reactor, self.incarnation, config.grace, fence=True)
        self.shared = config.database.startswith(("postgresql:", "postgres:"))
        self.feed = ChangeFeed(self.store, reactor, self._apply, listen_url=config.database if self.shared else None,
                               metrics=self.metrics, follow=self.shared)
        self.metrics.watch(self.metrics.bus_connected, lambda: 1 if self.feed.connected else 0)
        self.cluster = Cluster(self.store, self.hub, self.feed, reactor, self.incarnation, config.node_timeout,
                               config.log_retention, label=config.node, shared=self.shared)
        self.hub.on_fenced = lambda: self._rejoin_soon("a write found this node's registration gone")
        self.streams.fence = True
        self.streams.on_fenced = self.hub.on_fenced
        self.feed.on_gap = lambda last, first: self._rejoin_soon("the change log was trimmed past what it read")
        self.cluster.on_taken_for_dead = self.rejoin
        self._rejoining: Deferred | None = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self.apps = Applications(self.store, reactor, allow_ports=config.insecure_identity, origin=self.incarnation)
        self.notifier = Notifier(self.store, self.hub, reactor, self.incarnation, limit=config.notify_queue,
                                 ttl=config.notify_ttl, rate=config.notify_rate, burst=config.notify_burst,
                                 max_batch=config.notify_batch, metrics=self.metrics)
        self.verifier = verifier or make_verifier(config, reactor)
        self._own_verifier = verifier is None
        self.web: Any = None
        self.ws_factory = PresenceServerFactory(
            self.route, reactor, self.metrics, max_message=config.max_message,
            handshake_timeout=config.handshake_timeout, ping_interval=config.ping_interval,
            max_auth_message=config.max_auth_message, max_fragments=config.max_fragments,
            max_output=config.max_output)
        self.streams.prepare = self.ws_factory.prepare  # frame each list once per application
        self.web_port: Any = None
        self.ws_port: Any = None
        self.metrics_port: Any = None
        self._expiry = LoopingCall(self._expire_pending)
        self._expiry.clock = reactor
        self._gc_freeze = LoopingCall(gc.freeze)
        self._gc_freeze.clock = reactor
        self._gc_compact = LoopingCall(self._compact_memory)
        self._gc_compact.clock = reactor
        self._started: Deferred | None = None
        self._stopping = False
        self.ready = False
        self._gc_threshold: tuple[int, int, int] | None = None
        # This node's session classes carry its --log-connections (a class attribute: no slot each).
        self.syncer = Syncer(self.store, self.streams, reactor, self.feed)
        flags = {"__slots__": (), "log_connections": config.log_connections, "syncer": self.syncer}
        self._device_session = type("DeviceSession", (DeviceSession,), flags)
        self._app_session = type("AppSession", (AppSession,), flags)

    # -- routing websocket paths to sessions ----------------------------------------------------------
    def route(self, path: str, peer: Any):
        c = self.config
        if path == "/presence":
            return self._device_session(peer, self.hub, self.verifier, self.reactor, c.auth_timeout,
                                 c.device_rate, c.device_burst, self.metrics, self.notifier)
        match = _APP_PATH.match(path)
        if match:
            return self._app_session(peer, match.group(1), self.apps, self.streams, self.reactor, c.auth_timeout,
                              self.metrics, self.notifier)
        raise not_found(path)

    def _apply(self, change: Any) -> None:
        """A change from the log (ours are skipped by the hub: they were delivered when made)."""
        self.hub.apply(change)
        if change.origin != self.incarnation:
            self.metrics.bus_changes.inc()
            self.metrics.bus_lag.set(max(0.0, self.reactor.seconds() - change.at))

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Can this node serve? (started, store answers, log listener connected with several nodes)"""
        checks: dict[str, str] = {}
        try:
            ping = ensureDeferred(self.store.ping())
            ping.addTimeout(2.0, self.reactor)
            await ping
            checks["store"] = "ok"
        except Exception as e:
            checks["store"] = f"unavailable: {e}"
        if self.shared:
            checks["bus"] = "ok" if self.feed.connected else "disconnected"
        checks["node"] = "ok" if self.ready and not self._stopping else ("stopping" if self._stopping else "starting")
        return all(v == "ok" for v in checks.values()), checks

    def entry_point(self, app_id: str) -> str:
        return self.config.public_ws_url.rstrip("/") + "/" + app_id

    # -- start ----------------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._started = ensureDeferred(self.start())
        self._started.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        if self._stopping:
            return
        log.failure("the node could not start", failure, event="node.start_failed")
        if self.exit_on_start_failure:
            # Up but listening on nothing, it would look alive to its supervisor and serve no one.
            log.error("the node exits (status 1) so that its supervisor starts it again; fix what the"
                      " traceback above says first", event="node.exit_failed")
            atexit.register(_exit_failed)
            self.reactor.stop()

    async def start(self) -> None:
        from presence.web.health import Front

        if self.config.metrics:
            self.metrics_port = await endpoints.serverFromString(self.reactor, self.config.metrics).listen(
                limited_site(Front(self, registry=self.metrics.registry), self.config.max_body))
        delay = 1.0
        while True:
            try:
                await self._join()
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
        self._expiry.start(15, now=True)
        self._heartbeat.start(self.config.heartbeat, now=False)
        if self._own_verifier:
            self.verifier = make_verifier(self.config, self.reactor, issuer=self.web.issuer)
        self.web_port = await endpoints.serverFromString(self.reactor, self.config.web).listen(
            limited_site(Front(self, pages=self.web.resource()), self.config.max_body))
        self.ws_port = await endpoints.serverFromString(self.reactor, self.config.ws).listen(self.ws_factory)
        self.ready = True
        self._settle_memory()
        log.info("presence node {node} ready: pages on {web} ({public_url}), websockets on {ws} ({public_ws_url})",
                 node=self.config.node, web=self.config.web, ws=self.config.ws, public_url=self.config.public_url,
                 public_ws_url=self.config.public_ws_url, event="node.ready")
        log_unreachable(self.config, log)
        systemd.ready(f"serving: pages on {self.config.web}, websockets on {self.config.ws}")

    async def _join(self) -> None:
        """Everything the node needs from the store before it serves, retried whole while the store
        is away: the database may go away at any step, not only the first."""
        from presence.web.site import WebSite

        await self.store.open()
        await self.feed.start()
        await self.cluster.join()
        # A crash left devices and subscriptions of an earlier incarnation: clean up after it now.
        await self.cluster.reap_predecessors()
        web = await WebSite.open(self)
        await web.start()
        self.web = web

    def _settle_memory(self) -> None:
        """Keep full garbage collections short: they stop the node while they walk every object.

        What start-up made lives as long as the node: collect once, then freeze it. After that,
        every --gc-freeze seconds what has lived that long (connections, mostly) is frozen too, so
        full collections only walk what is new. Closed connections are freed by reference counting
        (their cycles are broken on close); what cyclic garbage a frozen object still leaves is
        collected by one full collection every --gc-compact seconds."""
        if self.metrics.gc_callback not in gc.callbacks:
            gc.callbacks.append(self.metrics.gc_callback)
        gc.collect()
        gc.freeze()
        # No automatic full collections: one would walk every object that is not frozen yet (the
        # connections of the last --gc-freeze seconds) at a moment chosen by allocation counts,
        # stalling the node under load. Young generations are still collected as usual; what
        # cyclic garbage gets old is collected by the --gc-compact collection.
        self._gc_threshold = gc.get_threshold()
        gc.set_threshold(self._gc_threshold[0], self._gc_threshold[1], NO_AUTOMATIC_FULL_COLLECTION)
        if self.config.gc_freeze > 0:
            self._gc_freeze.start(self.config.gc_freeze, now=False)
        if self.config.gc_compact > 0:
            self._gc_compact.start(self.config.gc_compact, now=False)

    def _compact_memory(self) -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    async def _expire_pending_async(self) -> None:
        now = self.reactor.seconds()
        try:
            n = await self.store.expire_pending(now - self.config.pending_ttl)
            if n:
                self.metrics.pending_expired.inc(n)
                log.info("expired {n} waiting updates older than {ttl:g}s", n=n, ttl=self.config.pending_ttl,
                         event="pending.expired")
            await self.notifier.expire()
            count, oldest = await self.store.pending_stats()
            self.metrics.pending_items.set(count)
            self.metrics.pending_oldest.set(0 if oldest is None else max(0.0, now - oldest))
        except StoreUnavailable as e:
            log.warn("could not expire waiting updates: {why}", why=e, event="pending.expire_failed")

    def _expire_pending(self) -> Deferred:
        return ensureDeferred(self._expire_pending_async())

    # -- taken for dead ------------------------------------------------------------------------------
    def _rejoin_soon(self, why: str) -> None:
        if self._rejoining is None and not self._stopping:
            ensureDeferred(self.cluster.taken_for_dead(why))

    async def rejoin(self, why: str = "") -> None:
        """Another node reaped this one (or it missed changes for good): whatever it holds may be
        stale. Close every connection — devices and applications reconnect and state their truth
        again — and rejoin the registry as a new incarnation, reaping the old one if nobody has."""
        if self._rejoining is not None or self._stopping:
            return
        self._rejoining = Deferred()
        try:
            self._set_incarnation(incarnation(self.config.node))
            self.hub.drop_all()
            self.streams.close_all(errors.CLOSE_GOING_AWAY, "node out of sync; reconnect")
            self.feed.last = await self.store.last_change()
            await self.cluster.join()
            await self.cluster.reap_predecessors()
            log.info("rejoined as {incarnation}", incarnation=self.incarnation, event="cluster.rejoined")
        except StoreUnavailable as e:
            log.warn("could not rejoin yet ({why}); the next heartbeat tries again", why=e, event="cluster.rejoin_failed")
        finally:
            self._rejoining = None

    def _set_incarnation(self, name: str) -> None:
        self.incarnation = name
        for part in (self.streams, self.hub, self.notifier, self.cluster):
            part.node = name
        self.apps.origin = name

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
        if self.web is not None:
            self.web.stop()
        for loop in (self._expiry, self._heartbeat, self._gc_freeze, self._gc_compact):
            if loop.running:
                loop.stop()
        self.syncer.stop()
        if self.ready:
            await self._drain()
        if self.metrics_port is not None:
            await self.metrics_port.stopListening()
        if not self.ready:
            self.feed.stop()
            return
        try:
            await self.cluster.leave()
        except StoreUnavailable as e:
            log.error("could not leave the node registry: {why}", why=e, event="cluster.leave_failed")
        self.feed.stop()
        await self.store.close()
        if self.metrics.gc_callback in gc.callbacks:
            gc.callbacks.remove(self.metrics.gc_callback)
        if self._gc_threshold is not None:
            gc.set_threshold(*self._gc_threshold)
        log.info("presence node {node} stopped", node=self.config.node, event="node.stopped")

    async def _drain(self) -> None:
        devices = [p for p in self.ws_factory.open_connections if p.session is not None and p.session.kind == "device"]
        await self._close_spread(devices, self.config.drain_time)
        # The devices are dropped now: offline once their grace runs out, unless they reconnect.
        waited = 0.0
        while any(link.grace is not None for link in self.hub.links.values()) and waited < self.config.grace + 2:
            await deferLater(self.reactor, 0.1, lambda: None)
            waited += 0.1
        await self.hub.stop()          # whatever is left goes offline now
        await self.streams.flush()     # the applications connected here hear it
        await self._close_spread(list(self.ws_factory.open_connections), 0)
        for protocol in list(self.ws_factory.open_connections):
            protocol.abort()
        await self.streams.flush()     # backlogs of closed connections go to the waiting queue

    async def _close_spread(self, protocols: list, over: float) -> None:
        """Close with 1001 ("reconnect elsewhere"), spread evenly over ``over`` seconds; wait for the
        close handshakes (up to 5 s more)."""
        for i, protocol in enumerate(protocols):
            delay = over * i / len(protocols) if over > 0 else 0
            self.reactor.callLater(delay, protocol.close, errors.CLOSE_GOING_AWAY, "node stopping; reconnect elsewhere")
        waited = 0.0
        while any(p in self.ws_factory.open_connections for p in protocols) and waited < over + 5:
            await deferLater(self.reactor, 0.1, lambda: None)
            waited += 0.1
