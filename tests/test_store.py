"""The store, on both backends: every test that takes ``database_url`` runs on SQLite and on the
real PostgreSQL server. Nothing here mocks the database."""

from __future__ import annotations

import time
from importlib import resources

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

from presence.store import App, PendingUpdate, StoreUnavailable, migrations, open_store
from presence.store.base import ACTIVE, PENDING, VERIFIED
from presence.store.postgres import PostgresStore
from presence.store.sql import PENDING_BATCH
from presence.store.sqlite import SQLiteStore

KEY = "k" * 1024


@pytest_twisted.async_yield_fixture
async def store(database_url):
    s = open_store(database_url)
    await s.open()
    yield s
    await s.close()


async def reopen(url, schema_dir=None):
    s = open_store(url)
    if schema_dir is not None:
        s.schema_dir = schema_dir
    await s.open()
    return s


async def new_app(store, developer="dev@example.com", domain="example.com", now=1.0) -> App:
    return await store.create_app(developer, domain, "Example", "An example", KEY, now)


async def active_app(store, app_id="app1", developer="dev@example.com", now=1.0) -> App:
    app = await new_app(store, developer=developer, domain=f"{app_id}.example.com", now=now)
    await store.mark_verified(app.id, app_id, now + 1)
    return await store.set_api_key(app.id, "hash-" + app_id, now + 2)


def pending(app_id, email, status="online", at=1.0, uid=None) -> PendingUpdate:
    return PendingUpdate(app_id, email, uid or f"uid-{email}", status, at)


# -- opening, schema, ping -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fresh_database_is_at_version_1_and_answers_ping(store):
    assert await store.schema_version() == 1
    assert await store.ping() is None
    assert await store._query("SELECT COUNT(*) FROM schema_version") == [(1,)]  # a single row


@pytest_twisted.ensureDeferred
async def test_reopening_keeps_data_and_does_not_rerun_v1(database_url):
    first = await reopen(database_url)
    app = await new_app(first)
    await first.set_status("a@example.com", "online", 5.0)
    await first.close()

    second = await reopen(database_url)
    try:
        assert await second.get_app_by_id(app.id) == app
        assert (await second.get_status("a@example.com")).status == "online"
        assert await second.schema_version() == 1
        assert await migrations.migrate(second) == []  # nothing left to apply
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_two_stores_opening_a_fresh_database_at_once(database_url):
    stores = [open_store(database_url), open_store(database_url)]
    await defer.gatherResults([defer.Deferred.fromCoroutine(s.open()) for s in stores])
    try:
        assert [await s.schema_version() for s in stores] == [1, 1]
    finally:
        for s in stores:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_closed_store_refuses_calls(database_url):
    s = await reopen(database_url)
    await s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.ping()


# -- migrations ------------------------------------------------------------------------------


def scripts(tmp_path, dialect, **files):
    """A directory of migration scripts: the real v1.sql plus the given ones (name_sql="...")."""
    directory = tmp_path / "schema"
    directory.mkdir()
    v1 = resources.files("presence.store") / "schema" / dialect / "v1.sql"
    (directory / "v1.sql").write_text(v1.read_text())
    for name, text in files.items():
        (directory / name.replace("_sql", ".sql")).write_text(text)
    return directory


@pytest_twisted.ensureDeferred
async def test_upgrade_script_is_applied_to_an_existing_database(store, tmp_path):
    app = await new_app(store)
    directory = scripts(
        tmp_path,
        store.dialect,
        upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER NOT NULL);\nINSERT INTO extra (x) VALUES (42);\n",
    )
    assert await migrations.migrate(store, directory) == ["upgrade_1_to_2.sql"]
    assert await store.schema_version() == 2
    assert await store._query("SELECT x FROM extra") == [(42,)]
    assert await store.get_app_by_id(app.id) == app
    assert await migrations.migrate(store, directory) == []


