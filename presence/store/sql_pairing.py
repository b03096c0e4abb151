"""Pairing devices that have no browser (schema v7), written once for both SQL backends. A mixin of
SQLStore.

A request is one row from the device's first call until it takes the answer: the person's decision
is an UPDATE of a pending, unexpired row, and taking the answer is a DELETE, so each happens once
on any node. Approving also makes the paired device's row, in the same transaction.
"""

from __future__ import annotations

from presence.store.base import PairedDevice, PairingAnswer, PairingRequest

PAIRED_COLUMNS = "id, email, name, public_key, created_at, last_seen"


def _paired(row: tuple) -> PairedDevice:
    id, email, name, public_key, created_at, last_seen = row
    return PairedDevice(id, email, name, public_key, float(created_at),
                        None if last_seen is None else float(last_seen))


class PairingQueries:
    async def add_pairing_request(self, device_hash: str, user_hash: str, public_key: str, name: str,
                                  now: float, expires_at: float) -> None:
        await self._execute(
            "INSERT INTO pairing_requests (device_hash, user_hash, public_key, name, created_at, expires_at, polled_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (device_hash, user_hash, public_key, name, now, expires_at, now))

    async def get_pairing_request(self, user_hash: str, now: float) -> PairingRequest | None:
        rows = await self._query(
            "SELECT name, created_at, expires_at FROM pairing_requests"
            " WHERE user_hash = ? AND state = 'pending' AND expires_at > ?", (user_hash, now))
        return PairingRequest(rows[0][0], float(rows[0][1]), float(rows[0][2])) if rows else None

    async def decide_pairing(self, user_hash: str, now: float, email: str, name: str | None,
                             pairing_id: str) -> str:
        """Approve (``name`` given) or deny a pending request: "approved", "denied", "taken" (the person
        already has a device of that name) or "gone" (no such pending request, or expired)."""
        def interaction():
            if name is None:
                rows = yield ("UPDATE pairing_requests SET state = 'denied', email = ?"
                              " WHERE user_hash = ? AND state = 'pending' AND expires_at > ? RETURNING 1",
                              (email, user_hash, now))
                return "denied" if rows else "gone"
            rows = yield ("SELECT public_key FROM pairing_requests"
                          " WHERE user_hash = ? AND state = 'pending' AND expires_at > ?", (user_hash, now))
            if not rows:
                return "gone"
            # The name first: of two approvals racing for one name, the unique index lets one in and
            # the other changes nothing (no error, no request approved without its device).
            added = yield (f"INSERT INTO paired_devices ({PAIRED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
                           " ON CONFLICT (email, name) DO NOTHING RETURNING id",
                           (pairing_id, email, name, rows[0][0], now, None))
            if not added:
                return "taken"
            decided = yield ("UPDATE pairing_requests SET state = 'approved', email = ?, pairing = ?"
                             " WHERE user_hash = ? AND state = 'pending' RETURNING 1", (email, pairing_id, user_hash))
            if not decided:   # decided meanwhile by another request of the person's
                yield "DELETE FROM paired_devices WHERE id = ?", (pairing_id,)
                return "gone"
            return "approved"

        return await self._transaction(interaction())

    async def poll_pairing(self, device_hash: str, now: float, interval: float) -> PairingAnswer:
        """The device's poll: its state, and once decided the answer, taken once (the row goes)."""
        def interaction():
            rows = yield ("SELECT state, email, pairing, polled_at, expires_at FROM pairing_requests"
                          " WHERE device_hash = ?", (device_hash,))
            if not rows:
                return PairingAnswer("expired_token")
            state, email, pairing, polled_at, expires_at = rows[0]
            if float(expires_at) <= now and state != "approved":
                # only if still undecided: an approval racing it (another node's clock) wins
                gone = yield ("DELETE FROM pairing_requests WHERE device_hash = ? AND state <> 'approved' RETURNING 1",
                              (device_hash,))
                return PairingAnswer("expired_token" if gone else "authorization_pending")
            if state == "pending":
                yield "UPDATE pairing_requests SET polled_at = ? WHERE device_hash = ?", (now, device_hash)
                # a little slack: a device that waits exactly the interval is not too fast
                too_soon = now - float(polled_at) < interval * 0.8
                return PairingAnswer("slow_down" if too_soon else "authorization_pending")
            taken = yield "DELETE FROM pairing_requests WHERE device_hash = ? RETURNING 1", (device_hash,)
            if not taken:
                return PairingAnswer("expired_token")
            if state == "denied":
                return PairingAnswer("access_denied")
            rows = yield f"SELECT {PAIRED_COLUMNS} FROM paired_devices WHERE id = ?", (pairing,)
            if not rows:   # revoked before the device took it
                return PairingAnswer("access_denied")
            return PairingAnswer("approved", _paired(rows[0]))

        return await self._transaction(interaction())

    async def add_paired_device(self, pairing_id: str, email: str, name: str, public_key: str,
                                now: float) -> PairedDevice | None:
        """A device paired directly (a browser the person approved in the pairing popup): None if the
        person already has a device of that name (the unique index decides, on any node)."""
        rows = await self._query(
            f"INSERT INTO paired_devices ({PAIRED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
            f" ON CONFLICT (email, name) DO NOTHING RETURNING {PAIRED_COLUMNS}",
            (pairing_id, email, name, public_key, now, None))
        return _paired(rows[0]) if rows else None

    async def touch_paired_device(self, pairing_id: str, email: str, now: float) -> PairedDevice | None:
        """Note that the device was seen; None if it is not (or no longer) paired to ``email``."""
        rows = await self._query(
            f"UPDATE paired_devices SET last_seen = ? WHERE id = ? AND email = ? RETURNING {PAIRED_COLUMNS}",
            (now, pairing_id, email))
        return _paired(rows[0]) if rows else None

    async def list_paired_devices(self, email: str) -> list[PairedDevice]:
        rows = await self._query(
            f"SELECT {PAIRED_COLUMNS} FROM paired_devices WHERE email = ? ORDER BY created_at, id", (email,))
        return [_paired(row) for row in rows]

    async def revoke_paired_device(self, email: str, pairing_id: str, origin: str = "", now: float = 0.0,
                                   payload: str | None = None) -> PairedDevice | None:
        """Delete the pairing and, in the same transaction, log ``payload`` (what closes the device's
        connection on every node): revoked everywhere, or not at all."""
        def interaction():
            rows = yield (f"DELETE FROM paired_devices WHERE id = ? AND email = ? RETURNING {PAIRED_COLUMNS}",
                          (pairing_id, email))
            if not rows:
                return None
            if payload is not None:
                yield from self._log(origin, now, payload)
            return _paired(rows[0])

        return await self._transaction(interaction())
