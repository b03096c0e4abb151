"""Several nodes holding N connections together (issue 8, "beyond that run several node processes"):
K `twistd -n presence` nodes on one fresh PostgreSQL database, each with its own ports, hold N idle
connections between them (split evenly, at most 19,000 per node: a process holds at most 20,000
open files here): half devices with a real BrowserID assertion, half connections of one
application (with its API key), as scenario 1 "idle" does for one node. Reported: connections held
per node and in total, RSS per connection per node (VmRSS delta / that node's connections), the
connect rate overall; then a cross-node fan-out: a device on node 0 (the person who granted the
application) changes status, and the time until the last application connection on every node has
it (through the change log and PostgreSQL on the other nodes), per node and overall, median of the
rounds.

    python -m bench cluster-hold --connections 45000 --nodes 3
    python -m bench cluster-hold --quick        # 2 nodes x 150 connections (the smoke test's run)

Each load generator (bench.generator) serves one node and holds at most PER_GENERATOR sockets, so
there are K x ceil(N/K / PER_GENERATOR) of them, each with its own loopback source addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from bench import common
from bench.fleet import Worker
from bench.node import IssuerServer, NodeProcess, _env, seed, seed_plan
from bench.pg import PgDatabase
from bench.report import markdown, median, say, _num
from bench.scenarios import Bench, Target

PER_GENERATOR = 15_000  # sockets one generator process holds at most (it too has 20,000 files)


# -- the command line ---------------------------------------------------------------------------------------
def add_parser(sub) -> argparse.ArgumentParser:
    q = sub.add_parser("cluster-hold", help="K nodes on one PostgreSQL hold N connections together; RSS per "
                                            "connection per node, connect rate, cross-node fan-out")
    q.add_argument("--connections", "-n", type=int, default=None,
                   help=f"N: connections held in total (default 45000; at most {common.MAX_PER_NODE:,} per node)")
    q.add_argument("--nodes", "-k", type=int, default=None, help="K: node processes (default 3)")
    q.add_argument("--quick", action="store_true",
                   help="a small run: 2 nodes x 150 connections, 2 s grace (the smoke test's run)")
    q.add_argument("--rounds", type=int, default=3, help="fan-out rounds (default 3; median reported)")
    q.add_argument("--fanout-timeout", type=float, default=60.0)
    q.add_argument("--grace", type=float, default=None, help="the nodes' --grace (default 10; 2 with --quick)")
    q.add_argument("--heartbeat", type=float, default=1.0, help="the nodes' --heartbeat (default 1)")
    common.add_cluster_options(q)
    return q


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def settle(o: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on --quick; the per-node cap; the generators."""
    o.nodes = o.nodes or (2 if o.quick else 3)
    o.connections = o.connections or (150 * o.nodes if o.quick else 45_000)
    if o.nodes < 1:
        sys.exit("--nodes must be at least 1")
    per_node = split(o.connections, o.nodes)
    if max(per_node) > common.MAX_PER_NODE:
        sys.exit(f"{o.connections:,} connections on {o.nodes} nodes is {max(per_node):,} on a node; one node "
                 f"process holds at most {common.MAX_PER_NODE:,} (20,000 open files): raise --nodes to at least "
                 f"{math.ceil(o.connections / common.MAX_PER_NODE)}")
    if min(per_node) < 4:
        sys.exit("--connections must be at least 4 per node")
    o.per_node = per_node
    o.generators_per_node = max(1, math.ceil(max(per_node) / PER_GENERATOR))
    o.generators = o.nodes * o.generators_per_node
    o.grace = o.grace if o.grace is not None else (2.0 if o.quick else 10.0)
    o.timeout = o.timeout or (240 if o.quick else 3600)
    o.profile = None
    return o


