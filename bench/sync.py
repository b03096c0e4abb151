"""Syncing an application with many grants (issue 15): ``{"key": ..., "sync": true}`` on one node whose
store holds an application granted by N people (a share of them online), read as fast as a client
reads. Reports per round the time to ``synced``, the people and bytes received, the largest message,
the worst event-loop stall (the stall probe, bench/probe.py, pinging the node every 5 ms on a
connection of its own) and the node's memory (its RSS sampled every 20 ms, against before the round).

    python -m bench sync --grants 100000 --rounds 3 [--store postgresql]
    python -m bench.sync seed DATABASE PLAN.json       (the store's seeding, in a child process)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.fleet import Worker
from bench.machine import LoadMonitor
from bench.node import NodeProcess, _env
from bench.report import median, say
from bench.wsclient import Conn, frame

APP = "syncbench"
PROBE = "syncprobe"


def add_parser(sub) -> None:
    s = sub.add_parser("sync", help="an application with N grants asks for the state on connect (issue 15)")
    s.add_argument("--grants", type=int, default=100_000, help="people who granted the application (default 100000)")
    s.add_argument("--online", type=float, default=0.1, help="share of them online (default 0.1)")
    s.add_argument("--rounds", type=int, default=3, help="syncs, one after the other (default 3)")
    s.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    s.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                   help="with --store postgresql: an administrative URL; the bench makes and drops its own database")
    s.add_argument("--node-arg", dest="node_args", action="append", default=[])
    s.add_argument("--json", type=Path, default=None)
    s.add_argument("--markdown", type=Path, default=None)
    s.add_argument("--keep", action="store_true", help="keep the run directory (logs, store)")
    s.add_argument("--timeout", type=float, default=1800)


# -- seeding (child process) -----------------------------------------------------------------------------
async def _seed(reactor, database: str, plan_path: str) -> None:
    from presence.keys import new_id, new_key
    from presence.store import open_store

    plan = json.loads(Path(plan_path).read_text())
    store = open_store(database, reactor=reactor)
    await store.open()
    t0, now = time.monotonic(), time.time()
    try:
        for app_id in (APP, PROBE):
            app = await store.create_app("bench@bench.test", f"{app_id}.bench.test", app_id, "", new_key(), now)
            await store.mark_verified(app.id, app_id, now)
            await store.set_api_key(app.id, plan["key_hash"], now)
        n, every = plan["grants"], max(1, round(1 / plan["online"])) if plan["online"] > 0 else 0

        def insert():
            for start in range(0, n, 500):
                emails = [f"person{i:07d}@bench.test" for i in range(start, min(n, start + 500))]
                yield ("INSERT INTO grants (email, app_id, uid, created_at) VALUES " + ", ".join(["(?, ?, ?, ?)"] * len(emails)),
                       tuple(v for e in emails for v in (e, APP, new_id(), now)))
                online = [e for i, e in enumerate(emails, start) if every and i % every == 0]
                if online:
                    # the person's own page as their device: online, and seen active now
                    yield ("INSERT INTO devices (email, device, node, status, last_seen, session) VALUES "
                           + ", ".join(["(?, 'web', '', 'online', ?, 'page')"] * len(online)),
                           tuple(v for e in online for v in (e, now)))
                    yield ("INSERT INTO people (email, seq, last_active) VALUES " + ", ".join(["(?, 0, ?)"] * len(online)),
                           tuple(v for e in online for v in (e, now)))

        await store._transaction(insert())
        await store._execute("ANALYZE")    # as autovacuum would after a bulk load: the planner knows the sizes
    finally:
        await store.close()
    print(json.dumps({"grants": plan["grants"], "seconds": round(time.monotonic() - t0, 2)}))


# -- the syncing application ---------------------------------------------------------------------------------
class Syncing:
    """One application connection: key with sync, then counts what arrives until synced."""

    def __init__(self, key: str):
        self.auth = frame(json.dumps({"key": key, "sync": True}).encode())
        self.done = asyncio.get_running_loop().create_future()
        self.people = 0
        self.messages = 0
        self.bytes = 0
        self.largest = 0
        self.t0 = 0.0
        self.error = ""

    def opened(self, conn: Conn) -> None:
        self.t0 = time.monotonic()
        conn.send(self.auth)

    def text(self, conn: Conn, payload: bytes) -> None:
        self.messages += 1
        self.bytes += len(payload)
        self.largest = max(self.largest, len(payload))
        if payload.startswith(b'{"type":"state"'):
            self.people += payload.count(b'"email":')
        elif payload.startswith(b'{"type":"synced"') and not self.done.done():
            self.done.set_result(time.monotonic() - self.t0)
        elif b'"KO"' in payload and not self.done.done():
            self.error = payload[:200].decode("utf-8", "replace")
            self.done.set_exception(RuntimeError(self.error))

    def pong(self, conn: Conn, payload: bytes) -> None:
        pass

    def closed_by_peer(self, conn: Conn, code) -> None:
        self.failed(conn, f"closed by the node with {code}")

    def failed(self, conn: Conn, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))

    def lost(self, conn: Conn, was: int) -> None:
        self.failed(conn, "connection lost")


class SyncBench:
    def __init__(self, o: argparse.Namespace):
        self.o = o
        self.run_dir = Path(tempfile.mkdtemp(prefix="presence-sync-"))
        self.node: NodeProcess | None = None
        self.probe: Worker | None = None
        self.db = None
        self.load: LoadMonitor | None = None

    async def run(self) -> dict:
        from presence.keys import hash_key, new_key

        o = self.o
        key = new_key()
        self.load = LoadMonitor()
        self.load.start()
        try:
            if o.store == "postgresql":
                from bench.pg import PgDatabase

                self.db = await asyncio.to_thread(PgDatabase, o.postgres)
                database = self.db.url("presence-bench-sync")
            else:
                database = f"sqlite:{self.run_dir / 'sync.sqlite'}"
            plan = self.run_dir / "plan.json"
            plan.write_text(json.dumps({"key_hash": hash_key(key), "grants": o.grants, "online": o.online}))
            say(f"seeding {o.grants:,} grants ({o.store})")
            out = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "bench.sync", "seed", database, str(plan)],
                capture_output=True, text=True, timeout=900, env=_env(common.ROOT), cwd=self.run_dir)
            if out.returncode != 0:
                raise RuntimeError(f"seeding failed:\n{out.stderr[-3000:]}")
            say(f"seeded: {out.stdout.strip().splitlines()[-1]}")
            ws, web = common.free_port(), common.free_port()
            self.node = NodeProcess(self.run_dir, common.ROOT, database, f"http://127.0.0.1:{web}", "127.0.0.1:9",
                                    web, ws, 128, ["--ping-interval", "0", *o.node_args])
            await asyncio.to_thread(self.node.wait_ready)
            self.probe = Worker("probe", ["-m", "bench.probe"], _env(common.ROOT), self.run_dir / "probe.log")
            await self.probe.start()
            await asyncio.wait_for(self.probe.ready.wait(), 30)
            started = await self.probe.call({"cmd": "start", "host": "127.0.0.1", "port": ws, "source": "127.0.0.1",
                                             "path": "/" + PROBE, "key": key, "interval": 0.005}, 60)
            if started.get("error"):
                raise RuntimeError(f"stall probe: {started['error']}")
            rounds = [await self.round(ws, key, i) for i in range(o.rounds)]
            return {"bench": "sync", "store": o.store, "grants": o.grants, "online": o.online,
                    "rounds": rounds, "problems": self.node.problems(),
                    "median": {k: median([r[k] for r in rounds]) for k in ("seconds", "stall_ms", "rss_growth_mb")}}
        finally:
            await self.cleanup()

    async def round(self, ws: int, key: str, i: int) -> dict:
        await asyncio.sleep(1.5)
        base = self.node.rss()
        t0 = time.monotonic()
        await self.probe.call({"cmd": "window"}, 10)
        client = Syncing(key)
        conn = Conn(client, "/" + APP, f"127.0.0.1:{ws}")
        loop = asyncio.get_running_loop()
        peak = base
        await loop.create_connection(lambda: conn, "127.0.0.1", ws)
        while not client.done.done():
            peak = max(peak, self.node.rss())
            await asyncio.wait([client.done], timeout=0.02)
        seconds = client.done.result()
        window = await self.probe.call({"cmd": "window"}, 10)
        conn.abort()
        other, other_peak = self.load.since(t0) if time.monotonic() - t0 > 0.6 else self.load.since(t0 - 1.0)
        r = {"round": i + 1, "seconds": round(seconds, 3), "people": client.people, "messages": client.messages,
             "mb": round(client.bytes / 1e6, 1), "largest_kb": round(client.largest / 1024, 1),
             "stall_ms": round(window["worst_ms"], 1), "pings": window["pings"],
             "rss_before_mb": round(base / 2**20, 1), "rss_growth_mb": round((peak - base) / 2**20, 1),
             "other_cpu_pct": other, "other_cpu_peak_pct": other_peak}
        say(f"round {i + 1}: {r['people']:,} people in {r['seconds']}s ({r['messages']} messages, {r['mb']} MB, "
            f"largest {r['largest_kb']} KiB); worst stall {r['stall_ms']} ms over {r['pings']} pings; "
            f"RSS {r['rss_before_mb']} MB + {r['rss_growth_mb']} MB at most; other processes used {other}% of a "
            f"core (peak {other_peak}%)")
        if client.people != self.o.grants:
            raise RuntimeError(f"synced {client.people} people, not {self.o.grants}")
        return r

    async def cleanup(self) -> None:
        if self.load is not None:
            self.load.stop()
        if self.probe is not None:
            await self.probe.stop()
        if self.node is not None:
            await asyncio.to_thread(self.node.stop)
        if self.db is not None:
            await asyncio.to_thread(self.db.drop)
        if not self.o.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            say(f"run directory kept: {self.run_dir}")


def render(results: dict) -> str:
    lines = [f"sync of one application with {results['grants']:,} grants ({results['store']}, "
             f"{results['online']:.0%} online)", "",
             "| round | time to synced | people | messages | MB | largest message | worst stall | RSS before | RSS growth "
             "| other processes (mean/peak % of a core) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rounds"]:
        lines.append(f"| {r['round']} | {r['seconds']} s | {r['people']:,} | {r['messages']} | {r['mb']} | "
                     f"{r['largest_kb']} KiB | {r['stall_ms']} ms | {r['rss_before_mb']} MB | {r['rss_growth_mb']} MB | "
                     f"{r['other_cpu_pct']}/{r['other_cpu_peak_pct']} |")
    m = results["median"]
    lines.append(f"\nmedian: {m['seconds']} s, worst stall {m['stall_ms']} ms, RSS growth {m['rss_growth_mb']} MB")
    if results["problems"]:
        lines.append("node log problems: " + "; ".join(results["problems"]))
    return "\n".join(lines)


def main(o: argparse.Namespace) -> None:
    results = asyncio.run(asyncio.wait_for(SyncBench(o).run(), o.timeout))
    text = render(results)
    print()
    print(text)
    if o.json:
        o.json.write_text(json.dumps(results, indent=1))
    if o.markdown:
        o.markdown.write_text(text + "\n")


if __name__ == "__main__":
    common.die_with_parent()
    if len(sys.argv) == 4 and sys.argv[1] == "seed":
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.task import react

        react(lambda reactor: ensureDeferred(_seed(reactor, sys.argv[2], sys.argv[3])))
    else:
        sys.exit("usage: python -m bench.sync seed DATABASE PLAN.json")
