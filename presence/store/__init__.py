"""Persistent state: one interface (base.Store), two backends (SQLite, PostgreSQL)."""

from presence.store.base import (
    App, CommitUnknown, Device, Grant, LoggedChange, NodeFenced, Notification, PendingUpdate, PersonChange, PersonState,
    PersonStatus, Queued,
    Reaped, Store, StoreUnavailable,
)

__all__ = [
    "App", "CommitUnknown", "Device", "Grant", "LoggedChange", "NodeFenced", "Notification", "Reaped", "PendingUpdate", "Queued", "PersonChange", "PersonState",
    "PersonStatus", "Store",
    "StoreUnavailable", "open_store",
]


def open_store(url: str, reactor=None) -> Store:
    """Build (not yet open) the store named by a --database value.

    ``sqlite:PATH`` (relative to the working directory) or ``postgresql://user:pass@host:port/db``.
    """
    if url.startswith("sqlite:"):
        from presence.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:"):], reactor=reactor)
    if url.startswith(("postgresql://", "postgres://")):
        from presence.store.postgres import PostgresStore

        return PostgresStore(url, reactor=reactor)
    raise ValueError(
        f"unknown --database {url!r}: use sqlite:PATH or postgresql://user:password@host:port/database"
    )
