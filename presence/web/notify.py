"""``POST /<appid>/notification``: an application sends live notifications over HTTP.

Authenticated with ``Authorization: Bearer <API key>`` (never the query string). The body is the
same JSON list as the websocket's ``notify`` message; the answer is the list of per-item results.
Batch-level failures answer an HTTP status with ``{"result": "KO", "errno": N, "error": "..."}``
and store nothing (see docs/protocol.md).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from presence import errors
from presence.errors import PresenceError
from presence.notifications import RateLimited
from presence.store import StoreUnavailable

log = Logger()

MAX_BODY = 256 * 1024

# errno -> HTTP status for failures of the whole request
STATUS = {
    errors.BAD_FIELD: 401, errors.BAD_KEY: 401, errors.UNKNOWN_APP: 404, errors.APP_NOT_VERIFIED: 403,
    errors.APP_NOT_ACTIVE: 403, errors.NOTIFY_MALFORMED: 400, errors.BATCH_TOO_LARGE: 413,
    errors.RATE_LIMITED: 429, errors.UNAVAILABLE: 503,
}


def _bearer(request: Request) -> str | None:
    header = request.getHeader("authorization") or ""
    scheme, _, credentials = header.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


class NotificationEndpoint(Resource):
    isLeaf = True

    def __init__(self, node: Any, app_id: str):
        super().__init__()
        self.node = node
        self.app_id = app_id

    def render_POST(self, request: Request):
        ensureDeferred(self._answer(request))
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        try:
            code, body = 200, await self._handle(request)
        except PresenceError as e:
            code, body = STATUS.get(e.errno, 400), e.reply()
            if isinstance(e, RateLimited):
                request.setHeader(b"retry-after", str(max(1, round(e.retry_after + 0.5))).encode())
            if code == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="presence"')
        except StoreUnavailable:
            code, body = 503, PresenceError(errors.UNAVAILABLE, "the node cannot reach its store; try again shortly").reply()
        except Exception:
            log.failure("notification request failed")
            code, body = 500, PresenceError(errors.UNAVAILABLE, "internal error").reply()
        if request._disconnected:
            return
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode())
        request.finish()

    async def _handle(self, request: Request) -> list[dict]:
        key = _bearer(request)
        if key is None:
            raise PresenceError(errors.BAD_FIELD, "send the API key as Authorization: Bearer <key>")
        # Read before the first wait: a client that gives up meanwhile takes its body with it.
        length = request.getHeader("content-length")
        data = request.content.read(MAX_BODY + 1)
        app = await self.node.apps.authenticate(self.app_id, key)
        if (length and length.isdigit() and int(length) > MAX_BODY) or len(data) > MAX_BODY:
            raise PresenceError(errors.BATCH_TOO_LARGE, f"the body may have at most {MAX_BODY} bytes")
        try:
            body = json.loads(data)
        except ValueError:
            raise PresenceError(errors.NOTIFY_MALFORMED, "the body is not JSON")
        return await self.node.notifier.send(app, body)
