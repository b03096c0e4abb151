"""The log of a full flow through a twistd process: stable event names, JSON lines with
--log-json, and no secret (API keys, verification keys, assertions, certificates) in either log."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest_twisted
import treq
from twisted.logger import Logger, LogPublisher

from presence.logs import EVENTS, start_json_log
from tests.test_systemd import ended
from tests.test_twistd import AUDIENCE, admin, free_port, twistd, wait_listening
from tests.wsclient import WSClient


def pieces(assertion: str) -> list[str]:
    """The assertion, its certificate and assertion parts, and every long JWS segment of them."""
    parts = assertion.split("~")
    return [assertion, *parts, *[seg for part in parts for seg in part.split(".") if len(seg) > 16]]


@pytest_twisted.ensureDeferred
async def test_a_full_flow_logs_stable_events_as_json_lines_and_no_secret(idp, tmp_path):
    database = f"sqlite:{tmp_path / 'presence.sqlite'}"
    created = admin(database, "apps", "create", "dev@example.com", "example.com", "Example")
    verification_key = created.splitlines()[-1]
    app_id = admin(database, "apps", "verify", "1", "--force").split()[-1]
    key = admin(database, "apps", "activate", "1").splitlines()[-1]
    admin(database, "grants", "add", "alice@example.com", app_id)
    wrong_key = "K" + key[1:] if not key.startswith("K") else "J" + key[1:]
    good = idp.assertion("alice@example.com", AUDIENCE)
    misaddressed = idp.assertion("alice@example.com", "https://elsewhere.example")
    secrets = {"API key": key, "wrong API key": wrong_key, "verification key": verification_key}
    secrets.update({f"assertion piece {i}": p for i, p in enumerate(pieces(good) + pieces(misaddressed))})
    assert len(key) >= 20 and len(verification_key) >= 20

    log_json = tmp_path / "presence.jsonl"
    web, ws = free_port(), free_port()
    process = subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "presence", "--web", f"tcp:{web}:interface=127.0.0.1",
         "--ws", f"tcp:{ws}:interface=127.0.0.1", "--database", database, "--public-url", AUDIENCE,
         "--insecure-identity", "--trusted-issuer", idp.domain, "--grace", "1", "--log-json", str(log_json), "--log-connections"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await wait_listening(ws, process)
        assert (await treq.get(f"http://127.0.0.1:{web}/")).code == 200
        intruder = await WSClient.connect(ws, "/" + app_id)
        intruder.send({"key": wrong_key})
        assert (await intruder.receive())["result"] != "OK"
        stream = await WSClient.connect(ws, "/" + app_id)
        stream.send({"key": key})
        assert (await stream.receive())["result"] == "OK"

        stranger = await WSClient.connect(ws, "/presence")
        stranger.send({"type": "connect", "assertion": misaddressed})
        assert (await stranger.receive())["result"] is not True
        phone = await WSClient.connect(ws, "/presence")
        phone.send({"type": "connect", "assertion": good, "device": "phone"})
        assert (await phone.receive())["result"] is True
        for status in ("online", "unavailable"):
            phone.send({"type": "status", "status": status})
            assert await phone.receive() == {"result": "OK"}
            assert [u["status"] for u in await stream.receive()] == [status]

        process.send_signal(signal.SIGTERM)
        await ended(process, 30)
    finally:
        if process.poll() is None:
            process.kill()
        plain = process.stdout.read()

    lines = log_json.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and "log_level" in e and "log_time" in e for e in events)
    names = [e["event"] for e in events if "event" in e]
    for name in ("node.ready", "application.refused", "application.connected", "device.refused",
                 "device.connected", "node.stopping", "node.stopped"):
        assert name in names, (name, names)
    assert set(names) <= set(EVENTS), set(names) - set(EVENTS)  # every name is documented
    assert names.index("node.ready") < names.index("application.connected") < names.index("node.stopped")
    ready = next(e for e in events if e.get("event") == "node.ready")
    assert ready["node"] and ready["ws"] == f"tcp:{ws}:interface=127.0.0.1"
    refused = next(e for e in events if e.get("event") == "application.refused")
    assert refused["kind"] == "application" and isinstance(refused["errno"], int)
    # the plain log says the same things in words
    assert "ready" in plain and "authentication refused" in plain and "stopped" in plain

    whole_json = log_json.read_text()
    for what, secret in secrets.items():
        assert secret not in whole_json, f"the {what} is in the JSON log"
        assert secret not in plain, f"the {what} is in the plain log"
    assert "eyJ" not in whole_json and "eyJ" not in plain  # no JWS of any kind


def test_json_lines_observer_writes_one_object_per_line(tmp_path):
    publisher = LogPublisher()
    path = tmp_path / "log.jsonl"
    start_json_log(str(path), publisher)
    log = Logger(namespace="test", observer=publisher)
    log.info("hello {who}", who="operator", event="test.hello")
    log.warn("second", event="test.second")
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["event"] == "test.hello" and first["who"] == "operator" and first["log_namespace"] == "test"
    assert first["log_level"]["name"] == "info" and second["log_level"]["name"] == "warn"
    assert "\x1e" not in path.read_text()


def test_log_json_option_and_environment():
    from presence.tap import Options, config_from_env

    options = Options()
    options.parseOptions(["--log-json", "-"])
    assert options.config().log_json == "-"
    assert config_from_env({"PRESENCE_LOG_JSON": "/var/log/presence.jsonl"}).log_json == "/var/log/presence.jsonl"
    assert Options().config().log_json == ""
