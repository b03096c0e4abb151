"""JSON over HTTP for the few requests the clients make (pairing, notifications, queries).

The standard library's urllib in a worker thread: these requests are rare, and it keeps the
client's dependencies to websockets and cryptography.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

TIMEOUT = 15.0


def _request(method: str, url: str, body: Any, headers: dict[str, str], timeout: float) -> tuple[int, Any, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", "accept": "application/json",
                                              **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, head = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, raw, head = e.code, e.read(), dict(e.headers)
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        answer = {"error": raw.decode(errors="replace")[:200]}
    return status, answer, {k.lower(): v for k, v in head.items()}


async def request_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
                       timeout: float = TIMEOUT) -> tuple[int, Any, dict[str, str]]:
    """(HTTP status, decoded JSON body or None, lower-cased headers); connection errors raise OSError."""
    return await asyncio.to_thread(_request, method, url, body, headers or {}, timeout)
