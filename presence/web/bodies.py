"""Request bodies: bounded before they are read.

twisted.web reads a whole request body (to memory, or to a temporary file past 100 kB) before any
resource sees the request, so without a bound an anonymous client could make a node store 300 MB
only to be told 401 afterwards. ``limited_site`` builds the Site of a node's HTTP listeners with
requests that refuse a body larger than ``--max-body`` bytes (default 1 MiB, room for a full batch
of notifications): a Content-Length over the limit is answered 413 at once, when the head arrives,
without reading the body; a chunked (or length-less) body is answered 413 as soon as it grows past
the limit. Either way the connection is closed after the answer, and nothing of the request reaches
a resource (so nothing is authenticated or stored). The answer is the JSON of every batch-level
failure: ``{"result": "KO", "errno": 45, "error": "..."}``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request, Site

from presence import errors

log = Logger()

MAX_BODY = 1024 * 1024


class _Sink:
    """Where the refused body goes: nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class LimitedRequest(Request):
    """A Request that refuses bodies past ``max_body`` bytes (set by ``limited_site``)."""

    max_body = MAX_BODY

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._body_size = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._refuse(f"the request body has {length} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self.max_body:
            self._refuse("the request body grew past the limit")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return   # already answered; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self, why: str) -> None:
        self._refused = True
        old, self.content = getattr(self, "content", None), _Sink()
        if old is not None and hasattr(old, "close"):
            old.close()
        # No "100 Continue" for a body we will not take.
        self.requestHeaders.removeHeader(b"expect")
        body = json.dumps({"result": "KO", "errno": errors.BATCH_TOO_LARGE,
                           "error": f"the request body may have at most {self.max_body} bytes"}).encode()
        head = (b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        peer = self.getClientAddress()
        log.info("refused a request body from {peer}: {why} (limit {limit})", peer=getattr(peer, "host", peer),
                 why=why, limit=self.max_body, event="web.body_too_large")
        self.channel.transport.write(head + body)
        self.channel.loseConnection()


def limited_site(resource: Any, max_body: int = MAX_BODY, **kw: Any) -> Site:
    """A Site whose requests refuse bodies larger than ``max_body`` bytes with 413."""
    request = type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
    return Site(resource, requestFactory=request, **kw)
