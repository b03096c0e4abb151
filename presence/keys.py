"""Long random secrets (API and verification keys) and how API keys are kept: hashed, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

KEY_LENGTH = 1024  # the design asks for 1024-character keys


def new_key(length: int = KEY_LENGTH) -> str:
    """A URL-safe random string of exactly ``length`` characters."""
    return secrets.token_urlsafe(length)[:length]


_ALNUM = string.ascii_letters + string.digits


def new_id(length: int = 22) -> str:
    """A random identifier (application ids, per-application user ids, session ids): letters and
    digits only (~131 bits), so it never starts with a dash on a command line or needs escaping."""
    # 64 random bits more than needed, written in base 62 (one call to secrets, not one per character: a device
    # connect makes two ids); the digits are uniform to within 2**-58.
    n = int.from_bytes(secrets.token_bytes(length * 6 // 8 + 8), "big")
    out = []
    for _ in range(length):
        n, digit = divmod(n, 62)
        out.append(_ALNUM[digit])
    return "".join(out)


def hash_key(key: str) -> str:
    # A 1024-character random key has far more entropy than any password; a fast hash is enough.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(key: str, key_hash: str | None) -> bool:
    if not key_hash:
        return False
    return hmac.compare_digest(hash_key(key), key_hash)
