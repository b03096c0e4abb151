"""Nodes sharing one database: heartbeats, and cleaning up after a node that died without stopping.

Every node records a heartbeat. A node whose heartbeat is older than ``node_timeout`` is dead: one
survivor claims it (an atomic ``DELETE ... RETURNING`` of its registry row: of several survivors
exactly one gets it), marks its devices offline (the applications hear it through the log like any
change), takes over its application subscriptions and hands the changes the dead node may not have
delivered (logged after the last one it applied) to the applications' other connections or to their
waiting queue. The same loop trims the change log.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from presence import changelog
from presence.bus import ChangeFeed
from presence.hub import Hub
from presence.store import PendingUpdate, Store, StoreUnavailable
from presence.views import Update

log = Logger()


class Cluster:
    def __init__(self, store: Store, hub: Hub, feed: ChangeFeed, clock: IReactorTime, node: str,
                 node_timeout: float = 30.0, log_retention: float = 600.0):
        self.store = store
        self.hub = hub
        self.feed = feed
        self.clock = clock
        self.node = node
        self.node_timeout = node_timeout
        self.log_retention = log_retention
        self.reaped: list[str] = []

    async def join(self) -> None:
        await self.store.register_node(self.node, self.clock.seconds(), self.feed.last)

    async def leave(self) -> None:
        await self.store.forget_node(self.node)

    async def beat(self) -> None:
        """One heartbeat: record ours, reap the dead, trim the log."""
        now = self.clock.seconds()
        try:
            if not await self.store.heartbeat(self.node, now, self.feed.last):
                log.error("another node took this node ({node}) for dead and marked its devices offline; "
                          "rejoining. Check the clocks and load of the nodes, or raise --node-timeout.",
                          node=self.node, event="cluster.taken_for_dead")
                await self.join()
                self.hub.drop_all()
            while (dead := await self.store.claim_dead_node(now - self.node_timeout)) is not None:
                await self.reap(*dead)
            await self.store.trim_changes(now - self.log_retention)
        except StoreUnavailable as e:
            log.warn("heartbeat failed: {why}", why=e, event="cluster.heartbeat_failed")

    async def reap(self, node: str, last_applied: int) -> None:
        log.warn("node {dead} stopped sending heartbeats; marking its devices offline", dead=node,
                 event="cluster.node_dead")
        people = await self.hub.clear_node(node)
        apps = set(await self.store.take_subscriptions(node))
        missed = await self._missed(apps, last_applied) if apps else {}
        if missed:
            held = await self.store.subscribed(sorted({u.app_id for u in missed.values()}))
            live = [u for u in missed.values() if u.app_id in held]
            waiting = [u for u in missed.values() if u.app_id not in held]
            if live:
                await self.store.log_change(self.node, self.clock.seconds(), changelog.encode(live))
                self.hub.streams.publish(live)
            if waiting:
                await self.store.queue_pending([PendingUpdate(u.app_id, u.email, u.uid, u.status, u.at)
                                                for u in waiting])
        self.reaped.append(node)
        log.info("cleaned up after node {dead}: {people} people offline, {apps} applications taken over, "
                 "{missed} changes it may not have delivered handed on", dead=node, people=people,
                 apps=len(apps), missed=len(missed), event="cluster.reaped")

    async def _missed(self, apps: set[str], since: int) -> dict[tuple[str, str], Update]:
        """The latest update per (application, person) logged after ``since`` for these applications."""
        latest: dict[tuple[str, str], Update] = {}
        while True:
            changes = await self.store.changes_since(since)
            for change in changes:
                updates, queued, _ = changelog.decode(change.payload)
                for u in updates:
                    if u.app_id in apps and u.app_id not in queued:
                        latest[(u.app_id, u.email)] = u
                since = change.seq
            if len(changes) < 1000:
                return latest
