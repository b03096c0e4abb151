"""The device page's Content-Security-Policy: the pages' policy, plus the websocket listener's origin in
connect-src (the browser test checks the page itself in Chromium)."""

from __future__ import annotations

import pytest

from presence.web.common import HEADERS
from presence.web.device import device_csp, ws_origin


def test_the_websocket_origin_of_a_public_ws_url():
    assert ws_origin("ws://127.0.0.1:8081") == "ws://127.0.0.1:8081"
    assert ws_origin("wss://presence.example/ws/") == "wss://presence.example"
    assert ws_origin("wss://[2001:db8::1]:443/") == "wss://[2001:db8::1]:443"
    for bad in ("http://presence.example", "ws://", "presence.example:8081", "ws://a b; script-src *"):
        with pytest.raises(ValueError):
            ws_origin(bad)


def test_the_device_page_may_connect_to_the_websocket_listener_and_nothing_else():
    policy = device_csp("wss://presence.example/ws").decode()
    assert policy.startswith("default-src 'self'; connect-src 'self' wss://presence.example; ")
    assert policy.replace("connect-src 'self' wss://presence.example; ", "") == \
        HEADERS[b"content-security-policy"].decode()
