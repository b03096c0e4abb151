"""Verifying BrowserID backed identity assertions (`<certificate>~<assertion>`) locally.

Cheap offline checks (structure, algorithm, times, audience, the assertion's signature against
the certified key) come first, so garbage never causes a network fetch; then the trust rule,
then the issuer's key and the certificate's signature.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from presence import errors
from presence.identity import jws
from presence.identity.jws import IdentityError
from presence.identity.support import NoSupport, SupportDocuments, check_domain

MAX_ASSERTION = 16 * 1024
# Times. BrowserID assertions are short-lived (browsers made them valid for about two minutes) and
# certificates last at most a day (Persona's cap on cert_duration): an expiry further away than these
# (plus the skew) is refused, so a leaked assertion or certificate cannot be replayed for years.
SKEW = 120.0                        # seconds of clock difference tolerated on every time check
MAX_ASSERTION_LIFETIME = 600.0      # seconds from now an assertion may still be valid
MAX_CERTIFICATE_LIFETIME = 86400.0  # seconds from now a certificate may still be valid
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_EMAIL = re.compile(
    rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>(?!-)[A-Za-z0-9-]{{1,63}}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{{1,63}}(?<!-))*)\Z"
)

log = Logger()


@dataclass(frozen=True)
class Identity:
    """A verified email address; `expires_at` (epoch seconds) is when its certificate expires."""

    email: str
    issuer: str
    expires_at: float
    pairing: str = ""   # the paired device a certificate of Presence's own issuer names (presence.pairing)


def normalize_origin(url: str) -> str | None:
    """`scheme://host:port` with lowercase scheme and host and an explicit port; None if `url`
    is not an origin (path other than "/", query, fragment, credentials, unknown scheme)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port if port is not None else _DEFAULT_PORTS[scheme]}"


def _when(ms: float) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"{ms}ms"


def _malformed(message: str) -> IdentityError:
    return IdentityError(errors.ASSERTION_MALFORMED, message)


