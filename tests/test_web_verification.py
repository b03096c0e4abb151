"""Domain verification: what the check reports for each way a domain can fail (in memory with
StubTreq and a Clock), the safety of the fetch over real loopback sockets (private addresses,
body limit, timeouts, redirects), and the background polling with backoff, driven by a Clock."""

from __future__ import annotations

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.error import DNSLookupError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from presence import verification as v
from presence.apps import Applications
from presence.keys import new_key
from presence.store.base import PENDING, VERIFIED
from presence.fetch import Fetcher, FetchFailed, TreqFetcher
from presence.verification import VerificationFailed, VerificationPoller, address_refusal, check_domain, safe_client
from tests.webnode import KeyServer, free_port

KEY = new_key()


class Domain(Resource):
    """A stub site: ``routes`` maps a path to (code, headers, body); body None never answers."""

    isLeaf = True

    def __init__(self, routes: dict[bytes, tuple[int, dict[bytes, bytes], bytes | None]]):
        super().__init__()
        self.routes = routes
        self.requests: list[bytes] = []

    def render(self, request):
        self.requests.append(request.uri)
        code, headers, body = self.routes.get(request.path, (404, {b"content-type": b"text/html"}, b"no"))
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        if body is None:
            return NOT_DONE_YET
        return body


TEXT = {b"content-type": b"text/plain; charset=utf-8"}
GENERIC = v._public_message("http://example.com/__presence", 10)


async def check(routes, key=KEY, clock=None) -> VerificationFailed | None:
    try:
        await check_domain(TreqFetcher(StubTreq(Domain(routes))), clock or Clock(), "example.com", key, timeout=10)
    except VerificationFailed as e:
        return e
    return None


@pytest_twisted.ensureDeferred
async def test_the_key_as_text_plain_verifies_whitespace_around_it_too():
    assert await check({b"/__presence": (200, TEXT, KEY.encode() + b"\r\n")}) is None
    assert await check({b"/__presence": (200, {b"content-type": b"text/plain"}, b"  " + KEY.encode())}) is None


@pytest.mark.parametrize("routes, reason, words", [
    ({}, v.HTTP, "answered HTTP 404 (not found)"),
    ({b"/__presence": (500, TEXT, b"oops")}, v.HTTP, "answered HTTP 500"),
    ({b"/__presence": (200, {b"content-type": b"text/html"}, KEY.encode())}, v.CONTENT_TYPE,
     "content type 'text/html'; serve it as text/plain"),
    ({b"/__presence": (200, TEXT, b"hello")}, v.CONTENT,
     "does not hold this application's verification key (it holds 5 characters, the key has 1024)"),
    ({b"/__presence": (200, TEXT, KEY[:-1].encode() + b"!")}, v.CONTENT, "does not hold this application's"),
    ({b"/__presence": (200, TEXT, b"x" * 5000)}, v.TOO_BIG, "larger than 4096 bytes"),
    ({b"/__presence": (302, {b"location": b"http://evil.example/__presence"}, b"")}, v.REDIRECT,
     "redirects to http://evil.example/__presence; serve the key at http://example.com/__presence itself"),
    ({b"/__presence": (301, {b"location": b"ftp://example.com/key"}, b"")}, v.REDIRECT, "redirects to ftp://"),
    ({b"/__presence": (302, {b"location": b"/__presence"}, b"")}, v.REDIRECT, "redirects more than 3 times"),
])
@pytest_twisted.ensureDeferred
async def test_each_failure_says_why_in_the_log_and_the_same_on_the_page(routes, reason, words):
    failure = await check(routes)
    assert failure is not None and failure.reason == reason
    assert words in failure.detail  # for the log
    assert failure.message == GENERIC  # the page: the same whatever failed (no probing through Verify)
    assert KEY not in failure.message and KEY not in failure.detail  # nothing of the key shown or logged


