"""The store methods of the web pages (schema v4), on both backends."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults, ensureDeferred

from presence.store import open_store
from presence.store.base import LoginLink, Verification, WebSession


@pytest_twisted.ensureDeferred
async def test_a_login_token_works_once(store):
    await store.add_login_token("h1", "alice@example.com", "/myapps", 10.0, 100.0)
    assert await store.take_login_token("h1", 20.0) == LoginLink("alice@example.com", "/myapps", 10.0, 100.0)
    assert await store.take_login_token("h1", 20.0) is None
    assert await store.take_login_token("unknown", 20.0) is None


@pytest_twisted.ensureDeferred
async def test_an_expired_login_token_is_refused_and_gone(store):
    await store.add_login_token("h1", "alice@example.com", "/", 10.0, 100.0)
    assert await store.take_login_token("h1", 100.0) is None
    assert await store.count_login_tokens("alice@example.com", 0.0) == 0


@pytest_twisted.ensureDeferred
async def test_two_takers_of_one_token_get_it_once(database_url, store):
    other = open_store(database_url)
    await other.open()
    try:
        await store.add_login_token("h1", "alice@example.com", "/", 10.0, 100.0)
        results = await gatherResults([ensureDeferred(s.take_login_token("h1", 20.0)) for s in (store, other)])
        assert sorted(r is None for r in results) == [False, True]
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_count_login_tokens_per_address_since(store):
    for i, at in enumerate([10.0, 20.0, 30.0]):
        await store.add_login_token(f"h{i}", "alice@example.com", "/", at, at + 900)
    await store.add_login_token("hb", "bob@example.com", "/", 30.0, 930.0)
    assert await store.count_login_tokens("alice@example.com", 15.0) == 2
    assert await store.count_login_tokens("bob@example.com", 0.0) == 1
    assert await store.count_login_tokens("carol@example.com", 0.0) == 0


@pytest_twisted.ensureDeferred
async def test_sessions_expire_and_log_out(store):
    await store.add_session("s1", "alice@example.com", 10.0, 100.0)
    await store.add_session("s2", "alice@example.com", 10.0, 50.0)
    assert await store.get_session("s1", 20.0) == WebSession("alice@example.com", 10.0, 100.0)
    assert await store.get_session("s2", 50.0) is None  # expired
    await store.delete_session("s1")
    assert await store.get_session("s1", 20.0) is None
    await store.delete_session("s1")  # twice is fine


@pytest_twisted.ensureDeferred
async def test_expire_web_forgets_old_sessions_and_links(store):
    await store.add_session("old", "a@example.com", 1.0, 10.0)
    await store.add_session("new", "a@example.com", 1.0, 1000.0)
    await store.add_login_token("old", "a@example.com", "/", 1.0, 10.0)
    await store.add_login_token("new", "a@example.com", "/", 1.0, 1000.0)
    assert await store.expire_web(20.0) == 2
    assert await store.get_session("new", 20.0) is not None
    assert await store.take_login_token("new", 20.0) is not None


@pytest_twisted.ensureDeferred
async def test_web_secret_keeps_the_first_value(database_url, store):
    assert await store.web_secret("session", "first", 1.0) == "first"
    assert await store.web_secret("session", "second", 2.0) == "first"
    other = open_store(database_url)
    await other.open()
    try:
        assert await other.web_secret("session", "third", 3.0) == "first"
        assert await other.web_secret("identity", "x", 3.0) == "x"
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_verification_state_upserts_lists_by_node_and_goes_with_the_app(store):
    app = await store.create_app("dev@example.com", "example.com", "Example", "", "k" * 1024, 1.0)
    other = await store.create_app("dev@example.com", "other.example", "Other", "", "k" * 1024, 1.0)
    first = Verification(app.id, "node-a", 1, "HTTP 404", 10.0, 20.0, 3610.0)
    await store.save_verification(first)
    assert await store.get_verification(app.id) == first
    later = Verification(app.id, "node-a", 2, "timed out", 20.0, 40.0, 3610.0)
    await store.save_verification(later)
    assert await store.get_verification(app.id) == later
    stopped = Verification(other.id, "node-a", 9, "refused", 30.0, None, 40.0)
    await store.save_verification(stopped)
    assert await store.list_verifications("node-a") == [later]  # a stopped poll is not resumed
    assert await store.list_verifications("node-b") == []
    await store.delete_verification(app.id)
    assert await store.get_verification(app.id) is None
    await store.delete_app(other.id)
    assert await store.get_verification(other.id) is None


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_v4_is_v3_plus_the_upgrade(dialect):
    """A fresh database (v4.sql) and an upgraded one (v3.sql + upgrade_3_to_4.sql) have the same tables."""
    from presence.store.migrations import schema_dir

    directory = schema_dir(dialect)
    v3 = (directory / "v3.sql").read_text()
    v4 = (directory / "v4.sql").read_text()
    upgrade = (directory / "upgrade_3_to_4.sql").read_text()

    def body(text: str) -> str:
        return "\n".join(line for line in text.splitlines()[2:] if line.strip())

    assert body(v4) == body(v3) + "\n" + "\n".join(line for line in upgrade.splitlines() if line.strip())


@pytest_twisted.ensureDeferred
async def test_replace_web_secret_is_a_compare_and_swap(store):
    await store.web_secret("session", "clear", 1.0)
    assert await store.replace_web_secret("session", "stale", "x") is False
    assert await store.replace_web_secret("session", "clear", "sealed") is True
    assert await store.web_secret("session", "other", 2.0) == "sealed"
    assert await store.replace_web_secret("missing", "a", "b") is False
