"""Fetching and caching BrowserID support documents (https://<domain>/.well-known/browserid).

Every assertion from a remote issuer needs its public key; fetching it each time would let any
client make us hammer (or hang on) an arbitrary host, so documents are cached (failures too,
briefly), concurrent lookups of one domain share a single request, and each fetch goes through
presence.fetch: checked addresses (the resolved ones: a name that resolves to a private address is
refused like the address itself), bounded head, body and time, no redirects. A client is told only
that the document could not be fetched, or was not a usable document; why (refused, no DNS,
timed out, TLS, the HTTP status) goes to the log.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from presence import errors
from presence.fetch import BODY_TOO_BIG, Fetcher, FetchFailed
from presence.identity.jws import IdentityError, public_key_from_json

WELL_KNOWN = "/.well-known/browserid"
MAX_BODY = 64 * 1024
MAX_DELEGATIONS = 5
MAX_ENTRIES = 10_000  # domains are chosen by clients: the cache must not grow without bound

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_HOSTPORT = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?\Z")

log = Logger()


class NoSupport(IdentityError):
    """The domain answered, but has no usable support document (404, not JSON, disabled...).

    Unlike a timeout this is not worth retrying soon, and it tells the verifier that a domain
    does not delegate to anyone.
    """

    def __init__(self, message: str):
        super().__init__(errors.ASSERTION_UNAVAILABLE, message)


def _fresh(error: Exception) -> Exception:
    """The same error, without a traceback (its constructor is not called: its fields are copied)."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    return copy


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def check_domain(domain: Any, insecure: bool) -> str:
    """Return the domain lowercased, or ValueError saying why it may not be an issuer.

    Without `insecure`, only plain DNS names (with a dot, not localhost, no IP literal, no port):
    anything else would let a remote client point us at our own network.
    """
    if not isinstance(domain, str) or not domain:
        raise ValueError("empty domain")
    return _checked_domain(domain, insecure)


@functools.lru_cache(maxsize=4096)   # every assertion names its issuer: the same few domains
def _checked_domain(domain: str, insecure: bool) -> str:
    domain = domain.lower()
    m = _HOSTPORT.match(domain)
    if not m:
        raise ValueError(f"{domain!r} is not a domain")
    host, port = m["host"], m["port"]
    if port is not None and not insecure:
        raise ValueError(f"{domain!r} has a port (only allowed with insecure identity)")
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"{domain!r} has a bad port")
    if _is_ip(host):
        if not insecure:
            raise ValueError(f"{domain!r} is an IP address (only allowed with insecure identity)")
        return domain
    if host.startswith("["):
        raise ValueError(f"{domain!r} is not a domain")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{domain!r} is not a valid domain name")
    if not insecure:
        if len(labels) < 2 or labels[-1].isdigit():
            raise ValueError(f"{domain!r} is not a fully qualified domain name")
        if labels[-1] == "localhost":
            raise ValueError(f"{domain!r} is loopback (only allowed with insecure identity)")
    return domain


def support_url(domain: str, insecure: bool) -> str:
    """https always; with `insecure`, plain http for loopback, IP literals and explicit ports."""
    m = _HOSTPORT.match(domain)
    host, port = (m["host"], m["port"]) if m else (domain, None)
    local = port is not None or _is_ip(host) or host == "localhost" or host.endswith(".localhost")
    scheme = "http" if insecure and local else "https"
    return f"{scheme}://{domain}{WELL_KNOWN}"


@dataclass(frozen=True)
class SupportDocument:
    """A validated support document: either a key or a delegation to another domain."""

    domain: str
    public_key: rsa.RSAPublicKey | None
    authority: str | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class Authority:
    """Where a domain's authority ends up: `chain` is the domain then every delegate, in order."""

    domain: str
    authority: str
    public_key: rsa.RSAPublicKey
    chain: tuple[str, ...]


@dataclass
class _Entry:
    expires: float
    document: SupportDocument | None = None
    error: IdentityError | None = None


