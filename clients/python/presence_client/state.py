"""An application's view of its people, kept true across reconnections.

Pure bookkeeping, no I/O: what to send on (re)connecting (`sync`, or `since` the last `synced`),
and what each message the node sends changes. The rules are those of docs/protocol.md: order by
`seq`, drop an update whose `seq` is not above the one held for that person, resume from the last
`synced` (never from the highest `seq` seen), and a state (`sync`, `resync`) is the whole truth: who
is not in it is gone (their grant was revoked meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Person:
    """One person who granted the application, as it last heard of them."""

    email: str
    uid: str
    status: str
    last_active: float | None
    seq: int


@dataclass(frozen=True)
class Change:
    """A change the application had not seen: `previous` is the status it held (None for a person
    it did not know); `gone` says the person left its people (the grant was revoked)."""

    email: str
    uid: str
    status: str
    last_active: float | None
    seq: int
    previous: str | None
    at: float | None = None
    gone: bool = False


class AppState:
    """People by uid, the last `synced` number, and whether a state is arriving."""

    def __init__(self) -> None:
        self.people: dict[str, Person] = {}
        self.synced_seq: int | None = None
        self._seen: set[str] | None = None   # uids of the state being received, None when live

    @property
    def in_state(self) -> bool:
        return self._seen is not None

    def hello(self, key: str) -> dict[str, Any]:
        """The first message of a connection: the whole state the first time, `since` the last
        `synced` afterwards (the node answers `resync` and a state if it cannot replay)."""
        if self.synced_seq is None:
            self.begin_state()
            return {"key": key, "sync": True}
        self._seen = None
        return {"key": key, "since": self.synced_seq}

    def begin_state(self) -> None:
        """A state starts (on `sync`, or after `resync`): collect who is in it."""
        self._seen = set()

    def apply_state(self, entries: list[dict[str, Any]]) -> list[Change]:
        """Entries of a `state` message: the current truth of each person, whatever we held."""
        changes = []
        for entry in entries:
            uid = entry["uid"]
            if self._seen is not None:
                self._seen.add(uid)
            held = self.people.get(uid)
            person = Person(entry["email"], uid, entry["status"], entry.get("last_active"), int(entry["seq"]))
            self.people[uid] = person
            if held is None or (held.status, held.last_active) != (person.status, person.last_active):
                changes.append(Change(person.email, uid, person.status, person.last_active, person.seq,
                                      held.status if held else None))
        return changes

    def apply_updates(self, entries: list[dict[str, Any]]) -> list[Change]:
        """A list of live (or replayed) updates: each one newer than what we hold for the person."""
        changes = []
        for entry in entries:
            uid, seq = entry["uid"], int(entry["seq"])
            if self._seen is not None:
                self._seen.add(uid)
            held = self.people.get(uid)
            if held is not None and seq <= held.seq:
                continue   # a duplicate (after a crash) or an older change overtaken by a newer one
            self.people[uid] = Person(entry["email"], uid, entry["status"], entry.get("last_active"), seq)
            changes.append(Change(entry["email"], uid, entry["status"], entry.get("last_active"), seq,
                                  held.status if held else None, entry.get("at")))
        return changes

    def synced(self, seq: int) -> list[Change]:
        """`synced`: every change up to `seq` is held. Ends a state: who was not in it is gone."""
        self.synced_seq = int(seq)
        gone: list[Change] = []
        if self._seen is not None:
            for uid in [uid for uid in self.people if uid not in self._seen]:
                held = self.people.pop(uid)
                gone.append(Change(held.email, uid, "offline", held.last_active, self.synced_seq, held.status,
                                   gone=True))
            self._seen = None
        return gone
