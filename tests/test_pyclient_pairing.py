"""docs/clients.md's Python examples, run as written against a node started as the docs start it, with
the device paired through the `/me/pair` page in Chromium and then revoked on `/me`:

`watch.py` (the application example) follows alice; `presence-device pair` shows a code that alice
approves in the browser; `first_status.py` (the device example) reports online, unavailable, offline;
`presence-device run` keeps the machine reported, goes unavailable when its idle command says so,
prints the notification the application sends, and reports offline on SIGTERM. Then alice revokes
the device on /me: the Python client's live connection is closed with 4007 and it raises Revoked,
its reconnection is refused (errno 16), renewal too (403), and `presence-device run` exits 3.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from presence.apps import Applications
from presence.store import open_store
from presence_client import PresenceDevice, Revoked, renew
from tests.pyclient import AsyncioThread
from tests.test_browser import BrowserThread, NodeProcess, ask_for_link, follow_link, pytestmark  # noqa: F401
from tests.test_twistd import free_port, wait_listening

DOC = Path(__file__).parent.parent / "docs" / "clients.md"
BIN = Path(sys.executable).parent


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


class Lines:
    """A process's output, line by line, read in a thread; `await wait(pattern)` past what was seen."""

    def __init__(self, process: subprocess.Popen, stream=None):
        self.process, self.lines, self.seen = process, [], 0
        threading.Thread(target=self._read, args=(stream or process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    async def wait(self, pattern: str, timeout: float = 15.0) -> re.Match:
        for _ in range(int(timeout / 0.02)):
            for i in range(self.seen, len(self.lines)):
                if m := re.search(pattern, self.lines[i]):
                    self.seen = i + 1
                    return m
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"no {pattern!r} in:\n" + "\n".join(self.lines))


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# -- what the browser does (in the Playwright thread) -------------------------------------------------
def approve(page, expected_name: str) -> str:
    page.click("#continue")
    suggested = page.text_content("#suggested-name")
    assert page.input_value("#device-name") == expected_name
    page.click("#approve")
    page.wait_for_url(re.compile(r".*/me\?done=paired"))
    return suggested


def revoke(page, base: str) -> str:
    page.goto(base + "/me")
    name = page.text_content("#paired .paired-name")
    page.click("#paired button.danger")
    page.wait_for_url(re.compile(r".*/me\?done=unpaired"))
    return name


@pytest_twisted.ensureDeferred
async def test_the_documented_python_clients_pair_in_chromium_report_go_idle_stop_and_are_revoked(tmp_path):
    watch_py, first_status_py = blocks("python")
    commands = [line for block in blocks("sh") for line in block.splitlines() if line.startswith("presence-device")]
    pair_cmd, run_cmd = commands
    (tmp_path / "watch.py").write_text(watch_py)
    (tmp_path / "first_status.py").write_text(first_status_py)

    # an application alice granted, in the store the node will open
    database = f"sqlite:{tmp_path / 'presence.sqlite'}"
    store = open_store(database)
    await store.open()
    apps = Applications(store, reactor)
    app = await apps.mark_verified(await apps.register("dev@example.com", "example.com", "Example", ""))
    await apps.grant("alice@example.com", app.app_id)
    app, key = await apps.activate(app)
    await store.close()

    web = free_port()
    while not port_free(web + 1):   # the docs' commands find the websockets on the next port, as 8080 and 8081
        web = free_port()
    ws = web + 1
    base, ws_base = f"http://localhost:{web}", f"ws://localhost:{ws}"

    def as_documented(command: str) -> list[str]:
        return shlex.split(command.replace("http://localhost:8080", base).replace("ws://localhost:8081", ws_base))

    node = NodeProcess(["--web", f"tcp:{web}", "--ws", f"tcp:{ws}", "--pair-interval", "0.2", "--grace", "0.5"],
                       tmp_path)
    browser, client, processes = BrowserThread(), AsyncioThread(), []
    try:
        await wait_listening(web, node.process, timeout=60)
        await wait_listening(ws, node.process)
        await browser.start()
        watch = spawn([sys.executable, "watch.py", ws_base, base, app.app_id, key], tmp_path)
        processes.append(watch)
        watching = Lines(watch)
        await watching.wait(r"^state: alice@example.com offline$")

        # presence-device pair, as documented: it shows the code; alice approves it in the browser
        pairing = spawn(as_documented(pair_cmd), tmp_path)
        processes.append(pairing)
        paired = Lines(pairing)
        code = (await paired.wait(r"open (http://\S+/me/pair) and enter the code (\S+)$")).groups()
        complete = (await paired.wait(r"\(or open (http://\S+)\)")).group(1)
        assert code[0] == f"{base}/me/pair" and complete == f"{base}/me/pair?code={code[1]}"
        alice = await browser.person()
        await browser.run(ask_for_link, alice, complete, "alice@example.com")
        await browser.run(follow_link, alice, await node.link_for("alice@example.com"), r".*/me/pair\?code=.*")
        assert await browser.run(approve, alice, "kitchen laptop") == "kitchen laptop"
        assert await deferToThread(pairing.wait, 30) == 0, pairing.stderr.read()
        await paired.wait(r"^paired: alice@example.com, device 'kitchen laptop'; credentials in device.json$")
        assert stat.S_IMODE(os.stat(tmp_path / "device.json").st_mode) == 0o600

        # first_status.py, as documented: online, unavailable, offline, each heard by watch.py
        first = await deferToThread(subprocess.run, [sys.executable, "first_status.py", "device.json"], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)
        assert first.returncode == 0 and first.stdout.splitlines() == [
            "online as alice@example.com", "unavailable", "offline"], first.stdout + first.stderr + node.output[-3000:]
        await watching.wait(r"^change: alice@example.com online$")
        await watching.wait(r"^notify: OK$")
        await watching.wait(r"^change: alice@example.com unavailable$")
        await watching.wait(r"^change: alice@example.com offline$")

        # presence-device run, as documented plus an idle command: online, idle, back, the
        # notification, offline on SIGTERM
        idle = tmp_path / "idle-seconds"
        idle.write_text("0\n")
        running = spawn(as_documented(run_cmd) + ["--idle-command", f"cat {idle}", "--idle-after", "1",
                                                  "--check-every", "0.1"], tmp_path)
        processes.append(running)
        run_out = Lines(running)
        await watching.wait(r"^change: alice@example.com online$")
        await run_out.wait(r"^notification from Example: Welcome back, alice@example.com$")
        idle.write_text("5\n")
        await watching.wait(r"^change: alice@example.com unavailable$")
        idle.write_text("0\n")
        await watching.wait(r"^change: alice@example.com online$")
        running.send_signal(signal.SIGTERM)
        await watching.wait(r"^change: alice@example.com offline$")
        assert await deferToThread(running.wait, 30) == 0
        assert run_out.lines[-1] == "offline"

        # renewal against the node, while the certificate is valid: the same key and pairing
        credentials = PresenceDevice.from_file(tmp_path / "device.json").credentials
        renewed = await client.run(renew(credentials))
        assert (renewed.pairing, renewed.key_pem) == (credentials.pairing, credentials.key_pem)
        assert renewed.certificate != credentials.certificate and renewed.expires >= credentials.expires

        # alice revokes the device on /me while the Python client is connected
        device = PresenceDevice.from_file(tmp_path / "device.json")
        await client.run(device.wait_connected())
        await watching.wait(r"^change: alice@example.com online$")
        assert await browser.run(revoke, alice, base) == "kitchen laptop"
        with pytest.raises(Revoked) as closed:
            await client.run(device.wait(), timeout=15)
        assert closed.value.code == 4007
        await watching.wait(r"^change: alice@example.com offline$")
        again = PresenceDevice.from_file(tmp_path / "device.json")
        with pytest.raises(Revoked) as refused:
            await client.run(again.wait(), timeout=15)
        assert refused.value.errno == 16
        with pytest.raises(Revoked):
            await client.run(renew(again.credentials))
        rerun = await deferToThread(subprocess.run, as_documented(run_cmd), cwd=tmp_path, capture_output=True,
                                    text=True, timeout=60, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
        assert rerun.returncode == 3 and "revoked" in rerun.stderr, rerun.stderr
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
        client.stop()
        browser.stop()
        node.stop()
