"""Tell systemd how the node is doing (sd_notify), so ``Type=notify`` units work.

systemd gives a service the address of a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an
abstract socket written with a leading ``@``); the service sends newline-separated ``KEY=value``
lines to it: ``READY=1`` once it serves, ``STOPPING=1`` when it begins to stop, ``STATUS=...`` for
``systemctl status``. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.

Socket activation needs nothing here: Twisted's ``systemd:`` endpoint adopts the listening sockets
systemd passes (``$LISTEN_FDS``/``$LISTEN_PID``/``$LISTEN_FDNAMES``).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.logger import Logger

log = Logger()


def notify_address(env: Mapping[str, str] = os.environ) -> str | bytes | None:
    """The address to send to, or None when not running under a notify-aware supervisor."""
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # Linux abstract namespace
    if address.startswith("/"):
        return address
    return None  # vsock: and other address kinds are not supported


def notify(*lines: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) in one datagram. True if it was sent.

    Never raises and never blocks: a supervisor that cannot be told must not stop the node."""
    address = notify_address(env)
    if address is None:
        return False
    message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as e:
        log.warn("could not notify systemd at {address}: {why}", address=env.get("NOTIFY_SOCKET"), why=e,
                 event="systemd.notify_failed")
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", "STATUS=" + status)


def stopping(status: str = "stopping") -> bool:
    return notify("STOPPING=1", "STATUS=" + status)


def status(text: str) -> bool:
    return notify("STATUS=" + text)