class SupportDocuments:
    """Fetches support documents, caching them by domain.

    `http_client` is a presence.fetch.Fetcher (made with the reactor when not given; private
    addresses allowed only with `insecure`), or a TreqFetcher in the in-memory tests;
    `clock` gives time for the cache and the fetch timeout.
    """

    def __init__(
        self,
        http_client: Any = None,
        clock: IReactorTime | None = None,
        ttl: float = 3600.0,
        insecure: bool = False,
        timeout: float = 10.0,
        *,
        failure_ttl: float = 60.0,
        max_size: int = MAX_BODY,
        max_entries: int = MAX_ENTRIES,
    ):
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        if http_client is None:
            from twisted.internet import reactor

            http_client = Fetcher(reactor, allow_private=insecure, timeout=timeout)
        if not hasattr(http_client, "fetch"):
            raise TypeError("SupportDocuments needs a presence.fetch.Fetcher (or a TreqFetcher in tests)")
        self._http = http_client
        self._clock = clock
        self.ttl = ttl
        self.insecure = insecure
        self.timeout = timeout
        self.failure_ttl = min(failure_ttl, ttl)
        self.max_size = max_size
        self.max_entries = max_entries
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, list[Deferred[SupportDocument]]] = {}

    def url(self, domain: str) -> str:
        """The support document URL of an (already checked) domain."""
        return support_url(domain, self.insecure)

    def document(self, domain: str) -> Deferred[SupportDocument]:
        """The validated support document of `domain`, from cache or from one shared fetch."""
        try:
            domain = check_domain(domain, self.insecure)
        except ValueError as e:
            return fail(NoSupport(f"{e}"))
        entry = self._cache.get(domain)
        if entry is not None:
            if entry.expires > self._clock.seconds():
                # a copy each time: raising the cached error itself would grow its traceback with
                # every caller's frames, and keep them all alive as long as the cache entry
                return succeed(entry.document) if entry.error is None else fail(_fresh(entry.error))
            del self._cache[domain]
        # Each caller gets a Deferred of its own, so cancelling one does not cancel the others.
        d: Deferred[SupportDocument] = Deferred()
        waiters = self._inflight.get(domain)
        if waiters is not None:
            waiters.append(d)
        else:
            self._inflight[domain] = [d]
            self._start(domain)
        return d

    async def authority(self, domain: str) -> Authority:
        """Follow `authority` delegations from `domain` to the document holding the key."""
        chain = [domain.lower()]
        while True:
            doc = await self.document(chain[-1])
            if doc.authority is None:
                assert doc.public_key is not None
                return Authority(chain[0], chain[-1], doc.public_key, tuple(chain))
            if doc.authority in chain:
                raise NoSupport(f"authority delegation loop: {' -> '.join([*chain, doc.authority])}")
            if len(chain) > MAX_DELEGATIONS:
                raise NoSupport(f"more than {MAX_DELEGATIONS} authority delegations from {chain[0]}")
            chain.append(doc.authority)

    def _start(self, domain: str) -> None:
        url = self.url(domain)
        d = Deferred.fromCoroutine(self._fetch(domain, url))
        # Whatever the cancelled request fails with, a timeout is reported as one.
        d.addTimeout(self.timeout, self._clock,
                     onTimeoutCancel=lambda _, t: Failure(FetchFailed("timeout", f"no answer within {t:g}s")))
        d.addErrback(self._explain, domain, url)
        d.addBoth(self._finish, domain)

    def _explain(self, f: Failure, domain: str, url: str) -> Failure:
        """What the client is told: never why the fetch failed (that is logged in _finish)."""
        if f.check(IdentityError):
            return f
        why = f.value.detail if isinstance(f.value, FetchFailed) else f"{type(f.value).__name__}: {f.getErrorMessage()}"
        error = IdentityError(errors.ASSERTION_UNAVAILABLE, f"{domain}: could not fetch {url}")
        error.detail = why[:500]  # type: ignore[attr-defined]
        return Failure(error)

    def _finish(self, result: SupportDocument | Failure, domain: str) -> None:
        now = self._clock.seconds()
        self._make_room(now)
        if isinstance(result, Failure):
            error = result.value
            log.info("support document of {domain} unavailable: {error} ({detail})", domain=domain, error=error,
                     detail=getattr(error, "detail", ""), event="identity.support_unavailable")
            self._cache[domain] = _Entry(now + self.failure_ttl, error=_fresh(error))
        else:
            self._cache[domain] = _Entry(now + self.ttl, document=result)
        for d in self._inflight.pop(domain, []):
            if isinstance(result, Failure):
                d.errback(Failure(_fresh(result.value)))
            else:
                d.callback(result)

    def _make_room(self, now: float) -> None:
        """Forget expired entries, then the oldest ones, to stay under max_entries."""
        if len(self._cache) < self.max_entries:
            return
        for domain in [d for d, e in self._cache.items() if e.expires <= now]:
            del self._cache[domain]
        while len(self._cache) >= self.max_entries:
            del self._cache[next(iter(self._cache))]

    async def _fetch(self, domain: str, url: str) -> SupportDocument:
        unusable = f"{domain}: no BrowserID support document at {url}"
        try:
            response = await self._http.fetch(url, max_body=self.max_size, accept="application/json",
                                              timeout=self.timeout)
        except FetchFailed as e:
            if e.reason == BODY_TOO_BIG:
                raise NoSupport(f"{domain}: support document is larger than {self.max_size} bytes") from None
            raise
        code = response.code
        if code != 200:
            # The status is for the log: a client learns only that there is no usable document.
            if code >= 500 or code == 429:
                error = IdentityError(errors.ASSERTION_UNAVAILABLE, f"{domain}: could not fetch {url}")
            else:
                error = NoSupport(unusable)
            error.detail = f"HTTP {code}"  # type: ignore[attr-defined]
            raise error
        return self._parse(domain, response.body)

    def _parse(self, domain: str, data: bytes) -> SupportDocument:
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise NoSupport(f"{domain}: support document is not JSON") from None
        if not isinstance(raw, dict):
            raise NoSupport(f"{domain}: support document is not a JSON object")
        if raw.get("disabled") is True:
            raise NoSupport(f"{domain}: BrowserID support is disabled")
        if "authority" in raw:
            try:
                authority = check_domain(raw["authority"], self.insecure)
            except ValueError as e:
                raise NoSupport(f"{domain}: bad authority ({e})") from None
            return SupportDocument(domain, None, authority, raw)
        if "public-key" not in raw:
            raise NoSupport(f"{domain}: support document has neither 'public-key' nor 'authority'")
        for name in ("authentication", "provisioning"):
            if name in raw and not isinstance(raw[name], str):
                raise NoSupport(f"{domain}: support document '{name}' is not a string")
        try:
            key = public_key_from_json(raw["public-key"])
        except ValueError as e:
            raise NoSupport(f"{domain}: bad public-key in support document ({e})") from None
        return SupportDocument(domain, key, None, raw)
