"""Cross-node latency (issue 4): three `twistd -n presence` nodes (a, b, c) on one fresh PostgreSQL
database; devices on node A send status changes at R per second for S seconds; one application
connection on node B (and one of the same application on node C) receives them through the change
log and PostgreSQL LISTEN/NOTIFY. Reported per rate: device send -> application receipt on B (and C),
p50, p99, max, delivered / sent, and the CPU each node and the database's backends used.

    python -m bench cross-node --rate 200,500,1000,2000 --seconds 10
    python -m bench cross-node --quick          # what tests/test_bench_smoke.py runs

See docs/performance.md, "Several nodes".
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import time
from pathlib import Path

from bench import common
from bench.fleet import Worker
from bench.node import IssuerServer, NodeProcess, _env, seed, seed_plan
from bench.pg import PgDatabase, cpu_used
from bench.report import markdown, percentile, say, _num
from bench.scenarios import Bench, Profiler, Target

NODES = ("a", "b", "c")


class CrossNode(Bench):
    def __init__(self, opts):
        opts.connections = opts.devices + 2 * opts.generators
        super().__init__(opts)
        self.D = opts.devices
        self.nodes: dict[str, NodeProcess] = {}
        self.targets: dict[str, Target] = {}
        self.db: PgDatabase | None = None
        self.profilers: list[Profiler] = []

    # -- the run ------------------------------------------------------------------------------------
    async def run(self) -> dict:
        if self.o.presence_rev:
            self.o.presence_src = str(self.export(self.o.presence_rev))
        self.results["meta"] = {**self.meta(), "scenario": "cross-node", "devices": self.D,
                                "seconds": self.o.seconds, "rates": self.o.rate}
        self.load.start()
        try:
            if self.o.wait_quiet:
                await self.wait_quiet(self.o.wait_quiet)
            await self.start_all()
            await self.measure()
        finally:
            await self.cleanup()
        return self.results

    async def start_all(self) -> None:
        from presence.keys import hash_key, new_key

        o = self.o
        self.db = await asyncio.to_thread(PgDatabase, o.postgres)
        self.results["meta"]["database"] = self.db.name
        say(f"run directory {self.run_dir}; database {self.db.name} created; {self.D:,} devices on node A, "
            f"{self.G} generators")
        self.api_key = new_key()
        self.issuer = IssuerServer(self.run_dir)
        ports = {name: (common.free_port(), common.free_port()) for name in NODES}
        self.audience = f"http://127.0.0.1:{ports['a'][0]}"
        env = _env(Path(o.presence_src))
        self.fleet = self.generator_fleet(env)
        self.probe = Worker("probe", ["-m", "bench.probe"], env, self.run_dir / "probe.log")
        plan = self.run_dir / "plan.json"
        plan.write_text(json.dumps(seed_plan(0, self.G, self.D, hash_key(self.api_key))))
        say(f"seeding the database while the generators certify {self.D:,} device emails")
        seeding = asyncio.create_task(asyncio.to_thread(seed, self.db.url("presence-bench-seed"), plan,
                                                        Path(o.presence_src)))
        await self.fleet.start("certificates", self.D, timeout=600)
        await self.probe.start()
        await asyncio.wait_for(self.probe.ready.wait(), 30)
        seeded = await seeding
        say(f"database seeded: {seeded['apps']:,} applications, {seeded['grants']:,} grants in {seeded['seconds']}s")
        extra = ["--device-rate", "1000", "--device-burst", "1000", "--ping-interval", "0", "--grace", str(o.grace),
                 "--heartbeat", str(o.heartbeat), *o.node_args]
        for name in NODES:
            web, ws = ports[name]
            self.nodes[name] = NodeProcess(self.run_dir, Path(o.presence_src), self.db.url(f"presence-bench-{name}"),
                                           self.audience, self.issuer.domain, web, ws, o.backlog, extra, name=name)
        for name, node in self.nodes.items():
            node.wait_ready()
            self.targets[name] = Target(f"node {name.upper()}", node.ws_port, node.pid, True)
            say(f"node {name.upper()} started (pid {node.pid}): twistd {' '.join(node.args[1:])}")
        self.results["meta"]["node_commands"] = {n: " ".join(p.args[1:]) for n, p in self.nodes.items()}
        await self.start_probe(self.targets["b"])
        if o.profile:
            self.profilers = [Profiler(node.pid, o.profile / f"cross-node-{name}.txt")
                              for name, node in self.nodes.items()]

    async def measure(self) -> None:
        o = self.o
        a, b, c = (self.targets[n] for n in NODES)
        r = self.results["cross"] = {}
        self.load.exclude = set(await asyncio.to_thread(self.db.backends))
        r["devices"] = await self.connect(a, "devices", [{"group": "dev", "kind": "devices", "path": "/presence"}]
                                          * self.G, self.D)
        # each generator's application, granted by that generator's devices: one connection on B ...
        await self.connect(b, "application connections", [
            {"group": "obs", "kind": "apps", "paths": ["/" + common.tp_app(g)], "role": "obs"} for g in range(self.G)],
            self.G)
        if o.observer_c:  # ... and one more of the same application on C
            await self.connect(c, "application connections", [
                {"group": "obsc", "kind": "apps", "paths": ["/" + common.tp_app(g)], "role": "obsc"}
                for g in range(self.G)], self.G)
        await self.settle()
        share = [len(common.devices_of(g, self.G, self.D)) for g in range(self.G)]
        steps = r["steps"] = []
        for rate in o.rate:
            if rate > 4 * self.D:
                self.notes.append(f"rate {rate:,}/s skipped: {self.D:,} devices would each send more than 4 changes/s "
                                  "(raise --devices)")
                continue
            steps.append(await self.step(rate, share))
            await self.settle()
        for profiler in self.profilers:
            profiler.stop()
        await self.probe.call({"cmd": "stop"}, 10)
        for name, node in self.nodes.items():
            r[f"rss_peak_mib_{name}"] = round(common.proc_status(node.pid, "VmHWM") / 2**20, 1)

    async def settle(self) -> None:
        """Wait until every node has been (nearly) idle for half a second."""
        waited = max(await asyncio.gather(*(self.quiesce(node.pid, 120) for node in self.nodes.values())))
        if waited > 5:
            say(f"waited {waited:.0f}s for the nodes to settle")

    async def step(self, rate: int, share: list[int]) -> dict:
        o = self.o
        say(f"{rate:,} status changes/s on node A for {o.seconds:g}s")
        await self.stall()
        t0 = time.monotonic()
        cpu0 = {name: common.cpu_seconds(node.pid) for name, node in self.nodes.items()}
        gen0 = self.generators_cpu()
        pg0 = await asyncio.to_thread(self.db.cpu)
        self.load.exclude = set(pg0)  # the database's backends are part of what is measured
        replies = await self.fleet.all([{"cmd": "ramp", "rate": rate * n / self.D, "duration": o.seconds,
                                         "drain": o.drain} for n in share],
                                       timeout=o.seconds + o.drain + 60, what="sent", total=int(rate * o.seconds))
        wall = time.monotonic() - t0
        cpu = {name: common.cpu_seconds(node.pid) - cpu0[name] for name, node in self.nodes.items()}
        pg = cpu_used(pg0, await asyncio.to_thread(self.db.cpu))
        gen = self.generators_cpu() - gen0
        sent = sum(x["sent"] for x in replies)
        errors = sum(x["errors"] for x in replies)
        achieved = sent / max(x["elapsed"] for x in replies)
        step = {"target": rate, "achieved": round(achieved), "sent": sent, "errors": errors,
                "cpu_pct": {name: round(v / wall * 100) for name, v in cpu.items()},
                "pg_cpu_pct": round(pg / wall * 100), "generators_cpu_pct": round(gen / wall * 100),
                "cpu_us_per_change": {name: round(v / sent * 1e6) if sent else None for name, v in cpu.items()},
                "pg_us_per_change": round(pg / sent * 1e6) if sent else None,
                "generator_lag_ms": round(max(x["lag"] for x in replies) * 1000, 1),
                "stall_ms_b": await self.stall(), "other_cpu_pct": self.other_load(t0, f"cross-node {rate}/s")}
        for where, matched, lat, missing in (("b", "matched", "lat", "last_missing"),
                                             ("c", "matched_c", "lat_c", "last_missing_c")):
            if where == "c" and not o.observer_c:
                continue
            values = array.array("f")
            for reply in replies:
                values.frombytes(base64.b64decode(reply[lat]))
            tail = sorted(values[-max(len(values) // 5, 1):]) if values else []
            values = sorted(values)
            got = sum(x[matched] for x in replies)
            # Changes not delivered: coalesced with a later change of the same person in one batch
            # (by design) or lost; `last_missing` counts devices whose last status never arrived (lost).
            step[where] = {"delivered": got, "delivered_pct": 100.0 * got / sent if sent else 0.0,
                           "last_missing": sum(x[missing] for x in replies),
                           "p50": percentile(values, 50), "p99": percentile(values, 99),
                           "max": values[-1] if values else None, "p50_last_fifth": percentile(tail, 50)}
        bs = step["b"]
        for where in ("b", "c"):
            if step.get(where, {}).get("last_missing"):
                self.notes.append(f"cross-node {rate}/s: on node {where.upper()} the last status of "
                                  f"{step[where]['last_missing']} devices never arrived (lost, not coalesced)")
        step["kept_up"] = bool(achieved >= 0.95 * rate and bs["delivered_pct"] >= 99.5 and errors == 0 and sent
                               and bs["p50"] <= o.max_p50 and bs["p50_last_fifth"] <= o.max_p50)
        line = (f"{rate:,}/s: sent {achieved:,.0f}/s; on B delivered {bs['delivered']:,}/{sent:,} "
                f"({bs['delivered_pct']:.1f}%, last status missing for {bs['last_missing']} devices), "
                f"p50 {bs['p50']:.1f} ms, p99 {bs['p99']:.1f} ms, max {bs['max'] or 0:.1f} ms")
        if "c" in step:
            cs = step["c"]
            line += (f"; on C {cs['delivered_pct']:.1f}%, p50 {cs['p50']:.1f} ms, p99 {cs['p99']:.1f} ms, "
                     f"max {cs['max'] or 0:.1f} ms")
        line += (f"; CPU A {step['cpu_pct']['a']}% B {step['cpu_pct']['b']}% C {step['cpu_pct']['c']}% "
                 f"PostgreSQL {step['pg_cpu_pct']}% generators {step['generators_cpu_pct']}%; stall on B {step['stall_ms_b']:.1f} ms"
                 + (f"; {errors} errors e.g. {next((x['error_sample'] for x in replies if x.get('error_sample')), '')}"
                    if errors else "")
                 + ("" if step["kept_up"] else "  -> NOT kept up"))
        say(line)
        return step

    async def cleanup(self) -> None:
        for profiler in self.profilers:
            profiler.stop()
        # the generators first (their connections go), then the nodes, then the database
        if self.fleet:
            await self.fleet.stop()
            self.fleet = None
        # together: each waits out its devices' grace before it stops (--grace)
        codes = await asyncio.gather(*(asyncio.to_thread(node.stop) for node in self.nodes.values()))
        for (name, node), code in zip(self.nodes.items(), codes):
            say(f"node {name.upper()} stopped (exit status {code})")
            for problem in node.problems():
                self.notes.append(f"node {name.upper()} log: {problem}")
                say(f"node {name.upper()} log: {problem}")
        self.nodes = {}
        await super().cleanup()
        if self.db is not None:
            try:
                await asyncio.to_thread(self.db.drop)
                say(f"database {self.db.name} dropped")
            except Exception as e:  # noqa: BLE001 - reported, the run's figures stand
                self.notes.append(f"could not drop the bench database {self.db.name}: {e}")


# -- the table ------------------------------------------------------------------------------------------
def render(results: dict) -> str:
    meta = results["meta"]
    steps = results.get("cross", {}).get("steps", [])
    with_c = any("c" in s for s in steps)
    header = ["rate/s", "sent/s", "delivered on B", "B p50 ms", "B p99 ms", "B max ms"]
    if with_c:
        header += ["delivered on C", "C p50 ms", "C p99 ms", "C max ms"]
    header += ["last status lost B/C", "CPU A/B/C %", "PostgreSQL CPU %", "generators CPU %", "stall on B ms", "other CPU %", "kept up"]
    rows = []
    for s in steps:
        bs = s["b"]
        row = [_num(s["target"]), _num(s["achieved"]), f"{bs['delivered']:,}/{s['sent']:,} ({bs['delivered_pct']:.1f}%)",
               _num(bs["p50"], 1), _num(bs["p99"], 1), _num(bs["max"], 1)]
        if with_c:
            cs = s.get("c") or {}
            row += [f"{cs.get('delivered_pct', 0):.1f}%", _num(cs.get("p50"), 1), _num(cs.get("p99"), 1),
                    _num(cs.get("max"), 1)]
        row += [f"{bs.get('last_missing', '—')}/{(s.get('c') or {}).get('last_missing', '—')}",
                "/".join(str(s["cpu_pct"][n]) for n in NODES), _num(s["pg_cpu_pct"]), _num(s.get("generators_cpu_pct")), _num(s["stall_ms_b"], 1),
                _num(s.get("other_cpu_pct")), "yes" if s["kept_up"] else "NO"]
        rows.append(row)
    devices = results.get("cross", {}).get("devices", {})
    parts = [
        f"Cross-node latency — 3 nodes on one PostgreSQL, {meta['devices']:,} devices on node A "
        f"(connected at {_num(devices.get('rate'))}/s), the application on node B"
        + (" and on node C" if with_c else "") + f"; {meta['seconds']:g} s per rate; {meta['nproc']} cores; "
        f"node {meta['presence_rev']}",
        "",
        "Latency: a device's send on A -> the application's receipt on B (C), end to end. A change not delivered",
        "was coalesced with a later change of the same person (by design) or lost; \"last status lost\" counts",
        "devices whose last status never reached the application (lost).",
        "",
        markdown(header, rows),
    ]
    notes = results.get("notes") or []
    if notes:
        parts += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(parts)
