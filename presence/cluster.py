"""Nodes sharing one database: incarnations, heartbeats, and cleaning up after a node that died.

Every start of a node is a new **incarnation** (``<--node>#<random>``): the devices it records and
the applications it subscribes are its incarnation's, so a node restarted after a crash inherits
nothing live from its predecessor; it reaps them at once instead. Every node records a heartbeat on
the **database's clock** (skewed node clocks cannot make a node look dead or alive), together with
the last change it has delivered. A node whose heartbeat is older than ``node_timeout`` is dead: one
survivor reaps it in one transaction (``Store.reap_node``): if that survivor dies or loses the
database halfway, nothing happened and the dead node is reaped again later.

A node that finds it was taken for dead (its heartbeat or a fenced write finds its row gone, or its
change feed finds the log trimmed past what it read) closes everything and rejoins as a new
incarnation: its devices and applications reconnect and start from the truth. The same loop trims
the change log, never past what a registered node has not delivered.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from presence.bus import ChangeFeed
from presence.hub import Hub
from presence.keys import new_id
from presence.store import Reaped, Store, StoreUnavailable

log = Logger()

# "Older than this" on the database's clock: every other node (a node alone on SQLite, at start).
FAR_FUTURE = 1e15


def incarnation(label: str) -> str:
    return f"{label}#{new_id()[:12]}"


class Cluster:
    def __init__(self, store: Store, hub: Hub, feed: ChangeFeed, clock: IReactorTime, node: str,
                 node_timeout: float = 30.0, log_retention: float = 600.0, label: str | None = None,
                 shared: bool = True):
        self.store = store
        self.hub = hub
        self.feed = feed
        self.clock = clock
        self.node = node                # this incarnation
        self.label = label if label is not None else node.partition("#")[0]
        self.shared = shared            # other nodes may run on this database (PostgreSQL)
        self.node_timeout = node_timeout
        self.log_retention = log_retention
        self.reaped: list[str] = []
        # What to do once taken for dead (the node closes everything and rejoins).
        self.on_taken_for_dead: Callable[[str], Awaitable[None]] | None = None

    async def delivered(self) -> int:
        """The last change below which everything was handed to a socket or the waiting queue."""
        head = await self.feed.head()
        floor = self.hub.streams.unsent_floor()
        return head if floor is None else min(head, floor - 1)

    async def join(self) -> None:
        await self.store.register_node(self.node, await self.store.now(), await self.delivered(), self.label)

    async def leave(self) -> None:
        """A clean stop: reap this node itself, in one transaction, so whatever the stop could not
        clear (devices, if the store failed meanwhile) goes with the registration; if this fails too,
        the node stays registered and is reaped later, by a survivor or by its own next start."""
        reaped = await self.store.reap_node(self.node, self.clock.seconds(), node=self.node)
        if reaped is not None:
            self._publish(reaped)

    async def reap_predecessors(self) -> None:
        """At start (and rejoin): this node's earlier incarnations are dead, whatever their heartbeat
        says; alone on SQLite, so is every other node."""
        if self.shared:
            await self._reap_all(label=self.label)
        else:
            await self._reap_all(before=FAR_FUTURE)

    async def beat(self) -> None:
        """One heartbeat: record ours, reap the dead, trim the log."""
        try:
            now = await self.store.now()
            if not await self.store.heartbeat(self.node, now, await self.delivered()):
                await self.taken_for_dead("another node took this node for dead and marked its devices offline")
                return
            await self._reap_all(before=now - self.node_timeout)
            await self.store.trim_changes(self.clock.seconds() - self.log_retention)
        except StoreUnavailable as e:
            log.warn("heartbeat failed: {why}", why=e, event="cluster.heartbeat_failed")

    async def taken_for_dead(self, why: str) -> None:
        log.error("{why}: closing every connection and rejoining as a new incarnation. Check the clocks and "
                  "load of the nodes, or raise --node-timeout.", why=why, node=self.node,
                  event="cluster.taken_for_dead")
        if self.on_taken_for_dead is not None:
            await self.on_taken_for_dead(why)

    async def _reap_all(self, before: float | None = None, label: str | None = None) -> None:
        while (reaped := await self.store.reap_node(self.node, self.clock.seconds(), before=before, label=label,
                                                    held=self.hub.streams.channels)) is not None:
            self._reaped(reaped)

    def _reaped(self, reaped: Reaped) -> None:
        self._publish(reaped)
        self.reaped.append(reaped.node)
        log.info("cleaned up after node {dead}: {people} people offline, {apps} applications taken over, "
                 "{missed} updates it may not have delivered replayed", dead=reaped.node, people=reaped.people,
                 apps=len(reaped.apps), missed=len(reaped.replayed), event="cluster.reaped")

    def _publish(self, reaped: Reaped) -> None:
        """The applications connected here hear what reaping did: the offline changes, and what the
        reaped node may not have delivered (older numbers than what they already have are dropped)."""
        self.hub.publish(reaped.changes)
        self.hub.streams.publish(reaped.replayed, reaped.queued)
