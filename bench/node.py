"""The node under test: its identity issuer, its seeded store, and the `twistd -n presence` process.

The store is seeded before the node starts, with presence's own store API (presence.store), in a
child process (`python -m bench.node seed PLAN.json`) so it uses the same presence sources as the
node and its reactor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from bench import common


# -- the identity issuer -----------------------------------------------------------------------------
class IssuerServer:
    """Serves the issuer's support document at http://127.0.0.1:PORT/.well-known/browserid (the node
    fetches it once and caches it) from a thread of the bench; writes the issuer's and the shared
    user key to `run_dir` for the generators, which certify their own devices."""

    def __init__(self, run_dir: Path):
        from presence.identity import Issuer, new_user_key

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.domain = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.issuer = Issuer(self.domain, new_user_key())
        self.document = json.dumps(self.issuer.support_document()).encode()
        self.issuer_pem = run_dir / "issuer.pem"
        self.user_pem = run_dir / "user.pem"
        for path, key in ((self.issuer_pem, self.issuer.private_key), (self.user_pem, new_user_key())):
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self.fetches = 0
        threading.Thread(target=self.httpd.serve_forever, name="issuer", daemon=True).start()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/.well-known/browserid":
                    self.send_error(404)
                    return
                server.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.document)))
                self.end_headers()
                self.wfile.write(server.document)

            def log_message(self, *args):
                pass

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- seeding the store -------------------------------------------------------------------------------
def seed_plan(n_apps: int, generators: int, devices: int, key_hash: str) -> dict:
    """Every application the scenarios use, with who granted it."""
    apps = [{"app_id": common.FAN_APP, "grants": [common.STAR_A]},
            {"app_id": common.PROBE_APP, "grants": []}]
    apps += [{"app_id": common.tp_app(g), "grants": [common.device_email(i) for i in common.devices_of(g, generators, devices)]}
             for g in range(generators)]
    apps += [{"app_id": common.b_app(i), "grants": [common.STAR_B]} for i in range(n_apps)]
    return {"key_hash": key_hash, "apps": apps}


def seed(database: str, plan_path: Path, presence_src: Path, timeout: float = 600) -> dict:
    """Write the plan into the store (in a child process); returns what it reports."""
    out = subprocess.run([sys.executable, "-m", "bench.node", "seed", database, str(plan_path)],
                         capture_output=True, text=True, timeout=timeout, env=_env(presence_src),
                         cwd=plan_path.parent, preexec_fn=common.child_setup)
    if out.returncode != 0:
        raise RuntimeError(f"seeding the store failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _seed(reactor, database: str, plan_path: str) -> None:
    from twisted.internet.defer import ensureDeferred, gatherResults

    from presence.keys import new_id, new_key
    from presence.store import open_store

    with open(plan_path) as f:
        plan = json.load(f)
    store = open_store(database, reactor=reactor)
    await store.open()
    t0 = time.monotonic()
    grants = 0
    try:
        now = time.time()

        async def one(entry: dict) -> int:
            app_id = entry["app_id"]
            app = await store.create_app("bench@bench.test", f"{app_id}.bench.test", app_id, "", new_key(), now)
            await store.mark_verified(app.id, app_id, now)
            await store.set_api_key(app.id, plan["key_hash"], now)
            uids = entry.get("uids") or [new_id() for _ in entry["grants"]]  # chosen uids: the poster knows them
            for email, uid in zip(entry["grants"], uids):
                await store.add_grant(email, app_id, uid, now)
            return len(entry["grants"])

        apps = plan["apps"]
        chunk = 64  # a few dozen in flight keep the store's thread busy
        for start in range(0, len(apps), chunk):
            done = await gatherResults([ensureDeferred(one(e)) for e in apps[start:start + chunk]])
            grants += sum(done)
    finally:
        await store.close()
    print(json.dumps({"apps": len(plan["apps"]), "grants": grants, "seconds": round(time.monotonic() - t0, 2)}))


def _seed_main(database: str, plan_path: str) -> None:
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    react(lambda reactor: ensureDeferred(_seed(reactor, database, plan_path)))


# -- the node process --------------------------------------------------------------------------------
def _env(presence_src: Path) -> dict:
    """Children import presence (and the twistd plugin) from `presence_src` first, and the bench
    package from this checkout."""
    paths = [str(presence_src), str(common.ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}


def twistd() -> str:
    return shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"


class NodeProcess:
    """`twistd -n --pidfile= presence ...` with its log in run_dir/node.log (node-NAME.log when it is
    not the one node "bench")."""

    def __init__(self, run_dir: Path, presence_src: Path, database: str, audience: str, issuer_domain: str,
                 web_port: int, ws_port: int, backlog: int, extra: list[str], name: str = "bench"):
        self.name = name
        self.ws_port = ws_port
        self.web_port = web_port
        self.log_path = run_dir / ("node.log" if name == "bench" else f"node-{name}.log")
        self.args = [
            twistd(), "-n", "--pidfile=", "presence",
            "--web", f"tcp:{web_port}:interface=127.0.0.1",
            "--ws", f"tcp:{ws_port}:interface=127.0.0.1:backlog={backlog}",
            "--database", database, "--public-url", audience, "--node", name,
            "--insecure-identity", "--trusted-issuer", issuer_domain,
            *extra,
        ]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.args, cwd=run_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=_env(presence_src), preexec_fn=common.child_setup)
        self.pid = self.process.pid

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            common.wait_listening(self.ws_port, time.monotonic() + timeout, lambda: self.process.poll() is None)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"the node did not start ({e}); its log:\n{self.tail()}") from None

    def rss(self) -> int:
        return common.proc_status(self.pid)

    def cpu(self) -> float:
        return common.cpu_seconds(self.pid)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def problems(self) -> list[str]:
        """What went wrong in the node, from its log: each distinct exception of a traceback and each
        critical or error line, with how often it happened."""
        from collections import Counter

        seen: Counter = Counter()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        last = ""
        in_traceback = False
        for line in lines:
            if line.startswith("\tTraceback"):
                in_traceback, last = True, ""
            elif in_traceback and line.startswith("\t") and line.strip():
                if not line.startswith("\t "):
                    last = line.strip()
            elif in_traceback:
                in_traceback = False
                if last:
                    seen[re.sub(r"\d+", "N", last)[:200]] += 1
            elif "#critical]" in line or "#error]" in line:
                seen[re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:200]] += 1
        return [f"{what} (x{n})" for what, n in seen.most_common(10)]

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (a clean stop), SIGKILL if it takes longer than `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


if __name__ == "__main__":
    common.raise_nofile()
    common.die_with_parent()
    if len(sys.argv) == 4 and sys.argv[1] == "seed":
        _seed_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bench.node seed DATABASE PLAN.json")