# -- the run ------------------------------------------------------------------------------------------------
class ClusterHold(Bench):
    def __init__(self, opts):
        super().__init__(opts)
        self.K = opts.nodes
        self.gpn = opts.generators_per_node
        self.per_node = opts.per_node
        self.nodes: list[NodeProcess] = []
        self.db: PgDatabase | None = None
        # generator g serves node g // gpn: its devices (d{g}, d{g+G}, ...) and a share of the node's
        # application connections, so that node k holds per_node[k] connections in all
        self.node_of = [g // self.gpn for g in range(self.G)]
        self.devices_of = [len(common.devices_of(g, self.G, self.D)) for g in range(self.G)]
        self.apps_of = [0] * self.G
        for k in range(self.K):
            gens = [g for g in range(self.G) if self.node_of[g] == k]
            apps = self.per_node[k] - sum(self.devices_of[g] for g in gens)
            if apps < 0:
                raise ValueError(f"node {k}: more devices than connections")
            for g, n in zip(gens, split(apps, len(gens))):
                self.apps_of[g] = n

    def gens(self, k: int) -> list[int]:
        return [g for g in range(self.G) if self.node_of[g] == k]

    async def run(self) -> dict:
        if self.o.presence_rev:
            self.o.presence_src = str(self.export(self.o.presence_rev))
        self.results["meta"] = {**self.meta(), "scenario": "cluster-hold", "nodes": self.K,
                                "per_node": self.per_node, "rounds": self.o.rounds}
        self.load.start()
        try:
            if self.o.wait_quiet:
                await self.wait_quiet(self.o.wait_quiet)
            await self.start_all()
            await self.hold()
            await self.fan()
            r = self.results["cluster"]
            for k, node in enumerate(self.nodes):
                r["nodes"][k]["rss_peak_mib"] = round(common.proc_status(node.pid, "VmHWM") / 2**20, 1)
        finally:
            await self.cleanup()
        return self.results

    async def start_all(self) -> None:
        from presence.keys import hash_key, new_key

        o = self.o
        self.db = await asyncio.to_thread(PgDatabase, o.postgres)
        self.results["meta"]["database"] = self.db.name
        say(f"run directory {self.run_dir}; database {self.db.name} created; N = {self.N:,} ({self.D:,} devices + "
            f"{self.N - self.D:,} application connections) on {self.K} nodes ({', '.join(f'{n:,}' for n in self.per_node)}), "
            f"{self.G} generators")
        self.api_key = new_key()
        self.issuer = IssuerServer(self.run_dir)
        self.ports = [(common.free_port(), common.free_port()) for _ in range(self.K)]
        self.audience = f"http://127.0.0.1:{self.ports[0][0]}"
        env = _env(Path(o.presence_src))
        self.fleet = self.generator_fleet(env, stars=[common.STAR_A])
        plan = self.run_dir / "plan.json"
        plan.write_text(json.dumps(seed_plan(0, self.G, self.D, hash_key(self.api_key))))
        say(f"seeding the database while the generators certify {self.D:,} device emails")
        seeding = asyncio.create_task(asyncio.to_thread(seed, self.db.url("presence-bench-seed"), plan,
                                                        Path(o.presence_src)))
        try:
            await self.fleet.start("certificates", self.D, timeout=900)
        finally:
            seeded = await seeding
        say(f"database seeded: {seeded['apps']:,} applications, {seeded['grants']:,} grants in {seeded['seconds']}s")
        extra = ["--device-rate", "1000", "--device-burst", "1000", "--ping-interval", "0", "--grace", str(o.grace),
                 "--heartbeat", str(o.heartbeat), *o.node_args]
        for k in range(self.K):
            web, ws = self.ports[k]
            self.nodes.append(NodeProcess(self.run_dir, Path(o.presence_src), self.db.url(f"presence-bench-n{k}"),
                                          self.audience, self.issuer.domain, web, ws, o.backlog, extra, name=f"n{k}"))
        for k, node in enumerate(self.nodes):
            await asyncio.to_thread(node.wait_ready)
            say(f"node {k} started (pid {node.pid}): twistd {' '.join(node.args[1:])}")
        self.results["meta"]["node_commands"] = [" ".join(p.args[1:]) for p in self.nodes]

    async def settle(self, timeout: float = 120) -> None:
        """Wait until every node has been (nearly) idle for half a second."""
        waited = max(await asyncio.gather(*(self.quiesce(node.pid, timeout) for node in self.nodes)))
        if waited > 5:
            say(f"waited {waited:.0f}s for the nodes to settle")

    async def counts(self, group: str) -> list[int]:
        """Connections of `group` open and authenticated, per node (as the generators see them)."""
        replies = await self.fleet.all({"cmd": "count", "group": group}, 30)
        out = [0] * self.K
        for g, reply in enumerate(replies):
            out[self.node_of[g]] += reply["open"]
        return out

    async def hold(self) -> None:
        o = self.o
        self.load.exclude = set(await asyncio.to_thread(self.db.backends))
        await self.settle(60)
        base = [common.proc_status(node.pid) for node in self.nodes]
        # the person who granted the application: a device on node 0, whose changes fan out
        await self.fleet.workers[0].call({"cmd": "connect", "group": "stara", "kind": "star", "email": common.STAR_A,
                                          "host": "127.0.0.1", "port": self.nodes[0].ws_port}, 60)
        since = time.monotonic()
        cluster = Target(f"{self.K} nodes", 0, 0, True)
        port = [self.nodes[self.node_of[g]].ws_port for g in range(self.G)]
        devices = await self.connect(cluster, "devices", [
            {"group": "dev", "kind": "devices", "path": "/presence", "port": port[g]} for g in range(self.G)], self.D)
        apps = await self.connect(cluster, "application connections", [
            {"group": "fan", "kind": "apps", "path": "/" + common.FAN_APP, "count": self.apps_of[g], "port": port[g]}
            for g in range(self.G)], self.N - self.D)
        await asyncio.sleep(0.5)
        await self.settle(120)
        loaded = [common.proc_status(node.pid) for node in self.nodes]
        held_dev, held_apps = await self.counts("dev"), await self.counts("fan")
        seconds = devices["seconds"] + apps["seconds"]
        total = sum(held_dev) + sum(held_apps)
        r = self.results["cluster"] = {
            "planned": self.N, "held": total, "devices": devices, "apps": apps,
            "connect_rate": round((devices["n"] + apps["n"]) / seconds) if seconds > 0 else None,
            "connect_seconds": round(seconds, 3), "other_cpu_pct": self.other_load(since, "cluster connect"),
            "nodes": []}
        for k in range(self.K):
            held = held_dev[k] + held_apps[k]
            node = {"node": k, "pid": self.nodes[k].pid, "planned": self.per_node[k], "held": held,
                    "devices": held_dev[k], "apps": held_apps[k], "rss_base_mib": round(base[k] / 2**20, 1),
                    "rss_loaded_mib": round(loaded[k] / 2**20, 1),
                    "rss_per_conn_kib": round((loaded[k] - base[k]) / max(held, 1) / 1024, 2)}
            r["nodes"].append(node)
            say(f"node {k}: holding {held:,}/{self.per_node[k]:,} connections ({held_dev[k]:,} devices, "
                f"{held_apps[k]:,} application): RSS {node['rss_base_mib']:.1f} -> {node['rss_loaded_mib']:.1f} MiB "
                f"= {node['rss_per_conn_kib']:.2f} KiB per connection")
            if held != self.per_node[k]:
                self.notes.append(f"node {k} held {held:,} of its {self.per_node[k]:,} connections")
        say(f"holding {total:,}/{self.N:,} connections on {self.K} nodes; connected at {r['connect_rate'] or 0:,}/s "
            f"overall ({seconds:.1f}s); other processes {r['other_cpu_pct']}% of a core")

    async def fan(self) -> None:
        o = self.o
        r = self.results["cluster"]
        held = [n["apps"] for n in r["nodes"]]
        rounds = []
        since = time.monotonic()
        for n in range(o.rounds):
            status = ("online", "unavailable")[n % 2]
            await self.fleet.all({"cmd": "arm", "group": "fan", "marker": f'"status":"{status}"'}, 30)
            sent = await self.fleet.workers[0].call(
                {"cmd": "trigger", "group": "stara", "text": '{"type":"status","status":"%s"}' % status}, 10)
            replies = await self.fleet.all({"cmd": "wait", "group": "fan", "timeout": o.fanout_timeout},
                                           o.fanout_timeout + 30)
            got, last = [0] * self.K, [0.0] * self.K
            for g, reply in enumerate(replies):
                k = self.node_of[g]
                got[k] += reply["got"]
                if reply["got"]:
                    last[k] = max(last[k], reply["t_last"])
            ms = [round((last[k] - sent["t"]) * 1000, 2) if got[k] else math.nan for k in range(self.K)]
            rounds.append({"got": got, "ms": ms})
            say(f"fan-out round {n + 1}: " + "; ".join(
                f"node {k} {got[k]:,}/{held[k]:,} last after {ms[k]:.1f} ms" for k in range(self.K)))
            await asyncio.sleep(0.3)
            await self.settle(60)
        overall = [max(x["ms"]) if all(not math.isnan(v) for v in x["ms"]) else math.nan for x in rounds]
        complete = all(x["got"][k] >= held[k] for x in rounds for k in range(self.K))
        r["fanout"] = {"rounds_ms": overall, "ms": median(overall), "complete": complete,
                       "other_cpu_pct": self.other_load(since, "cluster fan-out")}
        for k, node in enumerate(r["nodes"]):
            node_rounds = [x["ms"][k] for x in rounds]
            node["fanout"] = {"n": held[k], "got": [x["got"][k] for x in rounds], "rounds_ms": node_rounds,
                              "ms": median(node_rounds), "complete": all(x["got"][k] >= held[k] for x in rounds)}
        say(f"fan-out: the last application connection on every node after {r['fanout']['ms']:.1f} ms (median of "
            f"{o.rounds})" + ("" if complete else "; NOT every connection received every change"))
        if not complete:
            self.notes.append("cluster fan-out: not every application connection received every change")

    async def cleanup(self) -> None:
        # the generators first (their connections go), then the nodes, then the database
        try:
            if self.fleet:
                await self.fleet.stop()
                self.fleet = None
            # together: each waits out its devices' grace before it stops (--grace)
            codes = await asyncio.gather(*(asyncio.to_thread(node.stop) for node in self.nodes),
                                         return_exceptions=True)
            for k, (node, code) in enumerate(zip(self.nodes, codes)):
                say(f"node {k} stopped (exit status {code})")
                for problem in node.problems():
                    self.notes.append(f"node {k} log: {problem}")
                    say(f"node {k} log: {problem}")
            self.nodes = []
            await super().cleanup()
        finally:
            if self.db is not None:
                try:
                    await asyncio.to_thread(self.db.drop)
                    say(f"database {self.db.name} dropped")
                except Exception as e:  # noqa: BLE001 - reported, the run's figures stand
                    self.notes.append(f"could not drop the bench database {self.db.name}: {e}")


# -- the table ----------------------------------------------------------------------------------------------
def render(results: dict) -> str:
    meta = results["meta"]
    r = results.get("cluster") or {}
    header = ["node", "connections held", "devices", "applications", "RSS before MiB", "RSS holding MiB",
              "RSS per connection KiB", "peak RSS MiB", "fan-out last received ms (median)", "fan-out rounds ms",
              "received every change"]
    rows = []
    for n in r.get("nodes", []):
        f = n.get("fanout") or {}
        rows.append([str(n["node"]), f"{n['held']:,}/{n['planned']:,}", _num(n["devices"]), _num(n["apps"]),
                     _num(n["rss_base_mib"], 1), _num(n["rss_loaded_mib"], 1), _num(n["rss_per_conn_kib"], 2),
                     _num(n.get("rss_peak_mib"), 1), _num(f.get("ms"), 1),
                     ", ".join(_num(v, 1) for v in f.get("rounds_ms", [])),
                     "yes" if f.get("complete") else "NO"])
    if r.get("nodes"):
        nodes = r["nodes"]
        fan = r.get("fanout") or {}
        rss = sum(n["rss_loaded_mib"] - n["rss_base_mib"] for n in nodes) * 1024 / max(r["held"], 1)
        rows.append(["all", f"{r['held']:,}/{r['planned']:,}", _num(sum(n["devices"] for n in nodes)),
                     _num(sum(n["apps"] for n in nodes)), _num(sum(n["rss_base_mib"] for n in nodes), 1),
                     _num(sum(n["rss_loaded_mib"] for n in nodes), 1), _num(rss, 2),
                     _num(sum(n.get("rss_peak_mib") or 0 for n in nodes), 1), _num(fan.get("ms"), 1),
                     ", ".join(_num(v, 1) for v in fan.get("rounds_ms", [])),
                     "yes" if fan.get("complete") else "NO"])
    dev, apps = r.get("devices") or {}, r.get("apps") or {}
    parts = [
        f"Several nodes holding connections — {meta['nodes']} nodes on one PostgreSQL, {meta['connections']:,} "
        f"connections ({', '.join(f'{n:,}' for n in meta['per_node'])} per node), half devices with an assertion, "
        f"half connections of one application; {meta['generators']} generators; {meta['nproc']} cores; "
        f"node {meta['presence_rev']}",
        "",
        f"Connect rate overall: {_num(r.get('connect_rate'))} handshakes/s ({_num(dev.get('n'))} devices at "
        f"{_num(dev.get('rate'))}/s, then {_num(apps.get('n'))} application connections at {_num(apps.get('rate'))}/s, "
        f"all nodes at once; {_num(r.get('connect_seconds'), 1)} s).",
        "RSS per connection: the node's VmRSS holding its connections minus before, over its connections.",
        "Fan-out: a device on node 0 changes status; time until the last of the application's connections on each",
        "node has it (the other nodes through the change log and PostgreSQL); \"all\": the last on any node.",
        "",
        markdown(header, rows),
    ]
    notes = results.get("notes") or []
    if notes:
        parts += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(parts)