@pytest_twisted.ensureDeferred
async def test_fresh_database_gets_v1_then_upgrades_in_order(database_url, tmp_path):
    directory = scripts(
        tmp_path,
        "postgres" if database_url.startswith("postgres") else "sqlite",
        upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER NOT NULL);",
        # Fails unless 1->2 ran first.
        upgrade_2_to_3_sql="INSERT INTO extra (x) VALUES (3);",
    )
    s = open_store(database_url)
    await s._connect()
    try:
        applied = await migrations.migrate(s, directory)
        assert applied == ["v1.sql", "upgrade_1_to_2.sql", "upgrade_2_to_3.sql"]
        assert await s.schema_version() == 3
        assert await s._query("SELECT x FROM extra") == [(3,)]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_fresh_database_uses_the_newest_full_schema(database_url, tmp_path):
    dialect = "postgres" if database_url.startswith("postgres") else "sqlite"
    v1 = (resources.files("presence.store") / "schema" / dialect / "v1.sql").read_text()
    directory = scripts(
        tmp_path,
        dialect,
        v2_sql=v1 + "\nCREATE TABLE extra (x INTEGER);\n",
        upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER);",
    )
    s = open_store(database_url)
    await s._connect()
    try:
        assert await migrations.migrate(s, directory) == ["v2.sql"]
        assert await s.schema_version() == 2
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_failed_upgrade_changes_nothing(store, tmp_path):
    broken = scripts(
        tmp_path,
        store.dialect,
        upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n",
    )
    with pytest.raises(StoreUnavailable, match=r"with upgrade_1_to_2\.sql failed .*still at version 1"):
        await migrations.migrate(store, broken)
    assert await store.schema_version() == 1
    # The table of the failed step was rolled back too: creating it again works.
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    (fixed / "v1.sql").write_text((broken / "v1.sql").read_text())
    (fixed / "upgrade_1_to_2.sql").write_text("CREATE TABLE extra (x INTEGER);")
    assert await migrations.migrate(store, fixed) == ["upgrade_1_to_2.sql"]


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(database_url):
    s = await reopen(database_url)
    await s._execute("UPDATE schema_version SET version = 7")
    await s.close()
    s = open_store(database_url)
    try:
        with pytest.raises(StoreUnavailable, match="version 7 but this Presence only knows up to version 1"):
            await s.open()
    finally:
        await s.close()


# -- developers and applications -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_developer_is_idempotent(store):
    await store.add_developer("dev@example.com", 1.0)
    await store.add_developer("dev@example.com", 2.0)
    app = await new_app(store, developer="dev@example.com")
    assert app.developer == "dev@example.com"


@pytest_twisted.ensureDeferred
async def test_create_app_is_pending_and_adds_its_developer(store):
    app = await store.create_app("new@example.com", "example.com", "Name", "Description", KEY, 10)
    assert app == App(
        id=app.id, app_id=None, developer="new@example.com", domain="example.com", name="Name",
        description="Description", verification_key=KEY, state=PENDING, api_key_hash=None,
        created_at=10.0, verified_at=None, activated_at=None,
    )
    assert isinstance(app.id, int) and isinstance(app.created_at, float)
    assert await store.get_app_by_id(app.id) == app
    assert await store.get_app_by_id(app.id + 1000) is None
    assert await store.get_app("nope") is None


@pytest_twisted.ensureDeferred
async def test_list_apps_by_id_and_by_developer(store):
    a = await new_app(store, developer="a@example.com", domain="a1.example.com")
    b = await new_app(store, developer="b@example.com", domain="b.example.com")
    c = await new_app(store, developer="a@example.com", domain="a2.example.com")
    assert a.id < b.id < c.id
    assert await store.list_apps() == [a, b, c]
    assert await store.list_apps("a@example.com") == [a, c]
    assert await store.list_apps("nobody@example.com") == []


@pytest_twisted.ensureDeferred
async def test_mark_verified(store):
    app = await new_app(store)
    verified = await store.mark_verified(app.id, "app1", 5.0)
    assert (verified.state, verified.app_id, verified.verified_at) == (VERIFIED, "app1", 5.0)
    assert await store.get_app("app1") == verified
    # Already verified: returned unchanged (the new app_id and time are ignored).
    assert await store.mark_verified(app.id, "other", 6.0) == verified
    assert await store.get_app("other") is None
    with pytest.raises(KeyError):
        await store.mark_verified(app.id + 1000, "x", 7.0)


@pytest_twisted.ensureDeferred
async def test_mark_verified_with_an_app_id_already_taken(store):
    first = await new_app(store, domain="one.example.com")
    second = await new_app(store, domain="two.example.com")
    await store.mark_verified(first.id, "app1", 2.0)
    with pytest.raises(ValueError):
        await store.mark_verified(second.id, "app1", 3.0)
    assert (await store.get_app_by_id(second.id)).state == PENDING


