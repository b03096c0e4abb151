"""presence.fetch, the one client for outbound requests, against hostile servers on loopback: endless
headers, endless 1xx heads, bodies and chunks past the limit, silence and drips, TLS to a plain
server; which addresses it refuses (names read as numbers, IPv6 that embeds IPv4); and that a
client is only ever told "the fetch failed"."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from presence import errors, fetch
from presence.fetch import Fetcher, FetchFailed, address_refusal
from presence.identity import IdentityError, SupportDocuments
from presence.verification import VerificationFailed, check_domain


class Scripted(Protocol):
    """A server that answers every request with ``script(self)`` (which writes as it likes)."""

    def __init__(self, server: "Server"):
        self.server = server
        self.started = False

    def connectionMade(self) -> None:
        self.server.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.server.requests.append(data)
        if not self.started and b"\r\n\r\n" in data:
            self.started = True
            self.server.script(self)

    def connectionLost(self, reason=None) -> None:
        self.server.closed += 1
        if self.server.lost is not None and not self.server.lost.called:
            self.server.lost.callback(None)


class Server:
    def __init__(self, script) -> None:
        self.script = script
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self.lost: Deferred | None = Deferred()
        self.sent = 0
        factory = Factory()
        factory.buildProtocol = lambda addr: Scripted(self)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/thing"

    async def stop(self) -> None:
        await self.port.stopListening()


def streaming(self_server_writes):
    """A script that keeps writing what ``chunk()`` gives, as fast as the peer reads, until it closes."""

    def script(p: Scripted) -> None:
        head, chunk = self_server_writes

        class Pump:
            def resumeProducing(self) -> None:
                for _ in range(16):
                    if p.transport is None or p.transport.disconnecting:
                        return
                    data = chunk()
                    p.server.sent += len(data)
                    p.transport.write(data)

            def pauseProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        p.transport.write(head)
        p.transport.registerProducer(Pump(), False)

    return script


def fetcher(**kw) -> Fetcher:
    kw.setdefault("allow_private", True)
    kw.setdefault("timeout", 5)
    return Fetcher(reactor, **kw)


async def failure(coro) -> FetchFailed:
    with pytest.raises(FetchFailed) as e:
        await coro
    assert str(e.value) == "the fetch failed"   # all a client is ever told
    return e.value


# -- hostile servers ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_endless_header_lines_end_in_a_clean_failure_with_bounded_memory():
    n = iter(range(10**9))
    server = Server(streaming((b"HTTP/1.1 200 OK\r\n", lambda: b"X-Header-%d: %s\r\n" % (next(n), b"v" * 200))))
    try:
        f = fetcher()
        e = await failure(f.fetch(server.url, max_body=1000))
        assert e.reason == fetch.HEAD_TOO_BIG and "larger than 16384 bytes" in e.detail
        await server.lost   # the node hung up
        # what was read before giving up: at most the head limit and the socket's buffers, not megabytes
        assert server.sent < 16384 + 4 * 1024 * 1024
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_many_tiny_header_lines_hit_the_line_limit():
    server = Server(streaming((b"HTTP/1.1 200 OK\r\n", lambda: b"a:b\r\n" * 100)))
    try:
        e = await failure(fetcher(max_header_lines=50).fetch(server.url, max_body=1000))
        assert e.reason == fetch.HEAD_TOO_BIG and "more than 50 lines" in e.detail
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_endless_informational_heads_count_towards_the_head():
    server = Server(streaming((b"", lambda: b"HTTP/1.1 100 Continue\r\n\r\n")))
    try:
        e = await failure(fetcher().fetch(server.url, max_body=1000))
        assert e.reason == fetch.HEAD_TOO_BIG
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_line_without_end_is_cut_at_the_head_limit():
    server = Server(streaming((b"HTTP/1.1 200 OK\r\nX: ", lambda: b"y" * 4096)))
    try:
        e = await failure(fetcher(max_head=4096).fetch(server.url, max_body=1000))
        assert e.reason == fetch.HEAD_TOO_BIG
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_bodies_past_the_limit_in_every_framing():
    heads = {
        "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", lambda: b"x" * 4096),
        "close": (b"HTTP/1.1 200 OK\r\n\r\n", lambda: b"x" * 4096),
        "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", lambda: b"10\r\n" + b"x" * 16 + b"\r\n"),
    }
    for name, script in heads.items():
        server = Server(streaming(script))
        try:
            e = await failure(fetcher().fetch(server.url, max_body=1000))
            assert e.reason == fetch.BODY_TOO_BIG, name
        finally:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_endless_chunk_size_line_is_refused():
    server = Server(streaming((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;", lambda: b"e" * 512)))
    try:
        e = await failure(fetcher().fetch(server.url, max_body=1000))
        assert e.reason == fetch.BAD_RESPONSE and "chunk-size line" in e.detail
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_silence_and_a_drip_time_out_on_the_deadline():
    silent = Server(lambda p: None)

    def drip(p: Scripted) -> None:
        def one() -> None:
            if p.transport is not None and not p.transport.disconnecting:
                p.transport.write(b"X")
                reactor.callLater(0.02, one)
        p.transport.write(b"HTTP/1.1 200 OK\r\n")
        one()

    dripping = Server(drip)
    try:
        for server in (silent, dripping):
            started = reactor.seconds()
            e = await failure(fetcher(timeout=0.3).fetch(server.url, max_body=1000))
            assert e.reason == fetch.TIMED_OUT and reactor.seconds() - started < 3
            await server.lost
    finally:
        await silent.stop()
        await dripping.stop()


@pytest_twisted.ensureDeferred
async def test_tls_to_a_server_that_does_not_speak_it_fails_cleanly():
    server = Server(lambda p: None)
    # A plain server: the TLS handshake gets garbage or nothing back.
    server.script = lambda p: (p.transport.write(b"HTTP/1.1 400 No\r\n\r\n"), p.transport.loseConnection())
    try:
        url = server.url.replace("http://", "https://")
        e = await failure(fetcher(timeout=2).fetch(url, max_body=1000))
        assert e.reason in (fetch.TLS, fetch.BAD_RESPONSE, fetch.TIMED_OUT)
    finally:
        await server.stop()


# -- well-formed answers ---------------------------------------------------------------------------------

def answer(data: bytes):
    def script(p: Scripted) -> None:
        p.transport.write(data)
        p.transport.loseConnection()
    return script


@pytest.mark.parametrize("raw, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n", b"abcde"),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end"),
])
@pytest_twisted.ensureDeferred
async def test_well_formed_answers(raw, body):
    server = Server(answer(raw))
    try:
        response = await fetcher().fetch(server.url, max_body=1000, accept="text/plain")
        assert response.code == 200 and response.body == body
        request = server.requests[0]
        assert request.startswith(b"GET /thing HTTP/1.1\r\n") and b"\r\nAccept: text/plain\r\n" in request
        assert b"\r\nConnection: close\r\n" in request
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_redirect_is_returned_not_followed():
    server = Server(answer(b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\nContent-Length: 999999\r\n\r\n"))
    try:
        response = await fetcher().fetch(server.url, max_body=10)
        assert response.code == 302 and response.header("location") == "http://10.0.0.1/" and response.body == b""
        assert server.connections == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_urls_that_could_smuggle_a_header_are_refused():
    for url in ("http://example.com/a\r\nX: y", "http://example.com/ a", "ftp://example.com/", "http://u:p@example.com/"):
        e = await failure(fetcher().fetch(url, max_body=10))
        assert e.reason == fetch.BAD_URL


# -- addresses ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, why", [
    ("2002:7f00:1::1", "a loopback address"),                       # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", "a link-local address"),                  # 6to4 of 169.254.169.254
    ("2002:0a00:0001::1", "a private address"),                     # 6to4 of 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a loopback address"),  # Teredo, client 127.0.0.1
    ("64:ff9b::7f00:1", "a loopback address"),                      # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "a link-local address"),
    ("64:ff9b::5db8:d822", None),                                   # NAT64 of a public address
    ("::7f00:1", "not a unicast address"),                          # IPv4-compatible (deprecated)
    ("::ffff:7f00:1", "a loopback address"),
    ("0.0.0.1", "a private address"), ("255.255.255.255", "not a unicast address"),
    ("198.18.0.1", "a private address"), ("2001:db8::1", "a private address"),
    ("2002:5db8:d822::1", None),                                    # 6to4 of a public address
])
def test_embedded_and_odd_addresses(address, why):
    assert address_refusal(address) == why


@pytest.mark.parametrize("name", ["0x7f.0x1", "2130706433", "0177.0.0.1", "127.1"])
@pytest_twisted.ensureDeferred
async def test_names_the_resolver_reads_as_numbers_are_checked_after_resolving(name):
    server = Server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"))
    try:
        url = server.url.replace("127.0.0.1", name)
        e = await failure(Fetcher(reactor, timeout=5).fetch(url, max_body=10))
        assert e.reason == fetch.PRIVATE and "is 127.0.0.1, a loopback address" in e.detail
        assert server.connections == 0
        # with the escape hatch (tests, local setups) the same name is fetched
        assert (await fetcher().fetch(url, max_body=10)).body == b"hi"
    finally:
        await server.stop()


# -- what the callers tell their clients ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_support_document_of_a_numeric_name_is_not_fetched_and_the_client_learns_nothing():
    support = SupportDocuments(Fetcher(reactor, timeout=5), reactor, insecure=False, timeout=5)
    with pytest.raises(IdentityError) as e:
        await support.document("0x7f.0x1")
    assert e.value.errno == errors.ASSERTION_UNAVAILABLE
    assert e.value.message == "0x7f.0x1: could not fetch https://0x7f.0x1/.well-known/browserid"
    assert "loopback" in e.value.detail


@pytest_twisted.ensureDeferred
async def test_support_documents_and_verify_survive_the_endless_header_server():
    server = Server(streaming((b"HTTP/1.1 200 OK\r\n", lambda: b"X-Pad: " + b"p" * 1000 + b"\r\n")))
    domain = f"127.0.0.1:{server.port.getHost().port}"
    try:
        support = SupportDocuments(fetcher(), reactor, insecure=True, timeout=5)
        with pytest.raises(IdentityError) as e:
            await support.document(domain)
        assert e.value.message == f"{domain}: could not fetch http://{domain}/.well-known/browserid"
        with pytest.raises(VerificationFailed) as v:
            await check_domain(fetcher(), reactor, domain, "k" * 1024, timeout=5)
        assert v.value.reason == "failed" and "larger than 16384 bytes" in v.value.detail
        assert "16384" not in v.value.message and "head" not in v.value.message
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_every_failure_has_the_same_text():
    refused = f"http://127.0.0.1:{(await _closed_port())}/"
    outcomes = [await failure(fetcher().fetch(refused, max_body=1)),
                await failure(Fetcher(reactor).fetch("http://127.0.0.1:9/", max_body=1)),
                await failure(fetcher().fetch("http://nowhere.invalid/", max_body=1))]
    assert [e.reason for e in outcomes] == [fetch.REFUSED, fetch.PRIVATE, fetch.DNS]
    assert {str(e) for e in outcomes} == {"the fetch failed"}


async def _closed_port() -> int:
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    await deferLater(reactor, 0, lambda: None)
    return number
