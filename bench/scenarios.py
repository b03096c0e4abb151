"""The scenarios, run against the node and then, with the same generators, against the two references.

For every server: hold N idle connections (half devices with a real assertion, half application
connections with an API key; RSS per connection, connect rates), [node: throughput ramp], reconnect
storm, fan-out to N connections of one application, [node: fan-out to N applications of one
connection each]. A stall probe pings the server all along; each scenario reads its worst round trip.
"""

from __future__ import annotations

import array
import asyncio
import base64
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench.fleet import Fleet, Worker
from bench.machine import LoadMonitor
from bench.node import IssuerServer, NodeProcess, _env, seed, seed_plan
from bench.report import median, percentile, say


@dataclass
class Target:
    name: str
    port: int
    pid: int
    is_node: bool
    host: str = "127.0.0.1"

    def path(self, node_path: str) -> str:
        """The references take any path; subscribers use /sub."""
        return node_path if self.is_node else "/sub"


class ServerProcess:
    """A reference server (python -m bench.reference_*), its output in run_dir/<name>.log."""

    def __init__(self, name: str, port: int, run_dir: Path, lifetime: float):
        self.log = open(run_dir / f"{name}.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", f"bench.reference_{name}", "--port", str(port),
                                         "--lifetime", str(lifetime)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=_env(common.ROOT),
                                        preexec_fn=common.child_setup)
        self.pid = self.process.pid
        common.wait_listening(port, time.monotonic() + 30, lambda: self.process.poll() is None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


class Profiler:
    """py-spy (if installed) recording the node during one scenario, collapsed stacks in `path`."""

    def __init__(self, pid: int, path: Path):
        self.process = None
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe:
            self.path = path
            self.process = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                                             "--format", "raw", "--output", str(path)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            preexec_fn=common.die_with_parent)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Bench:
    def __init__(self, opts):
        self.o = opts
        self.N = opts.connections
        self.G = opts.generators
        self.D = self.N // 2                    # idle devices; the other half are application connections
        self.results: dict = {"notes": []}
        self.notes: list[str] = self.results["notes"]
        self.run_dir = Path(opts.run_dir or tempfile.mkdtemp(prefix="presence-bench-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fleet: Fleet | None = None
        self.probe: Worker | None = None
        self.issuer: IssuerServer | None = None
        self.node: NodeProcess | None = None
        self.servers: list[ServerProcess] = []
        self.load = LoadMonitor()

    def split(self, n: int) -> list[int]:
        return [n // self.G + (1 if g < n % self.G else 0) for g in range(self.G)]

    # -- the run ----------------------------------------------------------------------------------------------
    def export(self, rev: str) -> Path:
        """A clean copy of the checkout at `rev` (git archive), for the node and the seeder."""
        dest = self.run_dir / "presence-src"
        dest.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(common.ROOT), "archive", rev], capture_output=True, timeout=120)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=120)
        # the bench itself always comes from this checkout (the seeder runs with the export first on its path)
        shutil.rmtree(dest / "bench", ignore_errors=True)
        return dest

    async def run(self) -> dict:
        if self.o.presence_rev:
            self.o.presence_src = str(self.export(self.o.presence_rev))
        self.results["meta"] = self.meta()
        self.load.start()
        try:
            if self.o.wait_quiet:
                await self.wait_quiet(self.o.wait_quiet)
            await self.setup()
            await self.node_run()
            if self.o.references:
                for name in ("autobahn", "floor"):
                    await self.reference_run(name)
        finally:
            await self.cleanup()
        return self.results

    def generator_fleet(self, env: dict, stars: list[str] | None = None) -> Fleet:
        """The load generators, each with its JSON config and its log in the run directory;
        generator 0 also drives ``stars`` (the devices whose changes the fan-outs time)."""
        import json

        workers = []
        for g in range(self.G):
            config = {"index": g, "generators": self.G, "devices": self.D, "sources": common.source_addresses(g),
                      "issuer_pem": str(self.issuer.issuer_pem), "user_pem": str(self.issuer.user_pem),
                      "issuer_domain": self.issuer.domain, "audience": self.audience, "api_key": self.api_key,
                      "inflight": self.o.inflight, "lifetime": self.o.timeout + 120,
                      "stars": list(stars or []) if g == 0 else []}
            path = self.run_dir / f"generator{g}.json"
            path.write_text(json.dumps(config))
            workers.append(Worker(f"generator {g}", ["-m", "bench.generator", str(path)], env,
                                  self.run_dir / f"generator{g}.log"))
        return Fleet(workers)

    def meta(self) -> dict:
        import autobahn
        import twisted

        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
        src = Path(self.o.presence_src).resolve()
        rev = ""
        try:
            if self.o.presence_rev:
                rev = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "--short", self.o.presence_rev],
                                     capture_output=True, text=True, timeout=10).stdout.strip() + " (clean export)"
            else:
                rev = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"], capture_output=True,
                                     text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
        return {"connections": self.N, "generators": self.G, "nproc": os.cpu_count(),
                "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
                "twisted": twisted.__version__, "autobahn": autobahn.__version__, "kernel": platform.release(),
                "presence_src": str(src), "presence_rev": rev or "(not a git checkout)",
                "command": "python -m bench " + " ".join(sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "nofile": common.raise_nofile()}

    async def setup(self) -> None:
        from presence.keys import hash_key, new_key

        say(f"run directory {self.run_dir}; N = {self.N:,} ({self.D:,} devices + {self.N - self.D:,} application "
            f"connections), {self.G} generators")
        self.api_key = new_key()
        self.issuer = IssuerServer(self.run_dir)
        self.web_port, self.ws_port = common.free_port(), common.free_port()
        self.audience = f"http://127.0.0.1:{self.web_port}"
        env = _env(Path(self.o.presence_src))
        self.fleet = self.generator_fleet(env, stars=[common.STAR_A, common.STAR_B])
        self.probe = Worker("probe", ["-m", "bench.probe"], env, self.run_dir / "probe.log")
        plan = self.run_dir / "plan.json"
        plan.write_text(__import__("json").dumps(seed_plan(self.N, self.G, self.D, hash_key(self.api_key))))
        self.database = f"sqlite:{self.run_dir / 'bench.sqlite'}"
        say(f"seeding the store ({self.N + self.G + 2:,} applications) while the generators certify "
            f"{self.D:,} device emails")
        seeding = asyncio.create_task(asyncio.to_thread(seed, self.database, plan, Path(self.o.presence_src)))
        await self.fleet.start("certificates", self.D, timeout=600)
        await self.probe.start()
        await asyncio.wait_for(self.probe.ready.wait(), 30)
        seeded = await seeding
        say(f"store seeded: {seeded['apps']:,} applications, {seeded['grants']:,} grants in {seeded['seconds']}s")

    async def wait_quiet(self, limit: float) -> None:
        if await self.load.wait_quiet(limit, say) is None:
            self.notes.append(f"the machine was not quiet after waiting {limit:g}s")

    def profiler(self, t: Target, name: str) -> Profiler | None:
        return Profiler(t.pid, self.o.profile / f"{name}.txt") if self.o.profile and t.is_node else None

    def other_load(self, since: float, what: str) -> int:
        """Mean CPU (% of one core) that processes outside the bench used since `since`; noted if high."""
        mean, peak = self.load.since(since)
        if mean >= 15:
            self.notes.append(f"{what}: other processes on the machine used {mean}% of a core on average "
                              f"(peak {peak}%) meanwhile; the figures are disturbed")
        return mean

    async def cleanup(self) -> None:
        self.load.stop()
        if self.fleet:
            await self.fleet.stop()
        if self.probe:
            await self.probe.stop()
        if self.node:
            self.node.stop()
        for server in self.servers:
            server.stop()
        if self.issuer:
            self.issuer.close()
        for path in sorted(self.run_dir.glob("*.log")):  # the bench's own processes must not fail silently
            if path.name.startswith("node"):  # node.log, node-a.log, ...: read by NodeProcess.problems
                continue
            text = path.read_text(errors="replace")
            if "Traceback" in text:
                last = [line for line in text.splitlines() if line.strip()][-1]
                self.notes.append(f"bench process log {path.name} has a traceback: {last[:200]}")
        if not self.o.keep and not self.o.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------------------
    async def quiesce(self, pid: int, timeout: float = 60) -> float:
        """Wait until the server has been (nearly) idle for half a second; returns the wait."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            c0 = common.cpu_seconds(pid)
            await asyncio.sleep(0.5)
            if common.cpu_seconds(pid) - c0 < 0.03:
                break
        return time.monotonic() - t0

    async def stall(self) -> float:
        """Worst ping round trip since the last call, in ms."""
        window = await self.probe.call({"cmd": "window"}, 10)
        if window["error"]:
            self.notes.append(f"stall probe: {window['error']}")
        return round(window["worst_ms"], 2)

    async def connect(self, t: Target, what: str, cmds: list[dict], total: int) -> dict:
        cmds = [{"cmd": "connect", "host": t.host, "port": t.port, **c} for c in cmds]
        say(f"{t.name}: connecting {what} ({total:,})")
        cpu0 = self.generators_cpu()
        replies = await self.fleet.all(cmds, timeout=60 + total / 100, what=what, total=total)
        gen_cpu = self.generators_cpu() - cpu0
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        seconds = max(r["t_end"] for r in replies) - min(r["t0"] for r in replies)
        rate = ok / seconds if seconds > 0 else None
        errors = [e for r in replies for e in r["errors"]][:3]
        gen_pct = round(gen_cpu / seconds * 100) if seconds >= 0.5 else None  # too short to say otherwise
        say(f"{t.name}: {what}: {ok:,} connected in {seconds:.2f}s = {rate or 0:,.0f}/s"
            + (f" (generators used {gen_pct}% of a core)" if gen_pct is not None else "")
            + (f"; {failed} FAILED, e.g. {errors}" if failed else ""))
        if failed:
            self.notes.append(f"{t.name}: {failed} of {total} {what} failed to connect, e.g. {errors}")
        return {"n": ok, "failed": failed, "seconds": round(seconds, 3), "rate": rate and round(rate),
                "generators_cpu_pct": gen_pct}

    def generators_cpu(self) -> float:
        return sum(common.cpu_seconds(w.process.pid) for w in self.fleet.workers)

    async def close(self, group: str) -> None:
        await self.fleet.all({"cmd": "close", "group": group}, 60)

    async def start_probe(self, t: Target) -> None:
        answer = await self.probe.call({"cmd": "start", "host": t.host, "port": t.port, "source": "127.0.0.9",
                                        "path": "/" + common.PROBE_APP if t.is_node else "/probe",
                                        "key": self.api_key if t.is_node else None, "interval": 0.005}, 60)
        del answer

    # -- scenarios --------------------------------------------------------------------------------------------
    async def idle(self, t: Target, r: dict) -> None:
        await asyncio.sleep(0.5)
        await self.quiesce(t.pid, 30)
        base = common.proc_status(t.pid)
        await self.stall()
        t0 = time.monotonic()
        idle = r["idle"] = {}
        profiler = self.profiler(t, "connect")
        try:
            idle["devices"] = await self.connect(t, "devices", [{"group": "dev", "kind": "devices",
                                                                 "path": t.path("/presence")}] * self.G, self.D)
            apps = self.N - self.D
            idle["apps"] = await self.connect(t, "application connections", [
                {"group": "fan", "kind": "apps", "path": t.path("/" + common.FAN_APP), "count": c}
                for c in self.split(apps)], apps)
        finally:
            if profiler:
                profiler.stop()
        await self.quiesce(t.pid, 60)
        loaded = common.proc_status(t.pid)
        held = idle["devices"]["n"] + idle["apps"]["n"]
        idle.update(connections=held, rss_base_mib=round(base / 2**20, 1), rss_loaded_mib=round(loaded / 2**20, 1),
                    rss_per_conn_kib=round((loaded - base) / max(held, 1) / 1024, 2), stall_ms=await self.stall(),
                    other_cpu_pct=self.other_load(t0, f"{t.name} idle connect"))
        say(f"{t.name}: holding {held:,} idle connections: RSS {base / 2**20:.1f} -> {loaded / 2**20:.1f} MiB "
            f"= {idle['rss_per_conn_kib']:.2f} KiB per connection; worst stall {idle['stall_ms']:.1f} ms; "
            f"other processes {idle['other_cpu_pct']}% of a core")

    async def throughput(self, t: Target, r: dict) -> None:
        share = [len(common.devices_of(g, self.G, self.D)) for g in range(self.G)]
        steps, stalls = [], []
        profiler = self.profiler(t, "throughput")
        try:
            for rate in self.o.ramp:
                if rate > 4 * self.D:
                    self.notes.append(f"throughput ramp stopped below {rate:,}/s: {self.D:,} devices would each send "
                                      "more than 4 changes/s (raise --connections)")
                    break
                steps.append(step := await self.ramp_step(t, rate, share))
                stalls.append(step["stall_ms"])
                if not step["sustained"]:
                    break
                await self.quiesce(t.pid, 30)
        finally:
            if profiler:
                profiler.stop()
        sustained = [s["target"] for s in steps if s["sustained"]]
        r["throughput"] = {"steps": steps, "sustained": max(sustained) if sustained else 0,
                           "stall_ms": max(stalls) if stalls else None}
        waited = await self.quiesce(t.pid, 180)
        if waited > 5:
            say(f"{t.name}: waited {waited:.0f}s for the node to work off the last step")

    async def ramp_step(self, t: Target, rate: int, share: list[int]) -> dict:
        o = self.o
        say(f"{t.name}: throughput step {rate:,} status changes/s for {o.step_seconds:g}s")
        await self.stall()
        t0 = time.monotonic()
        cpu0 = common.cpu_seconds(t.pid)
        replies = await self.fleet.all([{"cmd": "ramp", "rate": rate * n / self.D, "duration": o.step_seconds,
                                         "drain": o.drain} for n in share],
                                       timeout=o.step_seconds + o.drain + 60, what="sent", total=int(rate * o.step_seconds))
        cpu = common.cpu_seconds(t.pid) - cpu0
        lat = array.array("f")
        for reply in replies:
            lat.frombytes(base64.b64decode(reply["lat"]))
        tail = sorted(lat[-max(len(lat) // 5, 1):]) if lat else []  # the step's last fifth, in arrival order
        values = sorted(lat)
        sent = sum(x["sent"] for x in replies)
        matched = sum(x["matched"] for x in replies)
        errors = sum(x["errors"] for x in replies)
        achieved = sent / max(x["elapsed"] for x in replies)
        step = {"target": rate, "achieved": round(achieved), "sent": sent, "delivered": matched,
                "delivered_pct": 100.0 * matched / sent if sent else 0.0, "errors": errors,
                "p50": percentile(values, 50), "p99": percentile(values, 99), "max": values[-1] if values else None,
                "p50_last_fifth": percentile(tail, 50),
                "cpu_us_per_change": round(cpu / sent * 1e6) if sent else None, "node_cpu_pct": round(cpu / o.step_seconds * 100),
                "generator_lag_ms": round(max(x["lag"] for x in replies) * 1000, 1), "stall_ms": await self.stall(),
                "other_cpu_pct": self.other_load(t0, f"{t.name} throughput {rate}/s")}
        # Sustained: the rate was sent, (nearly) all of it delivered, and latency did not run away: the
        # median stays low overall and at the end of the step (a backlog that builds shows there). One
        # stall (a garbage collection) raises p99 and max, which are reported, but is not a runaway.
        step["sustained"] = bool(achieved >= 0.95 * rate and step["delivered_pct"] >= 99.5 and errors == 0
                                 and values and step["p50"] <= o.max_p50 and step["p50_last_fifth"] <= o.max_p50)
        say(f"{t.name}: {rate:,}/s: sent {achieved:,.0f}/s, delivered {step['delivered_pct']:.1f}%, "
            f"p50 {step['p50']:.1f} ms, p99 {step['p99']:.1f} ms, max {step['max'] or 0:.1f} ms, "
            f"node CPU {step['node_cpu_pct']}%, stall {step['stall_ms']:.1f} ms, other processes {step['other_cpu_pct']}%"
            + (f", {errors} errors e.g. {replies[0].get('error_sample') or replies[-1].get('error_sample')}" if errors else "")
            + ("" if step["sustained"] else "  -> NOT sustained"))
        return step

    async def storm(self, t: Target, r: dict) -> None:
        total = r["idle"]["devices"]["n"] + r["idle"]["apps"]["n"]
        say(f"{t.name}: reconnect storm: {total:,} clients drop and reconnect at once")
        await self.stall()
        since = time.monotonic()
        profiler = self.profiler(t, "storm")
        try:
            replies = await self.fleet.all({"cmd": "storm", "groups": ["dev", "fan"], "observe": t.is_node,
                                            "timeout": 120}, timeout=300 + total / 50, what="back", total=total)
        finally:
            if profiler:
                profiler.stop()
        t0 = min(x["t0"] for x in replies)
        storm = r["storm"] = {
            "n": sum(x["ok"] for x in replies), "failed": sum(x["failed"] for x in replies),
            "not_current": sum(x["not_current"] for x in replies),
            "seconds_back": round(max(x["t_back"] for x in replies) - t0, 3),
            "seconds": round(max(x["t_current"] for x in replies) - t0, 3), "stall_ms": await self.stall(),
            "other_cpu_pct": self.other_load(since, f"{t.name} storm")}
        current = "their new statuses delivered to the applications" if t.is_node else "statuses answered"
        say(f"{t.name}: storm: {storm['n']:,} back in {storm['seconds_back']:.2f}s, {current} after "
            f"{storm['seconds']:.2f}s; worst stall {storm['stall_ms']:.1f} ms; other processes {storm['other_cpu_pct']}%"
            + (f"; {storm['failed']} failed, {storm['not_current']} not current" if storm["failed"] or storm["not_current"] else ""))
        storm["status_errors"] = sum(x["status_errors"] for x in replies)
        if storm["failed"] or storm["not_current"] or storm["status_errors"]:
            samples = [e for x in replies for e in x["errors"]][:3] + [x["error_sample"] for x in replies if x["error_sample"]][:1]
            self.notes.append(f"{t.name} storm: {storm['failed']} failed to reconnect, {storm['status_errors']} statuses "
                              f"refused, {storm['not_current']} new statuses never reached the application"
                              + (f"; e.g. {samples}" if samples else ""))

    async def fanout(self, t: Target, key: str, group: str, trigger: str, total: int, r: dict) -> None:
        rounds, complete = [], True
        profiler = self.profiler(t, key)
        await self.stall()
        since = time.monotonic()
        try:
            for n in range(self.o.rounds):
                status = ("online", "unavailable")[n % 2]
                await self.fleet.all({"cmd": "arm", "group": group, "marker": f'"status":"{status}"'}, 30)
                if t.is_node:
                    text = '{"type":"status","status":"%s"}' % status
                else:  # what the node would send, broadcast as it is
                    text = ('[{"email":"%s","status":"%s","uid":"Qm9iQm9iQm9iQm9iQm9iQm","at":%.3f}]'
                            % (common.STAR_A, status, time.time()))
                sent = await self.fleet.workers[0].call({"cmd": "trigger", "group": trigger, "text": text}, 10)
                replies = await self.fleet.all({"cmd": "wait", "group": group, "timeout": self.o.fanout_timeout},
                                               self.o.fanout_timeout + 30)
                got = sum(x["got"] for x in replies)
                last = max(x["t_last"] for x in replies)
                ms = (last - sent["t"]) * 1000 if got else float("nan")
                first = min(x["t_first"] for x in replies if x["got"]) if got else 0
                rounds.append(round(ms, 2))
                complete = complete and got >= total
                say(f"{t.name}: {key} round {n + 1}: {got:,}/{total:,} received; first after "
                    f"{(first - sent['t']) * 1000 if got else 0:.1f} ms, last after {ms:.1f} ms")
                await asyncio.sleep(0.3)
                await self.quiesce(t.pid, 30)
        finally:
            if profiler:
                profiler.stop()
        r[key] = {"n": total, "rounds_ms": rounds, "ms": median(rounds), "complete": complete,
                  "stall_ms": await self.stall(), "other_cpu_pct": self.other_load(since, f"{t.name} {key}")}
        if not complete:
            self.notes.append(f"{t.name} {key}: not every subscriber received every change")

    # -- per server -------------------------------------------------------------------------------------------
    async def node_run(self) -> None:
        o = self.o
        extra = ["--device-rate", "1000", "--device-burst", "1000", "--ping-interval", str(o.ping_interval),
                 "--grace", str(o.grace), *o.node_args]
        self.node = NodeProcess(self.run_dir, Path(o.presence_src), self.database, self.audience, self.issuer.domain,
                                self.web_port, self.ws_port, o.backlog, extra)
        self.node.wait_ready()
        self.results["meta"]["node_command"] = " ".join(self.node.args[1:])
        say(f"node started (pid {self.node.pid}): twistd {' '.join(self.node.args[1:])}")
        t = Target("node", self.ws_port, self.node.pid, True)
        r = self.results["node"] = {}
        since = time.monotonic()
        await self.start_probe(t)
        for name, email in (("stara", common.STAR_A), ("starb", common.STAR_B)):
            await self.fleet.workers[0].call({"cmd": "connect", "group": name, "kind": "star", "email": email,
                                              "host": t.host, "port": t.port}, 60)
        await self.idle(t, r)
        # each generator's application, granted by its devices: throughput and storm observe with it
        await self.connect(t, "observer applications", [
            {"group": "obs", "kind": "apps", "paths": ["/" + common.tp_app(g)], "role": "obs"} for g in range(self.G)],
            self.G)
        if o.ramp:
            await self.throughput(t, r)
        await self.storm(t, r)
        await self.fanouts(t, r)
        say("node: connecting one application per connection")
        r["many_apps_connect"] = await self.connect(t, "connections, one per application", [
            {"group": "bapps", "kind": "apps", "paths": ["/" + common.b_app(i) for i in range(g, self.N, self.G)]}
            for g in range(self.G)], self.N)
        await self.quiesce(t.pid, 60)
        await self.fanout(t, "fanout_many_apps", "bapps", "starb", r["many_apps_connect"]["n"], r)
        await self.close("bapps")
        await self.probe.call({"cmd": "stop"}, 10)
        r["rss_peak_mib"] = round(common.proc_status(t.pid, "VmHWM") / 2**20, 1)
        r["other_cpu_pct"] = self.load.since(since)[0]
        code = self.node.stop()
        say(f"node stopped (exit status {code}); its peak RSS was {r['rss_peak_mib']:.1f} MiB")
        for problem in self.node.problems():
            self.notes.append(f"node log: {problem}")
            say(f"node log: {problem}")
        self.node = None

    async def fanouts(self, t: Target, r: dict) -> None:
        """Devices leave (the node: wait out their grace period); the application gets N connections."""
        await self.close("dev")
        await self.close("obs")
        if t.is_node:
            say(f"{t.name}: devices dropped; waiting {self.o.grace:g}s of grace and for the node to settle")
            await asyncio.sleep(self.o.grace + 0.5)
            await self.quiesce(t.pid, 180)
        await self.connect(t, "more application connections", [
            {"group": "fan", "kind": "apps", "path": t.path("/" + common.FAN_APP), "count": c, "append": True}
            for c in self.split(self.D)], self.D)
        await self.quiesce(t.pid, 60)
        total = sum(x["open"] for x in await self.fleet.all({"cmd": "count", "group": "fan"}, 30))
        await self.fanout(t, "fanout_one_app", "fan", "stara" if t.is_node else "trig", total, r)
        await self.close("fan")

    async def reference_run(self, name: str) -> None:
        port = common.free_port()
        server = ServerProcess(name, port, self.run_dir, self.o.timeout + 120)
        self.servers.append(server)
        say(f"reference {name} started (pid {server.pid})")
        t = Target(name, port, server.pid, False)
        r = self.results[name] = {}
        since = time.monotonic()
        await self.start_probe(t)
        await self.fleet.workers[0].call({"cmd": "connect", "group": "trig", "kind": "star", "email": common.STAR_A,
                                          "path": "/trigger", "auth": False, "host": t.host, "port": port}, 60)
        await self.idle(t, r)
        await self.storm(t, r)
        await self.fanouts(t, r)
        await self.probe.call({"cmd": "stop"}, 10)
        r["other_cpu_pct"] = self.load.since(since)[0]
        await self.close("trig")
        server.stop()
        self.servers.remove(server)