@pytest_twisted.ensureDeferred
async def test_set_api_key_activates_and_rotates(store):
    app = await new_app(store)
    with pytest.raises(ValueError):
        await store.set_api_key(app.id, "h1", 2.0)
    assert await store.get_app_by_id(app.id) == app  # unchanged

    await store.mark_verified(app.id, "app1", 3.0)
    active = await store.set_api_key(app.id, "h1", 4.0)
    assert (active.state, active.api_key_hash, active.activated_at) == (ACTIVE, "h1", 4.0)

    rotated = await store.set_api_key(app.id, "h2", 5.0)
    assert (rotated.state, rotated.api_key_hash, rotated.activated_at) == (ACTIVE, "h2", 4.0)
    assert await store.get_app("app1") == rotated

    with pytest.raises(KeyError):
        await store.set_api_key(app.id + 1000, "h", 6.0)


@pytest_twisted.ensureDeferred
async def test_deactivate(store):
    active = await active_app(store, "app1")
    verified = await store.deactivate(active.id)
    assert (verified.state, verified.api_key_hash, verified.activated_at) == (VERIFIED, None, None)
    assert (verified.app_id, verified.verified_at) == (active.app_id, active.verified_at)
    assert await store.deactivate(active.id) == verified  # not active: unchanged
    again = await store.set_api_key(active.id, "h3", 9.0)
    assert (again.state, again.activated_at) == (ACTIVE, 9.0)

    pending_app = await new_app(store, domain="other.example.com")
    assert await store.deactivate(pending_app.id) == pending_app
    with pytest.raises(KeyError):
        await store.deactivate(active.id + 1000)


@pytest_twisted.ensureDeferred
async def test_delete_app_removes_its_grants_and_pending_updates(store):
    doomed = await active_app(store, "doomed")
    kept = await active_app(store, "kept")
    for app_id in ("doomed", "kept"):
        await store.add_grant("p@example.com", app_id, "u-" + app_id, 1.0)
    await store.queue_pending([pending("doomed", "p@example.com"), pending("kept", "p@example.com")])

    await store.delete_app(doomed.id)
    assert await store.get_app_by_id(doomed.id) is None
    assert await store.get_app("doomed") is None
    assert [g.app_id for g in await store.list_grants()] == ["kept"]
    assert await store.count_pending("doomed") == 0
    assert await store.count_pending("kept") == 1
    assert await store.list_apps() == [kept]

    await store.delete_app(doomed.id)  # unknown: nothing to do
    never_verified = await new_app(store, domain="p.example.com")
    await store.delete_app(never_verified.id)
    assert await store.list_apps() == [kept]


# -- grants ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_grant_is_idempotent_and_keeps_the_uid(store):
    await active_app(store, "app1")
    grant = await store.add_grant("p@example.com", "app1", "uid-1", 3.0)
    assert (grant.email, grant.app_id, grant.uid, grant.created_at) == ("p@example.com", "app1", "uid-1", 3.0)
    assert await store.add_grant("p@example.com", "app1", "uid-2", 4.0) == grant
    assert await store.get_grant("p@example.com", "app1") == grant
    assert await store.get_grant("p@example.com", "other") is None


@pytest_twisted.ensureDeferred
async def test_add_grant_refused_for_an_unknown_app_or_a_uid_in_use(store):
    await active_app(store, "app1")
    with pytest.raises(ValueError):
        await store.add_grant("p@example.com", "no-such-app", "uid-1", 1.0)
    await store.add_grant("p@example.com", "app1", "uid-1", 1.0)
    with pytest.raises(ValueError):
        await store.add_grant("q@example.com", "app1", "uid-1", 1.0)  # uid unique per app
    assert [g.email for g in await store.list_grants(app_id="app1")] == ["p@example.com"]


@pytest_twisted.ensureDeferred
async def test_list_grants_filters_and_order(store):
    for app_id in ("b", "a"):
        await active_app(store, app_id)
    for email, app_id in [("q@x", "b"), ("p@x", "b"), ("q@x", "a"), ("p@x", "a")]:
        await store.add_grant(email, app_id, f"{email}-{app_id}", 1.0)
    keys = lambda grants: [(g.email, g.app_id) for g in grants]  # noqa: E731
    assert keys(await store.list_grants()) == [("p@x", "a"), ("p@x", "b"), ("q@x", "a"), ("q@x", "b")]
    assert keys(await store.list_grants(email="q@x")) == [("q@x", "a"), ("q@x", "b")]
    assert keys(await store.list_grants(app_id="b")) == [("p@x", "b"), ("q@x", "b")]
    assert keys(await store.list_grants(email="p@x", app_id="b")) == [("p@x", "b")]
    assert await store.list_grants(email="nobody@x") == []


