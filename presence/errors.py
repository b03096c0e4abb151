"""Every error a client can see: errno numbers and websocket close codes (documented in docs/protocol.md)."""

from __future__ import annotations

# errno values carried in {"result": "KO", "errno": N, "error": "..."}
MALFORMED = 1            # not JSON, or not a JSON object
UNKNOWN_TYPE = 2         # "type" missing or not one we know
BAD_FIELD = 3            # a field is missing or has the wrong type or value
NOT_CONNECTED = 4        # a status before a successful connect
ALREADY_CONNECTED = 5    # a second connect on the same socket
BINARY = 6               # binary frames are not part of the protocol
ASSERTION_MALFORMED = 10
ASSERTION_EXPIRED = 11
ASSERTION_AUDIENCE = 12
ASSERTION_ISSUER = 13
ASSERTION_SIGNATURE = 14
ASSERTION_UNAVAILABLE = 15  # the issuer's support document could not be fetched
PAIRING_REVOKED = 16     # a paired device's pairing was revoked on /me (or never existed)
SLOW_DOWN = 20           # a device sends statuses faster than the node allows
BAD_KEY = 30
UNKNOWN_APP = 31
APP_NOT_VERIFIED = 32
APP_NOT_ACTIVE = 33
AUTH_TIMEOUT = 34
NOTIFY_MALFORMED = 40    # the notification batch is not a list of objects
UNKNOWN_UID = 41         # no grant behind this uid (never granted, or revoked)
BAD_MESSAGE = 42         # message missing, not a string, empty or longer than 512 characters
BAD_ACTION = 43          # action not an http(s) URL, or longer than 512 characters
RATE_LIMITED = 44        # the application sends more notifications than the node allows
BATCH_TOO_LARGE = 45     # more items than a batch may hold, or a body too large
UNAVAILABLE = 50         # the store does not answer; try again later

# websocket close codes
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001      # the node is shutting down; reconnect (elsewhere)
CLOSE_UNSUPPORTED = 1003     # binary frame
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009         # sent by presence.ws.server for oversized messages
CLOSE_INTERNAL = 1011        # the store failed
CLOSE_REPLACED = 4000        # the same device connected again; this older socket is closed
CLOSE_AUTH_TIMEOUT = 4001    # no connect/key message in time
CLOSE_AUTH_FAILED = 4002     # bad assertion or bad API key
CLOSE_UNKNOWN_APP = 4003     # no such application
CLOSE_APP_NOT_READY = 4004   # application not verified or not active
CLOSE_TOO_SLOW = 4005        # the application does not read fast enough; its changes wait for it
CLOSE_REVOKED = 4006         # the application was deactivated while connected
CLOSE_DEVICE_REVOKED = 4007  # the person revoked this paired device on /me


class PresenceError(Exception):
    """An error meant for the client: turned into a KO reply (and maybe a close) by the protocol."""

    def __init__(self, errno: int, message: str, close_code: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.close_code = close_code

    def reply(self) -> dict:
        return {"result": "KO", "errno": self.errno, "error": self.message}
