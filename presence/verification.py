"""Domain ownership: fetch ``http://<domain>/__presence`` and compare it with the verification key."""

from __future__ import annotations

import hmac
from typing import Any

from twisted.internet.interfaces import IReactorTime

MAX_BODY = 4096  # the key is 1024 characters; a little room for whitespace, no more


class VerificationFailed(Exception):
    """Why the domain did not prove ownership, in words a developer can act on."""


async def check_domain(http: Any, clock: IReactorTime, domain: str, key: str, timeout: float = 10.0,
                       scheme: str = "http") -> None:
    """Raise VerificationFailed unless the domain serves exactly ``key`` as text/plain."""
    url = f"{scheme}://{domain}/__presence"
    try:
        response = await http.get(url, timeout=timeout, allow_redirects=False, reactor=clock)
    except Exception as e:  # connection refused, DNS, timeout: all mean "could not fetch"
        raise VerificationFailed(f"could not fetch {url}: {e.__class__.__name__}: {e}") from e
    if response.code != 200:
        await _discard(response)
        raise VerificationFailed(f"{url} answered HTTP {response.code}; it must answer 200 with the key")
    ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
    if ctype.split(";")[0].strip().lower() != "text/plain":
        await _discard(response)
        raise VerificationFailed(f"{url} has content type {ctype or 'none'!r}; serve it as text/plain")
    body = await _read_limited(response, MAX_BODY)
    if body is None:
        raise VerificationFailed(f"{url} is larger than {MAX_BODY} bytes; it must hold only the key")
    if not hmac.compare_digest(body.strip(), key.encode("ascii")):
        raise VerificationFailed(f"{url} does not hold this application's verification key")


class _TooBig(Exception):
    pass


async def _read_limited(response: Any, limit: int) -> bytes | None:
    """The body, or None past ``limit`` bytes (treq drops the connection when the collector raises)."""
    import treq

    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise _TooBig()
        chunks.append(data)

    try:
        await treq.collect(response, collect)
    except _TooBig:
        return None
    return b"".join(chunks)


async def _discard(response: Any) -> None:
    import treq

    try:
        await treq.collect(response, lambda data: None)
    except Exception:
        pass