@pytest_twisted.ensureDeferred
async def test_revoke_grant_deletes_the_persons_pending_updates_only(store):
    await active_app(store, "app1")
    await active_app(store, "app2")
    await store.add_grant("p@x", "app1", "p1", 1.0)
    await store.add_grant("q@x", "app1", "q1", 1.0)
    await store.add_grant("p@x", "app2", "p2", 1.0)
    await store.queue_pending([pending("app1", "p@x"), pending("app1", "q@x"), pending("app2", "p@x")])

    assert await store.revoke_grant("p@x", "app1") is True
    assert await store.get_grant("p@x", "app1") is None
    assert [(u.app_id, u.email) for u in await store.take_pending("app1", 0)] == [("app1", "q@x")]
    assert await store.count_pending("app2") == 1
    assert await store.get_grant("p@x", "app2") is not None
    assert await store.revoke_grant("p@x", "app1") is False


# -- devices and statuses ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_devices_upsert_list_and_remove(store):
    await store.set_device("p@x", "phone", "node1", "online", 1.0)
    await store.set_device("p@x", "laptop", "node1", "away", 2.0)
    await store.set_device("p@x", "phone", "node2", "busy", 3.0)  # reconnected elsewhere
    devices = await store.list_devices("p@x")
    assert [(d.device, d.node, d.status, d.last_seen) for d in devices] == [
        ("laptop", "node1", "away", 2.0),
        ("phone", "node2", "busy", 3.0),
    ]
    await store.remove_device("p@x", "laptop")
    await store.remove_device("p@x", "unknown")
    assert [d.device for d in await store.list_devices("p@x")] == ["phone"]
    assert await store.list_devices("nobody@x") == []


@pytest_twisted.ensureDeferred
async def test_take_node_devices_returns_and_removes_only_that_nodes(store):
    await store.set_device("p@x", "phone", "node1", "online", 1.0)
    await store.set_device("p@x", "laptop", "node2", "online", 1.0)
    await store.set_device("a@x", "tablet", "node1", "away", 2.0)
    taken = await store.take_node_devices("node1")
    assert [(d.email, d.device, d.node) for d in taken] == [("a@x", "tablet", "node1"), ("p@x", "phone", "node1")]
    assert await store.take_node_devices("node1") == []
    assert [d.device for d in await store.list_devices("p@x")] == ["laptop"]
    assert await store.list_devices("a@x") == []


@pytest_twisted.ensureDeferred
async def test_status_upsert(store):
    assert await store.get_status("p@x") is None
    await store.set_status("p@x", "online", 1.0)
    await store.set_status("p@x", "away", 2.0)
    status = await store.get_status("p@x")
    assert (status.email, status.status, status.changed_at) == ("p@x", "away", 2.0)


# -- waiting updates ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queue_pending_keeps_the_newest_update(store):
    await store.queue_pending([pending("app1", "p@x", "online", at=5.0)])
    await store.queue_pending([pending("app1", "p@x", "away", at=3.0)])  # older: ignored
    assert [u.status for u in await store.take_pending("app1", 0)] == ["online"]

    await store.queue_pending([pending("app1", "p@x", "online", at=5.0)])
    await store.queue_pending([pending("app1", "p@x", "busy", at=7.0)])  # newer: replaces
    await store.queue_pending([pending("app1", "p@x", "away", at=7.0)])  # same time: the later call wins
    assert [(u.status, u.at) for u in await store.take_pending("app1", 0)] == [("away", 7.0)]

    # Within one call too, whatever the order.
    await store.queue_pending([pending("app1", "p@x", "busy", at=9.0), pending("app1", "p@x", "away", at=8.0)])
    assert [u.status for u in await store.take_pending("app1", 0)] == ["busy"]

    await store.queue_pending([])
    assert await store.count_pending() == 0


@pytest_twisted.ensureDeferred
async def test_take_pending_removes_in_order_and_drops_expired(store):
    await store.queue_pending([
        pending("app1", "c@x", at=30.0),
        pending("app1", "a@x", at=10.0),
        pending("app1", "old@x", at=1.0),
        pending("app1", "b@x", at=20.0, uid="uid-b"),
        pending("app2", "a@x", at=1.0),
    ])
    taken = await store.take_pending("app1", not_before=10.0)
    assert [(u.email, u.at) for u in taken] == [("a@x", 10.0), ("b@x", 20.0), ("c@x", 30.0)]
    assert taken[1] == PendingUpdate("app1", "b@x", "uid-b", "online", 20.0)
    assert await store.count_pending("app1") == 0  # the expired one is gone too
    assert await store.take_pending("app1", 0) == []
    assert await store.count_pending("app2") == 1


