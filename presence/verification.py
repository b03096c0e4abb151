"""Domain ownership: fetch ``http://<domain>/__presence`` and compare it with the verification key.

The fetch goes to a host a developer names, on the node's network, so it goes through
presence.fetch (checked addresses, bounded head, body and time, see there), with one deadline for
the whole check, a body of at most 4096 bytes, and redirects followed only on the same host (each
hop fetched, and its addresses checked, anew). Whatever fails, the page says only that the key
was not served as it must be; why (refused, no DNS, timeout, TLS, the status...) goes to the log.

A failed Verify keeps checking in the background (``VerificationPoller``), with backoff, for a
configurable time, so the application becomes verified without another click.
"""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from presence import fetch
from presence.fetch import Fetcher, FetchFailed, Resolve, address_refusal  # noqa: F401 (address_refusal: API)
from presence.store.base import PENDING, Verification

log = Logger()

MAX_BODY = 4096  # the key is 1024 characters; a little room for whitespace, no more
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)

# Why a check failed: for the log and the tests (the page shows one message for all of them).
REFUSED, TIMEOUT, DNS, PRIVATE, HTTP, CONTENT_TYPE, CONTENT, TOO_BIG, REDIRECT, FAILED = (
    "refused", "timeout", "dns", "private", "http", "content-type", "content", "too-big", "redirect", "failed")


class VerificationFailed(Exception):
    """The domain did not prove ownership. ``message`` is what the page shows (the same for every
    failure of a fetch); ``reason`` (one of the constants above) and ``detail`` are for the log."""

    def __init__(self, message: str, reason: str = FAILED, detail: str = ""):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.detail = detail or message


# -- the check -------------------------------------------------------------------------------------

def safe_client(reactor: Any, allow_private: bool = False, resolve: Resolve | None = None,
                connect_timeout: float = 10.0, **limits: Any) -> Fetcher:
    """The fetcher verification uses (presence.fetch: checked addresses, bounded head, body and time)."""
    return Fetcher(reactor, allow_private=allow_private, resolve=resolve, timeout=connect_timeout, **limits)


def _public_message(url: str, timeout: float) -> str:
    return (f"{url} did not serve this application's verification key: it must answer HTTP 200 with exactly"
            f" the key as text/plain (at most {MAX_BODY} bytes) within {timeout:g} seconds, from a public"
            f" address, redirecting (if at all) only on the same host. The node's log says what went wrong.")


async def check_domain(http: Any, clock: IReactorTime, domain: str, key: str, timeout: float = 10.0,
                       scheme: str = "http") -> None:
    """Raise VerificationFailed unless the domain serves exactly ``key`` as text/plain within
    ``timeout`` seconds (the whole exchange, redirects and body included).

    ``http`` is a presence.fetch.Fetcher (or a TreqFetcher in tests). What the page shows is the
    same whatever failed (so Verify cannot be used to probe what the node can reach); ``reason`` and
    ``detail`` say what it was, and go to the log."""
    url = f"{scheme}://{domain}/__presence"
    d = ensureDeferred(_check(http, domain, key, url, timeout))
    # Whatever the cancelled fetch fails with, the deadline is reported as a timeout.
    d.addTimeout(timeout, clock, onTimeoutCancel=lambda _, t: Failure(defer.TimeoutError(t)))
    try:
        await d
    except defer.TimeoutError:
        failure = VerificationFailed(_public_message(url, timeout), TIMEOUT,
                                     f"no complete answer within {timeout:g} seconds (timed out)")
        _log(domain, failure)
        raise failure from None
    except VerificationFailed as e:
        e.message = _public_message(url, timeout)
        e.args = (e.message,)
        _log(domain, e)
        raise


def _log(domain: str, failure: VerificationFailed) -> None:
    log.info("verification of {domain} failed ({reason}): {detail}", domain=domain, reason=failure.reason,
             detail=failure.detail, event="verify.failed")


_REASONS = {fetch.PRIVATE: PRIVATE, fetch.DNS: DNS, fetch.REFUSED: REFUSED, fetch.TIMED_OUT: TIMEOUT,
            fetch.BODY_TOO_BIG: TOO_BIG}


async def _get(http: Any, url: str, timeout: float) -> Any:
    try:
        return await http.fetch(url, max_body=MAX_BODY, accept="text/plain", timeout=timeout)
    except FetchFailed as e:
        raise VerificationFailed("", _REASONS.get(e.reason, FAILED), f"could not fetch {url}: {e.detail}") from None


async def _check(http: Any, domain: str, key: str, url: str, timeout: float) -> None:
    host = urlsplit(url).hostname
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        response = await _get(http, url, timeout)
        if response.code not in _REDIRECTS:
            break
        target = urljoin(url, response.header("location"))
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or parts.hostname != host:
            raise VerificationFailed("", REDIRECT, f"{url} redirects to {target[:300] or 'nowhere'}; serve the key"
                                                   f" at {first} itself (a redirect may only stay on {host})")
        url = target
    else:
        raise VerificationFailed("", REDIRECT, f"{first} redirects more than {MAX_REDIRECTS} times")
    if response.code == 404:
        raise VerificationFailed("", HTTP, f"{url} answered HTTP 404 (not found): put the key there")
    if response.code != 200:
        raise VerificationFailed("", HTTP, f"{url} answered HTTP {response.code}; it must answer 200 with the key")
    ctype = response.header("content-type")
    if ctype.split(";")[0].strip().lower() != "text/plain":
        raise VerificationFailed("", CONTENT_TYPE,
                                 f"{url} has content type {ctype[:100] or 'none'!r}; serve it as text/plain")
    found = response.body.strip()
    if not hmac.compare_digest(found, key.encode("ascii")):
        hint = f" (it holds {len(found)} characters, the key has {len(key)})" if len(found) != len(key) else ""
        raise VerificationFailed("", CONTENT, f"{url} does not hold this application's verification key{hint}")


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
