"""The store, on both backends: every test that takes ``database_url`` runs on SQLite and on the
real PostgreSQL server. Nothing here mocks the database."""

from __future__ import annotations

import random
import time
from importlib import resources

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task, threads

from presence import changelog, views
from presence.store import App, Device, LoggedChange, PendingUpdate, StoreUnavailable, migrations, open_store
from presence.store.base import ACTIVE, PENDING, VERIFIED
from presence.store.postgres import PostgresStore
from presence.store.sql import PENDING_BATCH
from presence.store.sqlite import SQLiteStore
from presence.views import Update
from tests.fakes import until

KEY = "k" * 1024
# The newest schema version the packaged scripts reach (2 brought devices' sessions, the node
# registry and the change log; later versions must keep all of it).
LATEST = migrations.Scripts(migrations.schema_dir("sqlite")).latest
assert LATEST == migrations.Scripts(migrations.schema_dir("postgres")).latest >= 2


async def reopen(url, schema_dir=None):
    s = open_store(url)
    if schema_dir is not None:
        s.schema_dir = schema_dir
    await s.open()
    return s


def dialect_of(url: str) -> str:
    return "postgres" if url.startswith("postgres") else "sqlite"


async def new_app(store, developer="dev@example.com", domain="example.com", now=1.0) -> App:
    return await store.create_app(developer, domain, "Example", "An example", KEY, now)


async def active_app(store, app_id="app1", developer="dev@example.com", now=1.0) -> App:
    app = await new_app(store, developer=developer, domain=f"{app_id}.example.com", now=now)
    await store.mark_verified(app.id, app_id, now + 1)
    return await store.set_api_key(app.id, "hash-" + app_id, now + 2)


def pending(app_id, email, status="online", at=1.0, uid=None, seq=None) -> PendingUpdate:
    """A waiting update; unless told, its change number follows its time (later: newer)."""
    return PendingUpdate(app_id, email, uid or f"uid-{email}", status, at, int(at) if seq is None else seq)


def dev(email, device, status="online", node="node1", at=1.0, session="", scope=None, overrides=None) -> Device:
    return Device(email, device, node, status, at, session,
                  None if scope is None else frozenset(scope), dict(overrides or {}))


def put(*devices: Device):
    """A mutate that adds or replaces these device records."""
    def mutate(current):
        for d in devices:
            current[d.device] = d
    return mutate


def drop(*device_ids: str):
    def mutate(current):
        for device_id in device_ids:
            del current[device_id]
    return mutate


def nothing(current):
    pass


async def granted(store, email, *app_ids):
    """Active applications with a grant for ``email`` each (uid: ``<app_id>-<email>``)."""
    for app_id in app_ids:
        if await store.get_app(app_id) is None:
            await active_app(store, app_id)
        await store.add_grant(email, app_id, f"{app_id}-{email}", 1.0)


def views_of(change) -> dict[str, str]:
    return {u.app_id: u.status for u in change.updates}


async def pending_rows(store):
    rows = await store._query("SELECT app_id, email, uid, status, at FROM pending ORDER BY app_id, email")
    return [(a, e, u, s, float(at)) for a, e, u, s, at in rows]


async def claim(store, before: float) -> str | None:
    """The dead node reaping picks (these nodes have no devices or subscriptions: only the choice)."""
    reaped = await store.reap_node("survivor", 0.0, before=before)
    return reaped and reaped.node


def timed(coroutine, seconds=10.0):
    """A Deferred for the coroutine that fails instead of hanging (a lock never released)."""
    return defer.Deferred.fromCoroutine(coroutine).addTimeout(seconds, reactor)


# -- opening, schema, ping -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fresh_database_is_at_version_2_and_answers_ping(store):
    assert await store.schema_version() == LATEST
    assert await store.ping() is None
    assert await store._query("SELECT COUNT(*) FROM schema_version") == [(1,)]  # a single row
    assert await store.last_change() == 0  # the v2 tables are there, the counter starts at 0


@pytest_twisted.ensureDeferred
async def test_reopening_keeps_data_and_does_not_rerun_the_schema(database_url):
    first = await reopen(database_url)
    app = await new_app(first)
    await first.change_person("a@example.com", put(dev("a@example.com", "phone")), "node1", 5.0)
    await first.log_change("node1", 5.0, changelog.encode([]))
    await first.close()

    second = await reopen(database_url)
    try:
        assert await second.get_app_by_id(app.id) == app
        assert (await second.get_status("a@example.com")).status == "online"
        assert [d.device for d in await second.list_devices("a@example.com")] == ["phone"]
        assert await second.last_change() == 1
        assert await second.schema_version() == LATEST
        assert await migrations.migrate(second) == []  # nothing left to apply
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_two_stores_opening_a_fresh_database_at_once(database_url):
    stores = [open_store(database_url), open_store(database_url)]
    await defer.gatherResults([defer.Deferred.fromCoroutine(s.open()) for s in stores])
    try:
        assert [await s.schema_version() for s in stores] == [LATEST, LATEST]
        assert await stores[0]._query("SELECT id, seq FROM bus") == [(1, 0)]  # v2.sql ran once
    finally:
        for s in stores:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_closed_store_refuses_calls(database_url):
    s = await reopen(database_url)
    await s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.ping()
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.change_person("p@x", put(dev("p@x", "phone")), "node1", 1.0)


# -- migrations ------------------------------------------------------------------------------


def real_script(dialect, name):
    return (resources.files("presence.store") / "schema" / dialect / name).read_text()