@pytest_twisted.ensureDeferred
async def test_expire_and_count_pending(store):
    await store.queue_pending([pending("app1", f"{i}@x", at=float(i)) for i in range(5)])
    await store.queue_pending([pending("app2", "p@x", at=10.0)])
    assert await store.count_pending() == 6
    assert await store.count_pending("app1") == 5
    assert await store.count_pending("nope") == 0
    assert await store.expire_pending(3.0) == 3
    assert await store.expire_pending(3.0) == 0
    assert await store.count_pending("app1") == 2
    assert await store.count_pending() == 3


@pytest_twisted.ensureDeferred
async def test_queue_pending_in_several_statements_is_all_or_nothing(store):
    many = [pending("app1", f"{i}@x", at=1.0) for i in range(PENDING_BATCH + 100)]
    await store.queue_pending(many)
    assert await store.count_pending("app1") == len(many)

    # The bad row is in the second INSERT: the first one must be rolled back with it.
    batch = [pending("app2", f"{i}@x", at=1.0) for i in range(PENDING_BATCH + 100)]
    batch[-1] = PendingUpdate("app2", "bad@x", None, "online", 1.0)
    with pytest.raises(ValueError):
        await store.queue_pending(batch)
    assert await store.count_pending("app2") == 0


# -- failures ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_postgres_unreachable():
    s = PostgresStore("postgresql://postgres:secret@127.0.0.1:1/test")
    with pytest.raises(StoreUnavailable, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1/test: .*--database") as e:
        await s.open()
    assert "secret" not in str(e.value)
    with pytest.raises(StoreUnavailable):
        await s.ping()  # tries again, fails again
    await s.close()


@pytest_twisted.ensureDeferred
async def test_postgres_server_that_never_answers():
    factory = protocol.Factory.forProtocol(protocol.Protocol)  # accepts, then says nothing
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        s = PostgresStore(f"postgresql://postgres@127.0.0.1:{port.getHost().port}/test", connect_timeout=0.3)
        with pytest.raises(StoreUnavailable, match="no answer in 0.3s"):
            await s.open()
        await s.close()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_sqlite_in_a_missing_directory(tmp_path):
    path = tmp_path / "missing" / "presence.sqlite"
    s = SQLiteStore(str(path))
    with pytest.raises(StoreUnavailable, match=f"{path}.*--database"):
        await s.open()
    await s.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "presence.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    s = SQLiteStore(str(path))
    with pytest.raises(StoreUnavailable):
        await s.open()
    await s.close()


def kill_connections(url):
    """Terminate every other session on the store's database, and wait until they are gone."""
    admin = psycopg2.connect(url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            cur.execute(f"SELECT pg_terminate_backend(pid) {others}")
            assert cur.fetchall(), "the store had no connection to kill"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cur.execute(f"SELECT COUNT(*) {others}")
                if cur.fetchone()[0] == 0:
                    return
                time.sleep(0.02)
            raise AssertionError("the store's connections did not go away")
    finally:
        admin.close()


@pytest_twisted.ensureDeferred
async def test_postgres_connection_lost_then_recovered(postgres_url):
    s = await reopen(postgres_url)
    try:
        app = await new_app(s)
        kill_connections(postgres_url)
        with pytest.raises(StoreUnavailable, match="the next call reconnects"):
            await s.list_apps()
        assert await s.list_apps() == [app]  # reconnected
        await s.set_status("p@x", "online", 1.0)

        kill_connections(postgres_url)
        with pytest.raises(StoreUnavailable):
            await s.revoke_grant("p@x", "app1")  # a transaction
        assert await s.revoke_grant("p@x", "app1") is False
        await s.ping()
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_postgres_idle_connections_closed_by_the_server_are_replaced(postgres_url):
    s = await reopen(postgres_url)
    try:
        kill_connections(postgres_url)
        deadline = time.monotonic() + 5
        while s._pool is not None and time.monotonic() < deadline:  # let the reactor notice
            await task.deferLater(reactor, 0.01, lambda: None)
        assert s._pool is None
        await s.ping()  # no failed call: the pool was rebuilt first
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_postgres_concurrent_calls_share_the_pool(postgres_url):
    s = await reopen(postgres_url)
    try:
        await defer.gatherResults([
            defer.Deferred.fromCoroutine(s.set_device(f"{i}@x", "phone", "node1", "online", float(i)))
            for i in range(30)
        ])
        assert len(await s.take_node_devices("node1")) == 30
    finally:
        await s.close()
