"""The little of JWS and BrowserID a device needs: RS256 signing, keys in the `{"algorithm": "RS"}`
form, and backed assertions `<certificate>~<assertion>`.

Reimplemented here (with `cryptography`) so that the client never imports the server package.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ALGORITHM = "RS256"
# Nodes refuse smaller keys; an assertion is valid for two minutes, as browsers make them.
KEY_BITS = 2048
ASSERTION_LIFETIME = 120.0


def b64url_encode(data: bytes) -> str:
    """base64url without padding, as JWS wants."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """base64url, padded or not."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key(bits: int = KEY_BITS) -> rsa.RSAPrivateKey:
    """A fresh RSA key pair for a device."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_key_json(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> dict[str, str]:
    """The public half in BrowserID's form: decimal strings, which is what `/pair` and
    `/login/certify` expect."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    numbers = public.public_numbers()
    return {"algorithm": "RS", "n": str(numbers.n), "e": str(numbers.e)}


def key_to_pem(key: rsa.RSAPrivateKey) -> str:
    """The private key as unencrypted PKCS#8 PEM (the state file that holds it is mode 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")


def key_from_pem(pem: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the stored key is not an RSA key")
    return key


def sign(payload: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """A compact RS256 JWS of a JSON payload."""
    header = b64url_encode(json.dumps({"alg": ALGORITHM}, separators=(",", ":")).encode())
    body = b64url_encode(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{header}.{body}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{b64url_encode(signature)}"


def make_assertion(certificate: str, key: rsa.RSAPrivateKey, audience: str, now: float | None = None,
                   lifetime: float = ASSERTION_LIFETIME) -> str:
    """A backed assertion for `audience` (the node's public URL), valid `lifetime` seconds from `now`.

    Times are milliseconds, as BrowserID has them."""
    now = time.time() if now is None else now
    payload = {"aud": audience, "iat": int(now * 1000), "exp": int((now + lifetime) * 1000)}
    return f"{certificate}~{sign(payload, key)}"


def unverified_payload(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, not verified: a device reads its own certificate's lifetime."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")
    payload = json.loads(b64url_decode(parts[1]))
    if not isinstance(payload, dict):
        raise ValueError("the JWS payload is not a JSON object")
    return payload
