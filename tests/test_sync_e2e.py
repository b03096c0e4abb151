"""A real node over loopback sockets, on both stores: an application resumes after its socket vanished,
asks for the state on connect, and bad ``since``/``sync`` get errno 3."""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from presence import errors
from presence.node import Node
from tests.test_node_e2e import Running, config
from tests.wsclient import WSClient


@pytest_twisted.async_yield_fixture
async def running(idp, tmp_path, database_url):
    node = Node(config(idp, tmp_path, database=database_url))
    await node.start()
    yield Running(node, idp)
    await node.stop()


async def catch_up(running, app, message: dict) -> WSClient:
    client = await WSClient.connect(running.ws, "/" + app.app_id)
    client.send(message)
    assert await client.receive() == {"result": "OK", "app_id": app.app_id}
    return client


async def until_synced(client: WSClient, timeout: float = 10.0) -> tuple[list, int]:
    """Messages up to and including synced; returns them and its number."""
    got, deadline = [], time.monotonic() + timeout
    while True:
        message = await client.receive(max(0.1, deadline - time.monotonic()))
        got.append(message)
        if isinstance(message, dict) and message.get("type") == "synced":
            return got, message["seq"]


async def next_updates(client: WSClient, timeout: float = 10.0) -> list:
    """The next list of updates (the periodic synced marks in between are skipped)."""
    while True:
        message = await client.receive(timeout)
        if isinstance(message, list):
            return message


def transitions(messages: list) -> list[tuple[str, str, int]]:
    return [(u["email"], u["status"], u["seq"]) for m in messages if isinstance(m, list) for u in m]


@pytest.mark.parametrize("message, why", [
    ({"since": "12"}, "since must be"), ({"since": -1}, "since must be"), ({"since": 1.5}, "since must be"),
    ({"since": True}, "since must be"), ({"sync": "yes"}, "sync must be"), ({"since": 3, "sync": True}, "not both"),
])
@pytest_twisted.ensureDeferred
async def test_bad_since_or_sync_is_errno_3(running, message, why):
    app, key = await running.app("alice@example.com")
    client = await WSClient.connect(running.ws, "/" + app.app_id)
    client.send({"key": key, **message})
    reply = await client.receive()
    assert reply["errno"] == errors.BAD_FIELD and why in reply["error"]
    assert await client.wait_closed() == errors.CLOSE_AUTH_FAILED


@pytest_twisted.ensureDeferred
async def test_a_resume_after_a_socket_that_vanished_delivers_every_missed_transition_once_in_order(running):
    app, key = await running.app("alice@example.com", "bob@example.com")
    stream = await running.stream(app, key)
    alice, bob = await running.device("alice@example.com", "phone"), await running.device("bob@example.com", "phone")
    await running.status(alice, "online")
    first = await stream.receive()
    last = first[-1]["seq"]
    stream.drop()                     # the socket vanishes: no close
    await stream.wait_closed()
    missed = [(alice, "unavailable"), (bob, "online"), (alice, "offline"), (alice, "online"), (bob, "unavailable")]
    for device, status in missed:
        await running.status(device, status)
    again = await catch_up(running, app, {"key": key, "since": last})
    got, n = await until_synced(again)
    seen = transitions(got)
    assert [(e, s) for e, s, _ in seen] == [("alice@example.com", "unavailable"), ("bob@example.com", "online"),
                                           ("alice@example.com", "offline"), ("alice@example.com", "online"),
                                           ("bob@example.com", "unavailable")]
    seqs = [q for _, _, q in seen]
    assert seqs == sorted(set(seqs)) and seqs[0] > last and n >= seqs[-1]
    await running.status(bob, "offline")              # live after synced
    live = await next_updates(again)
    assert [(u["email"], u["status"]) for u in live] == [("bob@example.com", "offline")] and live[0]["seq"] > n
    # seq grows on this connection, and on the next one too
    later = await catch_up(running, app, {"key": key, "since": n})
    got, n2 = await until_synced(later)
    assert transitions(got) == [("bob@example.com", "offline", live[0]["seq"])] and n2 >= live[0]["seq"]


@pytest_twisted.ensureDeferred
async def test_sync_sends_the_state_of_every_granted_person_then_synced_then_live(running):
    people = [f"p{i}@example.com" for i in range(5)]
    app, key = await running.app(*people)
    phone = await running.device(people[1], "phone")
    await running.status(phone, "online")
    client = await catch_up(running, app, {"key": key, "sync": True})
    got, n = await until_synced(client)
    state = {p["email"]: p for m in got if isinstance(m, dict) and m.get("type") == "state" for p in m["people"]}
    assert sorted(state) == people
    assert {e: p["status"] for e, p in state.items()} == {e: "online" if e == people[1] else "offline" for e in people}
    assert state[people[1]]["last_active"] is not None and state[people[0]]["last_active"] is None
    grant = await running.node.store.get_grant(people[1], app.app_id)
    assert state[people[1]]["uid"] == grant.uid and state[people[1]]["seq"] <= n
    await running.status(phone, "unavailable")
    live = await next_updates(client)
    assert [(u["email"], u["status"]) for u in live] == [(people[1], "unavailable")]
    assert live[0]["seq"] > n and live[0]["last_active"] >= state[people[1]]["last_active"]
