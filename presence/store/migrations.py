"""Bring a database's schema to the latest version.

Scripts live in presence/store/schema/<dialect>/ (package data):

- ``vN.sql``: the full schema at version N, for a fresh database (the highest N is used);
- ``upgrade_N_to_M.sql``: turns a version N database into version M.

The version is the single row of ``schema_version``, which this module owns. Each script runs in
one transaction together with the version update (and, where the backend needs one, a lock that
keeps two processes from migrating at once), so a failed script leaves the database as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from presence.store.base import StoreUnavailable

if TYPE_CHECKING:
    from presence.store.sql import SQLStore

log = Logger()

CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
)
SET_VERSION = (
    "INSERT INTO schema_version (id, version) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET version = excluded.version"
)

_FULL = re.compile(r"^v(\d+)\.sql$")
_UPGRADE = re.compile(r"^upgrade_(\d+)_to_(\d+)\.sql$")


class SchemaError(StoreUnavailable):
    """This Presence cannot bring the database's schema to its version."""


def schema_dir(dialect: str) -> Traversable:
    return resources.files("presence.store") / "schema" / dialect


@dataclass(frozen=True)
class Step:
    name: str
    target: int
    text: str


class Scripts:
    """The scripts found in one directory, and which one to run next from a given version."""

    def __init__(self, directory: Traversable):
        self.full: dict[int, Traversable] = {}
        self.upgrades: dict[int, dict[int, Traversable]] = {}
        for entry in directory.iterdir():
            if m := _FULL.match(entry.name):
                self.full[int(m[1])] = entry
            elif (m := _UPGRADE.match(entry.name)) and int(m[2]) > int(m[1]):
                self.upgrades.setdefault(int(m[1]), {})[int(m[2])] = entry
        if not self.full:
            raise ValueError(f"no vN.sql schema script in {directory}")
        self.latest = max([*self.full, *(m for targets in self.upgrades.values() for m in targets)])

    def next(self, current: int) -> Step | None:
        """The script that moves a database at ``current`` forward (0: fresh), None if up to date."""
        if current == 0:
            return self._step(max(self.full), self.full[max(self.full)])
        if current in self.upgrades:
            target = max(self.upgrades[current])
            return self._step(target, self.upgrades[current][target])
        if current == self.latest:
            return None
        if current > self.latest:
            raise SchemaError(
                f"the database schema is at version {current} but this Presence only knows up to version"
                f" {self.latest}; run a newer Presence (or point --database at another database)"
            )
        raise SchemaError(
            f"no upgrade script from schema version {current} (latest is {self.latest}); this Presence"
            " cannot upgrade that database"
        )

    @staticmethod
    def _step(target: int, entry: Traversable) -> Step:
        return Step(entry.name, target, entry.read_text(encoding="utf-8"))


def _migrate_once(store: SQLStore, scripts: Scripts, attempt: dict):
    """One transaction: lock, read the version, run the next script and record its version.

    Deciding inside the transaction (after the lock) means a concurrent migrator is never raced.
    Returns the step taken, or None if the schema was up to date; ``attempt`` tells a failure
    which step it interrupted.
    """
    from presence.store.sql import Script

    if store.migration_lock:
        yield store.migration_lock, ()
    yield CREATE_VERSION_TABLE, ()
    rows = yield "SELECT version FROM schema_version", ()
    current = rows[0][0] if rows else 0
    step = scripts.next(current)
    if step is None:
        return None
    attempt.update(current=current, step=step)
    yield Script(step.text)
    yield SET_VERSION, (step.target,)
    return step


async def migrate(store: SQLStore, directory: Traversable | None = None) -> list[str]:
    """Apply every script the database needs, in order; returns their names (empty if none)."""
    scripts = Scripts(directory if directory is not None else schema_dir(store.dialect))
    applied: list[str] = []
    while True:
        attempt: dict = {}
        try:
            step = await store._transaction(_migrate_once(store, scripts, attempt))
        except Exception as e:
            if "step" not in attempt:
                raise  # could not even read the version: already a clear error
            failed = attempt["step"]
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SchemaError(
                f"upgrading the database schema with {failed.name} failed ({reason}); nothing of it was"
                f" applied and the schema is still at version {attempt['current']}"
            ) from e
        if step is None:
            return applied
        log.info("database schema: applied {name} (version {current} -> {target})",
                 name=step.name, current=attempt["current"], target=step.target, event="store.migrated")
        applied.append(step.name)
