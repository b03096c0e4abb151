"""Real node processes (`twistd -n presence`) sharing one real PostgreSQL, for the several-node tests."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.test_twistd import free_port, twistd, wait_listening

AUDIENCE = "http://presence.test:8080"


def with_application_name(url: str, name: str) -> str:
    """The database URL tagged with this node's name, so a test can find its backends."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


class NodeProcess:
    def __init__(self, name: str, database: str, idp, workdir: Path, **options: str):
        self.name = name
        self.database = with_application_name(database, f"presence-{name}")
        self.idp = idp
        self.workdir = workdir
        self.options = {"grace": "0.5", "batch-window": "0.02", "heartbeat": "0.5", "node-timeout": "3",
                        "device-rate": "100", "device-burst": "100", **options}
        self.ws = free_port()
        self.web = free_port()
        self.process: subprocess.Popen | None = None
        self.log = workdir / f"{name}.log"

    async def start(self) -> "NodeProcess":
        args = [twistd(), "-n", "--pidfile=", "--logfile", str(self.log), "presence", "--node", self.name,
                "--database", self.database, "--ws", f"tcp:{self.ws}:interface=127.0.0.1",
                "--web", f"tcp:{self.web}:interface=127.0.0.1", "--public-url", AUDIENCE,
                "--insecure-identity", "--trusted-issuer", self.idp.domain]
        for option, value in self.options.items():
            args += [f"--{option}", value]
        self.process = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        await wait_listening(self.ws, self.process)
        return self

    def kill(self) -> None:
        """kill -9: no clean stop, no goodbye."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            for _ in range(100):
                if self.process.poll() is not None:
                    return
                await deferLater(reactor, 0.1, lambda: None)
            self.process.kill()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""
