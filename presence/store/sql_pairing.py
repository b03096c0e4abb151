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
            if name is not None:
                taken = yield "SELECT 1 FROM paired_devices WHERE email = ? AND name = ?", (email, name)
                if taken:
                    return "taken"
            rows = yield ("UPDATE pairing_requests SET state = ?, email = ?, pairing = ?"
                          " WHERE user_hash = ? AND state = 'pending' AND expires_at > ? RETURNING public_key",
                          ("approved" if name is not None else "denied", email,
                           pairing_id if name is not None else None, user_hash, now))
            if not rows:
                return "gone"
            if name is None:
                return "denied"
            yield (f"INSERT INTO paired_devices ({PAIRED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                   (pairing_id, email, name, rows[0][0], now, None))
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
                yield "DELETE FROM pairing_requests WHERE device_hash = ?", (device_hash,)
                return PairingAnswer("expired_token")
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

    async def revoke_paired_device(self, email: str, pairing_id: str) -> PairedDevice | None:
        rows = await self._query(
            f"DELETE FROM paired_devices WHERE id = ? AND email = ? RETURNING {PAIRED_COLUMNS}", (pairing_id, email))
        return _paired(rows[0]) if rows else None