@pytest_twisted.ensureDeferred
async def test_a_redirect_on_the_same_host_is_followed():
    routes = {b"/__presence": (301, {b"location": b"/.well-known/presence"}, b""),
              b"/.well-known/presence": (302, {b"location": b"https://example.com/key.txt"}, b""),
              b"/key.txt": (200, TEXT, KEY.encode())}
    assert await check(routes) is None


@pytest_twisted.ensureDeferred
async def test_a_site_that_never_answers_times_out_on_the_clock():
    clock = Clock()
    site = TreqFetcher(StubTreq(Domain({b"/__presence": (200, TEXT, None)})))
    from twisted.internet.defer import ensureDeferred

    result = ensureDeferred(check_domain(site, clock, "example.com", KEY, timeout=10))
    clock.advance(9.9)
    assert not result.called
    clock.advance(0.2)
    failure = (await result.addErrback(lambda f: f.value)) if result.called else None
    assert isinstance(failure, VerificationFailed) and failure.reason == v.TIMEOUT
    assert "within 10 seconds (timed out)" in failure.detail and failure.message == GENERIC


# -- the safe client over real loopback sockets -------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_loopback_is_refused_unless_allowed():
    server = KeyServer()
    server.serve(KEY)
    try:
        for domain in (server.domain, f"localhost:{server.port.getHost().port}"):
            with pytest.raises(VerificationFailed) as e:
                await check_domain(safe_client(reactor), reactor, domain, KEY, timeout=5)
            assert e.value.reason == v.PRIVATE and "a loopback address" in e.value.detail
            assert e.value.message == v._public_message(f"http://{domain}/__presence", 5)
        assert server.resource.fetches == 0  # refused before connecting
        await check_domain(safe_client(reactor, allow_private=True), reactor, server.domain, KEY, timeout=5)
        assert server.resource.fetches == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_closed_port_is_refused():
    with pytest.raises(VerificationFailed) as e:
        await check_domain(safe_client(reactor, allow_private=True), reactor, f"127.0.0.1:{(port := free_port())}", KEY)
    assert e.value.reason == v.REFUSED and "connection refused" in e.value.detail
    assert e.value.message == v._public_message(f"http://127.0.0.1:{port}/__presence", 10)


@pytest_twisted.ensureDeferred
async def test_a_name_that_does_not_resolve():
    async def nowhere(host, port):
        raise DNSLookupError(host)

    with pytest.raises(VerificationFailed) as e:
        await check_domain(safe_client(reactor, resolve=nowhere), reactor, "nowhere.example", KEY)
    assert e.value.reason == v.DNS and "does not resolve" in e.value.detail
    assert e.value.message == v._public_message("http://nowhere.example/__presence", 10)


class _Endless(Protocol):
    """Answers 200 text/plain and then sends megabytes (or nothing at all, with ``silent``)."""

    silent = False

    def dataReceived(self, data: bytes) -> None:
        if self.silent or b"\r\n\r\n" not in data:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
        self.transport.write(b"x" * 1_000_000)


@pytest_twisted.ensureDeferred
async def test_a_huge_body_is_cut_off_and_a_silent_server_times_out():
    factory = Factory.forProtocol(_Endless)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    domain = f"127.0.0.1:{port.getHost().port}"
    try:
        with pytest.raises(VerificationFailed) as e:
            await check_domain(safe_client(reactor, allow_private=True), reactor, domain, KEY, timeout=5)
        assert e.value.reason == v.TOO_BIG
        _Endless.silent = True
        with pytest.raises(VerificationFailed) as e:
            await check_domain(safe_client(reactor, allow_private=True), reactor, domain, KEY, timeout=0.3)
        assert e.value.reason == v.TIMEOUT
    finally:
        _Endless.silent = False
        await port.stopListening()


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
    ("10.1.2.3", "a private address"), ("192.168.0.10", "a private address"), ("172.16.5.4", "a private address"),
    ("100.64.0.1", "a private address"), ("fc00::1", "a private address"),
    ("169.254.169.254", "a link-local address"), ("fe80::1", "a link-local address"),
    ("::ffff:10.0.0.1", "a private address"), ("::ffff:127.0.0.1", "a loopback address"),
    ("0.0.0.0", "not a unicast address"), ("224.0.0.1", "not a unicast address"),
    ("93.184.216.34", None), ("2606:2800:220:1:248:1893:25c8:1946", None),
])
def test_which_addresses_verification_may_fetch(address, why):
    assert address_refusal(address) == why


