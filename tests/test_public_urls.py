"""The port trap: moving the listeners without --public-url used to leave the sign-in links and the
devices' audience on localhost:8080. The public URLs are now derived from the listeners when not
given, and a given one that no local listener answers is warned about at start and by check."""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from presence import check
from presence.config import Config
from presence.node import Node
from presence.public_urls import unreachable
from presence.tap import Options, config_from_env
from tests.webnode import free_port


def options(*argv: str) -> Config:
    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed.config()


@pytest.mark.parametrize("web, ws, public_url, public_ws_url", [
    ("tcp:18480", "tcp:18481", "http://localhost:18480", "ws://localhost:18481"),
    ("tcp:port=18480:interface=127.0.0.1", r"tcp:18481:interface=\:\:", "http://localhost:18480", "ws://localhost:18481"),
    ("tcp:80:interface=10.0.0.5", r"tcp:8081:interface=fd00\:\:5", "http://10.0.0.5", "ws://[fd00::5]:8081"),
    ("ssl:443:privateKey=k.pem", "ssl:8443:privateKey=k.pem", "https://localhost", "wss://localhost:8443"),
    # nothing to derive from: the defaults
    ("systemd:domain=INET6:name=web", "unix:/run/presence/ws.sock", "http://localhost:8080", "ws://localhost:8081"),
])
def test_public_urls_are_derived_from_the_listeners_when_not_given(web, ws, public_url, public_ws_url):
    config = options("--web", web, "--ws", ws)
    assert (config.public_url, config.public_ws_url) == (public_url, public_ws_url)
    env = config_from_env({"PRESENCE_WEB": web, "PRESENCE_WS": ws})
    assert (env.public_url, env.public_ws_url) == (public_url, public_ws_url)
    assert unreachable(config) == []


def test_given_public_urls_are_kept():
    config = options("--web", "tcp:18480", "--public-url", "https://presence.example.org",
                     "--public-ws-url", "wss://ws.example.org")
    assert (config.public_url, config.public_ws_url) == ("https://presence.example.org", "wss://ws.example.org")
    assert unreachable(config) == []   # another host: a balancer's business, not second-guessed
    assert options().public_url == Config().public_url == "http://localhost:8080"


def test_a_public_url_on_this_machine_that_no_listener_answers_is_named():
    config = options("--web", "tcp:18480", "--ws", "ssl:18481:privateKey=k.pem", "--public-url", "http://localhost:8080",
                     "--public-ws-url", "ws://127.0.0.1:18481")
    [(option, problem, fix), (ws_option, ws_problem, ws_fix)] = unreachable(config)
    assert option == "--public-url" and "http://localhost:8080 names port 8080 on this machine, but --web is tcp:18480" in problem
    assert "leave --public-url out (it is then derived: http://localhost:18480)" in fix
    assert ws_option == "--public-ws-url" and "names plain text on this machine, but --ws is ssl:18481" in ws_problem
    assert "wss://localhost:18481" in ws_fix


@pytest_twisted.ensureDeferred
async def test_check_warns_about_the_port_trap(tmp_path):
    out = io.StringIO()
    status = await check.run(["--web", "tcp:18480", "--ws", "tcp:18481", "--public-url", "http://localhost:8080"],
                             f"sqlite:{tmp_path / 'p.sqlite'}", reactor, out=out, strict=True)
    text = out.getvalue()
    assert status == 1, text   # a warning: --strict fails
    assert "WARNING  --public-url: http://localhost:8080 names port 8080 on this machine, but --web is tcp:18480" in text
    assert "fix: leave --public-url out (it is then derived: http://localhost:18480)" in text
    out = io.StringIO()
    status = await check.run(["--web", "tcp:18480", "--ws", "tcp:18481"], f"sqlite:{tmp_path / 'p.sqlite'}", reactor,
                             out=out, strict=True)
    assert status == 0 and "OK       --public-url: http://localhost:18480" in out.getvalue(), out.getvalue()


@pytest_twisted.ensureDeferred
async def test_the_start_log_warns_about_the_port_trap(tmp_path):
    web = free_port()
    config = Config(web=f"tcp:{web}:interface=127.0.0.1", ws="tcp:0:interface=127.0.0.1",
                    public_url="http://localhost:8080", database=f"sqlite:{tmp_path / 'n.sqlite'}", node="trap")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    node = Node(config)
    try:
        await node.start()
    finally:
        await node.stop()
        globalLogPublisher.removeObserver(events.append)
    [warning] = [e for e in events if e.get("event") == "node.public_url_unreachable"]
    assert warning["option"] == "--public-url" and f"but --web is tcp:{web}" in warning["problem"]
    assert warning["log_level"].name == "warn"
