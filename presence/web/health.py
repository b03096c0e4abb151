"""The front of a node's HTTP listeners: /healthz, /readyz and /metrics (what load balancers and
Prometheus ask), ``POST /<appid>/notification`` and ``GET /<appid>/people[/<uid>]`` (the applications'
API), then the pages.

``/healthz``: the process serves (always 200). ``/readyz``: the node can serve: it has started, its
store answers and, with several nodes, its change-log listener is connected (200, else 503). Both
answer a small JSON body. They are mounted in front of the pages on the web listener and, with
/metrics, on the metrics listener.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.internet.defer import ensureDeferred
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request


def _json(request: Request, code: int, body: dict) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode()


class Healthz(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class Readyz(Resource):
    isLeaf = True

    def __init__(self, node: Any):
        super().__init__()
        self.node = node

    def render_GET(self, request: Request):
        async def answer() -> None:
            ready, checks = await self.node.readiness()
            if not request.finished and not request._disconnected:
                request.write(_json(request, 200 if ready else 503, {"ready": ready, **checks}))
                request.finish()

        ensureDeferred(answer())
        return NOT_DONE_YET


class Front(Resource):
    """Health endpoints (and /metrics when given a registry) before ``pages``, which gets every other
    path untouched."""

    def __init__(self, node: Any, pages: Resource | None = None, registry: Any = None):
        super().__init__()
        self.node = node
        self.pages = pages
        self.putChild(b"healthz", Healthz())
        self.putChild(b"readyz", Readyz(node))
        if registry is not None:
            self.putChild(b"metrics", MetricsResource(registry=registry))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if self.pages is None:
            return NoResource()
        if request.postpath == [b"notification"] and request.method == b"POST":
            from presence.web.notify import NotificationEndpoint

            return NotificationEndpoint(self.node, path.decode("utf-8", "replace"))
        if request.postpath[:1] == [b"people"] and len(request.postpath) <= 2 and request.method == b"GET":
            from presence.web.queries import PeopleEndpoint

            uid = request.postpath[1].decode("utf-8", "replace") if len(request.postpath) == 2 else None
            return PeopleEndpoint(self.node, path.decode("utf-8", "replace"), uid)
        # hand the path segment back: the pages route on the whole path
        request.postpath.insert(0, request.prepath.pop())
        return self.pages

    def render(self, request: Request) -> bytes:
        if self.pages is None:
            return NoResource().render(request)
        return self.pages.render(request)
