"""Long random secrets (API and verification keys) and how API keys are kept: hashed, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_LENGTH = 1024  # the design asks for 1024-character keys


def new_key(length: int = KEY_LENGTH) -> str:
    """A URL-safe random string of exactly ``length`` characters."""
    return secrets.token_urlsafe(length)[:length]


def new_id(nbytes: int = 12) -> str:
    """A short random identifier (application ids, per-application user ids, session ids)."""
    return secrets.token_urlsafe(nbytes)


def hash_key(key: str) -> str:
    # A 1024-character random key has far more entropy than any password; a fast hash is enough.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(key: str, key_hash: str | None) -> bool:
    if not key_hash:
        return False
    return hmac.compare_digest(hash_key(key), key_hash)
