"""The change log's payload: what one logged change carries from its node to the others.

JSON, compact: ``{"u": [[app_id, email, uid, status, at(, seq)], ...], "a": [last_active of each
update, or null], "q": [queued app ids], "x": [{...extra}, ...]}``. Extras carry events that are not status changes, such as a device taken
over by another node (``{"takeover": [email, device, session]}``); a batch of changes has several.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from presence.views import Update


def encode(updates: Iterable[Update], queued: Iterable[str] = (),
           extras: Iterable[Mapping[str, Any]] = (), keep_seq: bool = False) -> str:
    """``keep_seq``: each update keeps its own number (a replay of older changes, which must not
    look newer than what came after them); otherwise they carry the logged change's number."""
    updates = list(updates)
    if keep_seq:
        body: dict[str, Any] = {"u": [[u.app_id, u.email, u.uid, u.status, u.at, u.seq] for u in updates]}
    else:
        body = {"u": [[u.app_id, u.email, u.uid, u.status, u.at] for u in updates]}
    actives = [u.last_active for u in updates]
    if any(a is not None for a in actives):
        body["a"] = actives          # each update's last_active, in the order of "u"
    queued = sorted(queued)
    if queued:
        body["q"] = queued
    extras = [dict(extra) for extra in extras if extra]
    if extras:
        body["x"] = extras
    return json.dumps(body, separators=(",", ":"))


def decode(payload: str, seq: int = 0) -> tuple[list[Update], frozenset[str], list[dict[str, Any]]]:
    """The updates carry ``seq``, the number of the logged change they came in."""
    body = json.loads(payload)
    updates = [Update(*item) if len(item) > 5 else Update(*item, seq) for item in body.get("u", [])]
    for u, active in zip(updates, body.get("a", ())):
        u.last_active = active
    return updates, frozenset(body.get("q", [])), body.get("x", [])
