"""The one HTTP client for every request the node makes to a host someone else names.

Two features fetch from hosts chosen by people the node does not trust: Verify
(``http://<domain>/__presence``, the domain given by a developer) and identity support documents
(``https://<domain>/.well-known/browserid``, the domain of any email address a device claims, before
it has authenticated). Both go through ``Fetcher.fetch``, which:

- resolves the name itself and checks every address it gets (``address_refusal``): no loopback,
  private, link-local, multicast, unspecified or reserved address, and none embedded in an IPv6
  address (IPv4-mapped, 6to4, Teredo, NAT64). The check is on the resolved address, never on the
  text, so names the resolver reads as numbers (``0x7f.0x1``, ``2130706433``) are caught; the
  connection then goes to the address that was checked, so a second DNS answer cannot move it;
- speaks HTTP/1.1 itself (a GET, ``Connection: close``, no connection reuse) with a parser that
  counts: at most ``max_head`` bytes and ``max_header_lines`` lines of response head (1xx heads and
  chunked trailers included), ``max_body`` bytes of body (chunk framing checked too), and one
  deadline for the whole exchange, resolution and TLS included;
- follows no redirect: a 3xx is returned with its ``Location`` like any other answer, and a caller
  that follows it (Verify, on the same host only) fetches the new URL through ``fetch`` again, so
  the target's addresses are checked like the first ones;
- fails with ``FetchFailed``, whose text is only "the fetch failed": the reason and the detail
  (refused, no DNS, timed out, TLS, head too large...) are attributes for the log, never for the
  client, so the fetch cannot be used to map what the node can reach.

``allow_private`` (``--verify-allow-private``, ``--insecure-identity``) lifts the address rule for
tests and local setups; every other limit stays.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

MAX_HEAD = 16 * 1024       # bytes of response head (status line, headers, 1xx heads, trailers)
MAX_HEADER_LINES = 100
MAX_CHUNK_LINE = 1024      # a chunk-size line, extensions included
TIMEOUT = 10.0

# Why a fetch failed: for the log and the tests, never for the client.
PRIVATE, DNS, REFUSED, TIMED_OUT, TLS, HEAD_TOO_BIG, BODY_TOO_BIG, BAD_RESPONSE, BAD_URL, FAILED = (
    "private", "dns", "refused", "timeout", "tls", "head-too-big", "body-too-big", "bad-response", "bad-url",
    "failed")

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchFailed(Exception):
    """A fetch failed. ``str()`` is what a client may be told ("the fetch failed"); ``reason`` (one of
    the constants above) and ``detail`` are for the log."""

    def __init__(self, reason: str, detail: str):
        super().__init__("the fetch failed")
        self.reason = reason
        self.detail = detail

    def __repr__(self) -> str:
        return f"FetchFailed({self.reason!r}, {self.detail!r})"


@dataclass
class Response:
    """An answer: status, headers (lower-case names, latin-1 text) and the body (read only for the
    codes the caller asked for, else empty)."""

    url: str
    code: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str:
        """The first value of header ``name`` ('' if absent)."""
        values = self.headers.get(name.lower())
        return values[0] if values else ""


# -- addresses -----------------------------------------------------------------------------------------

def _embedded(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried inside an IPv6 one (mapped, 6to4, Teredo server and client, NAT64)."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "not a unicast address"
    if ip.is_private or not ip.is_global:
        return "a private address"
    return None


def address_refusal(address: str) -> str | None:
    """Why the node may not connect to ``address`` (None: it may): it is not a public unicast
    address, or it is an IPv6 address that carries one that is not."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded(ip)
        for v4 in inner:
            why = _refusal(v4)
            if why is not None:
                return why
        if inner and ip in _NAT64:
            return None  # a public IPv4 address through the network's NAT64 gateway
    return _refusal(ip)


Resolve = Callable[[str, int], Awaitable[list[str]]]


def system_resolver(reactor: Any) -> Resolve:
    """getaddrinfo in the reactor's thread pool: every address, in the resolver's order."""

    async def resolve(host: str, port: int) -> list[str]:
        try:
            infos = await deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo, host, port, 0,
                                            socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise error.DNSLookupError(f"{host}: {getattr(e, 'strerror', None) or e}") from None
        return list(dict.fromkeys(info[4][0] for info in infos))

    return resolve


# -- the exchange ----------------------------------------------------------------------------------------

