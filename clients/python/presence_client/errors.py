"""What the clients raise instead of retrying: conditions that no reconnection can fix."""

from __future__ import annotations

# Close codes after which reconnecting with the same credentials cannot succeed (docs/protocol.md).
STOP_CLOSE_CODES = {
    4002: "authentication failed (assertion or API key)",
    4003: "unknown application",
    4004: "the application is not verified or not active",
    4006: "the application was deactivated or its key rotated",
    4007: "the person revoked this paired device",
}
REVOKED_CLOSE = 4007
REPLACED_CLOSE = 4000
ERRNO_REVOKED = 16


class PresenceError(Exception):
    """Base of every error the client raises."""


class Stopped(PresenceError):
    """The node refused this client for good (bad key, unknown or inactive application, bad
    assertion): retrying would only be refused again. `code` is the close code, `errno` the error
    number of the node's last KO answer, if any."""

    def __init__(self, message: str, code: int | None = None, errno: int | None = None):
        super().__init__(message)
        self.code = code
        self.errno = errno


class Revoked(Stopped):
    """The person revoked this paired device on `/me` (close 4007, errno 16, or 403 on renewal):
    pair again only if the person wants it."""


class Replaced(Stopped):
    """Another connection of the same device took over (close 4000)."""


class RequestError(PresenceError):
    """A request the node answered with an error: `status` (HTTP, if any), `errno`, `retry_after`."""

    def __init__(self, message: str, status: int | None = None, errno: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.errno = errno
        self.retry_after = retry_after


class PairingError(PresenceError):
    """Pairing ended without a certificate: `error` is the node's word (`access_denied`,
    `expired_token`, ...)."""

    def __init__(self, error: str, message: str | None = None):
        super().__init__(message or error)
        self.error = error


def stop_error(code: int | None, reason: str = "", errno: int | None = None) -> Stopped | None:
    """The exception a close code or errno calls for, or None when reconnecting is right."""
    if code == REVOKED_CLOSE or errno == ERRNO_REVOKED:
        return Revoked(f"revoked: {reason or STOP_CLOSE_CODES[4007]}", code, errno)
    if code == REPLACED_CLOSE:
        return Replaced("another connection of this device took over", code, errno)
    if code in STOP_CLOSE_CODES:
        return Stopped(f"close {code}: {reason or STOP_CLOSE_CODES[code]}", code, errno)
    return None
