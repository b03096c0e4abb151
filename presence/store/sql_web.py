"""The queries of the web pages (schema v4), written once for both SQL backends.

A mixin of SQLStore (see presence/store/sql.py for the primitives ``_query``, ``_execute`` and
``_transaction``), kept apart so the pages' tables do not crowd the core's queries.
"""

from __future__ import annotations

from presence.store.base import LoginLink, Verification, WebSession

VERIFICATION_COLUMNS = "app, node, attempts, last_error, checked_at, next_at, poll_until"


def _verification(row: tuple) -> Verification:
    app, node, attempts, last_error, checked_at, next_at, poll_until = row
    return Verification(int(app), node, int(attempts), last_error, float(checked_at),
                        None if next_at is None else float(next_at), float(poll_until))


class WebQueries:
    # -- one-time login links ------------------------------------------------------------------
    async def add_login_token(self, token_hash: str, email: str, next_path: str, now: float,
                              expires_at: float) -> None:
        await self._execute(
            "INSERT INTO login_tokens (token_hash, email, next_path, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
            (token_hash, email, next_path, now, expires_at))

    async def take_login_token(self, token_hash: str, now: float) -> LoginLink | None:
        # One DELETE: of two nodes handling the same link at once, only one gets the row.
        rows = await self._query(
            "DELETE FROM login_tokens WHERE token_hash = ? RETURNING email, next_path, created_at, expires_at",
            (token_hash,))
        if not rows:
            return None
        email, next_path, created_at, expires_at = rows[0]
        if float(expires_at) <= now:
            return None
        return LoginLink(email, next_path, float(created_at), float(expires_at))

    async def count_login_tokens(self, email: str, since: float) -> int:
        rows = await self._query(
            "SELECT COUNT(*) FROM login_tokens WHERE email = ? AND created_at >= ?", (email, since))
        return int(rows[0][0])

    # -- sessions --------------------------------------------------------------------------------
    async def add_session(self, id_hash: str, email: str, now: float, expires_at: float) -> None:
        await self._execute(
            "INSERT INTO web_sessions (id_hash, email, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (id_hash, email, now, expires_at))

    async def get_session(self, id_hash: str, now: float) -> WebSession | None:
        rows = await self._query(
            "SELECT email, created_at, expires_at FROM web_sessions WHERE id_hash = ? AND expires_at > ?",
            (id_hash, now))
        return WebSession(rows[0][0], float(rows[0][1]), float(rows[0][2])) if rows else None

    async def delete_session(self, id_hash: str) -> None:
        await self._execute("DELETE FROM web_sessions WHERE id_hash = ?", (id_hash,))

    async def expire_web(self, now: float) -> int:
        def interaction():
            sessions = yield "DELETE FROM web_sessions WHERE expires_at <= ? RETURNING 1", (now,)
            links = yield "DELETE FROM login_tokens WHERE expires_at <= ? RETURNING 1", (now,)
            # requests past their lifetime, decided or not (an approved one the device never took: its
            # paired device stays listed on /me, to revoke)
            pairings = yield ("DELETE FROM pairing_requests WHERE expires_at <= ? RETURNING 1", (now,))
            return len(sessions) + len(links) + len(pairings)

        return await self._transaction(interaction())

    # -- secrets shared by every node --------------------------------------------------------------
    async def web_secret(self, name: str, candidate: str, now: float) -> str:
        def interaction():
            yield ("INSERT INTO web_secrets (name, value, created_at) VALUES (?, ?, ?)"
                   " ON CONFLICT (name) DO NOTHING", (name, candidate, now))
            rows = yield "SELECT value FROM web_secrets WHERE name = ?", (name,)
            return rows[0][0]

        return await self._transaction(interaction())

    async def replace_web_secret(self, name: str, old: str, new: str) -> bool:
        """Store ``new`` for ``name`` if it still holds ``old`` (a compare-and-swap); whether it did."""
        rows = await self._query("UPDATE web_secrets SET value = ? WHERE name = ? AND value = ? RETURNING 1",
                                 (new, name, old))
        return bool(rows)

    # -- domain verification polling -----------------------------------------------------------------
    async def save_verification(self, v: Verification) -> None:
        await self._execute(
            f"INSERT INTO verifications ({VERIFICATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (app) DO UPDATE SET node = excluded.node, attempts = excluded.attempts,"
            " last_error = excluded.last_error, checked_at = excluded.checked_at, next_at = excluded.next_at,"
            " poll_until = excluded.poll_until",
            (v.app, v.node, v.attempts, v.last_error, v.checked_at, v.next_at, v.poll_until))

    async def get_verification(self, app: int) -> Verification | None:
        rows = await self._query(f"SELECT {VERIFICATION_COLUMNS} FROM verifications WHERE app = ?", (app,))
        return _verification(rows[0]) if rows else None

    async def list_verifications(self, node: str) -> list[Verification]:
        rows = await self._query(
            f"SELECT {VERIFICATION_COLUMNS} FROM verifications WHERE node = ? AND next_at IS NOT NULL ORDER BY app",
            (node,))
        return [_verification(row) for row in rows]

    async def delete_verification(self, app: int) -> None:
        await self._execute("DELETE FROM verifications WHERE app = ?", (app,))
