"""A paired device's credentials: its key, its certificate, and where its node is.

Kept in one JSON file of mode 0600 (it holds the private key), written atomically so that a crash
while renewing never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from presence_client import jws

# A device renews its certificate once less than this part of its lifetime is left.
RENEW_WHEN_LEFT = 1 / 3


def derive_ws_url(http_url: str) -> str:
    """The websocket listener next to a web listener as nodes start by default (8080 and 8081):
    same host, the next port. Give the URL explicitly when the node is set up otherwise."""
    parts = urlsplit(http_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{parts.port + 1}" if parts.port else f"{scheme}://{host}"


@dataclass
class Credentials:
    """What a device needs to connect: the certified key, the audience its assertions name (the
    node's public URL), the web URL it renews at and the websocket URL it connects to."""

    email: str
    device: str
    certificate: str
    key_pem: str
    audience: str
    http_url: str
    ws_url: str
    pairing: str | None = None
    expires: int | None = None   # ms, as the node gave it
    _key: rsa.RSAPrivateKey | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            self._key = jws.key_from_pem(self.key_pem)
        return self._key

    def assertion(self, now: float | None = None) -> str:
        """A fresh backed assertion for the node's public URL (one per connection)."""
        return jws.make_assertion(self.certificate, self.key, self.audience, now)

    def lifetime(self) -> tuple[float, float]:
        """(issued, expires) of the certificate, in seconds since the epoch."""
        payload = jws.unverified_payload(self.certificate)
        return payload["iat"] / 1000, payload["exp"] / 1000

    def renew_at(self) -> float:
        """When less than a third of the certificate's lifetime is left."""
        issued, expires = self.lifetime()
        return expires - (expires - issued) * RENEW_WHEN_LEFT

    def renewal_due(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.renew_at()

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.lifetime()[1]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_key")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Credentials:
        fields = {k: data[k] for k in ("email", "device", "certificate", "key_pem", "audience", "http_url", "ws_url")}
        return cls(**fields, pairing=data.get("pairing"), expires=data.get("expires"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to `path` (mode 0600) through a temporary file in the same directory."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Credentials:
        with open(path) as f:
            return cls.from_json(json.load(f))
