"""The Python client's pure parts (clients/python): its JWS and assertions as the server verifies
them, the backoff's bounds, the application's state and resume bookkeeping, idle decisions on an
injected clock, the credentials file."""

from __future__ import annotations

import os
import stat
import time

import pytest

from presence.identity import Issuer, jws as server_jws
from presence_client import Activity, Backoff, Credentials, IdleWatcher, jws
from presence_client.credentials import derive_ws_url
from presence_client.errors import Replaced, Revoked, Stopped, stop_error
from presence_client.pairing import PairingCode, audience_of
from presence_client.state import AppState
from tests.idp import shared_key


def test_the_clients_signatures_and_keys_verify_with_the_servers_code():
    key = shared_key("pyclient-device")
    token = jws.sign({"hello": "world"}, key)
    parsed = server_jws.parse(token, "assertion")
    public = server_jws.public_key_from_json(jws.public_key_json(key))   # the BrowserID form, decimal strings
    server_jws.verify(parsed, public, "assertion", "the device's key")
    assert parsed.payload == {"hello": "world"} and parsed.header == {"alg": "RS256"}
    assert jws.key_from_pem(jws.key_to_pem(key)).private_numbers() == key.private_numbers()


def test_an_assertion_names_the_audience_in_milliseconds_and_carries_the_certificate():
    key = shared_key("pyclient-device")
    issuer = Issuer("issuer.test", shared_key("pyclient-issuer"), "browserid")
    certificate = issuer.certify("alice@example.com", jws.public_key_json(key), time.time())
    assertion = jws.make_assertion(certificate, key, "http://node.test:8080", now=1000.0, lifetime=120)
    cert, signed = assertion.split("~")
    assert cert == certificate
    parsed = server_jws.parse(signed, "assertion")
    certified = server_jws.public_key_from_json(server_jws.parse(cert, "certificate").payload["public-key"])
    server_jws.verify(parsed, certified, "assertion", "the certified key")
    assert parsed.payload == {"aud": "http://node.test:8080", "iat": 1_000_000, "exp": 1_120_000}


