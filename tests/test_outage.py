"""A database that is down at start or goes away: clear errors, the node keeps serving, nothing lost.

Runs against the real PostgreSQL: connections to the test database are refused
(ALLOW_CONNECTIONS false) and the node's backends terminated, then allowed again.
"""

from __future__ import annotations

import pytest_twisted
from twisted.logger import globalLogPublisher

from presence import errors
from presence.node import Node
from tests.conftest import _admin
from tests.fakes import eventually, until
from tests.test_node_e2e import AUDIENCE, Running, config, statuses
from tests.wsclient import WSClient


def database_up(url: str, up: bool) -> None:
    name = url.rsplit("/", 1)[1]
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if up else 'false'}")
            if not up:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_node_waits_for_a_database_that_is_down_at_start(idp, tmp_path, postgres_url):
    database_up(postgres_url, False)
    node = Node(config(idp, tmp_path, database=postgres_url))
    refusals: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("event") == "store.unavailable":
            refusals.append(event)

    globalLogPublisher.addObserver(observe)
    node.startService()
    try:
        # two attempts refused (the second after the 1 s retry delay): the node keeps waiting
        await until(lambda: len(refusals) >= 2, "the node to try the database twice", timeout=15)
        assert not node.ready and node.ws_port is None   # no listener it could not serve
        database_up(postgres_url, True)
        await eventually(lambda: node.ready, timeout=10)
        assert node.ws_port is not None
    finally:
        globalLogPublisher.removeObserver(observe)
        database_up(postgres_url, True)
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_a_database_that_goes_away_gets_a_clear_error_and_nothing_is_lost(idp, tmp_path, postgres_url):
    node = Node(config(idp, tmp_path, database=postgres_url))
    await node.start()
    running = Running(node, idp)
    try:
        app, key = await running.app("alice@example.com")
        stream = await running.stream(app, key)
        phone = await running.device("alice@example.com", "phone")
        await running.status(phone, "online")
        assert statuses(await stream.receive()) == [("alice@example.com", "online")]

        database_up(postgres_url, False)
        phone.send({"type": "status", "status": "unavailable"})
        reply = await phone.receive()
        assert reply["result"] == "KO" and reply["errno"] == errors.UNAVAILABLE
        # a device connecting now is told to try again, and may on the same socket
        other = await WSClient.connect(running.ws, "/presence")
        connect = {"type": "connect", "assertion": idp.assertion("bob@example.com", AUDIENCE)}
        other.send(connect)
        assert (await other.receive())["errno"] == errors.UNAVAILABLE
        assert other.close_code is None and phone.close_code is None and stream.close_code is None

        database_up(postgres_url, True)
        other.send(connect)
        assert (await other.receive())["result"] is True
        await running.status(phone, "unavailable")
        assert statuses(await stream.receive()) == [("alice@example.com", "unavailable")]
        stored = await node.store.get_status("alice@example.com")
        assert stored.status == "unavailable"
    finally:
        database_up(postgres_url, True)
        await node.stop()
