"""The node's log: twisted.logger events, each important one with a stable ``event`` name, and the
``--log-json`` observer that writes every event as one JSON object per line.

Events carry their values as fields (``node``, ``app_id``, ``errno``, ``why``, ...), so a JSON line can
be filtered on ``event`` and read without parsing the message. No event carries a secret: API keys,
verification keys, assertions and certificates are never passed to a log call (tests/test_logs.py
checks the log of a full flow).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import ILogObserver, globalLogPublisher, jsonFileLogObserver

# The stable event names, for operators' filters and alerts (docs/operations.md lists them too).
EVENTS: dict[str, str] = {
    "node.ready": "the node serves: store open, listeners up (fields: node, web, ws, public_url, public_ws_url)",
    "node.public_url_unreachable": "a public URL on this machine names a port (or TLS) no listener of the node has: sign-in and devices would fail (option, problem, fix)",
    "node.stopping": "a clean stop began (SIGTERM/SIGINT)",
    "node.stopped": "the clean stop finished; the store is closed",
    "node.start_failed": "the node could not start (a traceback follows)",
    "node.exit_failed": "after node.start_failed, twistd's node stops and exits with status 1 (a supervisor restarts it)",
    "node.recovered": "people marked offline at start whose devices were here when the node last crashed (n)",
    "store.unavailable": "the store cannot be opened at start; retrying (why, delay)",
    "store.connection_lost": "the PostgreSQL connection dropped; the next call reconnects (where)",
    "store.migrated": "a schema upgrade was applied (name, current, target)",
    "store.write_failed": "a write to the waiting queue failed (what)",
    "pending.expired": "waiting updates older than --pending-ttl were dropped (n, ttl)",
    "pending.expire_failed": "the waiting queue could not be expired (why)",
    "pending.store_failed": "waiting updates could not be stored; kept in memory and retried (n, app_id)",
    "pending.lost_at_stop": "the node stopped with waiting updates the store did not take (n)",
    "application.connected": "an application authenticated with its API key (with --log-connections; app_id)",
    "application.refused": "an application's authentication was refused (errno, message)",
    "application.auth_timeout": "an application connection did not authenticate in time (timeout)",
    "application.too_slow": "a slow application connection was closed with 4005 (app_id, why)",
    "pair.certified": "a paired device took its certificate after the person approved it (email, device)",
    "pair.approved": "a person approved a device's pairing code on /me/pair (email, name)",
    "pair.denied": "a person denied a device's pairing code (email)",
    "pair.browser": "a person let a page of another origin pair this browser as a device, in the node's popup (email, name, origin)",
    "pair.revoked": "a person revoked a paired device on /me; its connection closes on every node (email, name)",
    "device.connected": "a device proved its owner's email (with --log-connections; email, device)",
    "device.refused": "a device's assertion was refused (errno, message)",
    "device.auth_timeout": "a device connection did not authenticate in time (timeout)",
    "device.offline_retry": "a dropped device could not be marked offline; retrying (email, why, delay)",
    "device.offline_failed": "marking a dropped device offline failed unexpectedly (traceback)",
    "session.store_unavailable": "a websocket message could not be handled: the store is unavailable (why)",
    "session.error": "unexpected error while handling a websocket message (traceback)",
    "hub.stop_failed": "this node's devices could not be marked offline while stopping (why)",
    "bus.apply_failed": "a change from the log could not be applied (seq)",
    "bus.read_failed": "the change log could not be read; the next poll retries (why)",
    "bus.listen_failed": "LISTEN on the change channel failed; retrying (why, delay)",
    "bus.lost": "the change-log listener dropped; reconnecting (delay)",
    "cluster.heartbeat_failed": "this node's heartbeat could not be written (why)",
    "cluster.reaped": "this node cleaned up after a dead node or an earlier incarnation of its own (dead, people,"
                      " apps, missed)",
    "cluster.taken_for_dead": "another node took this one for dead, or it missed changes for good: closing"
                              " everything and rejoining (why, node)",
    "cluster.rejoined": "rejoined as a new incarnation (incarnation)",
    "cluster.rejoin_failed": "rejoining failed (the store); the next heartbeat tries again (why)",
    "bus.gap": "the change log was trimmed past what this node read (first, last)",
    "secrets.key_created": "the key that encrypts secrets at rest was made (path): copy it to every node sharing"
                           " the database",
    "cluster.leave_failed": "the node could not leave the registry at stop (why)",
    "identity.support_unavailable": "an issuer's support document could not be fetched (domain, error)",
    "systemd.notify_failed": "$NOTIFY_SOCKET could not be written to (address, why)",
}


def open_json_log(path: str) -> IO[str]:
    """The file ``--log-json`` names, opened for appending; ``-`` is standard output."""
    if path == "-":
        return sys.stdout
    return open(path, "a", encoding="utf-8", buffering=1)


def json_observer(out: IO[str]) -> ILogObserver:
    """Every event as one JSON object and a newline (JSON lines, not RFC 7464's record separators)."""
    return jsonFileLogObserver(out, recordSeparator="")


def start_json_log(path: str, publisher: Any = globalLogPublisher) -> ILogObserver:
    """Add a JSON-lines observer for ``path`` to the global log publisher (``--log-json``)."""
    try:
        out = open_json_log(path)
    except OSError as e:
        raise SystemExit(f"presence: --log-json: cannot open {path}: {e.strerror}")
    observer = json_observer(out)
    publisher.addObserver(observer)
    return observer
