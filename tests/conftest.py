"""Fixtures shared by the whole suite.

PostgreSQL tests run against the real server (PRESENCE_TEST_POSTGRES, by default the machine's
trust-auth server at 127.0.0.1:5432); each test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets

import pytest
import pytest_twisted

pytest_plugins = ["tests.idp"]

POSTGRES_ADMIN = os.environ.get("PRESENCE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin():
    import psycopg2

    conn = psycopg2.connect(POSTGRES_ADMIN)
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_url():
    """The URL of a fresh, empty PostgreSQL database."""
    name = "presence_test_" + secrets.token_hex(6)
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    base, _, _ = POSTGRES_ADMIN.rpartition("/")
    yield f"{base}/{name}"
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:{tmp_path / 'presence.sqlite'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Both backends, for suites that must hold on each (the PostgreSQL one for real)."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'presence.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest_twisted.async_yield_fixture
async def store(database_url):
    """An open store of each backend (a test that needs more than the store opens its own)."""
    from presence.store import open_store

    opened = open_store(database_url)
    await opened.open()
    yield opened
    await opened.close()


@pytest_twisted.async_yield_fixture
async def sqlite_store(sqlite_url):
    """An open SQLite store in a temporary file."""
    from presence.store import open_store

    store = open_store(sqlite_url)
    await store.open()
    yield store
    await store.close()
