"""`twistd presence` as operators run it: a real process, real sockets, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from presence import errors
from tests.wsclient import WSClient

AUDIENCE = "http://presence.test:8080"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd() -> str:
    return shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"


def admin(database: str, *args: str) -> str:
    # --create: the tests set up the database before the node first starts
    out = subprocess.run([sys.executable, "-m", "presence.admin", "--database", database, "--create", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def alice_goes_online(ws: int, app_id: str, key: str, idp) -> tuple[WSClient, WSClient]:
    """The core flow against a node process: the application authenticates, alice's phone proves
    her email and goes online, the application hears it. Returns (stream, phone)."""
    stream = await WSClient.connect(ws, "/" + app_id)
    stream.send({"key": key})
    assert (await stream.receive())["result"] == "OK"
    phone = await WSClient.connect(ws, "/presence")
    phone.send({"type": "connect", "assertion": idp.assertion("alice@example.com", AUDIENCE)})
    assert (await phone.receive())["result"] is True
    phone.send({"type": "status", "status": "online"})
    assert await phone.receive() == {"result": "OK"}
    assert [(u["email"], u["status"]) for u in await stream.receive()] == [("alice@example.com", "online")]
    return stream, phone


async def wait_listening(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.1)):
        assert process.poll() is None, process.stdout.read()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"nothing listens on {port}")


@pytest_twisted.ensureDeferred
async def test_twistd_presence_serves_devices_and_applications_and_stops_cleanly(idp, tmp_path):
    database = f"sqlite:{tmp_path / 'presence.sqlite'}"
    admin(database, "apps", "create", "dev@example.com", "example.com", "Example")
    app_id = admin(database, "apps", "verify", "1", "--force").split()[-1]
    key = admin(database, "apps", "activate", "1").splitlines()[-1]
    admin(database, "grants", "add", "alice@example.com", app_id)

    web, ws = free_port(), free_port()
    process = subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "presence", "--web", f"tcp:{web}:interface=127.0.0.1",
         "--ws", f"tcp:{ws}:interface=127.0.0.1", "--database", database, "--public-url", AUDIENCE,
         "--insecure-identity", "--trusted-issuer", idp.domain, "--grace", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await wait_listening(ws, process)
        page = await treq.get(f"http://127.0.0.1:{web}/")
        assert page.code == 200 and "Presence" in await page.text()

        stream, phone = await alice_goes_online(ws, app_id, key, idp)

        process.send_signal(signal.SIGTERM)
        # clean stop: the device is told to reconnect elsewhere; it does not, so after its grace
        # period the application (still connected here) hears it go offline; then it is closed too
        assert await phone.wait_closed() == errors.CLOSE_GOING_AWAY
        assert [(u["email"], u["status"]) for u in await stream.receive()] == [("alice@example.com", "offline")]
        assert await stream.wait_closed() == errors.CLOSE_GOING_AWAY
        for _ in range(100):
            if process.poll() is not None:
                break
            await deferLater(reactor, 0.1, lambda: None)
        # twistd ends itself with the signal it stopped on, after the services stopped
        assert process.returncode == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    assert "ready" in output and "stopped" in output
    assert key not in output and "eyJ" not in output  # no API key, no assertion in the log


@pytest_twisted.ensureDeferred
async def test_presence_tac_runs_the_same_node_from_the_environment(tmp_path):
    web, ws = free_port(), free_port()
    tac = Path(__file__).resolve().parent.parent / "presence.tac"
    env = {**os.environ, "PRESENCE_WEB": f"tcp:{web}:interface=127.0.0.1",
           "PRESENCE_WS": f"tcp:{ws}:interface=127.0.0.1", "PRESENCE_DATABASE": f"sqlite:{tmp_path / 'tac.sqlite'}",
           "PRESENCE_NODE": "from-tac"}
    process = subprocess.Popen([twistd(), "-n", "--pidfile=", "-y", str(tac)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        await wait_listening(ws, process)
        page = await treq.get(f"http://127.0.0.1:{web}/")
        assert "from-tac" in await page.text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert (tmp_path / "tac.sqlite").exists()


@pytest_twisted.ensureDeferred
async def test_a_node_that_cannot_start_exits_with_status_1_so_its_supervisor_restarts_it(tmp_path):
    """Its websocket port is taken by another process: a node that logged the failure and stayed up
    listening on nothing would look alive to systemd (Restart=on-failure) and serve no one."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ws = taken.getsockname()[1]
    process = subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "presence", "--web", f"tcp:{free_port()}:interface=127.0.0.1",
         "--ws", f"tcp:{ws}:interface=127.0.0.1", "--database", f"sqlite:{tmp_path / 'presence.sqlite'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(300):
            if process.poll() is not None:
                break
            await deferLater(reactor, 0.1, lambda: None)
        output = process.stdout.read() if process.poll() is not None else ""
        assert process.poll() == 1, output
        assert "the node could not start" in output and "exits (status 1)" in output, output
    finally:
        taken.close()
        if process.poll() is None:
            process.kill()
            process.wait(10)
