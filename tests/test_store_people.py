"""The state of an application's people (presence/store/sql_people.py), on both stores for real:
keyset pages, each person's last number and last_active written by the change itself."""

from __future__ import annotations

import pytest_twisted

from presence import changelog
from presence.store import PersonState
from tests.test_store import active_app, dev, drop, put


async def all_pages(store, app_id, limit):
    got, after, pages = [], "", 0
    while True:
        page = await store.people_page(app_id, after, limit)
        if not page:
            return got, pages
        pages += 1
        got += page
        after = page[-1].email


@pytest_twisted.ensureDeferred
async def test_pages_cover_every_granted_person_once_in_email_order(store):
    await active_app(store, "app1")
    await active_app(store, "other")
    emails = [f"p{i:03d}@x" for i in range(25)]
    for email in emails:
        await store.add_grant(email, "app1", "u-" + email, 1.0)
    await store.add_grant("stranger@x", "other", "u-stranger", 1.0)
    got, pages = await all_pages(store, "app1", 7)
    assert [s.email for s in got] == emails and pages == 4
    assert all(s == PersonState(s.email, "u-" + s.email, "offline", None, 0) for s in got)


@pytest_twisted.ensureDeferred
async def test_the_state_is_the_applications_view_with_the_last_number_and_last_active(store):
    await active_app(store, "a")
    await active_app(store, "b")
    for app in ("a", "b"):
        await store.add_grant("p@x", app, f"{app}-p", 1.0)
    # seen online by a only (scoped), then the phone goes unavailable: last_active is when it stopped
    first = await store.change_person("p@x", put(dev("p@x", "phone", "online", scope={"a"})), "n1", 10.0)
    assert first.updates[0].last_active == 10.0
    second = await store.change_person("p@x", put(dev("p@x", "phone", "unavailable", scope={"a"})), "n1", 20.0)
    third = await store.change_person("p@x", put(dev("p@x", "phone", "offline", scope={"a"})), "n1", 30.0)
    assert [u.last_active for u in second.updates + third.updates] == [20.0, 20.0]   # offline: unchanged
    assert await store.person_state("a", "a-p") == PersonState("p@x", "a-p", "offline", 20.0, third.seq)
    await store.change_person("p@x", put(dev("p@x", "laptop", "unavailable")), "n1", 40.0)
    a, = await store.people_page("a")
    b, = await store.people_page("b")
    assert (a.status, b.status) == ("unavailable", "unavailable")
    assert a.seq == b.seq == await store.last_change() and a.last_active == 20.0
    assert await store.person_state("a", "nobody") is None
    assert await store.person_state("b", "a-p") is None       # a uid is one application's


@pytest_twisted.ensureDeferred
async def test_a_group_commit_numbers_each_person_and_logs_last_active_for_other_nodes(store):
    await active_app(store, "a")
    await store.add_grant("p@x", "a", "u-p", 1.0)
    await store.add_grant("q@x", "a", "u-q", 1.0)
    changes = await store.change_people([
        ("p@x", put(dev("p@x", "phone", "online")), None),
        ("q@x", put(dev("q@x", "phone", "unavailable")), None),
        ("p@x", drop("phone"), None),
    ], "n1", 50.0)
    states = {s.email: s for s in await store.people_page("a")}
    assert states["p@x"].seq == changes[2].seq and states["q@x"].seq == changes[1].seq
    assert (states["p@x"].last_active, states["q@x"].last_active) == (50.0, None)
    logged, = await store.changes_since(0)
    updates, _, _ = changelog.decode(logged.payload, logged.seq)
    assert [(u.email, u.status, u.seq, u.last_active) for u in updates] == [
        ("p@x", "online", changes[0].seq, 50.0), ("q@x", "unavailable", changes[1].seq, None),
        ("p@x", "offline", changes[2].seq, 50.0)]


@pytest_twisted.ensureDeferred
async def test_a_waiting_update_keeps_last_active(store):
    await active_app(store, "a")
    await store.add_grant("p@x", "a", "u-p", 1.0)
    await store.change_person("p@x", put(dev("p@x", "phone", "online")), "n1", 10.0)
    await store.change_person("p@x", put(dev("p@x", "phone", "unavailable")), "n1", 20.0)
    await store.change_person("p@x", put(dev("p@x", "phone", "offline")), "n1", 30.0)
    waiting, = await store.take_pending("a", 0)
    assert (waiting.status, waiting.last_active) == ("offline", 20.0)
