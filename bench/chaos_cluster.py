"""What the chaos checker runs and breaks: `twistd -n presence` node processes and, for the PostgreSQL
scenario, a private PostgreSQL instance (initdb in a temporary directory, its own port), so that a
restart of "the database" never touches the machine's shared server.

Every process started here is also recorded in `_LIVE`, and `cleanup_all()` (registered with
atexit) kills what is left and removes the private instance, whatever way the checker ends.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.node import _env, twistd

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
_LIVE: dict[int, object] = {}   # id -> ChaosNode or PrivatePostgres, until they are stopped


def cleanup_all() -> None:
    """Synchronous last resort (atexit, errors, Ctrl-C): nothing the checker started survives it."""
    for thing in list(_LIVE.values()):
        thing.destroy()


atexit.register(cleanup_all)


def faketime_library() -> str | None:
    """libfaketime (Debian's `faketime` package), or None when it is not installed."""
    found = [LIBFAKETIME] if os.path.exists(LIBFAKETIME) else glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    return found[0] if found else None


async def wait_port(port: int, alive, timeout: float) -> None:
    """Until something accepts connections on 127.0.0.1:port; raises if `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process meant to listen on {port} exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


class ChaosNode:
    """One node under test. It keeps its name, ports and database across restarts, like a systemd
    unit with Restart=on-failure; every incarnation appends to the same log."""

    def __init__(self, name: str, database: str, run_dir: Path, audience: str, issuer: str, options: list[str]):
        self.name = name
        self.database = database
        self.web, self.ws = common.free_port(), common.free_port()
        self.log_path = run_dir / f"node-{name}.log"
        self.args = [twistd(), "-n", "--pidfile=", "presence", "--node", name, "--database", database,
                     "--web", f"tcp:{self.web}:interface=127.0.0.1", "--ws", f"tcp:{self.ws}:interface=127.0.0.1",
                     "--public-url", audience, "--insecure-identity", "--trusted-issuer", issuer, *options]
        self.run_dir = run_dir
        self.process: subprocess.Popen | None = None
        self.paused = False
        self.skew = 0.0
        self.starts = 0

    def start(self, skew: float = 0.0) -> None:
        """Start an incarnation; with `skew` its wall clock (not its monotonic clock, so Twisted's
        timers keep working) is off by that many seconds, through libfaketime."""
        env = _env(common.ROOT)
        if skew:
            lib = faketime_library()
            if lib is None:
                raise RuntimeError("clock skew needs libfaketime: apt-get install faketime")
            env.update(LD_PRELOAD=lib, FAKETIME=f"{skew:+.3f}", FAKETIME_DONT_FAKE_MONOTONIC="1",
                       FAKETIME_NO_CACHE="1")
        with open(self.log_path, "a") as log:
            log.write(f"\n===== chaos: start #{self.starts + 1} of node {self.name}, clock skew {skew:+.3f}s =====\n")
            log.flush()
            # started from the event loop's thread: PR_SET_PDEATHSIG is tied to the creating thread
            self.process = subprocess.Popen(self.args, cwd=self.run_dir, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, preexec_fn=common.child_setup)
        self.skew, self.paused = skew, False
        self.starts += 1
        _LIVE[id(self)] = self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def ready(self, timeout: float = 30.0) -> None:
        try:
            await wait_port(self.ws, self.alive, timeout)
            await wait_port(self.web, self.alive, timeout)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"node {self.name} did not start ({e}); see {self.log_path}") from None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def kill9(self) -> None:
        """kill -9: no clean stop, no goodbye."""
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    async def stop(self, timeout: float = 20.0) -> int | None:
        """A clean stop (SIGTERM), SIGKILL past `timeout`."""
        if self.paused:
            self.resume()
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.alive():
            self.process.kill()
        code = self.process.wait(10) if self.process else None
        _LIVE.pop(id(self), None)
        return code

    def destroy(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        _LIVE.pop(id(self), None)

    def problems(self) -> list[str]:
        """Each distinct error line and traceback's exception in the log, with how often it came."""
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        seen: dict[str, int] = {}
        exception: str | None = None      # inside a traceback: its last line so far
        for line in lines:
            if line.startswith("\tTraceback"):
                exception = ""
                continue
            if exception is not None:
                if line.startswith("\t") and line.strip():
                    exception = line.strip() if not line.startswith("\t ") else exception
                    continue
                if exception:
                    seen[exception[:160]] = seen.get(exception[:160], 0) + 1
                exception = None
            if "#critical]" in line or "#error]" in line:
                key = line.split("] ", 1)[-1][:160]
                seen[key] = seen.get(key, 0) + 1
        return [f"{what} (x{n})" for what, n in sorted(seen.items(), key=lambda kv: -kv[1])[:8]]


class PrivatePostgres:
    """A PostgreSQL instance of the checker's own: initdb in a temporary directory owned by the
    `postgres` user (when running as root), a free port, a socket directory inside it."""

    DATABASE = "presence_chaos"

    def __init__(self) -> None:
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not versions:
            raise RuntimeError("PostgreSQL's server binaries (initdb) are not installed")
        self.bin = Path(versions[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="presence-chaos-pg-"))
        self.data = self.dir / "data"
        self.port = common.free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.started = False
        _LIVE[id(self)] = self

    def _command(self, *args: str) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] if self.as_postgres else []) + list(args)

    def _ctl(self, *args: str) -> list[str]:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        return self._command(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
                             "-o", options, *args)

    async def _run(self, command: list[str], timeout: float = 120.0) -> None:
        proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            raise RuntimeError(f"{' '.join(command)} did not finish within {timeout:g}s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.decode(errors='replace')[-2000:]}")

    async def start(self) -> None:
        await self._run(self._command(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust",
                                      "-U", "postgres", "--no-sync", "-E", "UTF8"))
        await self._run(self._ctl("-w", "start"))
        self.started = True
        await asyncio.to_thread(self._sql, "postgres", f'CREATE DATABASE "{self.DATABASE}"')

    def url(self, application_name: str) -> str:
        return (f"postgresql://postgres@127.0.0.1:{self.port}/{self.DATABASE}"
                f"?application_name={application_name}")

    def _sql(self, database: str, statement: str, args: tuple = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database,
                                connect_timeout=10, application_name="presence-chaos-admin")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    async def terminate(self, node: str) -> int:
        """pg_terminate_backend of one node's connections, in the checker's database only."""
        rows = await asyncio.to_thread(
            self._sql, "postgres",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
            (f"presence-{node}", self.DATABASE))
        return int(rows[0][0])

    async def restart(self, mode: str, down: float) -> None:
        """Stop (fast: clean; immediate: as if it crashed), stay down `down` seconds, start again."""
        await self._run(self._ctl("-w", "-m", mode, "stop"))
        await asyncio.sleep(down)  # the outage itself
        await self._run(self._ctl("-w", "start"))

    def destroy(self) -> None:
        if self.started and (self.data / "postmaster.pid").exists():
            subprocess.run(self._ctl("-w", "-m", "immediate", "stop"), capture_output=True, timeout=60)
        self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
        _LIVE.pop(id(self), None)


async def store_call(command: str, database: str, payload: dict, run_dir: Path, timeout: float = 60.0) -> dict:
    """`python -m bench.chaos_store COMMAND DATABASE FILE` and its JSON answer."""
    path = run_dir / f"{command}.json"
    path.write_text(json.dumps(payload))
    env = _env(common.ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.chaos_store", command, database, str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=run_dir)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"reading the store ({command}) took more than {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"bench.chaos_store {command} failed:\n{err.decode(errors='replace')[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])
