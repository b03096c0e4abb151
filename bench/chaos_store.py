"""The chaos checker's two conversations with the store, each in a child process:

    python -m bench.chaos_store seed DATABASE PLAN.json    # applications, keys, grants -> JSON
    python -m bench.chaos_store truth DATABASE QUERY.json  # what the store says now -> JSON

A child process, like bench.node's seeding, because presence's store API runs on a Twisted reactor
while the checker runs on asyncio, and so that it uses the same presence sources as the nodes.
`truth` only reads, through the public store API (list_devices, get_status, views.view,
pending_notifications), so what it reports is what the nodes themselves would read.
"""

from __future__ import annotations

import json
import sys
import time

from bench import common


async def _seed(reactor, database: str, plan: dict) -> dict:
    """Register, verify and activate each application and add its grants, as the pages would."""
    from presence.apps import Applications
    from presence.store import open_store

    store = open_store(database, reactor=reactor)
    await store.open()  # creates the schema once, before several nodes race for it
    apps = Applications(store, reactor)
    out = {}
    try:
        for name, emails in plan["apps"].items():
            app = await apps.register("chaos@chaos.test", f"{name}.chaos.test", name, "")
            app = await apps.mark_verified(app)
            uids = {email: (await apps.grant(email, app.app_id)).uid for email in emails}
            app, key = await apps.activate(app)
            out[name] = {"app_id": app.app_id, "key": key, "uids": uids}
    finally:
        await store.close()
    return out


async def _truth(reactor, database: str, query: dict) -> dict:
    """Devices, stored statuses, each application's view and the waiting notifications of everyone
    the checker knows."""
    from presence.store import open_store
    from presence.views import view

    store = open_store(database, reactor=reactor)
    await store.open()
    try:
        devices, status, views, waiting = {}, {}, {}, {}
        for email in query["people"]:
            rows = await store.list_devices(email)
            devices[email] = [{"device": d.device, "node": d.node, "status": d.status} for d in rows]
            stored = await store.get_status(email)
            status[email] = stored.status if stored else None
            waiting[email] = [{"id": n.id, "message": n.message}
                              for n in await store.pending_notifications(email, time.time() - 10 * 86400)]
            for app_id in query["grants"].get(email, []):
                views.setdefault(app_id, {})[email] = view(rows, app_id)
        debug = await _debug(store) if query.get("debug") else None
    finally:
        await store.close()
    return {"devices": devices, "status": status, "views": views, "waiting": waiting, "debug": debug}


async def _debug(store) -> dict:
    """For --keep: the end of the change log, the registry, subscriptions and the waiting queue, to
    read a violation's story."""
    from presence import changelog

    last = await store.last_change()
    log = []
    for change in await store.changes_since(max(0, last - 400), 1000):
        updates, queued, extras = changelog.decode(change.payload, change.seq)
        log.append({"seq": change.seq, "first": change.first, "origin": change.origin,
                    "u": [[u.app_id, u.email, u.status, u.seq] for u in updates], "q": sorted(queued),
                    "x": [sorted(x) for x in extras]})
    nodes = await store._query("SELECT name, label, heartbeat_at, last_applied FROM nodes ORDER BY name")
    subscriptions = await store._query("SELECT node, app_id FROM subscriptions ORDER BY node, app_id")
    pending = await store._query("SELECT app_id, email, status, seq FROM pending ORDER BY app_id, email")
    return {"log": log, "nodes": [list(r) for r in nodes], "subscriptions": [list(r) for r in subscriptions],
            "pending": [list(r) for r in pending]}


def main(argv: list[str]) -> None:
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    if len(argv) != 3 or argv[0] not in ("seed", "truth"):
        sys.exit("usage: python -m bench.chaos_store seed|truth DATABASE FILE.json")
    command, database, path = argv
    with open(path) as f:
        arg = json.load(f)
    work = _seed if command == "seed" else _truth

    async def run(reactor) -> None:
        print(json.dumps(await work(reactor, database, arg)))

    react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    common.die_with_parent()
    main(sys.argv[1:])
