"""What each application sees of a person: pure functions over the person's device records.

A person's status, as one application sees it, is the most available status among their devices
whose session includes that application (a device's status for one application may be overridden
by a change that named it). A change of a person's devices is published as the applications whose
view it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from presence.status import most_available
from presence.store.base import Device


@dataclass(slots=True)
class Update:
    """One person's new status as one application sees it."""

    app_id: str
    email: str
    uid: str
    status: str
    at: float
    seq: int = 0        # the change log's number of the change that made it (0: not logged)
    # When a device of the person was last online (None: unknown); derived, so not part of equality.
    last_active: float | None = field(default=None, compare=False)

    def as_json(self) -> dict:
        return {"email": self.email, "status": self.status, "uid": self.uid, "at": round(self.at, 3),
                "seq": self.seq, "last_active": None if self.last_active is None else round(self.last_active, 3)}


def visible_to(device: Device, app_id: str) -> bool:
    return device.scope is None or app_id in device.scope


def status_for(device: Device, app_id: str) -> str:
    return device.overrides.get(app_id, device.status)


def view(devices: Iterable[Device], app_id: str) -> str:
    return most_available(status_for(d, app_id) for d in devices if visible_to(d, app_id))


def overall(devices: Iterable[Device]) -> str:
    """The person's own status (their page, the statuses table): every device, no overrides."""
    return most_available(d.status for d in devices)


def _plain(devices: list[Device]) -> bool:
    return all(d.scope is None and not d.overrides for d in devices)


def changes(before: Iterable[Device], after: Iterable[Device], email: str, grants: Iterable[tuple[str, str]],
            at: float) -> list[Update]:
    """The updates a change of ``email``'s devices makes, for the (app_id, uid) of each grant."""
    before, after = list(before), list(after)
    if _plain(before) and _plain(after):
        # every application sees the same status: compare once (a person may have granted thousands)
        old, new = overall(before), overall(after)
        if old == new:
            return []
        return [Update(app_id, email, uid, new, at) for app_id, uid in grants]
    updates = []
    for app_id, uid in grants:
        new = view(after, app_id)
        if new != view(before, app_id):
            updates.append(Update(app_id, email, uid, new, at))
    return updates
