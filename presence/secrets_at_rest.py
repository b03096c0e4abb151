"""Secrets at rest: what the database keeps of the node's own secrets is encrypted with a key it does
not hold.

The identity provider's signing key and the cookie secret are shared by every node through the
database (table ``web_secrets``), unless files are given for them. Whoever reads the database (a
backup, a replica, a dump) must not be able to certify any email or forge a session, so the values
are stored as ``fernet:<token>``: Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) under a
key kept in a file beside the node's state, never in the database:

- ``--secrets-key-file`` names it; empty (the default): ``<the SQLite file>.key`` for ``sqlite:PATH``,
  ``presence-secrets.key`` in the working directory for PostgreSQL (copy it to every node sharing the
  database, and back it up apart from the database);
- made at first start (32 random bytes from ``secrets``, base64) with mode 0600 if missing;
- a value found in clear (from a version before this one) is read once and stored again encrypted,
  with a compare-and-swap so two nodes starting together agree;
- a value that does not open with this key stops the node at start with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from twisted.logger import Logger

log = Logger()

PREFIX = "fernet:"
DEFAULT_SHARED = "presence-secrets.key"


class SecretsKeyError(Exception):
    """The key file is unusable, or the database's secrets do not open with it."""


def key_path(config: Any, store: Any = None) -> str | None:
    """Where the key lives for this configuration (None: no file, an in-memory database). Beside the
    SQLite file of ``store`` (or of --database)."""
    if config.secrets_key_file:
        return config.secrets_key_file
    database = config.database
    if getattr(store, "path", None) is not None:
        database = f"sqlite:{store.path}"
    if database.startswith("sqlite:"):
        path = database[len("sqlite:"):]
        if path == ":memory:" or path.startswith("file:"):
            return None
        return os.path.abspath(path) + ".key"
    return os.path.abspath(DEFAULT_SHARED)


class SecretBox:
    """Encrypts and decrypts the database's copies of the node's secrets."""

    def __init__(self, key: bytes, where: str = "the secrets key"):
        try:
            self._fernet = Fernet(key)
        except (ValueError, binascii.Error, TypeError):
            raise SecretsKeyError(f"{where}: not a secrets key (32 bytes, url-safe base64)") from None
        self.where = where

    @classmethod
    def generate(cls) -> SecretBox:
        return cls(base64.urlsafe_b64encode(secrets.token_bytes(32)), "a key in memory")

    @classmethod
    def from_config(cls, config: Any, store: Any = None) -> SecretBox:
        """The key of --secrets-key-file (or its default place), made there with mode 0600 if missing."""
        path = key_path(config, store)
        if path is None:
            return cls.generate()
        if not os.path.exists(path):
            # Written whole under another name, then linked into place (which fails if it exists): a
            # node starting beside this one reads no key or the whole key, never half of one.
            key = base64.urlsafe_b64encode(secrets.token_bytes(32))
            draft = f"{path}.{secrets.token_hex(8)}.tmp"
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key + b"\n")
            try:
                os.link(draft, path)
            except FileExistsError:   # another node on this machine made it meanwhile
                pass
            else:
                log.info("made a new secrets key in {path}: back it up apart from the database, and copy it to"
                         " every node sharing the database", path=path, event="secrets.key_created")
            finally:
                os.unlink(draft)
        try:
            with open(path, "rb") as f:
                return cls(f.read().strip(), path)
        except OSError as e:
            raise SecretsKeyError(f"cannot read the secrets key {path}: {e.strerror}") from None

    @staticmethod
    def sealed(value: str) -> bool:
        return value.startswith(PREFIX)

    def seal(self, text: str) -> str:
        return PREFIX + self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, value: str, name: str) -> str:
        try:
            return self._fernet.decrypt(value[len(PREFIX):].encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError):
            raise SecretsKeyError(
                f"the database's {name} was encrypted with another key than {self.where}: give every node"
                " sharing the database the same --secrets-key-file (copy it from the node that made it)") from None


async def shared_secret(store: Any, box: SecretBox, name: str, make: Any, now: float) -> str:
    """The secret ``name`` shared through the database: made by ``make()`` (and stored encrypted) if
    absent; stored again encrypted if found in clear; decrypted."""
    stored = await store.web_secret(name, box.seal(make()), now)
    if box.sealed(stored):
        return box.open(stored, name)
    sealed = box.seal(stored)
    if await store.replace_web_secret(name, stored, sealed):
        log.info("encrypted the database's {name}, stored in clear by an earlier version", name=name,
                 event="secrets.migrated")
        return stored
    # Another node replaced it first: read what it stored.
    again = await store.web_secret(name, sealed, now)
    return box.open(again, name) if box.sealed(again) else again
