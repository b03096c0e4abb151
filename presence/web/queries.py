"""``GET /<appid>/people`` and ``GET /<appid>/people/<uid>``: an application asks for the current state
of the people who granted it, over HTTP, with its API key (``Authorization: Bearer``, as for
notifications).

The list is paged with an opaque cursor (a keyset position: a page costs the same wherever it starts,
and a person granting or revoking meanwhile moves no other person between pages). Each answer says
``seq``: it holds every change up to that number (a person who changed meanwhile carries their own,
higher, ``seq``), so an application can go on with ``{"since": seq}`` on its websocket.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from presence import errors
from presence.errors import PresenceError
from presence.store import StoreUnavailable
from presence.web.notify import STATUS, _bearer

log = Logger()

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class BadQuery(PresenceError):
    """A query parameter that is not what the API takes (400)."""

    def __init__(self, message: str):
        super().__init__(errors.BAD_FIELD, message)


def encode_cursor(email: str) -> str:
    return base64.urlsafe_b64encode(email.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        email = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadQuery("cursor is not one this API gave")
    if not email or len(cursor) > 1024:
        raise BadQuery("cursor is not one this API gave")
    return email


def _arg(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


class PeopleEndpoint(Resource):
    isLeaf = True

    def __init__(self, node: Any, app_id: str, uid: str | None):
        super().__init__()
        self.node = node
        self.app_id = app_id
        self.uid = uid

    def render_GET(self, request: Request):
        ensureDeferred(self._answer(request))
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        try:
            code, body = 200, await self._handle(request)
        except BadQuery as e:
            code, body = 400, e.reply()
        except PresenceError as e:
            code, body = (404 if e.errno == errors.UNKNOWN_UID else STATUS.get(e.errno, 400)), e.reply()
            if code == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="presence"')
        except StoreUnavailable:
            code, body = 503, PresenceError(errors.UNAVAILABLE, "the node cannot reach its store; try again shortly").reply()
        except Exception:
            log.failure("people query failed", event="people.query_failed")
            code, body = 500, PresenceError(errors.UNAVAILABLE, "internal error").reply()
        if request._disconnected:
            return
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.write(json.dumps(body, separators=(",", ":")).encode())
        request.finish()

    async def _handle(self, request: Request) -> dict:
        key = _bearer(request)
        if key is None:
            raise PresenceError(errors.BAD_FIELD, "send the API key as Authorization: Bearer <key>")
        await self.node.apps.authenticate(self.app_id, key)
        store = self.node.store
        # Read before the state: the state then holds every change up to it.
        seq = await store.last_change()
        if self.uid is not None:
            person = await store.person_state(self.app_id, self.uid)
            if person is None:
                raise PresenceError(errors.UNKNOWN_UID, "no grant for this uid (never granted, or revoked)")
            return {"person": person.as_json(), "seq": seq}
        limit_arg = _arg(request, "limit")
        if limit_arg is None:
            limit = DEFAULT_LIMIT
        elif not limit_arg.isdigit() or not 1 <= int(limit_arg) <= MAX_LIMIT:
            raise BadQuery(f"limit must be an integer from 1 to {MAX_LIMIT}")
        else:
            limit = int(limit_arg)
        cursor = _arg(request, "cursor")
        after = decode_cursor(cursor) if cursor else ""
        # One more than asked: whether there is a next page, without an empty last one.
        people = await store.people_page(self.app_id, after, limit + 1)
        more = len(people) > limit
        people = people[:limit]
        return {"people": [p.as_json() for p in people], "seq": seq,
                "next": encode_cursor(people[-1].email) if more else None}
