"""``GET /device``: the browser device, a page a person leaves open so that this browser reports their
status and shows their live notifications (``static/presence-device.js``, ``static/device-page.js``;
docs/clients.md).

Every page's Content-Security-Policy allows connections to its own origin only (``default-src
'self'``); the device page also needs the node's websocket listener, which is another origin (another
port, or another host behind a proxy): its policy names that origin in ``connect-src`` and nothing else.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from presence.web.common import HEADERS

CSP = HEADERS[b"content-security-policy"].decode()
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


def ws_origin(url: str) -> str:
    """The origin (``ws[s]://host[:port]``) of a websocket URL, for a CSP source expression."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            host = ""
    elif not HOST_NAME.fullmatch(host):   # nothing that could end the source expression (a space, ";")
        host = ""
    if parts.scheme not in ("ws", "wss") or not host:
        raise ValueError(f"not a websocket URL: {url!r}")
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def device_csp(public_ws_url: str) -> bytes:
    """The pages' policy with the websocket listener's origin added to what may be connected to."""
    return (CSP.replace("default-src 'self';", f"default-src 'self'; connect-src 'self' {ws_origin(public_ws_url)};", 1)
            .encode())


class DevicePage:
    def __init__(self, site: Any):
        self.site = site
        self.ws = site.config.public_ws_url.rstrip("/") + "/presence"
        try:
            self.csp = device_csp(site.config.public_ws_url)
        except ValueError:   # not a websocket URL (the node warns about its public URLs): the page says so
            self.csp = HEADERS[b"content-security-policy"]

    async def page(self, request: Any) -> bytes:
        body = await self.site.page(request, "device.html", device_ws=self.ws, audience=self.site.public_url)
        request.setHeader(b"content-security-policy", self.csp)
        return body
