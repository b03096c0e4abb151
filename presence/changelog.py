"""The change log's payload: what one logged change carries from its node to the others.

JSON, compact: ``{"u": [[app_id, email, uid, status, at], ...], "q": [queued app ids],
"x": {...extra}}``. ``extra`` carries events that are not status changes, such as a device taken over
by another node (``{"takeover": [email, device, session]}``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from presence.views import Update


def encode(updates: Iterable[Update], queued: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"u": [[u.app_id, u.email, u.uid, u.status, u.at] for u in updates]}
    queued = sorted(queued)
    if queued:
        body["q"] = queued
    if extra:
        body["x"] = dict(extra)
    return json.dumps(body, separators=(",", ":"))


def decode(payload: str) -> tuple[list[Update], frozenset[str], dict[str, Any]]:
    body = json.loads(payload)
    updates = [Update(*item) for item in body.get("u", [])]
    return updates, frozenset(body.get("q", [])), body.get("x", {})
