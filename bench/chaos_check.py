"""The invariants of issue 13, checked on plain data: what the clients were told (a Record), which
devices are live with which last status answered OK, who granted what, and the store's truth (from
bench.chaos_store truth). Pure functions, so the checker's own logic is tested without nodes.

    (a) every connected application's last received status of every person who granted it equals
        the store's truth (a person it never heard of counts as offline);
    (b) nobody is online without a live device: every device row is a live device with the last
        status it was answered OK for, and each stored status is the most available of those;
    (c) every status change answered OK reached the application: its last received status is the
        one the live devices' last OK-answered statuses make (what (a) and (b) together promise);
    (d) every notification answered OK reaches every live device of its person unless acknowledged
        (it waits in the store until then); one only ever answered errno 50 reaches nobody;
    (e) duplicates carry the same id: one text under more ids than it had stored attempts, or two
        updates with the same seq and different content, is a violation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

RANK = {"offline": 0, "unavailable": 1, "online": 2}


def most_available(statuses: Iterable[str]) -> str:
    return max(statuses, key=RANK.__getitem__, default="offline")


def last_received(updates: list[dict]) -> dict[tuple[str, str], str]:
    """(app_id, email) -> the status the application believes: the update with the highest seq when
    updates carry one, otherwise the last to arrive (over all of the application's connections)."""
    best: dict[tuple[str, str], tuple] = {}
    for u in updates:
        order = (u["seq"], u["n"]) if u.get("seq") is not None else (-1, u["n"])
        key = (u["app"], u["email"])
        if key not in best or order > best[key][0]:
            best[key] = (order, u["status"])
    return {key: status for key, (_, status) in best.items()}


def violation(inv: str, key: str, detail: str) -> dict:
    return {"invariant": inv, "key": f"{inv}:{key}", "detail": detail}


def check(record, live: dict[str, str], grants: dict[str, list[str]], truth: dict) -> list[dict]:
    """Every violation of (a)-(e). `live`: device key ("email/name") -> its last status answered OK
    (offline if none); `grants`: app_id -> the emails that granted it."""
    out: list[dict] = []
    believed = last_received(record.updates)
    model: dict[str, str] = {}
    by_person: dict[str, list[str]] = defaultdict(list)
    for key, status in live.items():
        by_person[key.split("/", 1)[0]].append(status)
    people = set(truth["devices"]) | set(by_person)
    for email in people:
        model[email] = most_available(by_person.get(email, []))

    for app_id, emails in grants.items():
        for email in emails:
            told = believed.get((app_id, email), "offline")
            stored = truth["views"].get(app_id, {}).get(email, "offline")
            if told != stored:  # (a)
                out.append(violation("a", f"{app_id}/{email}", f"application {app_id} believes {email} is {told}, "
                                                               f"the store says {stored}"))
            if told != model[email]:  # (c)
                out.append(violation("c", f"{app_id}/{email}", f"application {app_id} believes {email} is {told}; "
                                                               f"the live devices' last OK statuses make "
                                                               f"{model[email]}"))

    for email in people:  # (b)
        rows = {f"{email}/{r['device']}": r for r in truth["devices"].get(email, [])}
        for key, row in rows.items():
            if key not in live:
                out.append(violation("b", key, f"device {key} is in the store ({row['status']} on node "
                                               f"{row['node']}) but has no live connection"))
            elif row["status"] != live[key]:
                out.append(violation("b", key, f"device {key} is {row['status']} in the store, its last status "
                                               f"answered OK is {live[key]}"))
        stored = truth["status"].get(email) or "offline"
        if stored != model[email]:
            out.append(violation("b", email, f"{email} is {stored} in the store; the live devices' last OK "
                                             f"statuses make {model[email]}"))

    out += check_notifications(record, live, truth)
    seqs: dict[tuple, set] = defaultdict(set)
    for u in record.updates:  # (e) for updates
        if u.get("seq") is not None:
            seqs[(u["app"], u["seq"], u["email"])].add(u["status"])
    for (app_id, seq, email), statuses in seqs.items():
        if len(statuses) > 1:
            out.append(violation("e", f"{app_id}/seq{seq}/{email}",
                                 f"application {app_id} got seq {seq} of {email} as {sorted(statuses)}"))
    return out


def check_notifications(record, live: dict[str, str], truth: dict) -> list[dict]:
    out: list[dict] = []
    got: dict[str, set[str]] = defaultdict(set)     # text -> devices that received it
    ids: dict[str, set[int]] = defaultdict(set)     # text -> ids it was seen under
    for r in record.received:
        got[r["message"]].add(r["device"])
        ids[r["message"]].add(r["id"])
    waiting: set[str] = set()
    for items in truth.get("waiting", {}).values():
        for n in items:
            waiting.add(n["message"])
            ids[n["message"]].add(n["id"])
    # lost, or answered errno 50 after every retry: it may have been applied (the commit's answer
    # was lost with the database), so the notification may be gone for every device
    acked = {i for i, outcome in record.acks.items() if outcome in ("ok", "lost", "maybe")}
    for text, sent in record.sent.items():
        attempts = sent["attempts"]
        stored_at_most = sum(a in ("ok", "lost") for a in attempts)
        if len(ids[text]) > max(stored_at_most, 1):
            out.append(violation("e", text, f"notification {text!r} came under ids {sorted(ids[text])} "
                                            f"from {stored_at_most} attempt(s) that may have stored it"))
        if "ok" in attempts:
            if ids[text] & acked:
                continue  # acknowledged: removed for every device
            if text not in waiting:
                out.append(violation("d", text, f"notification {text!r} (answered OK) is neither acknowledged "
                                                f"nor waiting in the store"))
            for key in live:
                if key.split("/", 1)[0] == sent["email"] and key not in got[text]:
                    out.append(violation("d", f"{text}@{key}", f"notification {text!r} (answered OK) never "
                                                               f"reached live device {key}"))
        elif "lost" not in attempts and (got[text] or text in waiting):
            where = "received by " + ", ".join(sorted(got[text])) if got[text] else "waiting in the store"
            out.append(violation("d", text, f"notification {text!r} was only ever answered "
                                            f"{'/'.join(sorted(set(attempts)))}, yet it was {where}"))
    return out