def test_backoff_is_full_jitter_under_a_growing_bound_capped_and_reset_after_a_stable_connection():
    now = [0.0]
    highs = Backoff(base=0.5, cap=8, stable=30, rand=lambda: 1.0, clock=lambda: now[0])
    assert [highs.delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    lows = Backoff(base=0.5, cap=8, rand=lambda: 0.0)
    assert [lows.delay() for _ in range(3)] == [0, 0, 0]
    real = Backoff(base=0.5, cap=8)
    assert all(0 <= real.delay() <= 8 for _ in range(200))
    highs.connected()
    now[0] += 29                    # a short connection: the bound stays high
    highs.disconnected()
    assert highs.delay() == 8
    highs.connected()
    now[0] += 30                    # a stable one: back to the start
    highs.disconnected()
    assert highs.delay() == 0.5
    with pytest.raises(ValueError):
        Backoff(base=0)


def person(email, status, seq, last_active=None):
    return {"email": email, "uid": "uid-" + email[0], "status": status, "seq": seq, "last_active": last_active}


def test_state_then_updates_then_resume_from_the_last_synced_not_the_highest_seq():
    state = AppState()
    assert state.hello("K") == {"key": "K", "sync": True}
    changes = state.apply_state([person("alice@x", "online", 5, 1.0), person("bob@x", "offline", 3)])
    assert [(c.email, c.status, c.previous) for c in changes] == [("alice@x", "online", None), ("bob@x", "offline", None)]
    assert state.synced(7) == [] and state.synced_seq == 7
    # live: a newer change applies, an older or duplicate one of the same person is dropped
    changes = state.apply_updates([{**person("bob@x", "online", 9, 2.0), "at": 2.0}, person("alice@x", "offline", 4)])
    assert [(c.email, c.status, c.previous, c.at) for c in changes] == [("bob@x", "online", "offline", 2.0)]
    assert state.apply_updates([person("bob@x", "online", 9, 2.0)]) == []
    assert state.people["uid-b"].status == "online" and state.people["uid-a"].status == "online"
    # a drop: resume from the last synced (7), although 9 was seen
    assert state.hello("K") == {"key": "K", "since": 7}
    assert state.apply_updates([person("bob@x", "online", 9, 2.0)]) == []   # the replay repeats it
    state.synced(12)
    assert state.hello("K") == {"key": "K", "since": 12}


def test_a_resync_state_is_the_whole_truth_people_missing_from_it_are_gone():
    state = AppState()
    state.hello("K")
    state.apply_state([person("alice@x", "online", 5), person("bob@x", "online", 6)])
    state.synced(6)
    state.hello("K")                 # since 6 ...
    state.begin_state()              # ... answered with resync: a state follows
    changes = state.apply_state([person("alice@x", "online", 5), person("carol@x", "unavailable", 20)])
    assert [(c.email, c.previous) for c in changes] == [("carol@x", None)]   # alice did not change
    gone = state.synced(21)
    assert [(c.email, c.gone, c.previous) for c in gone] == [("bob@x", True, "online")]
    assert sorted(p.email for p in state.people.values()) == ["alice@x", "carol@x"]


def test_close_codes_that_mean_stop():
    assert isinstance(stop_error(4007), Revoked) and isinstance(stop_error(4002, errno=16), Revoked)
    assert isinstance(stop_error(4000), Replaced)
    for code in (4002, 4003, 4004, 4006):
        assert type(stop_error(code)) is Stopped and stop_error(code).code == code
    for code in (None, 1000, 1001, 1006, 1011, 4001, 4005):
        assert stop_error(code) is None


def test_idle_goes_unavailable_after_the_threshold_and_online_at_activity_on_an_injected_clock():
    now = [100.0]
    activity = Activity(clock=lambda: now[0])
    watcher = IdleWatcher(activity, idle_after=300, check_every=5)
    assert watcher.decide() == ("online", 5)
    now[0] += 298
    assert watcher.decide() == ("online", pytest.approx(2))   # asks again right when it would cross
    now[0] += 2
    assert watcher.decide() == ("unavailable", 5)
    activity.touch()
    assert watcher.decide() == ("online", 5)
    assert IdleWatcher(lambda: None, 300).decide()[0] == "online"            # unknown counts as active
    assert IdleWatcher(lambda: 1 / 0, 300).decide()[0] == "online"           # so does a failing hook


def test_credentials_file_is_private_round_trips_and_renews_with_a_third_left(tmp_path):
    key = shared_key("pyclient-device")
    issuer = Issuer("issuer.test", shared_key("pyclient-issuer"), "browserid")
    certificate = issuer.certify("alice@example.com", jws.public_key_json(key), 1000.0, lifetime=300.0)
    credentials = Credentials("alice@example.com", "laptop", certificate, jws.key_to_pem(key), "http://node.test",
                              "http://127.0.0.1:1", "ws://127.0.0.1:2", pairing="p1", expires=1_300_000)
    path = tmp_path / "device.json"
    credentials.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Credentials.load(path) == credentials
    assert credentials.lifetime() == (1000.0, 1300.0)
    assert not credentials.renewal_due(now=1199.0) and credentials.renewal_due(now=1200.0)
    assert credentials.expired(now=1300.0) and not credentials.expired(now=1299.0)


def test_urls_derived_for_pairing():
    assert derive_ws_url("http://node:8080") == "ws://node:8081"
    assert derive_ws_url("https://presence.example") == "wss://presence.example"
    code = PairingCode("d", "BCDF-GHJK", "https://presence.example/me/pair", None, 600, 5)
    assert audience_of(code) == "https://presence.example"


def test_the_client_is_a_distribution_of_its_own_that_needs_neither_the_server_nor_twisted():
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "clients/python/pyproject.toml").read_text())["project"]
    assert project["name"] == "presence-client" and project["requires-python"] == ">=3.11"
    assert sorted(d.split()[0] for d in project["dependencies"]) == ["cryptography", "websockets"]
    assert project["scripts"] == {"presence-device": "presence_client.cli:main"}
    code = ("import sys; sys.modules['presence'] = sys.modules['twisted'] = None\n"
            "import presence_client, presence_client.cli; print(presence_client.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == project["version"], done.stderr
    # CI installs the client with the server and runs exactly README's test command
    readme, ci = (root / "README.md").read_text(), (root / ".ci/run").read_text()
    install = "pip install -q -e '.[test]' -e ./clients/python --config-settings editable_mode=compat"
    assert install in ci and install.replace(" -q", "") + " && python -m pytest -q" in readme


def test_pairing_polls_at_the_interval_adds_five_seconds_at_slow_down_and_stops_on_denial(monkeypatch):
    import asyncio

    from presence_client import PairingError, pairing

    answers = [(400, {"error": "authorization_pending"}), (400, {"error": "slow_down"}),
               (400, {"error": "authorization_pending"}), (200, {"email": "a@x", "certificate": "c"})]
    polled, slept = [], []

    async def fake_request(method, url, body=None, headers=None):
        polled.append((method, url, body))
        return (*answers.pop(0), {})

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(pairing, "request_json", fake_request)
    code = PairingCode("secret", "BCDF-GHJK", "http://n/me/pair", None, 600, 2)
    approved = asyncio.run(pairing.wait_for_approval("http://n/", code, fake_sleep))
    assert approved["email"] == "a@x" and slept == [2, 2, 7, 7]
    assert polled[0] == ("POST", "http://n/pair/token", {"device_code": "secret"})
    answers[:] = [(400, {"error": "access_denied"})]
    with pytest.raises(PairingError) as denied:
        asyncio.run(pairing.wait_for_approval("http://n", code, fake_sleep))
    assert denied.value.error == "access_denied"


def test_pairing_goes_on_polling_through_a_node_that_is_briefly_unreachable(monkeypatch):
    import asyncio

    from presence_client import pairing

    answers = [ConnectionRefusedError(111, "refused"), (400, {"error": "authorization_pending"}),
               (200, {"email": "a@x", "certificate": "c"})]

    async def fake_request(method, url, body=None, headers=None):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return (*answer, {})

    async def no_sleep(seconds):
        pass

    monkeypatch.setattr(pairing, "request_json", fake_request)
    code = PairingCode("secret", "BCDF-GHJK", "http://n/me/pair", None, 600, 1)
    assert asyncio.run(pairing.wait_for_approval("http://n", code, no_sleep))["email"] == "a@x"


def test_answers_stay_in_order_when_a_caller_stopped_waiting():
    import asyncio

    from presence_client.connection import Answers

    async def main():
        answers = Answers()
        first, second = answers.expect(), answers.expect()
        first.cancel()                      # e.g. a status sent on close, given up after its timeout
        assert answers.answer({"result": "OK", "for": "first"})
        assert answers.answer({"result": "OK", "acked": 1})
        return await second

    assert asyncio.run(main()) == {"result": "OK", "acked": 1}   # not the first request's answer


def _fake_credentials(port: int) -> Credentials:
    key = jws.new_key()
    now = time.time()
    certificate = jws.sign({"iss": "x", "iat": int(now * 1000), "exp": int((now + 86400) * 1000),
                            "public-key": jws.public_key_json(key), "principal": {"email": "a@x.org"}}, key)
    return Credentials("a@x.org", "dev", certificate, jws.key_to_pem(key), "http://x", "http://x",
                       f"ws://127.0.0.1:{port}")


def test_a_device_whose_node_drops_before_answering_its_status_reconnects_and_a_revocation_then_ends_it():
    """The node accepts connect, then goes away before it answers the status: the device must not
    wait for that answer for ever, and the close code it then reads counts (4007: revoked)."""
    import asyncio
    import json

    from websockets.asyncio.server import serve

    from presence_client import PresenceDevice

    connects = []

    async def node(ws):
        json.loads(await ws.recv())
        connects.append(1)
        await ws.send(json.dumps({"result": True, "session_id": str(len(connects))}))
        await ws.recv()                                   # the status, never answered
        if len(connects) == 1:
            await ws.close(1011, "going away")
        else:
            await ws.close(4007, "this device was revoked on /me")

    async def main():
        async with serve(node, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            device = PresenceDevice(_fake_credentials(port), backoff=Backoff(base=0.01, cap=0.05))
            with pytest.raises(Revoked) as revoked:
                await asyncio.wait_for(device.wait(), 10)
            return revoked.value

    assert asyncio.run(main()).code == 4007 and len(connects) == 2


def test_an_error_in_the_program_s_callback_ends_the_iterator_with_it():
    import asyncio
    import json

    from websockets.asyncio.server import serve

    from presence_client import PresenceApp

    async def node(ws):
        await ws.recv()
        await ws.send(json.dumps({"result": "OK", "app_id": "app"}))
        await ws.send(json.dumps({"type": "state", "people": [
            {"uid": "u1", "email": "a@x.org", "status": "online", "seq": 1, "last_active": None}]}))
        await ws.send(json.dumps({"type": "synced", "seq": 1}))
        await ws.wait_closed()

    def broken(change):
        raise RuntimeError("the program's own bug")

    async def main():
        async with serve(node, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            app = PresenceApp(f"ws://127.0.0.1:{port}", "app", "k" * 32, on_change=broken)
            with pytest.raises(RuntimeError, match="own bug"):
                async for _ in app.changes():
                    pass
            await app.close()

    asyncio.run(asyncio.wait_for(main(), 10))
