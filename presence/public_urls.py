"""How a node is reached from outside when the operator does not say: the public URLs derived from
the listeners; and the warning when a public URL that was given cannot reach a local listener.

The public URL is the sign-in links' base and the audience devices' assertions must name, so a node
moved with ``--web tcp:18480`` but still announcing ``http://localhost:8080`` refuses every sign-in
and every device with an audience error. Deriving it from the listener removes that trap; a URL on
another host (a balancer, a proxy) is the operator's word and is not second-guessed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from presence.config import Config

_WILDCARDS = ("", "0.0.0.0", "::")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _listener(description: str) -> tuple[bool, str, int] | None:
    """(TLS?, interface, port) of a tcp: or ssl: strports description with a fixed port; None for
    anything else (unix sockets, systemd's sockets, port 0: nothing to derive from)."""
    from twisted.internet.endpoints import _parse

    try:
        args, kwargs = _parse(description)
    except Exception:  # noqa: BLE001 - check reports descriptions that do not parse
        return None
    kind = str(args[0]).lower() if args else ""
    if kind not in ("tcp", "ssl"):
        return None
    raw = args[1] if len(args) > 1 else kwargs.get("port", "")
    try:
        port = int(raw)
    except (TypeError, ValueError):
        return None
    if not 0 < port < 65536:
        return None
    return kind == "ssl", str(kwargs.get("interface", "")), port


def is_loopback(host: str | None) -> bool:
    """localhost, *.localhost, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def derived_url(description: str, plain: str, secure: str) -> str | None:
    """The URL a listener is reached at from this machine, or None if it cannot be told."""
    listener = _listener(description)
    if listener is None:
        return None
    tls, interface, port = listener
    scheme = secure if tls else plain
    if interface in _WILDCARDS or is_loopback(interface):
        host = "localhost"
    else:
        host = f"[{interface}]" if ":" in interface else interface
    return f"{scheme}://{host}" + ("" if port == _DEFAULT_PORTS[scheme] else f":{port}")


def with_public_urls(config: Config, public_url: str, public_ws_url: str) -> Config:
    """``config`` with the public URLs given, or (when empty) derived from --web and --ws; the
    defaults of Config when a listener gives nothing to derive from."""
    return replace(config,
                   public_url=public_url or derived_url(config.web, "http", "https") or Config.public_url,
                   public_ws_url=public_ws_url or derived_url(config.ws, "ws", "wss") or Config.public_ws_url)


def unreachable(config: Config) -> list[tuple[str, str, str]]:
    """(option, what is wrong, the fix) for each public URL on this machine (a loopback host) that
    no local listener answers: another port, or TLS on one side only."""
    found = []
    for option, url, listen_option, description, plain in (
            ("--public-url", config.public_url, "--web", config.web, "http"),
            ("--public-ws-url", config.public_ws_url, "--ws", config.ws, "ws")):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            continue   # check reports URLs that do not parse
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not is_loopback(parts.hostname):
            continue
        listener = _listener(description)
        if listener is None:
            continue
        tls, _, listening = listener
        port = port or _DEFAULT_PORTS[scheme]
        wants_tls = scheme in ("https", "wss")
        if port == listening and wants_tls == tls:
            continue
        derived = derived_url(description, plain, plain + "s")
        why = (f"port {port}" if port != listening else ("TLS" if wants_tls else "plain text")) + \
              f" on this machine, but {listen_option} is {description}"
        found.append((option, f"{url} names {why}: sign-in links and the audience devices must name point "
                              "where nothing of this node answers",
                      f"leave {option} out (it is then derived: {derived}), or give the URL the listener "
                      "is reached at"))
    return found


def log_unreachable(config: Config, log: Any) -> None:
    """Warn in the start log about each public URL no local listener answers."""
    for option, problem, fix in unreachable(config):
        log.warn("{option}: {problem}; {fix}", option=option, problem=problem, fix=fix, event="node.public_url_unreachable")
