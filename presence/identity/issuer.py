"""The issuing side of BrowserID: certifying user keys, and making assertions with them.

Used by the tests and the benchmark to produce real assertions, and later by Presence's own
fallback identity provider.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from presence.identity import jws

CERT_LIFETIME = 24 * 3600.0
ASSERTION_LIFETIME = 120.0


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def new_user_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh key pair for a user (what a browser would generate)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


class Issuer:
    """An identity provider for `domain` holding the private key its support document publishes."""

    def __init__(self, domain: str, private_key: rsa.RSAPrivateKey, key_format: str = "jwk"):
        self.domain = domain
        self.private_key = private_key
        self.key_format = key_format

    @classmethod
    def generate(cls, domain: str, bits: int = 2048, key_format: str = "jwk") -> Issuer:
        """An issuer with a brand new key."""
        return cls(domain, new_user_key(bits), key_format)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def support_document(self, key_format: str | None = None) -> dict[str, Any]:
        """What https://<domain>/.well-known/browserid should serve."""
        return {
            "public-key": jws.public_key_to_json(self.public_key, key_format or self.key_format),
            "authentication": "/browserid/sign_in",
            "provisioning": "/browserid/provision",
        }

    def certify(
        self,
        email: str,
        public_key: rsa.RSAPublicKey | dict[str, Any],
        now: float,
        lifetime: float = CERT_LIFETIME,
        key_format: str | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A certificate saying that the holder of `public_key` owns `email`, from `now` (seconds);
        `claims` are added to its payload (a paired device's ``presence-pairing``)."""
        if not isinstance(public_key, dict):
            public_key = jws.public_key_to_json(public_key, key_format or self.key_format)
        payload = {
            "iss": self.domain,
            "iat": _ms(now),
            "exp": _ms(now + lifetime),
            "public-key": public_key,
            "principal": {"email": email},
            **(claims or {}),
        }
        return jws.sign(payload, self.private_key)


def make_assertion(
    certificate: str,
    user_private_key: rsa.RSAPrivateKey,
    audience: str,
    now: float,
    lifetime: float = ASSERTION_LIFETIME,
) -> str:
    """A backed assertion `<certificate>~<assertion>` for `audience`, valid from `now` (seconds)."""
    payload = {"aud": audience, "iat": _ms(now), "exp": _ms(now + lifetime)}
    return f"{certificate}~{jws.sign(payload, user_private_key)}"
