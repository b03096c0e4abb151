"""What every page handler shares: reading forms and JSON, safe redirects, rendering with the
security headers, and the one exception that becomes an error page."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment

MAX_JSON = 64 * 1024

# Every page: no inline script or style (so injected markup cannot run), no framing (the door
# hanger's Accept button must not be clickjacked), no referrer beyond our own pages.
HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
    b"cache-control": b"no-store",
}


class Problem(Exception):
    """Shown to the person as an error page (or a JSON error to the pages' scripts)."""

    def __init__(self, code: int, message: str, title: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds: sent as Retry-After (with 429 and 503)
        self.title = title or {400: "That did not work", 403: "Not allowed", 404: "Not found",
                               429: "Slow down", 503: "Try again in a moment"}.get(code, "Error")


def arg(request: Any, name: str, limit: int = 4096) -> str:
    """A form or query field as text ('' when absent); longer than ``limit`` is a 400."""
    raw = (request.args.get(name.encode()) or [b""])[0]
    if len(raw) > limit * 4:
        raise Problem(400, f"The field {name!r} is far too long.")
    return raw.decode("utf-8", "replace")


def read_json(request: Any) -> dict[str, Any]:
    """The request's JSON object body (the pages' scripts post JSON)."""
    request.content.seek(0)
    data = request.content.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise Problem(400, "The request is too large.")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Problem(400, "The request is not JSON.") from None
    if not isinstance(value, dict):
        raise Problem(400, "The request is not a JSON object.")
    return value


def send_json(request: Any, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    for name, value in HEADERS.items():
        request.setHeader(name, value)
    return json.dumps(body).encode()


def local_path(value: str, default: str = "/") -> str:
    """``value`` if it is a path on this site (so a ``next`` parameter cannot send people away)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    if any(ord(c) < 0x21 or c == "\x7f" for c in value) or len(value) > 2048:
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def redirect(request: Any, url: str) -> bytes:
    """303 See Other: after a POST the browser GETs ``url``."""
    request.setResponseCode(303)
    request.setHeader(b"location", url.encode("utf-8"))
    for name, value in HEADERS.items():
        request.setHeader(name, value)
    return b""


def with_query(path: str, **params: str) -> str:
    return path + ("&" if "?" in path else "?") + urlencode(params)


def when(seconds: float | None) -> str:
    """A time for people: ``2025-01-31 12:03:04 UTC``."""
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float, now: float) -> str:
    delta = max(0, int(now - seconds))
    if delta < 60:
        return "just now" if delta < 5 else f"{delta} s ago"
    if delta < 3600:
        return f"{delta // 60} min ago"
    if delta < 86400:
        return f"{delta // 3600} h ago"
    return f"{delta // 86400} days ago"


def render(env: Environment, request: Any, template: str, code: int = 200, **context: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    for name, value in HEADERS.items():
        request.setHeader(name, value)
    return env.get_template(template).render(**context).encode("utf-8")
