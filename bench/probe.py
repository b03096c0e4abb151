"""The stall probe: one websocket to the server under test, pinged every few milliseconds from a
process of its own. A server answers a ping from its event loop, so the longest ping round trip in
a window is (an upper bound of) the worst event-loop stall in it, measured from outside.

    python -m bench.probe         (commands on stdin, answers on stdout, like bench.generator)

Commands: start {host, port, path, key|null, interval}, window {} (worst and count since the last
window, then reset), stop {}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from bench import common
from bench.wsclient import PING, Conn, frame, now


class Probe:
    def __init__(self) -> None:
        self.conn: Conn | None = None
        self.ready = asyncio.Event()
        self.pong_event = asyncio.Event()
        self.worst = 0.0
        self.worst_at = 0.0
        self.count = 0
        self.error = ""
        self.task: asyncio.Task | None = None

    # Conn owner callbacks
    def opened(self, conn: Conn) -> None:
        if conn.auth is not None:
            conn.send(conn.auth)
        else:
            self.ready.set()

    def text(self, conn: Conn, payload: bytes) -> None:
        if not self.ready.is_set():
            if b'"KO"' in payload:
                self.error = payload[:200].decode("utf-8", "replace")
            self.ready.set()

    def pong(self, conn: Conn, payload: bytes) -> None:
        self.pong_event.set()

    def closed_by_peer(self, conn: Conn, code) -> None:
        self.error = self.error or f"closed by the server with {code}"

    def failed(self, conn: Conn, why: str) -> None:
        self.error = why
        self.ready.set()

    def lost(self, conn: Conn, was: int) -> None:
        self.error = self.error or "connection lost"
        self.ready.set()
        self.pong_event.set()

    async def cmd_start(self, cmd: dict) -> dict:
        loop = asyncio.get_running_loop()
        self.ready, self.error, self.worst, self.count = asyncio.Event(), "", 0.0, 0
        self.conn = Conn(self, cmd["path"], f"{cmd['host']}:{cmd['port']}")
        self.conn.auth = frame(('{"key":"%s"}' % cmd["key"]).encode()) if cmd.get("key") else None
        await loop.create_connection(lambda: self.conn, cmd["host"], cmd["port"], local_addr=(cmd["source"], 0))
        await asyncio.wait_for(self.ready.wait(), 30)
        if self.error:
            return {"error": self.error}
        self.task = loop.create_task(self._run(cmd.get("interval", 0.005)))
        return {"started": True}

    async def _run(self, interval: float) -> None:
        ping = frame(b"probe", PING)
        while not self.error:
            self.pong_event.clear()
            t = now()
            self.conn.send(ping)
            try:
                await asyncio.wait_for(self.pong_event.wait(), 60)
            except asyncio.TimeoutError:
                self.error = "no pong within 60 s"
                return
            rtt = now() - t
            self.count += 1
            if rtt > self.worst:
                self.worst, self.worst_at = rtt, t
            await asyncio.sleep(interval)

    async def cmd_window(self, cmd: dict) -> dict:
        result = {"worst_ms": self.worst * 1000, "pings": self.count, "error": self.error}
        self.worst, self.count = 0.0, 0
        return result

    async def cmd_stop(self, cmd: dict) -> dict:
        if self.task:
            self.task.cancel()
        if self.conn:
            self.conn.abort()
        return {"stopped": True}


async def main() -> None:
    common.raise_nofile()
    common.lifetime_guard(3600 * 3)
    probe = Probe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ev": "ready"}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        try:
            result = await getattr(probe, "cmd_" + cmd["cmd"])(cmd)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        result["id"] = cmd["id"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    common.die_with_parent()
    asyncio.run(main())