@pytest_twisted.ensureDeferred
async def test_the_connection_goes_to_the_address_that_was_checked():
    memory = MemoryReactor()
    answers = {"mixed.example": ["10.0.0.1", "93.184.216.34"], "private.example": ["10.0.0.1", "192.168.1.1"]}

    async def resolve(host, port):
        return answers[host]

    fetcher = Fetcher(memory, resolve=resolve, timeout=3, clock=Clock())
    fetcher.fetch("http://mixed.example:8080/__presence", max_body=10).close()  # only the connect matters
    pending = fetcher.fetch("http://mixed.example:8080/__presence", max_body=10)
    from twisted.internet.defer import ensureDeferred

    d = ensureDeferred(pending)
    host, port, _, timeout, _ = memory.tcpClients[-1]
    assert (host, port, timeout) == ("93.184.216.34", 8080, 3)  # the public one, never the private one
    d.cancel()
    d.addErrback(lambda f: None)
    with pytest.raises(FetchFailed) as e:
        await fetcher.fetch("http://private.example/__presence", max_body=10)
    assert e.value.reason == "private" and "private.example is 10.0.0.1, a private address" in e.value.detail
    assert str(e.value) == "the fetch failed"
    assert len(memory.tcpClients) == 1


# -- polling in the background ----------------------------------------------------------------------------

class Outcomes:
    """A scripted check: each call takes the next outcome (None: verified, text: fails with it)."""

    def __init__(self, clock: Clock, *outcomes: str | None):
        self.clock = clock
        self.outcomes = list(outcomes)
        self.calls: list[float] = []

    async def __call__(self, app) -> None:
        self.calls.append(self.clock.seconds())
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise VerificationFailed(outcome, v.HTTP)


async def setup(store, *outcomes, duration=3600.0, node="node-a"):
    clock = Clock()
    clock.advance(1000)
    apps = Applications(store, clock, allow_ports=True)
    app = await apps.register("dev@example.com", "example.com", "Example", "")
    script = Outcomes(clock, *outcomes)
    poller = VerificationPoller(store, apps, clock, node, script, duration=duration, first_delay=10, max_delay=40)
    return clock, app, script, poller


async def tick(clock: Clock, poller: VerificationPoller, seconds: float) -> None:
    clock.advance(seconds)
    await poller.wait()


@pytest_twisted.ensureDeferred
async def test_verify_that_works_at_once(sqlite_store):
    clock, app, script, poller = await setup(sqlite_store, None)
    verified, failure = await poller.verify(app)
    assert failure is None and verified.state == VERIFIED and verified.app_id
    assert await sqlite_store.get_verification(app.id) is None and not poller.timers


@pytest_twisted.ensureDeferred
async def test_polling_backs_off_and_verifies_without_another_click(sqlite_store):
    clock, app, script, poller = await setup(sqlite_store, "HTTP 404", "HTTP 404", "HTTP 404", "HTTP 404", None)
    _, failure = await poller.verify(app)
    assert failure.message == "HTTP 404"
    state = await sqlite_store.get_verification(app.id)
    assert (state.attempts, state.checked_at, state.next_at, state.poll_until) == (1, 1000, 1010, 4600)
    await tick(clock, poller, 10)
    assert (await sqlite_store.get_verification(app.id)).next_at == 1030  # 20 s later
    await tick(clock, poller, 20)
    assert (await sqlite_store.get_verification(app.id)).next_at == 1070  # 40 s later
    await tick(clock, poller, 40)
    assert (await sqlite_store.get_verification(app.id)).next_at == 1110  # capped at 40 s
    await tick(clock, poller, 40)
    assert script.calls == [1000, 1010, 1030, 1070, 1110]
    app = await sqlite_store.get_app_by_id(app.id)
    assert app.state == VERIFIED and app.app_id
    assert await sqlite_store.get_verification(app.id) is None and not poller.timers


