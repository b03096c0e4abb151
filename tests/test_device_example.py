"""docs/examples/device.py runs as written against a node started as the docs start it
(``twistd -n presence --web tcp:PORT --ws tcp:PORT``, no --public-url): it signs in with the link
from the node's log, connects, and its status reaches an application holding a grant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.test_browser import NodeProcess
from tests.test_twistd import admin, free_port, wait_listening
from tests.wsclient import WSClient

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "device.py"


@pytest_twisted.ensureDeferred
async def test_the_documented_device_example_runs_as_written(tmp_path):
    web, ws = free_port(), free_port()
    database = f"sqlite:{tmp_path / 'presence.sqlite'}"
    node = NodeProcess(["--web", f"tcp:{web}", "--ws", f"tcp:{ws}"], tmp_path)   # presence.sqlite in tmp_path
    device = None
    try:
        # a loaded machine (two cores shared by several test runs) can take long to start twistd
        await wait_listening(web, node.process, timeout=90)
        await wait_listening(ws, node.process, timeout=30)
        # an application alice granted, listening
        created = admin(database, "apps", "create", "dev@example.com", "example.com", "Example")
        number = created.split("\t", 1)[0]
        admin(database, "apps", "verify", number, "--force")
        key = admin(database, "apps", "activate", number).splitlines()[-1]
        app_id = admin(database, "apps", "show", number).split("\t")[1]
        admin(database, "grants", "add", "alice@example.com", app_id)
        stream = await WSClient.connect(ws, "/" + app_id)
        stream.send({"key": key})
        assert (await stream.receive())["result"] == "OK"

        # the example, with the URLs the docs give for these ports
        device = subprocess.Popen([sys.executable, str(EXAMPLE), "alice@example.com", f"http://localhost:{web}",
                                   f"ws://localhost:{ws}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        link = await node.link_for("alice@example.com")
        assert link.startswith(f"http://localhost:{web}/login/link#")   # the derived public URL
        out, _ = await deferToThread(device.communicate, link + "\n", 60)
        assert device.returncode == 0, out
        assert "certified a key for alice@example.com" in out
        assert 'connect: {"result": true, "session_id": ' in out and 'status: {"result": "OK"}' in out
        [update] = await stream.receive()
        assert (update["email"], update["status"]) == ("alice@example.com", "online")
        stream.close()
    finally:
        if device is not None and device.poll() is None:
            device.kill()
        node.stop()
