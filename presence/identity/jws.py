"""JWS compact tokens (RS256 only) and RSA public keys in both BrowserID and JWK form.

Also home of IdentityError, the one exception the identity layer raises, so that every module
(this one included) can say exactly why an assertion was refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from presence import errors
from presence.errors import PresenceError

ALGORITHM = "RS256"
# RS256 in BrowserID means a 2048-bit RSA key; smaller keys are refused rather than trusted.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}\Z")
_DECIMAL = re.compile(r"[0-9]{1,2500}\Z")


class IdentityError(PresenceError):
    """An identity assertion was refused; errno is one of presence.errors.ASSERTION_*."""

    def __init__(self, errno: int, message: str):
        super().__init__(errno, message, close_code=None)


def b64url_encode(data: bytes) -> str:
    """base64url without padding, as JWS wants."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url, padded or not; ValueError on anything else (no '+', '/', spaces)."""
    if not isinstance(text, str) or not _B64URL.match(text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise ValueError("bad base64url length")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64url ({e})") from None


@dataclass(frozen=True)
class JWS:
    """A parsed, not yet verified, compact JWS."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _json_part(text: str, what: str, part: str) -> dict[str, Any]:
    try:
        raw = b64url_decode(text)
    except ValueError as e:
        raise IdentityError(errors.ASSERTION_MALFORMED, f"{what}: {part} is {e}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IdentityError(errors.ASSERTION_MALFORMED, f"{what}: {part} is not JSON") from None
    if not isinstance(value, dict):
        raise IdentityError(errors.ASSERTION_MALFORMED, f"{what}: {part} is not a JSON object")
    return value


def parse(token: str, what: str) -> JWS:
    """Split and decode a compact JWS, refusing any algorithm but RS256 before anything else.

    `what` ("certificate", "assertion") prefixes every error message.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise IdentityError(
            errors.ASSERTION_MALFORMED, f"{what}: expected 3 dot-separated parts, got {len(parts)}"
        )
    header = _json_part(parts[0], what, "header")
    payload = _json_part(parts[1], what, "payload")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise IdentityError(errors.ASSERTION_SIGNATURE, f"{what}: unsigned (alg {alg!r}) is refused")
    if alg != ALGORITHM:
        raise IdentityError(
            errors.ASSERTION_SIGNATURE, f"{what}: algorithm {alg!r} is not supported (only {ALGORITHM})"
        )
    try:
        signature = b64url_decode(parts[2])
    except ValueError as e:
        raise IdentityError(errors.ASSERTION_MALFORMED, f"{what}: signature is {e}") from None
    if not signature:
        raise IdentityError(errors.ASSERTION_SIGNATURE, f"{what}: empty signature")
    return JWS(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def sign(payload: dict[str, Any], private_key: rsa.RSAPrivateKey) -> str:
    """Make a compact RS256 JWS of a JSON payload."""
    header = b64url_encode(json.dumps({"alg": ALGORITHM}, separators=(",", ":")).encode())
    body = b64url_encode(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{header}.{body}".encode("ascii")
    signature = private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{b64url_encode(signature)}"


def verify(token: JWS, public_key: rsa.RSAPublicKey, what: str, whose: str) -> None:
    """Raise ASSERTION_SIGNATURE unless `token` was signed by the private half of `public_key`.

    A signature shorter than the modulus is left-padded with zeros first: PyBrowserID's pure-Python
    RSA writes the signature as the number's shortest big-endian form, so one of its signatures in
    256 lacks the leading zero byte. It is the same number, and PyBrowserID's own verifier reads it."""
    signature = token.signature
    size = (public_key.key_size + 7) // 8
    if len(signature) < size:
        signature = signature.rjust(size, b"\0")
    try:
        public_key.verify(signature, token.signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise IdentityError(
            errors.ASSERTION_SIGNATURE, f"{what}: signature does not verify with {whose}"
        ) from None


def _check_numbers(n: int, e: int) -> rsa.RSAPublicKey:
    if e < 3 or e % 2 == 0:
        raise ValueError("bad RSA exponent")
    bits = n.bit_length()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {bits} bits is too small (at least {MIN_RSA_BITS})")
    if bits > MAX_RSA_BITS:
        raise ValueError(f"RSA key of {bits} bits is too large")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as err:
        raise ValueError(f"bad RSA key ({err})") from None


def public_key_from_json(obj: Any) -> rsa.RSAPublicKey:
    """Read a public key in legacy BrowserID form ({"algorithm": "RS", "n"/"e" decimal})
    or JWK form ({"kty": "RSA", "n"/"e" base64url}); ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("public key is not a JSON object")
    n, e = obj.get("n"), obj.get("e")
    if "kty" in obj:
        if obj["kty"] != "RSA":
            raise ValueError(f"JWK key type {obj['kty']!r} is not supported (only RSA)")
        if not isinstance(n, str) or not isinstance(e, str):
            raise ValueError("JWK needs base64url 'n' and 'e'")
        try:
            nb, eb = b64url_decode(n), b64url_decode(e)
        except ValueError:
            raise ValueError("JWK 'n' or 'e' is not base64url") from None
        if not nb or not eb:
            raise ValueError("JWK 'n' or 'e' is empty")
        return _check_numbers(int.from_bytes(nb, "big"), int.from_bytes(eb, "big"))
    if "algorithm" in obj:
        if obj["algorithm"] != "RS":
            raise ValueError(f"key algorithm {obj['algorithm']!r} is not supported (only RS)")
        if not isinstance(n, str) or not isinstance(e, str) or not _DECIMAL.match(n) or not _DECIMAL.match(e):
            raise ValueError("BrowserID key needs decimal 'n' and 'e'")
        return _check_numbers(int(n), int(e))
    raise ValueError("public key has neither 'kty' (JWK) nor 'algorithm' (BrowserID)")


def public_key_to_json(key: rsa.RSAPublicKey, key_format: str = "jwk") -> dict[str, str]:
    """Serialize a public key as JWK ("jwk") or legacy BrowserID ("browserid")."""
    numbers = key.public_numbers()
    if key_format == "jwk":
        def b64(i: int) -> str:
            return b64url_encode(i.to_bytes((i.bit_length() + 7) // 8, "big"))

        return {"kty": "RSA", "n": b64(numbers.n), "e": b64(numbers.e)}
    if key_format == "browserid":
        return {"algorithm": "RS", "n": str(numbers.n), "e": str(numbers.e)}
    raise ValueError(f"unknown key format {key_format!r}")
