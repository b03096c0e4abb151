"""The SQLite backend: one connection, used from one adbapi thread, in WAL mode."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from typing import TypeVar

from twisted.enterprise import adbapi

from presence.store.base import StoreUnavailable
from presence.store.sql import Interaction, Script, SQLStore

T = TypeVar("T")


BUSY_TIMEOUT = 5.0  # seconds to wait for another connection's lock


def _open(conn: sqlite3.Connection) -> None:
    # WAL lets readers (presence-admin, another process) work while the service writes;
    # foreign keys are off by default in SQLite and the schema relies on them (grant cascade).
    # Switching a new file to WAL can fail at once with "database is locked" while another
    # connection does the same (SQLite's busy timeout does not apply to it), so retry for a while.
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements: sqlite3's executescript would commit our transaction first."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending


def _drive(conn, interaction: Interaction[T]) -> T:
    """Run an interaction in one transaction (in the pool's thread)."""
    cursor = conn.cursor()
    cursor.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
    try:
        rows: list[tuple] | None = None  # a generator is started with None
        while True:
            try:
                step = interaction.send(rows)
            except StopIteration as done:
                result = done.value
                break
            if isinstance(step, Script):
                for statement in _statements(step.text):
                    cursor.execute(statement)
                rows = []
            else:
                sql, args = step
                rows = cursor.execute(sql, args).fetchall()
    except BaseException:
        conn.rollback()
        raise
    cursor.execute("COMMIT")
    return result


def _query(conn, sql: str, args: tuple) -> list[tuple]:
    return conn.cursor().execute(sql, args).fetchall()


class SQLiteStore(SQLStore):
    dialect = "sqlite"
    clock_sql = "(julianday('now') - 2440587.5) * 86400.0"

    def __init__(self, path: str, reactor=None):
        # Resolved now: relative to the working directory at start, even if the process changes it later.
        special = path == ":memory:" or path.startswith("file:")
        self.path = path if special else os.path.abspath(path)
        if reactor is None:
            from twisted.internet import reactor
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,  # autocommit; _drive issues BEGIN/COMMIT itself
            uri=path.startswith("file:"),
            timeout=BUSY_TIMEOUT,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open,
            cp_reactor=reactor,
        )
        self._closed = False

    async def _run(self, func, *args):
        if self._closed:
            raise StoreUnavailable("the store is closed")  # a closed pool would queue the call forever
        try:
            return await self._pool.runWithConnection(func, *args)
        except sqlite3.IntegrityError as e:
            raise ValueError(f"refused by the database: {e}") from e
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bug in a query, not the database's fault
        except sqlite3.Error as e:
            raise StoreUnavailable(
                f"cannot use the SQLite database {self.path}: {e}; check --database, that its directory"
                " exists and is writable, and that the file is a Presence database"
            ) from e

    async def _connect(self) -> None:
        await self.ping()

    async def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return await self._run(_query, sql, args)

    async def _execute(self, sql: str, args: tuple = ()) -> None:
        await self._run(_query, sql, args)

    async def _transaction(self, interaction: Interaction[T]) -> T:
        return await self._run(_drive, interaction)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.close()
