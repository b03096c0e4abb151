"""`python -m bench chaos`: the fault-injection checker of issue 13.

    python -m bench chaos --seconds 600 --scenario both --seed 42 --out chaos.json

Runs real node processes (scenario `sqlite`: one node on SQLite; `postgres`: three nodes on a private
PostgreSQL instance), drives people's devices, applications and notifications at them, and injects
faults drawn from the seed in rounds: a few overlapping faults with traffic flowing, then a quiet
period (--node-timeout + --grace + a few seconds, traffic stopped, every client reconnected), then
the invariants (bench.chaos_check) against the store's truth. A round's violations are attributed to
the fault kinds injected in it. Exits 1 if anything was violated, 2 if the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.chaos_check import check
from bench.chaos_cluster import ChaosNode, PrivatePostgres, cleanup_all, store_call
from bench.chaos_faults import KINDS, Injector, Schedule, Timings
from bench.chaos_fleet import Fleet
from bench.node import IssuerServer

AUDIENCE = "http://presence.chaos:8080"
ROUND_ESTIMATE = {"sqlite": 22.0, "postgres": 24.0}   # seconds, until a round has been measured
SETUP_ESTIMATE = {"sqlite": 5.0, "postgres": 10.0}


def add_parser(sub) -> None:
    c = sub.add_parser("chaos", help="fault injection: kill -9, pauses, database outages, clock skew; checks "
                                     "the invariants of issue 13")
    c.add_argument("--seconds", type=float, default=120.0, help="total run time, both scenarios (default 120)")
    c.add_argument("--seed", type=int, default=None, help="the fault schedule's seed (default: a random one, printed)")
    c.add_argument("--scenario", choices=("sqlite", "postgres", "both"), default="both")
    c.add_argument("--people", type=int, default=12, help="people, with 1-2 devices each (default 12)")
    c.add_argument("--apps", type=int, default=3, help="applications, granted by subsets of the people (default 3)")
    c.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    c.add_argument("--keep", action="store_true", help="keep the run directories (node logs, each check's data)")
    c.add_argument("--per-round", type=int, default=None,
                   help="faults per round (default 1-3, more if the run is too short for every kind to come up); "
                        "a long run uses more, e.g. 10, to inject hundreds of each kind")
    c.add_argument("--faults", default=None,
                   help="only these fault kinds, comma-separated (default: every kind the scenario has); "
                        "'none': traffic and checks without faults, a baseline")
    c.add_argument("--log-retention", type=float, default=None,
                   help="the nodes' --log-retention in seconds (default 5, short so that trimming is exercised); "
                        "raise it with --keep to read a violation's changes in the kept log")


def say(line: str) -> None:
    print(line, flush=True)


class Scenario:
    """One scenario from start to cleanup; `result` holds its rounds, faults and violations."""

    def __init__(self, o: argparse.Namespace, name: str, budget: float):
        self.o, self.name, self.budget = o, name, budget
        self.t = Timings() if o.log_retention is None else Timings(log_retention=o.log_retention)
        self.node_names = ["a"] if name == "sqlite" else ["a", "b", "c"]
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"presence-chaos-{name}-"))
        self.pg: PrivatePostgres | None = None
        self.nodes: dict[str, ChaosNode] = {}
        self.fleet: Fleet | None = None
        self.issuer: IssuerServer | None = None
        self.result: dict = {"scenario": self.name, "rounds": [], "faults": {k: 0 for k in KINDS[name]},
                             "violations": [], "error": None, "problems": {}, "run_dir": str(self.run_dir)}

    def options(self) -> list[str]:
        t = self.t
        return ["--heartbeat", "0.5", "--node-timeout", str(t.node_timeout), "--grace", str(t.grace),
                "--log-retention", str(t.log_retention), "--notify-ttl", "3600", "--notify-queue", "1000",
                "--device-rate", "100", "--device-burst", "100", "--drain-time", "0.2", "--ping-interval", "1",
                "--batch-window", "0.02", "--pending-ttl", "3600"]

    async def run(self) -> dict:
        started = time.monotonic()
        try:
            await self.setup()
            await self.rounds(started)
        except Exception as e:  # noqa: BLE001 - reported as the run's failure, with the logs kept
            self.result["error"] = f"{type(e).__name__}: {e}"
            say(f"[{self.name}] the run failed: {self.result['error']}")
        finally:
            await self.cleanup()
        return self.result

    async def setup(self) -> None:
        from presence.identity import make_assertion, new_user_key

        o = self.o
        self.issuer = IssuerServer(self.run_dir)
        user_key, certs = new_user_key(), {}

        def assertion(email: str) -> str:
            now = time.time()
            if email not in certs or certs[email][0] < now - 1800:
                certs[email] = (now, self.issuer.issuer.certify(email, user_key.public_key(), now, 3600))
            return make_assertion(certs[email][1], user_key, AUDIENCE, now, 120)

        if self.name == "postgres":
            self.pg = PrivatePostgres()
            await self.pg.start()
            urls = {n: self.pg.url(f"presence-{n}") for n in self.node_names}
            checker_url = self.pg.url("presence-chaos-checker")
        else:
            urls = {"a": f"sqlite:{self.run_dir / 'presence.sqlite'}"}
            checker_url = urls["a"]
        self.checker_url = checker_url
        traffic = random.Random(f"{o.seed}-{self.name}-traffic")
        self.people = [f"p{i}@chaos.test" for i in range(o.people)]
        plan = {f"app{k}": [p for p in self.people if traffic.random() < 0.6] or [self.people[k % o.people]]
                for k in range(o.apps)}
        apps = await store_call("seed", checker_url, {"apps": plan}, self.run_dir)
        self.grants = {app["app_id"]: sorted(app["uids"]) for app in apps.values()}
        for name in self.node_names:
            self.nodes[name] = ChaosNode(name, urls[name], self.run_dir, AUDIENCE, self.issuer.domain, self.options())
            self.nodes[name].start()
        await asyncio.gather(*(n.ready() for n in self.nodes.values()))
        self.fleet = Fleet(traffic, list(self.nodes.values()), apps, self.people, assertion)
        self.fleet.start()
        await self.wait_settled(30)
        say(f"[{self.name}] {len(self.nodes)} node(s), {len(self.fleet.devices)} devices of {o.people} people, "
            f"{sum(map(len, self.fleet.conns.values()))} connections of {o.apps} applications; logs in {self.run_dir}")

    async def wait_settled(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fleet.settled():
                return True
            await asyncio.sleep(0.1)
        return False

    async def rounds(self, started: float) -> None:
        kinds = tuple(k for k in KINDS[self.name] if not self.o.faults or k in self.o.faults.split(","))
        if not kinds and self.o.faults != "none":
            raise ValueError(f"--faults {self.o.faults}: none of them applies to scenario {self.name}")
        expected = max(1, int((self.budget - (time.monotonic() - started)) // ROUND_ESTIMATE[self.name]))
        schedule = Schedule(f"{self.o.seed}-{self.name}", kinds, self.node_names, self.t, expected, self.o.per_round)
        injector = Injector(self.nodes, self.pg, say)
        seen: set[str] = set()
        length = ROUND_ESTIMATE[self.name]
        number = 0
        while number == 0 or time.monotonic() - started + length <= self.budget:
            number += 1
            t0 = time.monotonic()
            faults = schedule.next_round()
            say(f"[{self.name}] round {number}: {', '.join(f.describe() for f in faults) or 'no fault'}; traffic stops "
                f"{schedule.tail:g}s after the last")
            self.fleet.set_traffic(True)
            await asyncio.gather(injector.run(faults, sequential=len(self.nodes) == 1), asyncio.sleep(4.0))
            await asyncio.sleep(schedule.tail)
            self.fleet.set_traffic(False)
            settled = await self.quiet()
            violations = await self.check(number)
            new = [v for v in violations if v["key"] not in seen]
            seen |= {v["key"] for v in violations}
            for f in faults:
                self.result["faults"][f.kind] += 1
            kinds_here = sorted({f.kind for f in faults})
            for v in new:
                v["round"], v["kinds"] = number, kinds_here
            self.result["violations"] += new
            length = time.monotonic() - t0
            self.result["rounds"].append({"round": number, "faults": [f.describe() for f in faults],
                                          "settled": settled, "seconds": round(length, 1),
                                          "violations": len(new), "still": len(violations) - len(new)})
            letters = "".join(sorted({v["invariant"] for v in new}))
            say(f"[{self.name}] round {number} checked in {length:.0f}s: {len(new)} new violation(s)"
                f"{' (' + letters + ')' if letters else ''}, {len(violations) - len(new)} still standing"
                f"{'' if settled else '; WARNING: not every client could reconnect'}")

    async def quiet(self) -> bool:
        """Every client reconnected, then --node-timeout + --grace + 3 s without a reconnection
        (restarted, at most 3 times, when one happens)."""
        period = self.t.node_timeout + self.t.grace + 3.0
        for _ in range(3):
            if not await self.wait_settled(30):
                continue
            before = self.fleet.reconnects()
            await asyncio.sleep(period)  # the quiet period the invariants are defined after
            if self.fleet.settled() and self.fleet.reconnects() == before:
                return True
        return self.fleet.settled()

    async def check(self, number: int) -> list[dict]:
        live = {d.key: d.ok or "offline" for d in self.fleet.live_devices() if d.ready.is_set()}
        grants_by_person: dict[str, list[str]] = {}
        for app_id, emails in self.grants.items():
            for email in emails:
                grants_by_person.setdefault(email, []).append(app_id)
        truth = await store_call("truth", self.checker_url, {"people": self.people, "grants": grants_by_person,
                                                             "debug": self.o.keep}, self.run_dir)
        violations = check(self.fleet.record, live, self.grants, truth)
        if self.o.keep:  # what the check saw, to read a violation's story next to the node logs
            (self.run_dir / f"check-{number}.json").write_text(json.dumps(
                {"live": live, "truth": truth, "violations": violations, "record": vars(self.fleet.record)},
                indent=1, default=str))
        return violations

    async def cleanup(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
            rec = self.fleet.record
            self.result["traffic"] = {
                "status_changes": len(rec.statuses), "status_ok": sum(s["outcome"] == "ok" for s in rec.statuses),
                "updates_received": len(rec.updates), "notifications": len(rec.sent),
                "notifications_ok": sum("ok" in s["attempts"] for s in rec.sent.values()),
                "notifications_errno50": sum("errno 50" in s["attempts"] for s in rec.sent.values()),
                "notifications_received": len(rec.received), "reconnections": self.fleet.reconnects()}
        for node in self.nodes.values():
            await node.stop()
            problems = node.problems()
            if problems:
                self.result["problems"][node.name] = problems
        if self.pg is not None:
            self.pg.destroy()
        if self.issuer is not None:
            self.issuer.close()
        if not self.o.keep and self.result["error"] is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.result["run_dir"] = None


def replay(o: argparse.Namespace, scenario: str) -> str:
    return (f"python -m bench chaos --seed {o.seed} --scenario {scenario} --seconds {o.seconds:g} "
            f"--people {o.people} --apps {o.apps}" + (f" --per-round {o.per_round}" if o.per_round else "")
            + (f" --faults {o.faults}" if o.faults else "")
            + (f" --log-retention {o.log_retention:g}" if o.log_retention is not None else ""))


def table(results: list[dict], o: argparse.Namespace) -> str:
    lines = ["| scenario | fault | injected | violations | invariants |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for kind, count in r["faults"].items():
            mine = [v for v in r["violations"] if kind in v["kinds"]]
            letters = "".join(sorted({v["invariant"] for v in mine})) or "—"
            lines.append(f"| {r['scenario']} | {kind} | {count} | {len(mine)} | {letters} |")
        total = r["violations"]
        lines.append(f"| {r['scenario']} | all | {sum(r['faults'].values())} | {len(total)} | "
                     f"{''.join(sorted({v['invariant'] for v in total})) or '—'} |")
    lines.append("")
    for r in results:
        if r["error"]:
            lines.append(f"{r['scenario']}: the run failed: {r['error']} (logs kept in {r['run_dir']})")
        for v in r["violations"][:12]:
            lines.append(f"{r['scenario']} round {v['round']} ({'+'.join(v['kinds'])}) ({v['invariant']}) {v['detail']}")
        if len(r["violations"]) > 12:
            lines.append(f"{r['scenario']}: ... {len(r['violations']) - 12} more in the JSON result (--out)")
        for node, problems in r["problems"].items():
            lines.append(f"{r['scenario']} node {node} log: " + "; ".join(problems[:3]))
        if r["violations"] or r["error"]:
            lines.append(f"replay: {replay(o, r['scenario'])}")
    return "\n".join(lines)


async def run(o: argparse.Namespace) -> list[dict]:
    names = ["sqlite", "postgres"] if o.scenario == "both" else [o.scenario]
    results = []
    for i, name in enumerate(names):
        budget = (o.seconds - sum(r["elapsed"] for r in results)) / (len(names) - i)
        t0 = time.monotonic()
        result = await Scenario(o, name, budget).run()
        result["elapsed"] = round(time.monotonic() - t0, 1)
        results.append(result)
    return results


def main(o: argparse.Namespace) -> None:
    # SIGTERM (a timeout, kill) ends the run like Ctrl-C: the finally below and atexit stop every
    # node and the private PostgreSQL instead of leaving them behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("chaos: stopped by SIGTERM; everything it started was stopped"))
    if o.seed is None:
        o.seed = random.SystemRandom().randrange(1, 10**6)
    say(f"chaos: seed {o.seed}, scenario {o.scenario}, {o.seconds:g}s "
        f"(replay: python -m bench chaos --seed {o.seed} --scenario {o.scenario} --seconds {o.seconds:g} "
        f"--people {o.people} --apps {o.apps})")
    try:
        results = asyncio.run(asyncio.wait_for(run(o), 2 * o.seconds + 180))
    except asyncio.TimeoutError:
        cleanup_all()
        sys.exit("chaos: the run did not end in time; everything it started was stopped")
    finally:
        cleanup_all()
    say("")
    say(table(results, o))
    failed = any(r["error"] for r in results)
    violated = sum(len(r["violations"]) for r in results)
    if o.out:
        o.out.write_text(json.dumps({"seed": o.seed, "replay": {r["scenario"]: replay(o, r["scenario"]) for r in results},
                                     "violations": violated, "failed": failed, "scenarios": results}, indent=1))
    sys.exit(2 if failed else 1 if violated else 0)
