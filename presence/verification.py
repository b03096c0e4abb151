"""Domain ownership: fetch ``http://<domain>/__presence`` and compare it with the verification key.

The fetch goes to a host a developer names, on the node's network, so it is bounded: one deadline
for the whole exchange, a small body limit, redirects only on the same host, and (through
``safe_client``) no connection to a private, loopback or link-local address unless the operator
allows it. The address is resolved and checked first and the connection goes to that checked
address, so a second DNS answer cannot point it elsewhere.

A failed Verify keeps checking in the background (``VerificationPoller``), with backoff, for a
configurable time, so the application becomes verified without another click.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Any, Awaitable, Callable
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer, error
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from presence.store.base import PENDING, Verification

log = Logger()

MAX_BODY = 4096  # the key is 1024 characters; a little room for whitespace, no more
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)

# Why a check failed, for tests and for the page (the message is what people read).
REFUSED, TIMEOUT, DNS, PRIVATE, HTTP, CONTENT_TYPE, CONTENT, TOO_BIG, REDIRECT, FAILED = (
    "refused", "timeout", "dns", "private", "http", "content-type", "content", "too-big", "redirect", "failed")


class VerificationFailed(Exception):
    """Why the domain did not prove ownership, in words a developer can act on; ``reason`` is one of
    the constants above."""

    def __init__(self, message: str, reason: str = FAILED):
        super().__init__(message)
        self.message = message
        self.reason = reason


class AddressRefused(error.ConnectError):
    """The host resolves only to addresses verification may not fetch."""


# -- the checked connection --------------------------------------------------------------------------

def address_refusal(address: str) -> str | None:
    """Why verification may not connect to ``address`` (None: it may): not a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "not a unicast address"
    if ip.is_private or not ip.is_global:
        return "a private address"
    return None


Resolve = Callable[[str, int], Awaitable[list[str]]]


def system_resolver(reactor: Any) -> Resolve:
    """getaddrinfo in the reactor's thread pool."""

    async def resolve(host: str, port: int) -> list[str]:
        try:
            infos = await deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo, host, port, 0,
                                            socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise error.DNSLookupError(f"{host}: {e.strerror}") from None
        return list(dict.fromkeys(info[4][0] for info in infos))

    return resolve


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    def __init__(self, factory: SafeEndpoints, scheme: bytes, host: str, port: int):
        self.factory, self.scheme, self.host, self.port = factory, scheme, host, port

    def connect(self, protocol_factory: Any) -> Deferred:
        return ensureDeferred(self._connect(protocol_factory))

    async def _connect(self, protocol_factory: Any) -> Any:
        f = self.factory
        try:
            addresses = [str(ipaddress.ip_address(self.host.strip("[]")))]
        except ValueError:
            addresses = await f.resolve(self.host, self.port)
        if not addresses:
            raise error.DNSLookupError(self.host)
        allowed = addresses if f.allow_private else [a for a in addresses if address_refusal(a) is None]
        if not allowed:
            named = f"{self.host} is" if self.host.strip("[]") == addresses[0] else f"{self.host} is {addresses[0]},"
            raise AddressRefused(f"{named} {address_refusal(addresses[0])}")
        address = allowed[0]
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: Any = kind(f.reactor, address, self.port, timeout=f.connect_timeout)
        if self.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return await endpoint.connect(protocol_factory)


@implementer(IAgentEndpointFactory)
class SafeEndpoints:
    """Endpoints that resolve the host, refuse non-public addresses (unless ``allow_private``) and
    connect to the address they checked."""

    def __init__(self, reactor: Any, allow_private: bool = False, resolve: Resolve | None = None,
                 connect_timeout: float = 10.0):
        self.reactor = reactor
        self.allow_private = allow_private
        self.resolve = resolve or system_resolver(reactor)
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise error.SchemeNotSupported(uri.scheme)
        return _CheckedEndpoint(self, uri.scheme, uri.host.decode("ascii"), uri.port)


def safe_client(reactor: Any, allow_private: bool = False, resolve: Resolve | None = None,
                connect_timeout: float = 10.0) -> Any:
    """A treq HTTPClient for verification fetches (no connection reuse, checked addresses)."""
    from treq.client import HTTPClient

    agent = Agent.usingEndpointFactory(
        reactor, SafeEndpoints(reactor, allow_private, resolve, connect_timeout),
        pool=HTTPConnectionPool(reactor, persistent=False))
    return HTTPClient(agent)


