"""Applications in sync on three `twistd presence` processes sharing one real PostgreSQL: a resume on
another node than the one the socket vanished from, and the state of 10,000 grants synced while
changes keep coming, with the live stream after ``synced`` missing none of them."""

from __future__ import annotations

import random
import secrets
import time

import pytest_twisted
from twisted.internet.defer import ensureDeferred

from presence import changelog
from tests.test_cluster import cluster, sleep  # noqa: F401 (the fixture)
from tests.test_sync_e2e import next_updates, transitions, until_synced
from tests.wsclient import WSClient


async def catch_up(cluster, node: str, app, key, **fields) -> WSClient:
    client = await WSClient.connect(cluster.nodes[node].ws, "/" + app.app_id)
    client.send({"key": key, **fields})
    assert (await client.receive())["result"] == "OK"
    return client


async def bulk_grants(store, app_id: str, emails: list[str]) -> None:
    def insert():
        for start in range(0, len(emails), 500):
            part = emails[start:start + 500]
            yield ("INSERT INTO grants (email, app_id, uid, created_at) VALUES " + ", ".join(["(?, ?, ?, 1)"] * len(part)),
                   tuple(v for e in part for v in (e, app_id, secrets.token_urlsafe(16))))
    await store._transaction(insert())


async def logged_updates(store, app_id: str, after: int) -> list[tuple[str, str, int]]:
    """Every change the log holds for the application after ``after`` (not the reapers' re-logs)."""
    out = []
    while changes := await store.changes_since(after, 1000):
        for change in changes:
            out += [(u.email, u.status, u.seq) for u in changelog.decode(change.payload, change.seq)[0]
                    if u.app_id == app_id and u.seq >= change.numbers.start]
            after = change.seq
    return out


@pytest_twisted.ensureDeferred
async def test_an_application_resumes_on_another_node_than_the_one_it_left(cluster):
    app, key = await cluster.app("alice@example.com", "bob@example.com")
    stream = await cluster.stream("a", app, key)
    alice = await cluster.device("b", "alice@example.com")
    bob = await cluster.device("c", "bob@example.com")
    await cluster.status(alice, "online")
    last = (await stream.receive(10))[-1]["seq"]
    stream.drop()
    await stream.wait_closed()
    missed = [(alice, "unavailable"), (bob, "online"), (alice, "offline"), (bob, "offline"), (alice, "online")]
    for device, status in missed:
        await cluster.status(device, status)
    again = await catch_up(cluster, "c", app, key, since=last)
    got, n = await until_synced(again)
    seen = transitions(got)
    assert seen == await logged_updates(cluster.store, app.app_id, last)
    assert [(e, s) for e, s, _ in seen] == [("alice@example.com", "unavailable"), ("bob@example.com", "online"),
                                           ("alice@example.com", "offline"), ("bob@example.com", "offline"),
                                           ("alice@example.com", "online")]
    await cluster.status(bob, "unavailable")       # made on c, from a device on c; and one from b
    await cluster.status(alice, "unavailable")
    live = transitions([await next_updates(again)])
    while len(live) < 2:
        live += transitions([await next_updates(again)])
    assert [(e, s) for e, s, _ in live] == [("bob@example.com", "unavailable"), ("alice@example.com", "unavailable")]
    assert all(q > n for _, _, q in live)


@pytest_twisted.ensureDeferred
async def test_sync_of_10000_grants_is_exact_while_changes_keep_coming_and_the_live_stream_misses_none(cluster):
    app, key = await cluster.app()
    people = [f"p{i:05d}@example.com" for i in range(10_000)]
    await bulk_grants(cluster.store, app.app_id, people)
    busy = people[::1000]                  # ten people, changing all along on nodes a and c
    devices = [await cluster.device("a" if i % 2 else "c", email) for i, email in enumerate(busy)]
    rng = random.Random(15)
    running = True

    async def keep_changing() -> int:
        made = 0
        while running:
            await cluster.status(rng.choice(devices), rng.choice(["online", "unavailable", "offline"]))
            made += 1
            await sleep(0.01)
        return made

    changing = ensureDeferred(keep_changing())
    await sleep(0.3)
    before = await cluster.store.last_change()
    started = time.monotonic()
    client = await catch_up(cluster, "b", app, key, sync=True)
    got, n = await until_synced(client, timeout=60)
    took = time.monotonic() - started
    await sleep(0.5)                       # live changes after synced
    running = False
    made = await changing
    await sleep(1.0)                       # the last of them arrive
    while client.messages.pending:
        got.append(await client.receive())
    state = [p for m in got if isinstance(m, dict) and m.get("type") == "state" for p in m["people"]]
    assert sorted(p["email"] for p in state) == people          # each once
    assert n > before and made > 20, (n, before, made, took)
    assert any(p["seq"] > before for p in state)                 # changes kept coming while pages were read
    # the application's view: the state, then every update, each person's numbers only growing
    view, numbers = {}, {}
    for item in state + [u for m in got if isinstance(m, list) for u in m]:
        assert item["seq"] > numbers.get(item["email"], -1)
        view[item["email"]], numbers[item["email"]] = item["status"], item["seq"]
    truth, after = {}, ""
    while page := await cluster.store.people_page(app.app_id, after, 1000):
        truth.update((p.email, p.status) for p in page)
        after = page[-1].email
    assert view == truth
    # after synced: every logged change of the application, none missed, none twice
    synced_at = next(i for i, m in enumerate(got) if isinstance(m, dict) and m.get("type") == "synced")
    live = transitions(got[synced_at + 1:])
    assert sorted(live, key=lambda t: t[2]) == await logged_updates(cluster.store, app.app_id, n)
    assert len(live) > 5
    # every later synced holds: each change up to its number arrived before it
    logged = await logged_updates(cluster.store, app.app_id, n)
    marks = 0
    for i, m in enumerate(got[synced_at + 1:], synced_at + 1):
        if isinstance(m, dict) and m.get("type") == "synced":
            marks += 1
            before = set(transitions(got[synced_at + 1:i]))
            assert {t for t in logged if t[2] <= m["seq"]} <= before, m
    assert marks >= 1
    print(f"sync of 10,000 took {took:.2f}s; {made} changes made meanwhile; state up to {n}, {len(live)} live")


@pytest_twisted.ensureDeferred
async def test_after_its_node_is_killed_an_application_resumes_elsewhere_with_every_transition(cluster):
    app, key = await cluster.app("alice@example.com", "bob@example.com")
    stream = await cluster.stream("a", app, key)
    alice = await cluster.device("b", "alice@example.com")
    bob = await cluster.device("c", "bob@example.com")
    await cluster.status(alice, "online")
    last = (await stream.receive(10))[-1]["seq"]
    cluster.nodes["a"].kill()              # the application's node dies: its socket vanishes with it
    for device, status in [(bob, "online"), (alice, "unavailable"), (bob, "unavailable"), (alice, "offline")]:
        await cluster.status(device, status)
    again = await catch_up(cluster, "b", app, key, since=last)
    got, n = await until_synced(again)
    seen = transitions(got)
    assert [(e, s) for e, s, _ in seen] == [("bob@example.com", "online"), ("alice@example.com", "unavailable"),
                                           ("bob@example.com", "unavailable"), ("alice@example.com", "offline")]
    assert seen == await logged_updates(cluster.store, app.app_id, last)
    seqs = [q for _, _, q in seen]
    assert seqs == sorted(set(seqs)) and seqs[0] > last
