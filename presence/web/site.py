"""The pages of a node. For now the front page; the developer and people pages build on it."""

from __future__ import annotations

from typing import Any

from klein import Klein

from presence import __version__
from presence.web.templates import environment


class WebSite:
    app = Klein()

    def __init__(self, node: Any):
        self.node = node
        self.templates = environment()

    @app.route("/", methods=["GET"])
    def index(self, request):
        request.setHeader("content-type", "text/html; charset=utf-8")
        return self.templates.get_template("index.html").render(
            node=self.node.config.node, version=__version__,
            device_url=self.node.config.public_ws_url.rstrip("/") + "/presence",
            app_url=self.node.entry_point("<appid>"))