# -- the check -------------------------------------------------------------------------------------

async def check_domain(http: Any, clock: IReactorTime, domain: str, key: str, timeout: float = 10.0,
                       scheme: str = "http") -> None:
    """Raise VerificationFailed unless the domain serves exactly ``key`` as text/plain within
    ``timeout`` seconds (the whole exchange, redirects and body included)."""
    url = f"{scheme}://{domain}/__presence"
    d = ensureDeferred(_check(http, domain, key, url))
    d.addTimeout(timeout, clock)
    try:
        await d
    except defer.TimeoutError:
        raise VerificationFailed(f"{url} did not answer within {timeout:g} seconds (timed out)", TIMEOUT) from None


async def _check(http: Any, domain: str, key: str, url: str) -> None:
    host = urlsplit(url).hostname
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        response = await _get(http, url)
        if response.code not in _REDIRECTS:
            break
        location = (response.headers.getRawHeaders(b"location") or [b""])[0].decode("latin-1")
        _discard(response)
        target = urljoin(url, location)
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or parts.hostname != host:
            raise VerificationFailed(
                f"{url} redirects to {target or 'nowhere'}; serve the key at {first} itself"
                f" (a redirect may only stay on {host})", REDIRECT)
        url = target
    else:
        raise VerificationFailed(f"{first} redirects more than {MAX_REDIRECTS} times", REDIRECT)
    if response.code == 404:
        _discard(response)
        raise VerificationFailed(f"{url} answered HTTP 404 (not found): put the key there", HTTP)
    if response.code != 200:
        _discard(response)
        raise VerificationFailed(f"{url} answered HTTP {response.code}; it must answer 200 with the key", HTTP)
    ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
    if ctype.split(";")[0].strip().lower() != "text/plain":
        _discard(response)
        raise VerificationFailed(
            f"{url} has content type {ctype or 'none'!r}; serve it as text/plain", CONTENT_TYPE)
    if response.length is not UNKNOWN_LENGTH and response.length > MAX_BODY:
        _discard(response)
        raise VerificationFailed(f"{url} is larger than {MAX_BODY} bytes; it must hold only the key", TOO_BIG)
    body = _LimitedBody(MAX_BODY)
    response.deliverBody(body)
    data = await body.finished
    if data is None:
        raise VerificationFailed(f"{url} is larger than {MAX_BODY} bytes; it must hold only the key", TOO_BIG)
    found = data.strip()
    if not hmac.compare_digest(found, key.encode("ascii")):
        hint = f" (it holds {len(found)} characters, the key has {len(key)})" if len(found) != len(key) else ""
        raise VerificationFailed(f"{url} does not hold this application's verification key{hint}", CONTENT)


async def _get(http: Any, url: str) -> Any:
    try:
        return await http.get(url, allow_redirects=False, unbuffered=True)
    except defer.CancelledError:
        raise  # the deadline: check_domain reports it
    except Exception as e:
        raise _connection_failed(url, e) from None


def _connection_failed(url: str, e: BaseException) -> VerificationFailed:
    reasons = [r.value for r in getattr(e, "reasons", []) if isinstance(r, Failure)] or [e]
    for cause in reasons:
        if isinstance(cause, defer.CancelledError):
            raise cause
        if isinstance(cause, AddressRefused):
            return VerificationFailed(
                f"{url} cannot be checked: {cause.osError or cause}; verification fetches only public addresses",
                PRIVATE)
        if isinstance(cause, error.DNSLookupError):
            return VerificationFailed(f"could not fetch {url}: the domain does not resolve", DNS)
        if isinstance(cause, error.ConnectionRefusedError):
            return VerificationFailed(f"could not fetch {url}: the connection was refused", REFUSED)
        if isinstance(cause, error.TimeoutError):
            return VerificationFailed(f"could not fetch {url}: the connection timed out", TIMEOUT)
    cause = reasons[0]
    return VerificationFailed(f"could not fetch {url}: {cause.__class__.__name__}: {cause}", FAILED)


