"""The change log's payload: what one logged change carries from its node to the others.

JSON, compact: ``{"g": [[email, status, at, seq, [app_id, ...], [uid, ...](, last_active)], ...],
"q": [queued app ids], "x": [{...extra}, ...]}``: the updates of one person's change share everything but the
application and its uid, so they are written once per change, not once per application (a person
who granted 19,000 applications made a 2 MB entry that cost more to encode than to commit). ``seq``
is 0 when the updates carry the logged change's own number; ``last_active`` (when a device of the
person was last online) is left out when unknown. Entries written before this form
(``"u": [[app_id, email, uid, status, at(, seq)], ...]``) are still read. Extras carry events that
are not status changes, such as a device taken over by another node (``{"takeover": [email,
device, session]}``); a batch of changes has several.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from presence.views import Update


def encode(updates: Iterable[Update], queued: Iterable[str] = (),
           extras: Iterable[Mapping[str, Any]] = (), keep_seq: bool = False) -> str:
    """``keep_seq``: each update keeps its own number (a replay of older changes, which must not
    look newer than what came after them); otherwise they carry the logged change's number."""
    groups: dict[tuple, tuple[list[str], list[str]]] = {}
    for u in updates:
        key = (u.email, u.status, u.at, u.seq if keep_seq else 0, u.last_active)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [])
        group[0].append(u.app_id)
        group[1].append(u.uid)
    body: dict[str, Any] = {"g": [[*key[:4], app_ids, uids] + ([] if key[4] is None else [key[4]])
                                  for key, (app_ids, uids) in groups.items()]}
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
    updates = [Update(app_id, email, uid, status, at, own or seq, active[0] if active else None)
               for email, status, at, own, app_ids, uids, *active in body.get("g", ())
               for app_id, uid in zip(app_ids, uids)]
    updates += [Update(*item) if len(item) > 5 else Update(*item, seq) for item in body.get("u", ())]
    return updates, frozenset(body.get("q", [])), body.get("x", [])