def scripts(tmp_path, dialect, name="schema", **files):
    """A directory of migration scripts: the real v1.sql plus the given ones (name_sql="...")."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "v1.sql").write_text(real_script(dialect, "v1.sql"))
    for file, text in files.items():
        (directory / file.replace("_sql", ".sql")).write_text(text)
    return directory


def upgrades_from(dialect, version):
    """The names of the packaged upgrade scripts that take a database from ``version`` to LATEST."""
    scripts, names = migrations.Scripts(migrations.schema_dir(dialect)), []
    while (step := scripts.next(version)) is not None:
        names.append(step.name)
        version = step.target
    return names


async def v1_store(url, tmp_path):
    """An open store on a fresh database created at schema version 1 (from v1.sql alone)."""
    s = await reopen(url, scripts(tmp_path, dialect_of(url), name="only_v1"))
    assert await s.schema_version() == 1
    return s


@pytest_twisted.ensureDeferred
async def test_upgrade_script_is_applied_to_an_existing_database(database_url, tmp_path):
    s = await v1_store(database_url, tmp_path)
    try:
        app = await new_app(s)
        directory = scripts(
            tmp_path,
            s.dialect,
            upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER NOT NULL);\nINSERT INTO extra (x) VALUES (42);\n",
        )
        assert await migrations.migrate(s, directory) == ["upgrade_1_to_2.sql"]
        assert await s.schema_version() == 2
        assert await s._query("SELECT x FROM extra") == [(42,)]
        assert await s.get_app_by_id(app.id) == app
        assert await migrations.migrate(s, directory) == []
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_real_upgrade_script_from_version_1(database_url, tmp_path):
    s = await v1_store(database_url, tmp_path)
    try:
        directory = scripts(tmp_path, s.dialect, upgrade_1_to_2_sql=real_script(s.dialect, "upgrade_1_to_2.sql"))
        assert await migrations.migrate(s, directory) == ["upgrade_1_to_2.sql"]
        assert await s.schema_version() == 2
        assert await s.last_change() == 0
        assert await s.list_devices("p@x") == []
        # The real directory takes it the rest of the way, if there is more.
        assert await migrations.migrate(s) == upgrades_from(s.dialect, 2)
        assert await s.schema_version() == LATEST
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_fresh_database_gets_v1_then_upgrades_in_order(database_url, tmp_path):
    directory = scripts(
        tmp_path,
        dialect_of(database_url),
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
    dialect = dialect_of(database_url)
    directory = scripts(
        tmp_path,
        dialect,
        v2_sql=real_script(dialect, "v1.sql") + "\nCREATE TABLE extra (x INTEGER);\n",
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
async def test_failed_upgrade_changes_nothing(database_url, tmp_path):
    s = await v1_store(database_url, tmp_path)
    try:
        broken = scripts(
            tmp_path,
            s.dialect,
            name="broken",
            upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n",
        )
        with pytest.raises(StoreUnavailable, match=r"with upgrade_1_to_2\.sql failed .*still at version 1"):
            await migrations.migrate(s, broken)
        assert await s.schema_version() == 1
        # The table of the failed step was rolled back too: creating it again works.
        fixed = scripts(tmp_path, s.dialect, name="fixed", upgrade_1_to_2_sql="CREATE TABLE extra (x INTEGER);")
        assert await migrations.migrate(s, fixed) == ["upgrade_1_to_2.sql"]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_failed_real_upgrade_leaves_a_v1_database_usable_at_version_1(database_url, tmp_path):
    # The real upgrade followed by a statement that fails: none of the real upgrade may stay.
    s = await v1_store(database_url, tmp_path)
    try:
        upgrade = real_script(s.dialect, "upgrade_1_to_2.sql") + "\nINSERT INTO no_such_table VALUES (1);\n"
        broken = scripts(tmp_path, s.dialect, name="broken", upgrade_1_to_2_sql=upgrade)
        with pytest.raises(StoreUnavailable, match="still at version 1"):
            await migrations.migrate(s, broken)
        assert await s.schema_version() == 1
    finally:
        await s.close()
    s = await reopen(database_url)  # the real scripts: the upgrade runs cleanly now
    try:
        assert await s.schema_version() == LATEST
        assert await s.last_change() == 0
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(database_url):
    s = await reopen(database_url)
    await s._execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    await s.close()
    s = open_store(database_url)
    try:
        with pytest.raises(StoreUnavailable,
                           match=f"version {LATEST + 1} but this Presence only knows up to version {LATEST}"):
            await s.open()
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_v1_database_with_data_is_upgraded_by_open(database_url, tmp_path):
    old = await v1_store(database_url, tmp_path)
    try:
        app = await active_app(old, "app1")
        grant = await old.add_grant("p@x", "app1", "uid-p", 3.0)
        await old._execute(
            "INSERT INTO devices (email, device, node, status, last_seen) VALUES (?, ?, ?, ?, ?)",
            ("p@x", "phone", "node1", "online", 4.0))
        await old._execute("INSERT INTO statuses (email, status, changed_at) VALUES (?, ?, ?)", ("p@x", "online", 4.0))
        for row in [("app1", "p@x", "uid-p", "online", 4.0), ("app1", "q@x", "uid-q@x", "unavailable", 5.0)]:
            # as version 1 wrote them (no change numbers yet)
            await old._execute("INSERT INTO pending (app_id, email, uid, status, at) VALUES (?, ?, ?, ?, ?)", row)
    finally:
        await old.close()

    s = await reopen(database_url)  # the normal open(): the packaged scripts
    try:
        assert await s.schema_version() == LATEST
        assert await s.get_app("app1") == app
        assert await s.list_grants() == [grant]
        assert await s.list_devices("p@x") == [
            Device("p@x", "phone", "node1", "online", 4.0, session="", scope=None, overrides={})
        ]
        assert (await s.get_status("p@x")).status == "online"
        assert await pending_rows(s) == [("app1", "p@x", "uid-p", "online", 4.0),
                                         ("app1", "q@x", "uid-q@x", "unavailable", 5.0)]
        assert await s.emails_on_node("node1") == ["p@x"]
        # The new tables work, and a change sees the old device record.
        assert await s.last_change() == 0
        change = await s.change_person("p@x", drop("phone"), "node2", 6.0)
        assert [(u.app_id, u.uid, u.status) for u in change.updates] == [("app1", "uid-p", "offline")]
        assert change.queued == {"app1"} and change.seq == 1
        assert (await s.take_pending("app1", 0))[-1] == PendingUpdate("app1", "p@x", "uid-p", "offline", 6.0, 1)
    finally:
        await s.close()


async def schema_of(s) -> dict:
    """Tables, columns (type, nullability, default) and indexes, comparable between databases."""
    if s.dialect == "sqlite":
        tables = [row[0] for row in await s._query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        shape = {}
        for table in tables:
            columns = sorted(tuple(row[1:]) for row in await s._query(f"PRAGMA table_info({table})"))
            indexes = {}
            for _, name, unique, *_ in await s._query(f"PRAGMA index_list({table})"):
                indexes[name] = (unique, [row[2] for row in await s._query(f"PRAGMA index_info({name})")])
            shape[table] = (columns, indexes)
        return shape
    columns = await s._query(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY table_name, column_name")
    indexes = await s._query(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname")
    checks = await s._query(
        "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2")
    return {"columns": columns, "indexes": indexes, "constraints": checks}


@pytest_twisted.ensureDeferred
async def test_upgraded_database_has_the_same_schema_as_a_fresh_one(database_url, tmp_path):
    fresh = await reopen(database_url)
    try:
        expected = await schema_of(fresh)
        bus = await fresh._query("SELECT id, seq FROM bus")
    finally:
        await fresh.close()
    if dialect_of(database_url) == "sqlite":
        url = f"sqlite:{tmp_path / 'upgraded.sqlite'}"
    else:  # a second database on the same server
        url = database_url.rsplit("/", 1)[0] + "/" + database_url.rsplit("/", 1)[1] + "_up"
        admin = psycopg2.connect(database_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {url.rsplit('/', 1)[1]}")
        admin.close()
    try:
        old = await v1_store(url, tmp_path)
        await old.close()
        upgraded = await reopen(url)
        try:
            assert await schema_of(upgraded) == expected
            assert await upgraded._query("SELECT id, seq FROM bus") == bus
        finally:
            await upgraded.close()
    finally:
        if url.startswith("postgres"):
            admin = psycopg2.connect(database_url)
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
            admin.close()


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


# -- people: change_person, devices and statuses -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_change_person_adds_replaces_and_deletes_devices(store):
    phone = dev("p@x", "phone", "online", node="node1", at=1.0, session="s1", scope={"a", "b"},
                overrides={"a": "unavailable"})
    laptop = dev("p@x", "laptop", "unavailable", node="node1", at=2.0)
    change = await store.change_person("p@x", put(phone, laptop), "node1", 2.0)
    assert change.devices == {"phone": phone, "laptop": laptop}
    assert await store.list_devices("p@x") == [laptop, phone]  # ordered by device id
    stored = (await store.list_devices("p@x"))[1]
    assert (stored.session, stored.scope, dict(stored.overrides)) == ("s1", frozenset({"a", "b"}), {"a": "unavailable"})
    assert isinstance(stored.last_seen, float)

    # The mutate sees what is stored, and may replace one record and leave the other alone.
    seen = {}
    moved = dev("p@x", "phone", "offline", node="node2", at=3.0, session="s2")  # reconnected elsewhere

    def reconnect(current):
        seen.update(current)
        current["phone"] = moved

    change = await store.change_person("p@x", reconnect, "node2", 3.0)
    assert seen == {"phone": phone, "laptop": laptop}
    assert change.devices == {"phone": moved, "laptop": laptop}
    assert await store.list_devices("p@x") == [laptop, moved]
    assert (await store.list_devices("p@x"))[1].scope is None  # a scope can be cleared

    change = await store.change_person("p@x", drop("laptop"), "node2", 4.0)
    assert change.devices == {"phone": moved}
    assert await store.list_devices("p@x") == [moved]
    await store.change_person("p@x", lambda current: current.clear(), "node2", 5.0)
    assert await store.list_devices("p@x") == []
    assert await store.list_devices("nobody@x") == []


@pytest_twisted.ensureDeferred
async def test_change_person_touches_only_that_person(store):
    await store.change_person("p@x", put(dev("p@x", "phone")), "node1", 1.0)
    await store.change_person("q@x", put(dev("q@x", "phone", "unavailable")), "node1", 1.0)
    change = await store.change_person("p@x", lambda current: current.clear(), "node1", 2.0)
    assert change.devices == {}
    assert [d.email for d in await store.list_devices("q@x")] == ["q@x"]
    assert (await store.get_status("q@x")).status == "unavailable"
    assert (await store.get_status("p@x")).status == "offline"


@pytest_twisted.ensureDeferred
async def test_overall_status_is_written_only_when_it_changes(store):
    assert await store.get_status("p@x") is None
    await store.change_person("p@x", put(dev("p@x", "phone", "online")), "node1", 1.0)
    status = await store.get_status("p@x")
    assert (status.email, status.status, status.changed_at) == ("p@x", "online", 1.0)
    assert isinstance(status.changed_at, float)

    # Another device, less available: still online, changed_at stays.
    await store.change_person("p@x", put(dev("p@x", "laptop", "unavailable")), "node1", 2.0)
    assert (await store.get_status("p@x")).changed_at == 1.0
    # A new last_seen, session or override changes no overall status either (overrides are per app).
    await store.change_person("p@x", put(dev("p@x", "phone", "online", at=3.0, session="s9",
                                             overrides={"a": "offline"})), "node1", 3.0)
    assert (await store.get_status("p@x")).changed_at == 1.0
    # The scope does not hide a device from the person's own status.
    await store.change_person("p@x", put(dev("p@x", "phone", "online", scope=set())), "node1", 3.5)
    assert ((await store.get_status("p@x")).status, (await store.get_status("p@x")).changed_at) == ("online", 1.0)

    await store.change_person("p@x", put(dev("p@x", "phone", "offline")), "node1", 4.0)
    status = await store.get_status("p@x")
    assert (status.status, status.changed_at) == ("unavailable", 4.0)
    await store.change_person("p@x", drop("laptop"), "node1", 5.0)
    status = await store.get_status("p@x")
    assert (status.status, status.changed_at) == ("offline", 5.0)
    await store.change_person("p@x", drop("phone"), "node1", 6.0)  # offline before and after
    assert (await store.get_status("p@x")).changed_at == 5.0


@pytest_twisted.ensureDeferred
async def test_updates_only_for_granted_apps_whose_view_changed(store):
    await granted(store, "p@x", "a", "b", "c")
    await active_app(store, "notgranted")
    # Seen by a only: b and c keep seeing offline; the ungranted app hears nothing.
    change = await store.change_person("p@x", put(dev("p@x", "phone", "online", scope={"a", "notgranted"})),
                                       "node1", 10.0)
    assert change.updates == [Update("a", "p@x", "a-p@x", "online", 10.0, change.seq)]

    # A device seen by all, unavailable: a's view (online) holds, b and c change.
    change = await store.change_person("p@x", put(dev("p@x", "laptop", "unavailable")), "node1", 11.0)
    assert sorted((u.app_id, u.status, u.at) for u in change.updates) == [
        ("b", "unavailable", 11.0), ("c", "unavailable", 11.0)]

    # An override for c alone: only c's view changes, and the overall status does not.
    change = await store.change_person(
        "p@x", put(dev("p@x", "laptop", "unavailable", overrides={"c": "online"})), "node1", 12.0)
    assert views_of(change) == {"c": "online"}
    assert (await store.get_status("p@x")).changed_at == 10.0

    # Nothing any application sees: no updates, nothing logged.
    before = await store.last_change()
    change = await store.change_person(
        "p@x", put(dev("p@x", "laptop", "unavailable", at=99.0, overrides={"c": "online"})), "node1", 13.0)
    assert (change.updates, change.queued, change.seq) == ([], frozenset(), None)
    assert await store.last_change() == before
    assert (await store.list_devices("p@x"))[0].last_seen == 99.0  # the record was written all the same

    # Going away altogether: every granted app whose view was not offline.
    change = await store.change_person("p@x", lambda current: current.clear(), "node1", 14.0)
    assert views_of(change) == {"a": "offline", "b": "offline", "c": "offline"}

    # A revoked grant: that app hears nothing more.
    assert await store.revoke_grant("p@x", "b")
    change = await store.change_person("p@x", put(dev("p@x", "phone")), "node1", 15.0)
    assert views_of(change) == {"a": "online", "c": "online"}


@pytest_twisted.ensureDeferred
async def test_queued_updates_are_for_apps_no_node_holds(store):
    await granted(store, "p@x", "held", "absent", "other")
    await store.subscribe("node2", "held")  # another node holds it: that counts too
    await store.subscribe("node1", "unrelated")
    await store.change_person("p@x", put(dev("p@x", "phone", "online", scope={"held", "absent"})), "node1", 5.0)
    # other's view did not change: nothing to queue for it.
    assert await pending_rows(store) == [("absent", "p@x", "absent-p@x", "online", 5.0)]

    change = await store.change_person("p@x", put(dev("p@x", "phone", "unavailable")), "node1", 6.0)
    assert views_of(change) == {"held": "unavailable", "absent": "unavailable", "other": "unavailable"}
    assert change.queued == frozenset({"absent", "other"})
    # The newer update replaced the older one for absent; held's went nowhere.
    assert await pending_rows(store) == [("absent", "p@x", "absent-p@x", "unavailable", 6.0),
                                         ("other", "p@x", "other-p@x", "unavailable", 6.0)]
    logged = (await store.changes_since(change.seq - 1))[0]
    updates, queued, extra = changelog.decode(logged.payload)
    assert sorted(u.app_id for u in updates) == ["absent", "held", "other"]
    assert (queued, extra) == (frozenset({"absent", "other"}), [])

    # A newer update already waiting (by its time) is kept over an older change.
    await store.queue_pending([pending("other", "p@x", "online", at=100.0, uid="other-p@x")])
    change = await store.change_person("p@x", put(dev("p@x", "phone", "offline")), "node1", 7.0)
    assert change.queued == frozenset({"absent", "other"})
    assert await pending_rows(store) == [("absent", "p@x", "absent-p@x", "offline", 7.0),
                                         ("other", "p@x", "other-p@x", "online", 100.0)]

    # Once a node holds it, nothing more is queued for it.
    await store.subscribe("node1", "absent")
    change = await store.change_person("p@x", put(dev("p@x", "phone", "online")), "node1", 8.0)
    assert change.queued == frozenset({"other"})
    assert ("absent", "p@x", "absent-p@x", "offline", 7.0) in await pending_rows(store)
    await store.unsubscribe("node2", "held")
    change = await store.change_person("p@x", put(dev("p@x", "phone", "unavailable")), "node1", 9.0)
    assert change.queued == frozenset({"held", "other"})
    assert await store.count_pending("held") == 1


@pytest_twisted.ensureDeferred
async def test_change_log_numbers_and_payloads_of_person_changes(store):
    await granted(store, "p@x", "app1")
    first = await store.change_person("p@x", put(dev("p@x", "phone", "online")), "node1", 1.0)
    assert first.seq == 1
    unchanged = await store.change_person("p@x", nothing, "node1", 2.0)
    assert (unchanged.updates, unchanged.seq) == ([], None)
    same_view = await store.change_person("p@x", put(dev("p@x", "laptop", "online")), "node1", 2.5)
    assert same_view.seq is None
    second = await store.change_person("p@x", put(dev("p@x", "phone", "offline"), dev("p@x", "laptop", "offline")),
                                       "node2", 3.0)
    assert second.seq == 2
    assert await store.log_change("node3", 4.0, changelog.encode([])) == 3  # one counter for both
    third = await store.change_person("p@x", put(dev("p@x", "phone", "online")), "node1", 5.0)
    assert third.seq == 4
    assert await store.last_change() == 4

    logged = await store.changes_since(0)
    assert [(c.seq, c.origin, c.at) for c in logged] == [(1, "node1", 1.0), (2, "node2", 3.0),
                                                         (3, "node3", 4.0), (4, "node1", 5.0)]
    updates, queued, extra = changelog.decode(logged[1].payload)
    assert updates == [Update("app1", "p@x", "app1-p@x", "offline", 3.0)]
    assert (queued, extra) == (frozenset({"app1"}), [])
    assert logged[1].payload == changelog.encode(second.updates, second.queued)


@pytest_twisted.ensureDeferred
async def test_extra_alone_logs_a_change_without_updates(store):
    await granted(store, "p@x", "app1")
    await store.change_person("p@x", put(dev("p@x", "phone", session="old")), "node1", 1.0)
    takeover = {"takeover": ["p@x", "phone", "new"]}
    change = await store.change_person(
        "p@x", put(dev("p@x", "phone", node="node2", session="new")), "node2", 2.0, extra=takeover)
    assert (change.updates, change.queued, change.seq) == ([], frozenset(), 2)
    assert (await store.list_devices("p@x"))[0].session == "new"
    logged = await store.changes_since(1)
    assert [(c.seq, c.origin, c.at) for c in logged] == [(2, "node2", 2.0)]
    assert changelog.decode(logged[0].payload) == ([], frozenset(), [takeover])

    # With a mutate that changes nothing at all, too; and together with updates.
    change = await store.change_person("p@x", nothing, "node1", 3.0, extra={"note": 1})
    assert (change.updates, change.seq) == ([], 3)
    change = await store.change_person("p@x", drop("phone"), "node1", 4.0, extra={"note": 2})
    assert change.seq == 4
    assert changelog.decode((await store.changes_since(3))[0].payload) == (
        [Update("app1", "p@x", "app1-p@x", "offline", 4.0)], frozenset({"app1"}), [{"note": 2}])
    # An empty extra is no extra.
    assert (await store.change_person("p@x", nothing, "node1", 5.0, extra={})).seq is None
    assert await store.last_change() == 4


async def snapshot(store, email="p@x"):
    return (await store.list_devices(email), await store.get_status(email), await store.last_change(),
            await store.changes_since(0), await pending_rows(store))


@pytest_twisted.ensureDeferred
async def test_a_mutate_that_raises_changes_nothing(store):
    await granted(store, "p@x", "app1")
    await store.change_person("p@x", put(dev("p@x", "phone"), dev("p@x", "laptop", "unavailable")), "node1", 1.0)
    before = await snapshot(store)

    def broken(current):
        del current["phone"]
        current["tablet"] = dev("p@x", "tablet", "offline")
        raise RuntimeError("the mutate failed")

    with pytest.raises(RuntimeError, match="the mutate failed"):
        await store.change_person("p@x", broken, "node1", 2.0, extra={"x": 1})
    assert await snapshot(store) == before
    # And the person is not left locked: the next change goes through.
    change = await timed(store.change_person("p@x", drop("phone"), "node1", 3.0))
    assert views_of(change) == {"app1": "unavailable"} and change.seq == 2


@pytest_twisted.ensureDeferred
async def test_a_change_that_fails_halfway_is_rolled_back(store):
    # The deletion runs, then writing the new record is refused by the database: both are undone.
    await granted(store, "p@x", "app1")
    await store.change_person("p@x", put(dev("p@x", "phone"), dev("p@x", "laptop", "unavailable")), "node1", 1.0)
    before = await snapshot(store)

    def half(current):
        del current["phone"]
        current["tablet"] = Device("p@x", "tablet", None, "online", 2.0)  # node NOT NULL

    with pytest.raises(ValueError):
        await store.change_person("p@x", half, "node1", 2.0)
    assert await snapshot(store) == before
    change = await timed(store.change_person("p@x", drop("phone"), "node1", 3.0))
    assert [d.device for d in await store.list_devices("p@x")] == ["laptop"] and change.seq == 2


@pytest_twisted.ensureDeferred
async def test_emails_on_node(store):
    await store.change_person("b@x", put(dev("b@x", "phone", node="node1"), dev("b@x", "laptop", node="node1")),
                              "node1", 1.0)
    await store.change_person("a@x", put(dev("a@x", "phone", node="node1"), dev("a@x", "tablet", node="node2")),
                              "node1", 1.0)
    await store.change_person("c@x", put(dev("c@x", "phone", node="node2")), "node2", 1.0)
    assert await store.emails_on_node("node1") == ["a@x", "b@x"]  # each once, ordered
    assert await store.emails_on_node("node2") == ["a@x", "c@x"]
    assert await store.emails_on_node("node3") == []

    # Clearing a node's devices, as a survivor does, leaves the other nodes' ones.
    def clear_node1(current):
        for device_id in [k for k, d in current.items() if d.node == "node1"]:
            del current[device_id]

    for email in await store.emails_on_node("node1"):
        await store.change_person(email, clear_node1, "node2", 2.0)
    assert await store.emails_on_node("node1") == []
    assert [d.device for d in await store.list_devices("a@x")] == ["tablet"]
    assert await store.list_devices("b@x") == []
    assert (await store.get_status("b@x")).status == "offline"


# -- the change log ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_log_change_and_changes_since(store):
    assert await store.last_change() == 0
    assert await store.changes_since(0) == []
    payloads = [changelog.encode([Update("app1", f"{i}@x", f"u{i}", "online", float(i))]) for i in range(1, 8)]
    for i, payload in enumerate(payloads, start=1):
        assert await store.log_change(f"node{i % 2}", float(i * 10), payload) == i
    assert await store.last_change() == 7

    logged = await store.changes_since(0)
    assert logged == [LoggedChange(i, f"node{i % 2}", float(i * 10), payloads[i - 1], i) for i in range(1, 8)]
    assert all(isinstance(c.seq, int) and isinstance(c.at, float) for c in logged)
    assert [c.seq for c in await store.changes_since(0, limit=3)] == [1, 2, 3]
    assert [c.seq for c in await store.changes_since(3, limit=3)] == [4, 5, 6]
    assert [c.seq for c in await store.changes_since(6, limit=3)] == [7]
    assert [c.seq for c in await store.changes_since(4)] == [5, 6, 7]
    assert await store.changes_since(7) == []
    assert await store.changes_since(100) == []


@pytest_twisted.ensureDeferred
async def test_changes_since_is_ordered_by_number_not_time(store):
    await store.log_change("node1", 50.0, "{}")
    await store.log_change("node2", 10.0, "{}")  # an earlier clock on another node
    await store.log_change("node1", 30.0, "{}")
    assert [(c.seq, c.at) for c in await store.changes_since(0)] == [(1, 50.0), (2, 10.0), (3, 30.0)]


@pytest_twisted.ensureDeferred
async def test_trim_changes(store):
    for at in (1.0, 2.0, 3.0, 4.0, 5.0):
        await store.log_change("node1", at, "{}")
    assert await store.trim_changes(1.0) == 0  # strictly older
    assert await store.trim_changes(3.0) == 2
    assert [c.seq for c in await store.changes_since(0)] == [3, 4, 5]
    assert await store.trim_changes(3.0) == 0
    assert await store.last_change() == 5  # the counter is not the table: numbers never come back
    assert await store.log_change("node1", 6.0, "{}") == 6
    assert await store.trim_changes(100.0) == 4
    assert await store.changes_since(0) == []
    assert await store.last_change() == 6
    assert await store.log_change("node1", 7.0, "{}") == 7


# -- the node registry -----------------------------------------------------------------------------


async def nodes(store):
    rows = await store._query("SELECT name, started_at, heartbeat_at, last_applied FROM nodes ORDER BY name")
    return [(n, float(s), float(h), int(a)) for n, s, h, a in rows]


@pytest_twisted.ensureDeferred
async def test_register_node_upserts(store):
    await store.register_node("node1", 10.0, 0)
    await store.register_node("node2", 11.0, 3)
    assert await nodes(store) == [("node1", 10.0, 10.0, 0), ("node2", 11.0, 11.0, 3)]
    await store.register_node("node1", 20.0, 5)  # again: one row, fresh heartbeat
    rows = await nodes(store)
    assert [(n, h, a) for n, _, h, a in rows] == [("node1", 20.0, 5), ("node2", 11.0, 3)]
    assert await claim(store, 15.0) == "node2"  # node1's heartbeat is the new one
    assert await claim(store, 15.0) is None


@pytest_twisted.ensureDeferred
async def test_heartbeat(store):
    assert await store.heartbeat("node1", 5.0, 0) is False  # not registered: nothing is created
    assert await nodes(store) == []
    await store.register_node("node1", 10.0, 0)
    assert await store.heartbeat("node1", 20.0, 7) is True
    assert await nodes(store) == [("node1", 10.0, 20.0, 7)]
    assert await claim(store, 20.0) is None  # heartbeat at 20 is not older than 20
    assert await claim(store, 20.5) == "node1"
    assert await store.heartbeat("node1", 21.0, 8) is False  # reaped
    await store.register_node("node1", 22.0, 8)  # rejoins
    assert await store.heartbeat("node1", 23.0, 9) is True


@pytest_twisted.ensureDeferred
async def test_reaping_takes_one_dead_node_at_a_time(store):
    await store.register_node("live", 100.0, 30)
    await store.register_node("dead2", 20.0, 2)
    await store.register_node("dead1", 10.0, 1)
    assert await claim(store, 50.0) == "dead1"  # the longest silent first
    assert [n for n, *_ in await nodes(store)] == ["dead2", "live"]
    assert await claim(store, 50.0) == "dead2"
    assert await claim(store, 50.0) is None
    assert await claim(store, 100.0) is None  # exactly at the limit: alive
    assert await store.heartbeat("live", 101.0, 31) is True
    assert await store.heartbeat("dead1", 101.0, 1) is False


@pytest_twisted.ensureDeferred
async def test_reaping_by_several_survivors_at_once_reaps_each_dead_node_once(database_url):
    stores = [await reopen(database_url) for _ in range(3)]
    try:
        dead = {f"dead{i}" for i in range(6)}
        for i, name in enumerate(sorted(dead)):
            await stores[0].register_node(name, float(i), i)
        for name in ("live1", "live2"):
            await stores[0].register_node(name, 100.0, 0)

        async def survivor(s):
            claimed = []
            while (node := await claim(s, 50.0)) is not None:
                claimed.append(node)
            return claimed

        results = await defer.gatherResults([timed(survivor(s)) for s in stores for _ in range(2)])
        claimed = [node for result in results for node in result]
        # A survivor that lost a race may stop early (the next heartbeat goes on): finish sequentially.
        claimed += await survivor(stores[0])
        assert sorted(claimed) == sorted(dead)  # each exactly once
        assert [n for n, *_ in await nodes(stores[0])] == ["live1", "live2"]
    finally:
        for s in stores:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_a_node_leaving_reaps_itself_row_and_subscriptions(store):
    await store.register_node("node1", 1.0, 0)
    await store.register_node("node2", 1.0, 0)
    for node, app_id in [("node1", "a"), ("node1", "b"), ("node2", "b"), ("node2", "c")]:
        await store.subscribe(node, app_id)
    left = await store.reap_node("node1", 2.0, node="node1")
    assert (left.node, left.apps, left.people) == ("node1", ["a", "b"], 0)
    assert [n for n, *_ in await nodes(store)] == ["node2"]
    assert await store.heartbeat("node1", 2.0, 0) is False
    assert await store.subscribed(["a", "b", "c"]) == {"b", "c"}
    assert await store.take_subscriptions("node1") == []
    assert await store.take_subscriptions("node2") == ["b", "c"]
    assert await store.reap_node("unknown", 2.0, node="unknown") is None   # nothing to do


# -- subscriptions -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_subscriptions(store):
    assert await store.subscribed([]) == set()
    assert await store.subscribed(["a"]) == set()
    await store.subscribe("node1", "a")
    await store.subscribe("node1", "a")  # idempotent
    await store.subscribe("node1", "b")
    await store.subscribe("node2", "b")
    await store.subscribe("node2", "c")
    assert await store.subscribed(["a", "b", "c", "d"]) == {"a", "b", "c"}
    assert await store.subscribed(["d"]) == set()

    await store.unsubscribe("node1", "b")
    assert await store.subscribed(["b"]) == {"b"}  # node2 still holds it
    await store.unsubscribe("node2", "b")
    assert await store.subscribed(["a", "b"]) == {"a"}
    await store.unsubscribe("node2", "nothing")  # nothing to do

    await store.subscribe("node2", "a")
    assert await store.take_subscriptions("node1") == ["a"]  # that node's only, once
    assert await store.take_subscriptions("node1") == []
    assert await store.subscribed(["a", "c"]) == {"a", "c"}  # node2's stay
    assert await store.take_subscriptions("node2") == ["a", "c"]
    assert await store.subscribed(["a", "b", "c"]) == set()


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
    assert taken[1] == PendingUpdate("app1", "b@x", "uid-b", "online", 20.0, 20)
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


# -- several nodes on one PostgreSQL database --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_postgres_two_nodes_changing_one_person_at_once(postgres_url):
    setup = await reopen(postgres_url)
    nodes = {"nodeA": await reopen(postgres_url), "nodeB": await reopen(postgres_url)}
    try:
        await granted(setup, "p@x", "app1")
        rng = random.Random(20261125)
        plan = {name: [rng.choice(["online", "unavailable", "offline"]) for _ in range(20)] for name in nodes}
        counted: dict[tuple[str, int], int] = {}  # what each call saw of the shared counter, plus one

        def step(name, i):
            def mutate(current):
                # A read-modify-write of a record both nodes change: a lost update would show.
                counter = current.get("shared")
                n = int(counter.session) + 1 if counter is not None else 1
                counted[(name, i)] = n
                current["shared"] = dev("p@x", "shared", "offline", node=name, at=float(n), session=str(n))
                current[name] = dev("p@x", name, plan[name][i], node=name, at=float(i), session=f"{name}-{i}")
            return mutate

        # Interleaved: every call of both nodes in flight at once (each store runs 3 at a time).
        calls, keys = [], []
        for i in range(20):
            for name, s in nodes.items():
                calls.append(timed(s.change_person("p@x", step(name, i), name, 1000.0,
                                                   extra={"call": [name, i]}), 30))
                keys.append((name, i))
        changes = dict(zip(keys, await defer.gatherResults(calls)))

        # The log: 1..40, no gaps, one entry per call, numbered in the order the person was changed.
        assert sorted(c.seq for c in changes.values()) == list(range(1, 41))
        assert await setup.last_change() == 40
        logged = await setup.changes_since(0)
        assert [c.seq for c in logged] == list(range(1, 41))
        for key, change in changes.items():
            assert counted[key] == change.seq, key  # log order is the order of the person's lock
            entry = logged[change.seq - 1]
            assert (entry.origin, changelog.decode(entry.payload)[2]) == (key[0], [{"call": list(key)}])

        # The devices: the shared counter saw all 40, each node's device has its last committed status.
        devices = {d.device: d for d in await setup.list_devices("p@x")}
        assert sorted(devices) == ["nodeA", "nodeB", "shared"]
        assert devices["shared"].session == "40"
        for name in nodes:
            last = max(range(20), key=lambda i: changes[(name, i)].seq)
            assert (devices[name].status, devices[name].session) == (plan[name][last], f"{name}-{last}")
            assert changes[(name, last)].devices[name] == devices[name]
        final = changes[max(changes, key=lambda k: changes[k].seq)].devices
        assert final == devices

        # The status and app1's view as the log tells them agree with the final devices.
        assert (await setup.get_status("p@x")).status == views.overall(devices.values())
        seen = "offline"
        for entry in logged:
            for u in changelog.decode(entry.payload)[0]:
                assert u.status != seen  # an update is always a change of the view before it
                seen = u.status
        assert seen == views.view(devices.values(), "app1")
        # Nobody holds app1: its update waited, and of equal times the last committed one stayed.
        assert [(u.email, u.status) for u in await setup.take_pending("app1", 0)] == [("p@x", seen)]
    finally:
        for s in [setup, *nodes.values()]:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_postgres_change_numbers_follow_commit_order(postgres_url):
    """A follower reading the log while several nodes write never sees change N before N-1."""
    writers = [await reopen(postgres_url) for _ in range(3)]
    reader = await reopen(postgres_url)
    total = 3 * 4 * 10
    done = []

    async def follow():
        since, reads = 0, 0
        while True:
            finished = bool(done)  # read after the writers were done: must then get everything
            batch = await reader.changes_since(since)
            reads += 1
            for change in batch:
                assert change.seq == since + 1, f"saw change {change.seq} before change {since + 1}"
                since = change.seq
            if finished:
                return since, reads

    async def write(s, w):
        for i in range(10):
            await defer.gatherResults([
                timed(s.change_person(f"{w}-{k}@x", put(dev(f"{w}-{k}@x", "phone", at=float(i))), f"node{w}",
                                      float(i), extra={"i": i}))
                for k in range(4)
            ])
            if i % 3 == 0:
                await s.log_change(f"node{w}", float(i), "{}")

    try:
        follower = timed(follow(), 60)
        await defer.gatherResults([timed(write(s, w), 60) for w, s in enumerate(writers)])
        done.append(True)
        last, reads = await follower
        assert last == await reader.last_change() == total + 3 * 4
        assert reads > 1
    finally:
        for s in [*writers, reader]:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_postgres_deadlock_is_a_refused_transaction_not_a_lost_connection(postgres_url):
    """Another node's transaction and ours wait for each other: the server aborts ours. That is no
    reason to drop the pool (and its other transactions' connections), nor to blame the server."""
    s = await reopen(postgres_url)
    other = psycopg2.connect(postgres_url)  # another node, driven from a thread (it blocks)
    run = lambda sql: threads.deferToThread(other.cursor().execute, sql)  # noqa: E731
    try:
        pool = s._pool
        await run("SET deadlock_timeout = '10s'")  # so the server picks our transaction to abort
        await run("INSERT INTO pending VALUES ('app1', 'b@x', 'ub', 'offline', 1)")
        await run("SELECT pg_advisory_xact_lock(1, hashtext('q@x'))")  # the other node is changing q@x
        waiting = timed(s.change_person("q@x", put(dev("q@x", "phone")), "node1", 2.0), 30)
        ours = timed(s.queue_pending([pending("app1", "a@x", at=2.0), pending("app1", "b@x", at=2.0)]), 30)
        def ours_waits_for_a_row() -> bool:
            # a transaction of this database waiting for another's (the other node's b@x row): ours
            # (change_person waits too, but for an advisory lock, not a transaction)
            cur = other.cursor()
            cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE NOT l.granted AND l.locktype = 'transactionid' AND a.datname = current_database()")
            return cur.fetchone()[0] > 0

        await until(lambda: threads.deferToThread(ours_waits_for_a_row), "our transaction to wait for b@x")
        theirs = run("INSERT INTO pending VALUES ('app1', 'a@x', 'ua', 'offline', 1)")
        with pytest.raises(StoreUnavailable, match="refused the transaction: deadlock detected") as e:
            await ours
        assert "check that the server runs" not in str(e.value)
        await theirs
        await threads.deferToThread(other.commit)
        assert (await waiting).devices["phone"].status == "online"  # went on once q@x was free
        assert s._pool is pool  # the same connections
        assert await pending_rows(s) == [("app1", "a@x", "ua", "offline", 1.0), ("app1", "b@x", "ub", "offline", 1.0)]
    finally:
        other.close()
        await s.close()


@pytest_twisted.ensureDeferred
async def test_postgres_a_failed_change_releases_the_person(postgres_url):
    one, two = await reopen(postgres_url), await reopen(postgres_url)
    try:
        await one.change_person("p@x", put(dev("p@x", "phone")), "node1", 1.0)

        def broken(current):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await one.change_person("p@x", broken, "node1", 2.0)
        # The other node (another connection) gets the person's lock at once.
        change = await timed(two.change_person("p@x", drop("phone"), "node2", 3.0), 5)
        assert change.devices == {}
    finally:
        await one.close()
        await two.close()


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
        await s.change_person("p@x", put(dev("p@x", "phone")), "node1", 1.0)

        kill_connections(postgres_url)
        with pytest.raises(StoreUnavailable):
            await s.change_person("p@x", drop("phone"), "node1", 2.0)  # nothing of it was applied
        assert [d.device for d in await s.list_devices("p@x")] == ["phone"]
        assert (await s.change_person("p@x", drop("phone"), "node1", 3.0)).devices == {}

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
        changes = await defer.gatherResults([
            timed(s.change_person(f"{i:02}@x", put(dev(f"{i:02}@x", "phone", at=float(i))), "node1", float(i),
                                  extra={"i": i}))
            for i in range(30)
        ])
        assert sorted(c.seq for c in changes) == list(range(1, 31))
        assert await s.emails_on_node("node1") == [f"{i:02}@x" for i in range(30)]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_of_changes_is_one_transaction_and_one_logged_change(store):
    """Group commit: several people, one of them twice, applied in order, written once, logged once."""
    await granted(store, "p@x", "app1")
    await granted(store, "q@x", "app1")
    seq = await store.last_change()
    changes = await store.change_people([
        ("p@x", put(dev("p@x", "phone", "online")), None),
        ("q@x", put(dev("q@x", "laptop", "unavailable")), {"takeover": ["q@x", "laptop", "s1"]}),
        ("p@x", put(dev("p@x", "phone", "offline")), None),
        ("q@x", nothing, None),
    ], "node1", 7.0)
    assert [[(u.email, u.status) for u in c.updates] for c in changes] == [
        [("p@x", "online")], [("q@x", "unavailable")], [("p@x", "offline")], []]
    # a number for each change of the batch (one number, one content), all in one row of the log
    assert [c.seq for c in changes] == [seq + 1, seq + 2, seq + 3, None]
    assert [c.devices for c in changes][2] == {"phone": dev("p@x", "phone", "offline")}
    logged = await store.changes_since(seq)
    assert len(logged) == 1 and logged[0].numbers == range(seq + 1, seq + 5)
    updates, queued, extras = changelog.decode(logged[0].payload, logged[0].seq)
    assert [(u.email, u.status, u.seq) for u in updates] == [
        ("p@x", "online", seq + 1), ("q@x", "unavailable", seq + 2), ("p@x", "offline", seq + 3)]
    assert extras == [{"takeover": ["q@x", "laptop", "s1"]}]
    # the final state is what was written, and the waiting queue kept the newest per person
    assert [d.status for d in await store.list_devices("p@x")] == ["offline"]
    assert (await store.get_status("q@x")).status == "unavailable"
    waiting = {(p.email, p.status) for p in await store.take_pending("app1", 0)}
    assert waiting == {("p@x", "offline"), ("q@x", "unavailable")}


@pytest_twisted.ensureDeferred
async def test_a_failing_batch_changes_nothing(store):
    await store.change_person("p@x", put(dev("p@x", "phone", "online")), "node1", 1.0)
    seq = await store.last_change()

    def broken(current):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.change_people([("p@x", put(dev("p@x", "phone", "offline")), None),
                                   ("q@x", broken, None)], "node1", 2.0)
    assert [d.status for d in await store.list_devices("p@x")] == ["online"]
    assert await store.last_change() == seq


@pytest_twisted.ensureDeferred
async def test_acknowledgements_of_several_people_in_one_transaction(store):
    await granted(store, "p@x", "app1")
    await granted(store, "q@x", "app1")
    queued = await store.queue_notifications("app1", [("app1-p@x", "for p", None), ("app1-q@x", "for q", None),
                                                      ("app1-p@x", "for p too", None)], 1.0, 100)
    p1, q1, p2 = (r.notification.id for r in queued)
    # q may not acknowledge p's item; an id twice or unknown changes nothing
    gone = await store.ack_notifications_of([("p@x", p1), ("q@x", p2), ("q@x", q1), ("p@x", 999_999)])
    assert gone == {("p@x", p1), ("q@x", q1)}
    assert [n.message for n in await store.pending_notifications("p@x", 0)] == ["for p too"]
    assert await store.pending_notifications("q@x", 0) == []
    assert await store.ack_notifications_of([]) == set()


@pytest_twisted.ensureDeferred
async def test_a_notification_batch_keeps_each_queue_first_in_first_out(store):
    await granted(store, "p@x", "app1")
    await granted(store, "q@x", "app1")
    await store.queue_notifications("app1", [("app1-p@x", "old", None)], 1.0, 3)
    items = [("app1-p@x", f"m{i}", None) for i in range(4)] + [("nobody", "x", None), ("app1-q@x", "for q", "https://q")]
    results = await store.queue_notifications("app1", items, 2.0, 3)
    assert [(r.queue_size, r.dropped) if r else None for r in results] == [
        (2, 0), (3, 0), (3, 1), (3, 1), None, (1, 0)]
    ids = [r.notification.id for r in results if r]
    assert ids == sorted(ids)
    assert [n.message for n in await store.pending_notifications("p@x", 0)] == ["m1", "m2", "m3"]
    [q] = await store.pending_notifications("q@x", 0)
    assert (q.message, q.action, q.id) == ("for q", "https://q", results[-1].notification.id)


@pytest_twisted.ensureDeferred
async def test_pending_notifications_of_several_people_in_one_call(store):
    await granted(store, "p@x", "app1")
    await granted(store, "q@x", "app1")
    await granted(store, "r@x", "app1")
    await store.queue_notifications("app1", [("app1-p@x", "old", None)], 1.0, 10)
    await store.queue_notifications("app1", [("app1-p@x", "p1", None), ("app1-q@x", "q1", "https://q"),
                                             ("app1-p@x", "p2", None)], 5.0, 10)
    found = await store.pending_notifications_of(["q@x", "p@x", "r@x", "p@x"], 2.0)
    assert set(found) == {"p@x", "q@x"}                       # nothing waits for r: left out
    assert [n.message for n in found["p@x"]] == ["p1", "p2"]  # oldest first; "old" is before not_before
    assert [(n.message, n.action, n.app_id) for n in found["q@x"]] == [("q1", "https://q", "app1")]
    many = [f"n{i}@x" for i in range(1200)] + ["q@x"]          # over one IN list (500)
    assert list(await store.pending_notifications_of(many, 0)) == ["q@x"]


@pytest_twisted.ensureDeferred
async def test_get_apps_finds_several_in_one_call(store):
    a = await active_app(store, "app1")
    b = await active_app(store, "app2")
    assert await store.get_apps(["app2", "nope", "app1", "app2"]) == {"app1": a, "app2": b}
    assert await store.get_apps([]) == {}


@pytest_twisted.ensureDeferred
async def test_open_streams_subscribes_and_takes_what_waits_for_each_application(store):
    await store.queue_pending([
        pending("app1", "b@x", at=20.0), pending("app1", "a@x", at=10.0), pending("app1", "old@x", at=1.0),
        pending("app2", "a@x", at=15.0), pending("app3", "z@x", at=15.0),
    ])
    ids = ["app1", "app2", "app4"] + [f"more{i}" for i in range(600)]     # over one IN list (500)
    taken = await store.open_streams("node1", ids, not_before=10.0)
    assert set(taken) == set(ids)
    assert [(u.email, u.at) for u in taken["app1"]] == [("a@x", 10.0), ("b@x", 20.0)]
    assert [u.email for u in taken["app2"]] == ["a@x"] and taken["app4"] == []
    assert await store.subscribed(["app1", "app2", "app4", "more599", "app3"]) == {"app1", "app2", "app4", "more599"}
    assert await store.count_pending() == 1                                # app3's stays; the expired one is gone
    assert (await store.open_streams("node1", ["app1"], 0))["app1"] == []  # taken once; subscribing again is fine
    assert await store.take_subscriptions("node1") == sorted(ids)


@pytest_twisted.ensureDeferred
async def test_applications_the_caller_holds_are_not_queued_and_others_are_looked_up(store):
    """A person granted 520 applications (over one IN list of 500): those the caller holds are
    never queued; of the rest, those another node subscribed are not queued either."""
    apps = [f"app{i}" for i in range(520)]
    for app_id in apps:
        await store.create_app("dev@x", f"{app_id}.example.com", "A", "", KEY, 1.0)
    for app in await store.list_apps():
        await store.mark_verified(app.id, app.domain.split(".")[0], 1.0)   # app17.example.com is app17
    for app_id in apps:
        await store.add_grant("p@x", app_id, f"{app_id}-p", 1.0)
    await store.subscribe("other-node", "app507")
    held = {f"app{i}": None for i in range(0, 520, 2)}           # a dict, as Streams.channels is
    [change] = await store.change_people([("p@x", put(dev("p@x", "phone", "online")), None)], "node1", 5.0,
                                         held=held)
    assert len(change.updates) == 520
    assert change.queued == {f"app{i}" for i in range(1, 520, 2)} - {"app507"}
    [change] = await store.change_people([("p@x", put(dev("p@x", "phone", "offline")), None)], "node1", 6.0)
    assert change.queued == set(apps) - {"app507"}
    assert await store.count_pending() == 519                        # the newest per application
