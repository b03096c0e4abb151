"""Pairing a device that has no browser, in the manner of RFC 8628 (device authorization).

The device makes its own key pair and asks for two codes: a secret device code it polls with, and a
short user code the person enters on ``/me/pair`` while signed in. Once the person approves (and
names) the device, its next poll takes a long-lived certificate for its key that names the pairing
(``presence-pairing``); it renews it while it is valid. Revoking the pairing on ``/me`` deletes its
row: the device's next connect and renewal are refused, and its live connection is closed on every
node (presence.hub). Codes are single-use, short-lived, rate-limited and kept only as hashes.

A browser on another origin (an application's page, ``static/presence-pairing.js``) pairs without
codes: the node's popup ``/pair/browser`` shows the person the origin that asks (the browser's
``event.origin``), and their approval there, signed in and with the pages' CSRF token, pairs the
key the page made directly (``pair_browser``), named after that origin.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from presence.identity import Identity, Issuer
from presence.identity import jws
from presence.keys import hash_key, new_id
from presence.ratelimit import KeyedLimit
from presence.store.base import PairedDevice

# Twenty consonants (no vowels: no words; no look-alikes such as 0/O, 1/I): 20^8 codes.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
MAX_NAME = 64
CLAIM = "presence-pairing"
SLOW_DOWN_STEP = 5
CODES_PER_PERSON = 10   # codes one person (or client address) may submit per code lifetime
CODES_TOTAL = 1000      # codes submitted to this node per code lifetime, by everyone
BROWSERS_PER_PERSON = 10  # browsers one person may pair through the popup per code lifetime
MAX_BROWSER_NAME_TRIES = 50


def new_user_code() -> str:
    code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return f"{code[:4]}-{code[4:]}"


def normalize_user_code(text: str) -> str | None:
    """The code as issued (``BCDF-GHJK``) from what a person typed (any case, spaces or dashes); None
    if it cannot be one."""
    code = "".join(c for c in text.upper() if c not in " -\t")
    if len(code) != USER_CODE_LENGTH or any(c not in USER_CODE_ALPHABET for c in code):
        return None
    return f"{code[:4]}-{code[4:]}"


def clean_name(value: Any) -> str | None:
    """A device name: 1 to 64 printable characters, spaces trimmed; None if not one."""
    if not isinstance(value, str):
        return None
    name = " ".join(value.split())
    if not 0 < len(name) <= MAX_NAME or not name.isprintable():
        return None
    return name


def browser_origin(value: Any) -> str | None:
    """``value`` if it is an origin as a browser's ``event.origin`` spells it (``scheme://host[:port]``,
    lower case, no default port, nothing else), https or, on loopback only, http (a page that
    WebCrypto works on); None otherwise ("null", file:, a path, a user name...)."""
    if not isinstance(value, str) or not 0 < len(value) <= 300 or not value.isascii():
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or parts.username is not None or parts.password is not None:
        return None
    if ":" in host:
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return None
    elif not all(c.isalnum() or c in "-." for c in host):
        return None
    loopback = host == "localhost" or host.endswith(".localhost")
    try:
        loopback = loopback or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if parts.scheme == "http" and not loopback:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    origin = f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")
    return origin if origin == value else None


def browser_device_name(origin: str, label: Any = None) -> str:
    """The name a browser paired from ``origin`` gets: its host (and port) first, so that the page
    cannot pass for another device; the page's own label, if any, in parentheses."""
    host = origin.split("://", 1)[1]
    label = clean_name(label) if label is not None else None
    return f"{host} ({label or 'browser'})"[:MAX_NAME].strip()


class PairingError(Exception):
    """An answer to the device other than a certificate: RFC 8628's ``error`` and an HTTP code."""

    def __init__(self, error: str, description: str, code: int = 400, retry_after: float | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "error_description": self.description}
        if self.retry_after is not None:
            body["retry_after"] = round(self.retry_after, 1)
        return body


@dataclass(frozen=True)
class PairingOptions:
    code_lifetime: float = 600.0
    interval: float = 5.0
    certificate_lifetime: float = 30 * 86400.0
    per_client: int = 10

    @classmethod
    def from_config(cls, config: Any) -> PairingOptions:
        return cls(config.pair_code_lifetime, config.pair_interval, config.paired_certificate_lifetime,
                   config.pairs_per_client)


