"""Hostile load (issue 14): each attack against a real node, with a healthy device beside it.

    python -m bench hostile --out hostile.json       # every attack, 10 s each (about 2 minutes)
    python -m bench hostile --seconds 1 --attacks fragments,heads   # a subset, short (the smoke test's kind)

For each attack the bench starts a healthy client (bench/hostile_client.py: a device signed in with an
assertion of the node's own identity provider, whose key the bench wrote, so no fetch is involved)
that sends a status every 50 ms and times each round trip to its {"result": "OK"}; it measures the
node's RSS at idle, then runs the attack (bench/hostile_attacks.py, a process of its own at a lower
priority) for --seconds while it reads the node's VmRSS every 100 ms. Reported per attack: what the node answered, the healthy client's
worst and p99 round trip, the node's peak RSS growth over idle, and whether it kept serving (every
status answered OK, a fresh device could connect afterwards, the process alive).

Goal (issue 14): the healthy client never waits more than 100 ms, RSS stays within 50 MB of idle.

Two node configurations, one node at a time (`twistd -n presence` on SQLite in a temporary directory):
the production rule for every attack but one, and, for the hostile issuer only (attack 2), a node with
--insecure-identity and the hostile servers as --trusted-issuer, since they listen on loopback, which
the production rule refuses to fetch (that refusal is attack 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import common
from bench.node import NodeProcess, _env, twistd
from bench.report import markdown, percentile, say

GOAL_RTT_MS = 100.0
GOAL_RSS_MB = 50.0
SAMPLE_INTERVAL = 0.1


@dataclass
class Attack:
    """One row of issue 14: how to run it and what the node must answer (docs/security.md)."""

    number: int
    key: str
    title: str
    connections: int
    documented: str
    expected: set[str] = field(default_factory=set)       # the answers documented; others are a failure
    must: Callable[[dict], bool] = lambda r: True          # more conditions on the result
    node: str = "strict"                                   # "strict": production rules; "issuer": see above
    log_event: str = ""                                    # node log lines to count (e.g. refused fetches)


CUT = {"no answer until the end", "open at the end"}       # a worker cut by the deadline


def _count(r: dict, label: str) -> int:
    return r["answers"].get(label, 0)


ATTACKS: list[Attack] = [
    Attack(0, "idle", "no attack (the healthy client alone: the baseline)", 0, "nothing", set()),
    Attack(1, "fragments", "fragmented messages before authentication (endless empty or one-byte continuation "
           "frames)", 50, "close 1009 at the 1025th frame (--max-fragments)",
           {"close 1009", "reset before a close frame"}, lambda r: _count(r, "close 1009") > 0),
    Attack(2, "issuer", "a hostile issuer streaming endless response header lines (device `connect`)", 16,
           "errno 15, close 4002; the fetch stops at --fetch-max-head",
           {"errno 15", "then close 4002"}, lambda r: _count(r, "errno 15") > 0 and r["log_lines"] > 0,
           node="issuer", log_event="failed (head-too-big)"),
    Attack(3, "ssrf", "support-document fetches to internal addresses (names read as 127/8, 10/8, 172.16/12, "
           "192.168/16, 100.64/10, 169.254/16)", 16, "errno 15, close 4002; the fetch refused before connecting",
           {"errno 15", "then close 4002"}, lambda r: _count(r, "errno 15") > 0 and r["log_lines"] > 0,
           log_event="failed (private)"),
    Attack(4, "bodies", "oversized request bodies: anonymous POSTs of 300 MB to /<appid>/notification", 4,
           "413 errno 45 at once, before the body is read (--max-body)",
           {"413 errno 45 (Content-Length)", "413 errno 45 (chunked)", "reset before the answer (Content-Length)",
            "reset before the answer (chunked)"},
           lambda r: _count(r, "413 errno 45 (Content-Length)") > 0),
    Attack(5, "no_read", "peers that do not read: bad JSON or statuses before `connect`, replies never read", 20,
           "the node reads no faster than it answers; never authenticated, each is closed at --auth-timeout and "
           "aborted 5 s later (it does not answer the close)",
           {"open, its writes blocked", "closed by the node"},
           lambda r: _count(r, "open, its writes blocked") + _count(r, "closed by the node") > 0),
    Attack(6, "nested", "deeply nested JSON before authentication ('[' x 30,000, 8 in flight per connection)", 8,
           "errno 1, the connection stays open", {"errno 1"}, lambda r: _count(r, "errno 1") > 0),
    Attack(9, "signin", "sign-in link floods from one client (POST /login/start for ever new addresses)", 4,
           "10 links, then 429 (--login-links-per-client)", {"200", "429"},
           lambda r: _count(r, "429") > 0 and _count(r, "200") <= 10),
    Attack(10, "heads", "oversized handshake heads (9 KiB, complete, in one read)", 8, "431, hang up", {"431"},
           lambda r: _count(r, "431") > 0),
]
NOT_LOAD = [
    (7, "secrets at rest", "not a load attack: see \"What is hashed or encrypted, and with what\""),
    (8, "assertion lifetime and clock skew", "not a load attack: see \"Assertions and certificates: times\""),
]
BY_KEY = {a.key: a for a in ATTACKS}


def add_parser(sub) -> None:
    h = sub.add_parser("hostile", help="each attack of issue 14 against a node, a healthy client beside it")
    h.add_argument("--seconds", type=float, default=10.0, help="length of each attack (default 10)")
    h.add_argument("--attacks", default="all",
                   help=f"comma-separated, in the table's order (default all): {','.join(BY_KEY)}")
    h.add_argument("--connections", type=float, default=1.0,
                   help="scale every attack's number of connections (default 1)")
    h.add_argument("--attacker-nice", type=int, default=10,
                   help="nice value of the attacker process (default 10: on one small machine the attacker's "
                        "CPU should not count as the node's)")
    h.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait (up to SECONDS) until other processes use under 10%% of a core")
    h.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    h.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown")
    h.add_argument("--keep", action="store_true", help="keep the run directory (node logs)")
    h.add_argument("--profile", type=Path, default=None,
                   help="record the node with py-spy during each attack into DIR/<attack>.txt (pip install py-spy; "
                        "it costs the node a little); read them with `python -m bench top`")
    h.add_argument("--presence-src", default=str(common.ROOT))
    h.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")


# -- processes ------------------------------------------------------------------------------------------------

class Child:
    """A bench child (healthy client or attacker) speaking JSON lines on stdout, "go" on stdin."""

    def __init__(self, name: str, args: list[str], env: dict, log: Path, nice: int = 0):
        self.name = name
        self.log = open(log, "w")

        def setup() -> None:
            common.child_setup()
            if nice:
                os.nice(nice)

        self.process = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=env, cwd=common.ROOT, preexec_fn=setup, text=True)

    async def line(self, timeout: float) -> dict:
        """The next JSON line (RuntimeError if the child ends or says nothing in time)."""
        loop = asyncio.get_running_loop()
        text = await asyncio.wait_for(loop.run_in_executor(None, self.process.stdout.readline), timeout)
        if not text:
            self.process.wait(5)
            raise RuntimeError(f"{self.name} ended (status {self.process.returncode}); see {self.log.name}")
        return json.loads(text)

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


class HostileNode(NodeProcess):
    """`twistd -n presence` on SQLite, without the bench's usual --insecure-identity unless asked: the
    healthy device signs in through the node's own identity provider (its key file is the bench's)."""

    def __init__(self, run_dir: Path, presence_src: Path, web_port: int, ws_port: int, name: str,
                 extra: list[str]):
        self.name = name
        self.ws_port = ws_port
        self.web_port = web_port
        self.log_path = run_dir / f"node-{name}.log"
        self.args = [
            twistd(), "-n", "--pidfile=", "presence",
            "--web", f"tcp:{web_port}:interface=127.0.0.1",
            "--ws", f"tcp:{ws_port}:interface=127.0.0.1",
            "--database", f"sqlite:{run_dir / (name + '.sqlite')}", "--public-url", f"http://127.0.0.1:{web_port}",
            "--node", name, "--identity-key-file", str(run_dir / "idp.pem"),
            "--device-rate", "100", "--device-burst", "100",   # the healthy device sends 20 statuses/s
            "--grace", "1",                                     # a quick stop
            *extra,
        ]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.args, cwd=run_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=_env(presence_src), preexec_fn=common.child_setup)
        self.pid = self.process.pid

    def log_count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    return common.proc_status(pid, field_name) / 2**20


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM (Linux: write 5 to clear_refs), so its peak is this attack's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def open_file_mb(pid: int) -> float:
    """Bytes in the regular files the process holds open (deleted temporary files included)."""
    total = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0.0
    for name in names:
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o100000:
            total += st.st_size
    return total / 2**20


# -- the bench ---------------------------------------------------------------------------------------------------

class Hostile:
    def __init__(self, o: argparse.Namespace):
        self.o = o
        self.run_dir = Path(tempfile.mkdtemp(prefix="presence-hostile-"))
        self.env = _env(Path(o.presence_src))
        self.children: list[Child] = []
        self.node: HostileNode | None = None
        self.results: dict = {"meta": {}, "rows": []}
        from bench.machine import LoadMonitor

        self.load = LoadMonitor()

    def attacks(self) -> list[Attack]:
        if self.o.attacks == "all":
            return list(ATTACKS)
        keys = [k.strip() for k in self.o.attacks.split(",") if k.strip()]
        unknown = [k for k in keys if k not in BY_KEY]
        if unknown:
            sys.exit(f"--attacks: unknown {', '.join(unknown)} (known: {', '.join(BY_KEY)})")
        return [a for a in ATTACKS if a.key in keys]

    async def run(self) -> dict:
        from cryptography.hazmat.primitives import serialization

        from presence.identity import new_user_key

        o = self.o
        chosen = self.attacks()
        self.idp_key = new_user_key()
        (self.run_dir / "idp.pem").write_bytes(self.idp_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.user_key = new_user_key()
        self.results["meta"] = {
            "seconds": o.seconds, "cores": os.cpu_count(), "commit": _commit(), "started": time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "attacker_nice": o.attacker_nice,
            "goal": {"worst_rtt_ms": GOAL_RTT_MS, "rss_growth_mb": GOAL_RSS_MB}}
        say(f"hostile load: {len(chosen)} attacks, {o.seconds:g}s each; run directory {self.run_dir}")
        self.load.start()
        results: dict[str, dict] = {}
        try:
            if o.wait_quiet:
                await self.wait_quiet(o.wait_quiet)
            for group in ("strict", "issuer"):
                todo = [a for a in chosen if a.node == group]
                if todo:
                    results.update(await self.group(group, todo))
        finally:
            self.load.stop()
            self.cleanup()
        self.results["rows"] = [results[a.key] for a in chosen if a.key in results]
        return self.results

    async def wait_quiet(self, limit: float) -> None:
        waited = await self.load.wait_quiet(limit, say)
        if waited is None:
            say(f"the machine was not quiet after {limit:g}s; measuring anyway")
        self.results["meta"]["quiet_after_s"] = None if waited is None else round(waited)

    async def group(self, group: str, todo: list[Attack]) -> dict[str, dict]:
        """Start the attackers (prepared, waiting), then the node, then run the attacks one by one."""
        web_port, ws_port = common.free_port(), common.free_port()
        audience = f"http://127.0.0.1:{web_port}"
        ready = await asyncio.gather(*(self.attacker(attack, web_port, ws_port, audience) for attack in todo))
        prepared = {attack.key: r for attack, r in zip(todo, ready)}
        extra: list[str] = []
        if group == "issuer":
            extra.append("--insecure-identity")
            for attack in todo:
                for issuer in prepared[attack.key][1].get("issuers", []):
                    extra += ["--trusted-issuer", issuer]
        self.node = HostileNode(self.run_dir, Path(self.o.presence_src), web_port, ws_port, group, extra)
        await asyncio.to_thread(self.node.wait_ready)
        common.wait_listening(web_port, time.monotonic() + 30)
        say(f"node '{group}' started (pid {self.node.pid}): twistd {' '.join(self.node.args[3:])}")
        self.results["meta"].setdefault("nodes", {})[group] = " ".join(["twistd", *self.node.args[1:]])
        out = {}
        try:
            for attack in todo:
                child, ready = prepared[attack.key]
                out[attack.key] = await self.measure(attack, child, ready, audience)
        finally:
            code = self.node.stop()
            problems = self.node.problems()
            say(f"node '{group}' stopped (exit status {code})" + (f"; its log: {problems}" if problems else ""))
            self.results["meta"].setdefault("node_log", {})[group] = problems
            self.node = None
        return out

    async def attacker(self, attack: Attack, web_port: int, ws_port: int, audience: str) -> tuple[Child, dict]:
        o = self.o
        config = {"attack": attack.key, "seconds": o.seconds, "web_port": web_port, "ws_port": ws_port,
                  "audience": audience, "connections": max(1, round(attack.connections * o.connections)) if attack.connections else 0,
                  "issuers": 64, "domains": int(min(10_000, max(100, 250 * o.seconds)))}
        path = self.run_dir / f"attack-{attack.key}.json"
        path.write_text(json.dumps(config))
        child = Child(f"attacker {attack.key}", ["-m", "bench.hostile_attacks", str(path)], self.env,
                      self.run_dir / f"attack-{attack.key}.log", nice=o.attacker_nice)
        self.children.append(child)
        ready = await child.line(120)
        return child, {**ready, "config": config}

    def assertion(self, audience: str) -> str:
        from presence.identity import Issuer, make_assertion
        from presence.identity.issuer import CERT_LIFETIME
        from presence.web.idp import issuer_domain

        now = time.time()
        cert = Issuer(issuer_domain(audience), self.idp_key).certify("healthy@bench.test", self.user_key.public_key(),
                                                                     now, CERT_LIFETIME)
        return make_assertion(cert, self.user_key, audience, now)

    async def measure(self, attack: Attack, attacker: Child, ready: dict, audience: str) -> dict:
        o = self.o
        node = self.node
        assert node is not None
        config = {"ws_port": node.ws_port, "seconds": o.seconds, "assertion": self.assertion(audience)}
        path = self.run_dir / f"healthy-{attack.key}.json"
        path.write_text(json.dumps(config))
        healthy = Child("healthy client", ["-m", "bench.hostile_client", str(path)], self.env,
                        self.run_dir / f"healthy-{attack.key}.log")
        self.children.append(healthy)
        warm = await healthy.line(60)
        settle = min(1.0, o.seconds / 2)   # short runs (the smoke test) wait less
        await asyncio.sleep(settle)
        idle_samples = []
        for _ in range(5):
            idle_samples.append(rss_mb(node.pid))
            await asyncio.sleep(SAMPLE_INTERVAL)
        idle = sorted(idle_samples)[len(idle_samples) // 2]
        disk0 = open_file_mb(node.pid)
        hwm = reset_peak(node.pid)
        log0 = node.log_count(attack.log_event) if attack.log_event else 0
        say(f"{attack.number}. {attack.key}: idle RSS {idle:.1f} MB; attacking for {o.seconds:g}s "
            f"with {ready['config']['connections']} connections")
        profiler = None
        if o.profile:
            from bench.scenarios import Profiler

            o.profile.mkdir(parents=True, exist_ok=True)
            profiler = Profiler(node.pid, o.profile / f"{attack.key}.txt")
        cpu0 = node.cpu()
        t0 = time.monotonic()
        attacker.go()
        healthy.go()
        done = asyncio.gather(attacker.line(o.seconds + 60), healthy.line(o.seconds + 60))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())   # an interrupted run: no warning
        peak, disk_peak, samples, alive = idle, disk0, 0, True
        next_note, cpu_note = t0 + 2, cpu0
        while not done.done():
            if node.process.poll() is not None:
                alive = False
                break
            try:
                value = rss_mb(node.pid)
            except (OSError, KeyError):
                alive = False
                break
            peak = max(peak, value)
            samples += 1
            if attack.key == "bodies":
                disk_peak = max(disk_peak, open_file_mb(node.pid))
            if time.monotonic() >= next_note:
                cpu_now = node.cpu()
                say(f"   {time.monotonic() - t0:4.1f}s: node RSS {value:.1f} MB (peak +{peak - idle:.1f}), "
                    f"CPU {100 * (cpu_now - cpu_note) / 2:.0f}% of a core")
                next_note, cpu_note = next_note + 2, cpu_now
            await asyncio.wait([done], timeout=SAMPLE_INTERVAL)
        attack_result, health = await done
        cpu = (node.cpu() - cpu0) / (time.monotonic() - t0) if alive else math.nan
        if profiler:
            profiler.stop()
        if alive and hwm:
            peak = max(peak, rss_mb(node.pid, "VmHWM"))
        await asyncio.sleep(settle)
        after = rss_mb(node.pid) if node.process.poll() is None else math.nan
        attacker.stop()
        healthy.stop()
        mean_other, max_other = self.load.since(t0)
        rtts = sorted(health["rtts_ms"] + health["unanswered_ms"])
        worst = rtts[-1] if rtts else math.nan
        p99 = percentile(rtts, 99)
        growth = peak - idle
        serving = (alive and not health["closed"] and health["ko"] == 0 and not health["unanswered_ms"]
                   and health["fresh"].get("ok", False))
        row = {"number": attack.number, "attack": attack.key, "title": attack.title, "node": attack.node,
               "documented": attack.documented, "answers": attack_result["answers"],
               "attempts": attack_result["attempts"], "mb_sent": attack_result["mb_sent"],
               "figures": attack_result["figures"], "attack_seconds": attack_result["seconds"],
               "log_lines": node.log_count(attack.log_event) - log0 if attack.log_event else None,
               "healthy": {"sent": health["sent"], "ok": health["ok"], "ko": health["ko"], "closed": health["closed"],
                           "unanswered": len(health["unanswered_ms"]), "fresh": health["fresh"],
                           "warm_ms": warm.get("warm_ms"), "ko_sample": health["ko_sample"],
                           "median_ms": round(percentile(rtts, 50), 1) if rtts else None},
               "worst_ms": round(worst, 1), "p99_ms": round(p99, 1), "rss_idle_mb": round(idle, 1),
               "rss_peak_mb": round(peak, 1), "rss_growth_mb": round(growth, 1), "rss_after_mb": round(after, 1),
               "rss_samples": samples, "peak_from_vmhwm": hwm, "alive": alive, "kept_serving": serving,
               "node_cpu_pct": round(100 * cpu), "other_cpu_pct": {"mean": mean_other, "max": max_other}}
        if attack.key == "bodies":
            row["disk_growth_mb"] = round(disk_peak - disk0, 1)
        row["as_documented"] = as_documented(attack, row)
        row["within_goal"] = bool(serving and worst <= GOAL_RTT_MS and growth <= GOAL_RSS_MB)
        say(f"{attack.number}. {attack.key}: {answered(row)}; healthy worst {worst:.1f} ms, p99 {p99:.1f} ms; "
            f"RSS +{growth:.1f} MB; {'kept serving' if serving else 'DID NOT keep serving'}; node CPU "
            f"{row['node_cpu_pct']}% of a core; other processes "
            f"{mean_other}% of a core (max {max_other}%)")
        return row

    def cleanup(self) -> None:
        for child in self.children:
            child.stop()
        if self.node is not None:
            self.node.stop(10)
        if self.o.keep:
            say(f"run directory kept: {self.run_dir}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def as_documented(attack: Attack, row: dict) -> bool:
    """Every answer is a documented one (or a worker cut by the deadline) and the attack's own
    conditions hold."""
    unexpected = [a for a in row["answers"] if a not in attack.expected and a not in CUT]
    return not unexpected and attack.must(row)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


# -- the table ---------------------------------------------------------------------------------------------------

def answered(row: dict) -> str:
    parts = [f"{label} x{n:,}" for label, n in row["answers"].items()]
    text = "; ".join(parts) or "nothing"
    if row.get("log_lines"):
        text += f"; {row['log_lines']:,} fetches logged"
    if "disk_growth_mb" in row:
        text += f"; disk +{row['disk_growth_mb']:g} MB"
    if not row["as_documented"]:
        text += f" (NOT as documented: {row['documented']})"
    return text


def render(results: dict) -> str:
    rows = []
    by_number = {r["number"]: r for r in results["rows"]}
    numbers = sorted([*by_number, *(n for n, _, _ in NOT_LOAD)]) if len(by_number) == len(ATTACKS) else sorted(by_number)
    not_load = {n: (title, text) for n, title, text in NOT_LOAD}
    for n in numbers:
        if n in not_load:
            title, text = not_load[n]
            rows.append([f"{n}. {title}", text, "—", "—", "—", "—"])
            continue
        r = by_number[n]
        goal = "yes" if r["within_goal"] else ("no (stopped serving)" if not r["kept_serving"] else "no")
        rows.append([f"{n}. {r['title']}", answered(r), f"{r['worst_ms']:.1f}", f"{r['p99_ms']:.1f}",
                     f"{r['rss_growth_mb']:.1f}", goal])
    header = ["attack", "what the node answered", "healthy worst RTT ms", "p99 ms", "RSS growth MB",
              f"within goal (≤ {GOAL_RTT_MS:g} ms, ≤ {GOAL_RSS_MB:g} MB)"]
    return markdown(header, rows)


def main(o: argparse.Namespace) -> None:
    bench = Hostile(o)
    limit = o.timeout or (len(bench.attacks()) * (o.seconds + 60) + 120)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        results = asyncio.run(asyncio.wait_for(bench.run(), limit))
    except asyncio.TimeoutError:
        bench.cleanup()
        sys.exit(f"hostile: the run did not end within {limit:g}s (see --timeout); everything it started was stopped")
    except KeyboardInterrupt:
        bench.cleanup()
        sys.exit("hostile: interrupted; everything it started was stopped")
    text = render(results)
    print()
    print(text)
    if o.out:
        o.out.write_text(json.dumps(results, indent=1, default=str))
    if o.markdown:
        o.markdown.write_text(text + "\n")
    if not all(r["as_documented"] for r in results["rows"]):
        sys.exit(1)