class _Exchange(Protocol):
    """Sends one request and reads one response, counting every byte of it."""

    def __init__(self, request: bytes, url: str, max_head: int, max_lines: int, max_body: int,
                 body_codes: tuple[int, ...]):
        self.request = request
        self.url = url
        self.max_head = max_head
        self.max_lines = max_lines
        self.max_body = max_body
        self.body_codes = body_codes
        self.done: Deferred[Response] = Deferred(lambda _: self._abort())
        self.buffer = bytearray()
        self.head_bytes = 0
        self.head_lines = 0
        self.state = "status"
        self.code = 0
        self.headers: dict[str, list[str]] = {}
        self.body = bytearray()
        self.remaining = 0      # bytes left of a Content-Length body or of the current chunk
        self.finished = False

    # -- connection events --
    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.buffer += data
        try:
            self._parse()
        except FetchFailed as e:
            self._fail(e)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished:
            return
        if self.state == "until-close":
            self._succeed()
            return
        why = reason.value if reason is not None else None
        if _is_tls_error(why):
            self._fail(FetchFailed(TLS, f"TLS failed: {why}"))
        else:
            self._fail(FetchFailed(BAD_RESPONSE, f"the connection closed before the response ended ({self.state})"))

    # -- endings --
    def _abort(self) -> None:
        self.finished = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail(self, e: FetchFailed) -> None:
        if self.finished:
            return
        self._abort()
        self.done.errback(e)

    def _succeed(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.abortConnection()   # Connection: close; nothing more to read
        self.done.callback(Response(self.url, self.code, self.headers, bytes(self.body)))

    # -- parsing --
    def _line(self, limit: int | None = None) -> bytes | None:
        """The next line of the head (counted), or None until it is complete."""
        end = self.buffer.find(b"\n")
        if limit is not None:   # a chunk-size line: limited on its own, not part of the head
            if end < 0:
                if len(self.buffer) > limit:
                    raise FetchFailed(BAD_RESPONSE, f"a chunk-size line longer than {limit} bytes")
                return None
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            if len(line) > limit:
                raise FetchFailed(BAD_RESPONSE, f"a chunk-size line longer than {limit} bytes")
            return line.rstrip(b"\r\n")
        if end < 0:
            if self.head_bytes + len(self.buffer) > self.max_head:
                raise FetchFailed(HEAD_TOO_BIG, f"the response head is larger than {self.max_head} bytes")
            return None
        line = bytes(self.buffer[:end + 1])
        del self.buffer[:end + 1]
        self.head_bytes += len(line)
        self.head_lines += 1
        if self.head_bytes > self.max_head:
            raise FetchFailed(HEAD_TOO_BIG, f"the response head is larger than {self.max_head} bytes")
        if self.head_lines > self.max_lines:
            raise FetchFailed(HEAD_TOO_BIG, f"the response head has more than {self.max_lines} lines")
        return line.rstrip(b"\r\n")

    def _parse(self) -> None:
        while not self.finished:
            state = self.state
            if state == "status":
                line = self._line()
                if line is None:
                    return
                parts = line.split(b" ", 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not (
                        len(parts[1]) == 3 and parts[1].isdigit()):
                    raise FetchFailed(BAD_RESPONSE, f"not an HTTP/1 status line: {line[:80]!r}")
                self.code = int(parts[1])
                self.headers = {}
                self.state = "headers"
            elif state == "headers":
                line = self._line()
                if line is None:
                    return
                if line:
                    self._header(line)
                elif 100 <= self.code < 200:
                    self.state = "status"   # an informational head: the real one follows (counted too)
                else:
                    self._start_body()
            elif state == "length":
                take = min(self.remaining, len(self.buffer))
                self.body += self.buffer[:take]
                del self.buffer[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self._succeed()
                return
            elif state == "until-close":
                self._add_body(bytes(self.buffer))
                self.buffer.clear()
                return
            elif state == "chunk-size":
                line = self._line(MAX_CHUNK_LINE)
                if line is None:
                    return
                size = line.split(b";", 1)[0].strip()
                try:
                    if not size or len(size) > 16:
                        raise ValueError
                    self.remaining = int(size, 16)
                except ValueError:
                    raise FetchFailed(BAD_RESPONSE, f"a bad chunk size: {line[:40]!r}") from None
                if self.remaining == 0:
                    self.state = "trailers"
                else:
                    if len(self.body) + self.remaining > self.max_body:
                        raise FetchFailed(BODY_TOO_BIG, f"the body is larger than {self.max_body} bytes")
                    self.state = "chunk-data"
            elif state == "chunk-data":
                take = min(self.remaining, len(self.buffer))
                self.body += self.buffer[:take]
                del self.buffer[:take]
                self.remaining -= take
                if self.remaining:
                    return
                self.state = "chunk-end"
            elif state == "chunk-end":
                if len(self.buffer) < 2:
                    return
                if self.buffer[:2] != b"\r\n":
                    raise FetchFailed(BAD_RESPONSE, "a chunk not followed by CRLF")
                del self.buffer[:2]
                self.state = "chunk-size"
            elif state == "trailers":
                line = self._line()
                if line is None:
                    return
                if not line:
                    self._succeed()

    def _header(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            raise FetchFailed(BAD_RESPONSE, "a folded header line")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise FetchFailed(BAD_RESPONSE, f"a bad header line: {line[:80]!r}")
        self.headers.setdefault(name.decode("latin-1").lower(), []).append(value.strip().decode("latin-1"))

    def _start_body(self) -> None:
        if self.code not in self.body_codes:
            self._succeed()   # the caller does not want this body: no need to read it
            return
        encodings = ",".join(self.headers.get("transfer-encoding", [])).lower()
        lengths = self.headers.get("content-length", [])
        if encodings:
            if [e.strip() for e in encodings.split(",")] != ["chunked"]:
                raise FetchFailed(BAD_RESPONSE, f"an unsupported transfer-encoding: {encodings[:80]!r}")
            self.state = "chunk-size"
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                raise FetchFailed(BAD_RESPONSE, f"a bad content-length: {lengths[:2]!r}")
            self.remaining = int(lengths[0])
            if self.remaining > self.max_body:
                raise FetchFailed(BODY_TOO_BIG, f"the body is larger than {self.max_body} bytes "
                                                f"(content-length {self.remaining})")
            self.state = "length"
            if self.remaining == 0:
                self._succeed()
        else:
            self.state = "until-close"

    def _add_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.max_body:
            raise FetchFailed(BODY_TOO_BIG, f"the body is larger than {self.max_body} bytes")
        self.body += data


def _is_tls_error(e: Any) -> bool:
    try:
        from OpenSSL import SSL
    except ImportError:   # pragma: no cover - Twisted[tls] is a dependency
        return False
    return isinstance(e, SSL.Error)


# -- the fetcher ----------------------------------------------------------------------------------------------

class Fetcher:
    """Fetches URLs safely (see the module's docstring). One instance per node is enough."""

    def __init__(self, reactor: Any, *, allow_private: bool = False, resolve: Resolve | None = None,
                 timeout: float = TIMEOUT, max_head: int = MAX_HEAD, max_header_lines: int = MAX_HEADER_LINES,
                 clock: Any = None, user_agent: str = "Presence"):
        self.reactor = reactor
        self.clock = clock or reactor
        self.allow_private = allow_private
        self.resolve = resolve or system_resolver(reactor)
        self.timeout = timeout
        self.max_head = max_head
        self.max_header_lines = max_header_lines
        self.user_agent = user_agent

    async def fetch(self, url: str, *, max_body: int, accept: str | None = None, timeout: float | None = None,
                    body_codes: tuple[int, ...] = (200,)) -> Response:
        """GET ``url``: the response (its body read, up to ``max_body`` bytes, only for
        ``body_codes``), or FetchFailed. ``timeout`` (default the fetcher's) bounds all of it."""
        limit = self.timeout if timeout is None else timeout
        d = Deferred.fromCoroutine(self._fetch(url, max_body, accept, body_codes))
        d.addTimeout(limit, self.clock,
                     onTimeoutCancel=lambda _, t: Failure(FetchFailed(TIMED_OUT, f"no complete answer within {t:g}s")))
        try:
            return await d
        except FetchFailed as e:
            log.info("fetch of {url} failed ({reason}): {detail}", url=url[:300], reason=e.reason,
                     detail=e.detail, event="fetch.failed")
            raise

    async def _fetch(self, url: str, max_body: int, accept: str | None, body_codes: tuple[int, ...]) -> Response:
        scheme, host, port, request = self._request(url, accept)
        address = await self._address(host, port)
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: Any = kind(self.reactor, address, port, timeout=max(self.timeout, 1))
        if scheme == "https":
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        exchange = _Exchange(request, url, self.max_head, self.max_header_lines, max_body, body_codes)
        try:
            await endpoint.connect(Factory.forProtocol(lambda: exchange))
        except defer.CancelledError:
            raise
        except error.ConnectionRefusedError as e:
            raise FetchFailed(REFUSED, f"{address} port {port}: connection refused ({e})") from None
        except error.TimeoutError as e:
            raise FetchFailed(TIMED_OUT, f"{address} port {port}: connecting timed out ({e})") from None
        except Exception as e:
            raise FetchFailed(FAILED, f"{address} port {port}: could not connect: {type(e).__name__}: {e}") from None
        return await exchange.done

    def _request(self, url: str, accept: str | None) -> tuple[str, str, int, bytes]:
        if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in url):
            raise FetchFailed(BAD_URL, "the URL has spaces, control or non-ASCII characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchFailed(BAD_URL, f"a bad URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise FetchFailed(BAD_URL, "only http and https URLs with a host and no credentials")
        host = parts.hostname
        default = 443 if parts.scheme == "https" else 80
        port = port or default
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = f"[{host}]" if ":" in host else host
        if port != default:
            host_header += f":{port}"
        lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}", f"User-Agent: {self.user_agent}",
                 "Accept-Encoding: identity", "Connection: close"]
        if accept:
            lines.append(f"Accept: {accept}")
        return parts.scheme, host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    async def _address(self, host: str, port: int) -> str:
        """The address to connect to: resolved, checked, the first allowed one."""
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await self.resolve(host, port)
            except error.DNSLookupError as e:
                raise FetchFailed(DNS, f"{host} does not resolve ({e})") from None
        if not addresses:
            raise FetchFailed(DNS, f"{host} has no address")
        if self.allow_private:
            return addresses[0]
        allowed = [a for a in addresses if address_refusal(a) is None]
        if not allowed:
            named = f"{host} is" if host == addresses[0] else f"{host} is {addresses[0]},"
            raise FetchFailed(PRIVATE, f"{named} {address_refusal(addresses[0])}; only public addresses are fetched")
        return allowed[0]


class TreqFetcher:
    """The same interface over a treq-like client (``treq.testing.StubTreq`` in the in-memory tests).
    No address checks and no head limits: for tests only, never for a node."""

    def __init__(self, http: Any, clock: Any = None, timeout: float = TIMEOUT):
        self.http = http
        self.clock = clock
        self.timeout = timeout

    async def fetch(self, url: str, *, max_body: int, accept: str | None = None, timeout: float | None = None,
                    body_codes: tuple[int, ...] = (200,)) -> Response:
        d = Deferred.fromCoroutine(self._fetch(url, max_body, accept, body_codes))
        if self.clock is not None:
            limit = self.timeout if timeout is None else timeout
            d.addTimeout(limit, self.clock,
                         onTimeoutCancel=lambda _, t: Failure(FetchFailed(TIMED_OUT, f"no answer within {t:g}s")))
        return await d

    async def _fetch(self, url: str, max_body: int, accept: str | None, body_codes: tuple[int, ...]) -> Response:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        headers = {"Accept": [accept]} if accept else {}
        try:
            response = await self.http.get(url, headers=headers, allow_redirects=False, unbuffered=True)
        except (defer.CancelledError, FetchFailed):
            raise
        except error.DNSLookupError as e:
            raise FetchFailed(DNS, str(e)) from None
        except error.ConnectionRefusedError as e:
            raise FetchFailed(REFUSED, str(e)) from None
        except Exception as e:
            raise FetchFailed(FAILED, f"{type(e).__name__}: {e}") from None
        result = Response(url, response.code, {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in response.headers.getAllRawHeaders()})
        if response.code not in body_codes:
            response.deliverBody(_Drop())
            return result
        chunks: list[bytes] = []
        done: Deferred[None] = Deferred()
        state = {"size": 0}

        class Collect(Protocol):
            def dataReceived(self, data: bytes) -> None:
                state["size"] += len(data)
                if state["size"] > max_body:
                    if not done.called:
                        done.errback(FetchFailed(BODY_TOO_BIG, f"the body is larger than {max_body} bytes"))
                    self.transport.stopProducing()
                    return
                chunks.append(data)

            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                if done.called:
                    return
                if reason is None or reason.check(ResponseDone, PotentialDataLoss):
                    done.callback(None)
                else:
                    done.errback(FetchFailed(BAD_RESPONSE, str(reason.value)))

        response.deliverBody(Collect())
        await done
        result.body = b"".join(chunks)
        return result


class _Drop(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()