class Pairing:
    """The rules of pairing; the web layer (presence.web.pairing) turns them into routes and pages."""

    def __init__(self, store: Any, issuer: Issuer, clock: Any, public_url: str, options: PairingOptions,
                 key_format: str = "browserid", websocket: str = ""):
        self.store = store
        self.issuer = issuer
        self.clock = clock
        self.public_url = public_url.rstrip("/")
        self.websocket = websocket   # where devices connect (<public websocket URL>/presence)
        self.options = options
        self.key_format = key_format
        window = options.code_lifetime
        self.per_client = KeyedLimit(options.per_client, window, clock)
        self.total = KeyedLimit(max(100, options.per_client * 100) if options.per_client > 0 else 0, window, clock)
        self.codes_per_person = KeyedLimit(CODES_PER_PERSON, window, clock)
        self.codes_per_client = KeyedLimit(CODES_PER_PERSON, window, clock)
        self.codes_total = KeyedLimit(CODES_TOTAL, window, clock)
        self.browsers_per_person = KeyedLimit(BROWSERS_PER_PERSON, window, clock)

    # -- the device ------------------------------------------------------------------------------------
    async def start(self, public_key: Any, name: Any, client: str) -> dict[str, Any]:
        """``POST /pair``: the codes for a device's key."""
        try:
            key = jws.public_key_to_json(jws.public_key_from_json(public_key), self.key_format)
        except (ValueError, TypeError) as e:
            raise PairingError("invalid_request", f"publicKey cannot be used ({e})") from None
        suggested = "device" if name is None else clean_name(name)
        if suggested is None:
            raise PairingError("invalid_request", f"name must be 1 to {MAX_NAME} printable characters")
        for limit, key_of in ((self.per_client, client), (self.total, None)):
            wait = limit.take(key_of)
            if wait:
                raise PairingError("slow_down", "too many pairing requests; try again later", 429, wait)
        device_code = secrets.token_urlsafe(32)
        user_code = new_user_code()
        now = self.clock.seconds()
        await self.store.add_pairing_request(hash_key(device_code), hash_key(user_code), json.dumps(key),
                                             suggested, now, now + self.options.code_lifetime)
        verify = self.public_url + "/me/pair"
        return {"device_code": device_code, "user_code": user_code, "verification_uri": verify,
                "verification_uri_complete": f"{verify}?code={user_code}",
                "expires_in": round(self.options.code_lifetime), "interval": self.options.interval}

    async def token(self, device_code: Any) -> dict[str, Any]:
        """``POST /pair/token``: the certificate once approved (once), else RFC 8628's error."""
        if not isinstance(device_code, str) or not 0 < len(device_code) <= 200:
            raise PairingError("invalid_request", "device_code is missing")
        now = self.clock.seconds()
        answer = await self.store.poll_pairing(hash_key(device_code), now, self.options.interval)
        if answer.state != "approved":
            raise PairingError(answer.state, {
                "authorization_pending": "the person has not decided yet; poll again after the interval",
                "slow_down": f"polling too fast; wait {SLOW_DOWN_STEP} seconds more between polls",
                "access_denied": "the person denied this device",
                "expired_token": "this code expired, was already used, or is unknown; start again",
            }.get(answer.state, answer.state))
        return self.certificate(answer.device, now)

    async def renew(self, identity: Identity) -> dict[str, Any]:
        """``POST /pair/renew``: a fresh certificate for a paired device that proved it holds one."""
        if not identity.pairing or identity.issuer != self.issuer.domain:
            raise PairingError("invalid_grant", "this certificate is not a paired device's")
        now = self.clock.seconds()
        device = await self.store.touch_paired_device(identity.pairing, identity.email, now)
        if device is None:
            raise PairingError("revoked", "this device's pairing was revoked; pair it again", 403)
        return self.certificate(device, now)

    def certificate(self, device: PairedDevice, now: float) -> dict[str, Any]:
        lifetime = self.options.certificate_lifetime
        certificate = self.issuer.certify(device.email, json.loads(device.public_key), now, lifetime,
                                          claims={CLAIM: device.id})
        return {"email": device.email, "device": device.name, "pairing": device.id,
                "certificate": certificate, "expires": int((now + lifetime) * 1000),
                "audience": self.public_url, "websocket": self.websocket}

    # -- the person -----------------------------------------------------------------------------------------
    def limit_codes(self, email: str, client: str) -> float:
        """Count a code submitted on /me/pair, right or wrong, before it is looked up (so a guess
        that hits is refused like any other past the limit); the seconds to wait, or 0."""
        return self.codes_per_person.take(email) or self.codes_per_client.take(client) or self.codes_total.take()

    async def pair_browser(self, email: str, public_key: Any, origin: Any, label: Any = None) -> dict[str, Any]:
        """``POST /pair/browser``: the person approved, in the node's popup, the page of ``origin``
        as one of their devices: pair its key at once and answer as ``/pair/token`` does."""
        checked = browser_origin(origin)
        if checked is None:
            raise PairingError("invalid_request", "origin must be an https origin (http on loopback only)")
        try:
            key = jws.public_key_to_json(jws.public_key_from_json(public_key), self.key_format)
        except (ValueError, TypeError) as e:
            raise PairingError("invalid_request", f"publicKey cannot be used ({e})") from None
        if label is not None and clean_name(label) is None:
            raise PairingError("invalid_request", f"name must be 1 to {MAX_NAME} printable characters")
        wait = self.browsers_per_person.take(email)
        if wait:
            raise PairingError("slow_down", "too many browsers paired; try again later", 429, wait)
        now = self.clock.seconds()
        base = browser_device_name(checked, label)
        for attempt in range(1, MAX_BROWSER_NAME_TRIES + 1):
            suffix = "" if attempt == 1 else f" {attempt}"
            name = base[:MAX_NAME - len(suffix)].rstrip() + suffix
            device = await self.store.add_paired_device(new_id(), email, name, json.dumps(key), now)
            if device is not None:
                return self.certificate(device, now)
        raise PairingError("invalid_request", "too many devices of this name: revoke some on /me first", 409)

    async def pending(self, user_code: str) -> Any:
        return await self.store.get_pairing_request(hash_key(user_code), self.clock.seconds())

    async def decide(self, email: str, user_code: str, name: str | None) -> str:
        """Approve as ``name`` (None: deny): "approved", "denied", "taken" or "gone"."""
        return await self.store.decide_pairing(hash_key(user_code), self.clock.seconds(), email, name, new_id())