@pytest_twisted.ensureDeferred
async def test_polling_gives_up_after_its_time(sqlite_store):
    clock, app, script, poller = await setup(sqlite_store, *["refused"] * 10, duration=60)
    await poller.verify(app)
    for _ in range(10):
        await tick(clock, poller, 10)
    assert script.calls == [1000, 1010, 1030, 1060]  # the last one at the end of the window
    state = await sqlite_store.get_verification(app.id)
    assert state.next_at is None and state.attempts == 4 and state.last_error == "refused"
    assert (await sqlite_store.get_app_by_id(app.id)).state == PENDING and not poller.timers
    assert await sqlite_store.list_verifications("node-a") == []


@pytest_twisted.ensureDeferred
async def test_a_new_click_starts_a_new_window(sqlite_store):
    clock, app, script, poller = await setup(sqlite_store, "a", "b", "c", duration=100)
    await poller.verify(app)
    await tick(clock, poller, 10)
    clock.advance(5)
    await poller.verify(app)
    state = await sqlite_store.get_verification(app.id)
    assert (state.attempts, state.checked_at, state.next_at, state.poll_until) == (1, 1015, 1025, 1115)
    assert list(poller.timers) == [app.id]


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_resumes_its_polls(sqlite_store):
    clock, app, script, poller = await setup(sqlite_store, "HTTP 404")
    await poller.verify(app)
    poller.stop()  # the node stops
    assert not poller.timers
    clock.advance(4)
    again = VerificationPoller(sqlite_store, poller.apps, clock, "node-a", Outcomes(clock, None), duration=3600,
                               first_delay=10, max_delay=40)
    other = VerificationPoller(sqlite_store, poller.apps, clock, "node-b", Outcomes(clock), duration=3600)
    assert await other.resume() == 0
    assert await again.resume() == 1
    await tick(clock, again, 5.9)
    assert again.check.calls == []
    await tick(clock, again, 0.1)
    assert again.check.calls == [1010]
    assert (await sqlite_store.get_app_by_id(app.id)).state == VERIFIED


@pytest_twisted.ensureDeferred
async def test_an_application_verified_meanwhile_stops_the_poll(sqlite_store):
    clock, app, script, poller = await setup(sqlite_store, "HTTP 404")
    await poller.verify(app)
    await poller.apps.mark_verified(app)  # presence-admin apps verify --force
    await tick(clock, poller, 10)
    assert script.calls == [1000]
    assert await sqlite_store.get_verification(app.id) is None and not poller.timers


@pytest_twisted.ensureDeferred
async def test_stopping_cancels_the_check_under_way(sqlite_store):
    clock = Clock()
    clock.advance(1000)
    apps = Applications(sqlite_store, clock, allow_ports=True)
    app = await apps.register("dev@example.com", "example.com", "Example", "")
    started: list[Deferred] = []

    async def check(app) -> None:
        if not started:
            started.append(succeed(None))
            raise VerificationFailed("HTTP 404", v.HTTP)
        started.append(Deferred())  # this one never answers
        await started[-1]

    poller = VerificationPoller(sqlite_store, apps, clock, "node-a", check, first_delay=10)
    await poller.verify(app)
    clock.advance(10)
    for _ in range(100):
        if len(started) == 2:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert len(poller.inflight) == 1
    poller.stop()
    await poller.wait()
    assert not poller.inflight and not poller.timers
    assert (await sqlite_store.get_verification(app.id)).attempts == 1
