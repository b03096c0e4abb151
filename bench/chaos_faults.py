"""The chaos checker's faults: a schedule drawn from the seed alone (so the same seed replays the same
faults, whatever the timing), and the coroutines that inject them into a ChaosNode or the private
PostgreSQL.

    kill9      SIGKILL a node, restart it under the same name on the same database (Restart=on-failure)
    pause      SIGSTOP a node past --node-timeout (sometimes past a --log-retention of 5 s), then SIGCONT
    dbconn     pg_terminate_backend of one node's connections (its pool and its LISTEN connection), by
               application_name and datname: the private instance's own database only
    dbrestart  restart the private PostgreSQL (fast: clean, or immediate: as after a crash)
    skew       restart a node with its wall clock off by up to 2 s (libfaketime); it keeps that clock
               until its next skew fault (which may bring it back near 0)
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field

KINDS = {"sqlite": ("kill9", "pause", "skew"), "postgres": ("kill9", "pause", "dbconn", "dbrestart", "skew")}


@dataclass
class Timings:
    node_timeout: float = 3.0
    grace: float = 0.5
    log_retention: float = 5.0
    long_pause: float = 5.0   # a long pause's base: past the default retention, not a raised one

    def __post_init__(self) -> None:
        self.long_pause = min(self.long_pause, self.log_retention)


@dataclass
class Fault:
    kind: str
    node: str | None          # None: the database itself
    at: float                 # seconds into the round's traffic
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v:g}s" if isinstance(v, float) else f"{k} {v}" for k, v in self.params.items())
        return f"{self.kind}({self.node or 'db'}{', ' + extra if extra else ''})"


class Schedule:
    """Rounds of faults from one seeded generator. Kinds are dealt from a shuffled deck, so every
    kind comes up before any comes twice; a round holds enough faults that a run of `rounds`
    expected rounds meets every kind at least once."""

    def __init__(self, seed: str, kinds: tuple[str, ...], nodes: list[str], timings: Timings, rounds: int,
                 per_round: int | None = None):
        self.rng = random.Random(seed)
        self.kinds, self.nodes, self.t = kinds, nodes, timings
        self.deck: list[str] = []
        self.per_round = max(1, math.ceil(len(kinds) / max(rounds, 1)))
        self.exact = per_round        # a fixed number of faults per round (a long run's density)
        self.tail = 0.0

    def _kind(self) -> str:
        if not self.deck:
            self.deck = list(self.kinds)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def next_round(self) -> list[Fault]:
        rng, t = self.rng, self.t
        count = (self.exact or max(self.per_round, rng.randint(1, 3))) if self.kinds else 0  # none: a baseline
        # traffic stops this soon after the last fault: the recovery itself must then be right,
        # not masked by later changes
        self.tail = round(rng.uniform(0.0, 1.5), 2)
        faults = []
        for _ in range(count):
            kind = self._kind()
            node = None if kind == "dbrestart" else rng.choice(self.nodes)
            at = round(rng.uniform(0.0, 2.0), 2)
            if kind == "kill9":
                params = {"down": round(rng.uniform(0.1, 1.0), 2)}
            elif kind == "pause":
                past_retention = rng.random() < 0.35
                base = t.long_pause if past_retention else t.node_timeout
                params = {"seconds": round(base + rng.uniform(0.5, 1.5), 2)}
            elif kind == "dbrestart":
                params = {"mode": rng.choice(("fast", "immediate")), "down": round(rng.uniform(0.2, 1.5), 2)}
            elif kind == "skew":
                offset = rng.uniform(0.0, min(2.0, t.node_timeout - 0.5)) * rng.choice((-1, 1))
                params = {"offset": round(offset, 2)}
            else:
                params = {}
            faults.append(Fault(kind, node, at, params))
        return faults


class Injector:
    """Runs one round's faults against the nodes (name -> ChaosNode) and the private PostgreSQL.
    Faults on one node never overlap (each node has a lock); with one node they run one after the
    other. `log` gets one line per fault as it happens."""

    def __init__(self, nodes: dict, pg, log):
        self.nodes, self.pg, self.log = nodes, pg, log
        self.locks = {name: asyncio.Lock() for name in nodes}
        self.db_lock = asyncio.Lock()

    async def run(self, faults: list[Fault], sequential: bool) -> None:
        if sequential:
            for fault in faults:
                await asyncio.sleep(min(fault.at, 1.0))
                await self.one(fault)
        else:
            await asyncio.gather(*(self._later(fault) for fault in faults))

    async def _later(self, fault: Fault) -> None:
        await asyncio.sleep(fault.at)
        await self.one(fault)

    async def one(self, fault: Fault) -> None:
        p = fault.params
        if fault.node is None:
            async with self.db_lock:
                self.log(f"  {fault.describe()}")
                await self.pg.restart(p["mode"], p["down"])
            return
        node = self.nodes[fault.node]
        async with self.locks[fault.node]:
            self.log(f"  {fault.describe()}")
            if fault.kind == "kill9":
                node.kill9()
                await asyncio.sleep(p["down"])  # systemd's RestartSec
                node.start(node.skew)
                await node.ready()
            elif fault.kind == "pause":
                node.pause()
                await asyncio.sleep(p["seconds"])  # the pause itself
                node.resume()
            elif fault.kind == "dbconn":
                async with self.db_lock:
                    await self.pg.terminate(node.name)
            elif fault.kind == "skew":
                await node.stop()
                node.start(p["offset"])       # kept until this node's next skew: clocks disagree meanwhile
                await node.ready()
            else:
                raise ValueError(f"unknown fault {fault.kind}")