def _field(payload: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = payload.get(name)
    if value is None:
        raise _malformed(f"{what}: missing '{name}'")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _malformed(f"{what}: '{name}' has the wrong type")
    if isinstance(value, float) and not math.isfinite(value):
        raise _malformed(f"{what}: '{name}' is not a finite number")
    return value


def _time(payload: dict[str, Any], name: str, what: str, required: bool = True) -> float | None:
    if not required and payload.get(name) is None:
        return None
    return float(_field(payload, name, (int, float), what))


class Verifier:
    """Checks assertions against this service's audiences and the operator's trust rule.

    An issuer is trusted for an address when it is the address's domain, the domain that the
    address's domain delegates `authority` to, or one of `trusted_issuers` (any address).
    `local_issuers` maps issuers to keys known without fetching (a key source, not a trust
    grant: list the issuer in `trusted_issuers` too if it may certify any address).
    """

    def __init__(
        self,
        audiences: Iterable[str],
        trusted_issuers: Iterable[str],
        support: SupportDocuments,
        clock: IReactorTime | None = None,
        insecure: bool = False,
        local_issuers: Mapping[str, rsa.RSAPublicKey | dict[str, Any]] | None = None,
        skew: float = SKEW,
        max_assertion_lifetime: float = MAX_ASSERTION_LIFETIME,
        max_certificate_lifetime: float = MAX_CERTIFICATE_LIFETIME,
        max_paired_lifetime: float = 0.0,
    ):
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._clock = clock
        self.support = support
        self.insecure = insecure
        self.skew = skew
        self.max_assertion_lifetime = max_assertion_lifetime
        self.max_certificate_lifetime = max_certificate_lifetime
        # Paired devices' certificates (Presence's own issuer, naming a pairing) may last this long.
        self.max_paired_lifetime = max_paired_lifetime
        self.audiences: dict[str, str] = {}
        for audience in audiences:
            origin = normalize_origin(audience)
            if origin is None:
                raise ValueError(f"audience {audience!r} is not an http(s) or ws(s) origin")
            self.audiences[origin] = audience
        if not self.audiences:
            raise ValueError("at least one audience is needed")
        self.trusted_issuers = frozenset(check_domain(i, insecure) for i in trusted_issuers)
        self.local_issuers: dict[str, rsa.RSAPublicKey] = {}
        for issuer, key in (local_issuers or {}).items():
            if isinstance(key, dict):
                key = jws.public_key_from_json(key)
            self.local_issuers[issuer.lower()] = key
        # Certificates whose signature checked out, by digest, with the issuer key that checked it:
        # a device reconnecting presents the same certificate, and an RSA verification is the
        # dearest part of a connect. A different key object (rotated, fetched again) checks anew.
        self._verified_certs: dict[bytes, rsa.RSAPublicKey] = {}
        self.max_verified_certs = 50_000

    @classmethod
    def from_config(
        cls,
        config: Any,
        http_client: Any = None,
        clock: IReactorTime | None = None,
        local_issuers: Mapping[str, rsa.RSAPublicKey | dict[str, Any]] | None = None,
    ) -> Verifier:
        """A verifier set up from presence.config.Config (fetching with presence.fetch unless
        given ``http_client``)."""
        if http_client is None:
            from twisted.internet import reactor

            from presence.fetch import Fetcher

            http_client = Fetcher(reactor, allow_private=config.insecure_identity, timeout=config.support_timeout,
                                  max_head=config.fetch_max_head, max_header_lines=config.fetch_max_header_lines)
        support = SupportDocuments(
            http_client, clock, config.support_cache_ttl, config.insecure_identity, config.support_timeout
        )
        return cls(
            config.accepted_audiences(),
            config.trusted_issuers,
            support,
            clock,
            insecure=config.insecure_identity,
            local_issuers=local_issuers,
            skew=config.clock_skew,
            max_assertion_lifetime=config.max_assertion_lifetime,
            max_certificate_lifetime=config.max_certificate_lifetime,
            max_paired_lifetime=config.paired_certificate_lifetime,
        )

    async def verify(self, assertion: str) -> Identity:
        """The identity proven by a backed assertion, or IdentityError saying why not."""
        try:
            return await self._verify(assertion)
        except IdentityError as e:
            log.debug("assertion refused (errno {errno}): {message}", errno=e.errno, message=e.message)
            raise

    async def _verify(self, assertion: str) -> Identity:
        if not isinstance(assertion, str):
            raise _malformed("assertion is not a string")
        if len(assertion) > MAX_ASSERTION:
            raise _malformed(f"assertion is longer than {MAX_ASSERTION} characters")
        parts = assertion.strip().split("~")
        if len(parts) < 2 or not all(parts):
            raise _malformed("not a backed identity assertion (expected <certificate>~<assertion>)")
        if len(parts) > 2:
            raise _malformed("certificate chains are not supported (expected one certificate)")
        cert = jws.parse(parts[0], "certificate")
        signed = jws.parse(parts[1], "assertion")

        # Certificate claims.
        c = cert.payload
        issuer = _field(c, "iss", str, "certificate").lower()
        cert_exp = _time(c, "exp", "certificate")
        cert_iat = _time(c, "iat", "certificate", required=False)
        principal = _field(c, "principal", dict, "certificate")
        email = _field(principal, "email", str, "certificate principal")
        m = _EMAIL.match(email)
        if m is None or len(email) > 254 or len(m["local"]) > 64:
            raise _malformed(f"certificate: {email[:100]!r} is not a valid email address")
        email = email.lower()
        domain = m["domain"].lower()
        try:
            user_key = jws.public_key_from_json(_field(c, "public-key", dict, "certificate"))
        except ValueError as e:
            raise _malformed(f"certificate: bad public-key ({e})") from None

        # Assertion claims.
        a = signed.payload
        audience = _field(a, "aud", str, "assertion")
        exp = _time(a, "exp", "assertion")
        iat = _time(a, "iat", "assertion", required=False)

        # Times (ms in the tokens, seconds on our clock).
        now_ms = self._clock.seconds() * 1000
        skew_ms = self.skew * 1000
        if cert_exp + skew_ms < now_ms:
            raise IdentityError(
                errors.ASSERTION_EXPIRED, f"certificate expired at {_when(cert_exp)} (now {_when(now_ms)})"
            )
        if cert_iat is not None and cert_iat - skew_ms > now_ms:
            raise IdentityError(
                errors.ASSERTION_EXPIRED,
                f"certificate issued in the future ({_when(cert_iat)}, now {_when(now_ms)}): check clocks",
            )
        if exp + skew_ms < now_ms:
            raise IdentityError(
                errors.ASSERTION_EXPIRED, f"assertion expired at {_when(exp)} (now {_when(now_ms)})"
            )
        if iat is not None and iat - skew_ms > now_ms:
            raise IdentityError(
                errors.ASSERTION_EXPIRED,
                f"assertion issued in the future ({_when(iat)}, now {_when(now_ms)}): check clocks",
            )
        # A pairing is named only by an issuer whose key this node holds (its own): a long-lived
        # certificate that Presence can revoke, so it may last longer than any other.
        pairing = c.get("presence-pairing") if issuer in self.local_issuers else None
        pairing = pairing if isinstance(pairing, str) and 0 < len(pairing) <= 64 else ""
        lifetime = max(self.max_certificate_lifetime, self.max_paired_lifetime) if pairing \
            else self.max_certificate_lifetime
        if cert_exp - skew_ms > now_ms + lifetime * 1000:
            raise IdentityError(
                errors.ASSERTION_EXPIRED,
                f"certificate expires at {_when(cert_exp)}, more than {lifetime:g} s from now"
                f" ({_when(now_ms)}): certificates may last at most that long",
            )
        if exp - skew_ms > now_ms + self.max_assertion_lifetime * 1000:
            raise IdentityError(
                errors.ASSERTION_EXPIRED,
                f"assertion expires at {_when(exp)}, more than {self.max_assertion_lifetime:g} s from now"
                f" ({_when(now_ms)}): assertions may last at most that long",
            )

        # Audience.
        if normalize_origin(audience) not in self.audiences:
            accepted = ", ".join(self.audiences.values())
            raise IdentityError(
                errors.ASSERTION_AUDIENCE, f"assertion is for {audience[:200]!r}, not for {accepted}"
            )

        # The assertion must be signed by the certified key: checkable before any fetch.
        jws.verify(signed, user_key, "assertion", "the certified user key")

        await self._check_trust(issuer, domain)
        key, whose = await self._issuer_key(issuer)
        digest = hashlib.sha256(cert.signing_input + b"." + cert.signature).digest()
        if self._verified_certs.get(digest) is not key:
            jws.verify(cert, key, "certificate", whose)
            if len(self._verified_certs) >= self.max_verified_certs:
                del self._verified_certs[next(iter(self._verified_certs))]   # the oldest
            self._verified_certs[digest] = key
        return Identity(email, issuer, cert_exp / 1000, pairing)

    async def _check_trust(self, issuer: str, domain: str) -> None:
        """Raise ASSERTION_ISSUER unless `issuer` may certify addresses at `domain`."""
        if issuer == domain or issuer in self.trusted_issuers:
            return
        refused = f"issuer {issuer} may not certify addresses at {domain}"
        try:
            check_domain(domain, self.insecure)
        except ValueError as e:
            raise IdentityError(errors.ASSERTION_ISSUER, f"{refused} ({e})") from None
        try:
            authority = await self.support.authority(domain)
        except NoSupport as e:
            raise IdentityError(errors.ASSERTION_ISSUER, f"{refused} ({e.message})") from None
        if issuer not in authority.chain[1:]:
            if len(authority.chain) == 1:
                why = f"{domain} issues its own certificates"
            else:
                why = f"{domain} delegates to {' -> '.join(authority.chain[1:])}"
            raise IdentityError(errors.ASSERTION_ISSUER, f"{refused} ({why})")

    async def _issuer_key(self, issuer: str) -> tuple[rsa.RSAPublicKey, str]:
        """The key that signs the issuer's certificates, and a phrase naming it for errors."""
        local = self.local_issuers.get(issuer)
        if local is not None:
            return local, f"the key of {issuer}"
        try:
            check_domain(issuer, self.insecure)
        except ValueError as e:
            raise IdentityError(errors.ASSERTION_ISSUER, f"issuer refused: {e}") from None
        authority = await self.support.authority(issuer)
        if authority.authority == issuer:
            return authority.public_key, f"the key of {issuer}"
        return authority.public_key, f"the key of {authority.authority} (authority for {issuer})"
