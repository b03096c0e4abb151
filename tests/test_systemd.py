"""Under systemd: sd_notify (READY=1 once the listeners accept, STOPPING=1 on SIGTERM) and socket
activation of both listeners through the ``systemd:`` endpoint, with real twistd processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from presence import systemd
from tests.test_twistd import AUDIENCE, admin, alice_goes_online, free_port, twistd
from tests.wsclient import WSClient

# What systemd does before it starts the service: the listening sockets become fds 3, 4, ... of
# the process and LISTEN_PID names that process (the pid stays the same across exec).
ACTIVATE = """\
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""


def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(50)
    return s


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class NotifySocket:
    """What systemd listens on: a unix datagram socket; collects the lines the node sends."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sd")  # short: unix socket paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.lines.extend(data.decode().splitlines())

    async def wait_for(self, line: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
        for _ in range(int(timeout / 0.05)):
            self._read()
            if line in self.lines:
                return
            assert process.poll() is None or line == "STOPPING=1", process.stdout.read()
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"{line} never arrived; got {self.lines}")

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


async def ended(process: subprocess.Popen, timeout: float = 20.0) -> int:
    for _ in range(int(timeout / 0.1)):
        if process.poll() is not None:
            return process.returncode
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("the node did not exit")


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        name = f"presence-test-{os.getpid()}"
        receiver.bind(b"\0" + name.encode())
        assert systemd.notify("READY=1", "STATUS=serving\nall", env={"NOTIFY_SOCKET": "@" + name})
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving all"
    assert not systemd.notify("READY=1", env={})
    # a supervisor that went away does not stop the node
    assert not systemd.notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/notify"})


@pytest_twisted.ensureDeferred
async def test_ready_once_the_listeners_accept_and_stopping_on_sigterm(tmp_path):
    notify = NotifySocket()
    web, ws = free_port(), free_port()
    process = subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "presence", "--web", f"tcp:{web}:interface=127.0.0.1",
         "--ws", f"tcp:{ws}:interface=127.0.0.1", "--database", f"sqlite:{tmp_path / 'p.sqlite'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": notify.path})
    try:
        await notify.wait_for("READY=1", process)
        # READY=1 is only sent once both listeners accept connections
        assert accepts(ws) and accepts(web)
        assert any(line.startswith("STATUS=serving") for line in notify.lines)
        assert "STOPPING=1" not in notify.lines
        client = await WSClient.connect(ws, "/presence")
        client.close()
        process.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1", process)
        assert notify.lines.index("STOPPING=1") > notify.lines.index("READY=1")
        assert await ended(process) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.read()
        notify.close()


@pytest_twisted.ensureDeferred
async def test_socket_activation_of_both_listeners(idp, tmp_path):
    database = f"sqlite:{tmp_path / 'presence.sqlite'}"
    admin(database, "apps", "create", "dev@example.com", "example.com", "Example")
    app_id = admin(database, "apps", "verify", "1", "--force").split()[-1]
    key = admin(database, "apps", "activate", "1").splitlines()[-1]
    admin(database, "grants", "add", "alice@example.com", app_id)

    web_sock, ws_sock = listening_socket(), listening_socket()
    web, ws = web_sock.getsockname()[1], ws_sock.getsockname()[1]
    fds = (web_sock.fileno(), ws_sock.fileno())
    notify = NotifySocket()
    process = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), "web:ws",
         twistd(), "-n", "--pidfile=", "presence",
         # by position and by FileDescriptorName: both work
         "--web", "systemd:domain=INET:index=0", "--ws", "systemd:domain=INET:name=ws",
         "--database", database, "--public-url", AUDIENCE, "--insecure-identity", "--trusted-issuer", idp.domain,
         "--grace", "1"],
        pass_fds=fds, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": notify.path})
    web_sock.close()  # only the node holds them now
    ws_sock.close()
    try:
        await notify.wait_for("READY=1", process)
        page = await treq.get(f"http://127.0.0.1:{web}/")
        assert page.code == 200 and "Presence" in await page.text()

        await alice_goes_online(ws, app_id, key, idp)

        process.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1", process)
        await ended(process, 30)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
        notify.close()
    assert "ready" in output
    # the sockets were the ones systemd (here: the test) made, not new ones
    assert not accepts(web) and not accepts(ws)
