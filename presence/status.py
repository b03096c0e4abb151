"""The three statuses and how several devices combine into one."""

from __future__ import annotations

from typing import Iterable

ONLINE = "online"
UNAVAILABLE = "unavailable"
OFFLINE = "offline"

STATUSES = (ONLINE, UNAVAILABLE, OFFLINE)

# Higher is "more available": a person is as available as their most available device.
_RANK = {OFFLINE: 0, UNAVAILABLE: 1, ONLINE: 2}


def is_status(value: object) -> bool:
    return isinstance(value, str) and value in _RANK


def most_available(statuses: Iterable[str]) -> str:
    """The combined status of several devices; no device at all means offline."""
    best = OFFLINE
    for status in statuses:
        if _RANK[status] > _RANK[best]:
            best = status
            if best == ONLINE:
                break
    return best