class _LimitedBody(Protocol):
    """Collects a body; ``finished`` gives None (and the connection is dropped) past ``limit`` bytes.
    Cancelling ``finished`` (the deadline) drops the connection too."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred = Deferred(lambda _: self._drop())
        self.done = False

    def _drop(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._drop()
            self.finished.callback(None)
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done:
            return
        self.done = True
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _discard(response: Any) -> None:
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass


# -- polling in the background -----------------------------------------------------------------------

class VerificationPoller:
    """After a failed Verify, check the domain again and again, waiting ``first_delay`` seconds and
    doubling up to ``max_delay``, until it proves ownership or ``duration`` seconds have passed.

    Where it stands is kept in the store, so any node's page shows it; the timers run on the node
    that got the click (and resume there after a restart).
    """

    def __init__(self, store: Any, apps: Any, clock: IReactorTime, node: str,
                 check: Callable[[Any], Awaitable[None]], duration: float = 3600.0,
                 first_delay: float = 10.0, max_delay: float = 300.0,
                 on_verified: Callable[[Any], Any] | None = None):
        self.store = store
        self.apps = apps
        self.clock = clock
        self.node = node
        self.check = check
        self.duration = duration
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.on_verified = on_verified
        self.timers: dict[int, IDelayedCall] = {}
        self.inflight: set[Deferred] = set()
        self.stopped = False

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed check."""
        return min(self.first_delay * 2 ** max(attempts - 1, 0), self.max_delay)

    async def verify(self, app: Any) -> tuple[Any, VerificationFailed | None]:
        """The Verify button: check now; on failure record why and keep checking in the background.
        Returns the application (verified, if it worked) and the failure, if any."""
        self._cancel(app.id)
        now = self.clock.seconds()
        return await self._attempt(app, Verification(app.id, self.node, 0, "", now, None, now + self.duration))

    async def resume(self) -> int:
        """Restart the polls this node ran before it stopped; returns how many."""
        polls = await self.store.list_verifications(self.node)
        now = self.clock.seconds()
        for v in polls:
            self._schedule(v.app, max(0.0, (v.next_at or now) - now))
        return len(polls)

    def stop(self) -> None:
        """No more checks: cancel the timers and the checks under way (the node is stopping)."""
        self.stopped = True
        for app in list(self.timers):
            self._cancel(app)
        for d in list(self.inflight):
            d.cancel()

    def _cancel(self, app: int) -> None:
        timer = self.timers.pop(app, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _schedule(self, app: int, delay: float) -> None:
        self._cancel(app)
        if not self.stopped:
            self.timers[app] = self.clock.callLater(delay, self._fire, app)

    def _fire(self, app_id: int) -> None:
        self.timers.pop(app_id, None)
        d = ensureDeferred(self._poll(app_id))

        def failed(f: Failure) -> None:
            if not f.check(defer.CancelledError):
                log.failure("verification polling failed", f, event="verify.poll_failed")

        d.addErrback(failed)
        self.inflight.add(d)
        d.addBoth(lambda _: self.inflight.discard(d))

    async def wait(self) -> None:
        """Until the checks running now are done (a clean stop, and tests)."""
        while self.inflight:
            await next(iter(self.inflight))

    async def _poll(self, app_id: int) -> None:
        try:
            app = await self.store.get_app_by_id(app_id)
            state = await self.store.get_verification(app_id)
        except Exception as e:
            log.warn("verification polling: the store failed ({why}); trying again later", why=e,
                     event="verify.poll_store")
            self._schedule(app_id, self.max_delay)
            return
        if app is None or app.state != PENDING or state is None:
            if state is not None:
                await self.store.delete_verification(app_id)
            return
        await self._attempt(app, state)

    async def _attempt(self, app: Any, state: Verification) -> tuple[Any, VerificationFailed | None]:
        try:
            await self.check(app)
        except VerificationFailed as e:
            now = self.clock.seconds()
            attempts = state.attempts + 1
            next_at: float | None = min(now + self.delay(attempts), state.poll_until)
            if now >= state.poll_until:
                next_at = None
            await self.store.save_verification(
                Verification(app.id, self.node, attempts, e.message, now, next_at, state.poll_until))
            if next_at is not None:
                self._schedule(app.id, next_at - now)
            else:
                log.info("stopped checking the domain of application {id} ({domain}) after {n} attempts",
                         id=app.id, domain=app.domain, n=attempts, event="verify.gave_up")
            return app, e
        app = await self.apps.mark_verified(app)
        await self.store.delete_verification(app.id)
        log.info("application {id} verified its domain {domain}: app id {app_id}", id=app.id, domain=app.domain,
                 app_id=app.app_id, event="verify.verified")
        if self.on_verified is not None:
            self.on_verified(app)
        return app, None
